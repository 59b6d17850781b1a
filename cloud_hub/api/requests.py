"""DSO requests: creating them and following them to their last client."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from cloud_hub.api.deps import Caller, IdempotencyKey, Service

router = APIRouter(prefix="/v1", tags=["requests"])

ClientId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]


class Targets(BaseModel):
    """Who a request is for: a list of clients or every client of a feeder."""

    model_config = ConfigDict(extra="forbid")
    client_ids: list[ClientId] | None = Field(None, min_length=1, max_length=100_000)
    feeder_id: str | None = Field(None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one_target(self) -> Targets:
        if not self.client_ids and not self.feeder_id:
            raise ValueError("give client_ids or feeder_id")
        if self.client_ids and self.feeder_id:
            raise ValueError("give client_ids or feeder_id, not both")
        return self


class EmergencyBody(Targets):
    """Emergency mode: hold the targeted homes under ``power_limit_kw`` from ``start`` for ``duration_s``."""

    start: AwareDatetime
    duration_s: int = Field(gt=0, le=7 * 24 * 3600)
    power_limit_kw: float = Field(ge=0, le=10_000)


@router.post("/emergencies", status_code=202)
async def post_emergency(body: EmergencyBody, who: Caller, service: Service, response: Response,
                         idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Announce an emergency to the targeted clients, before it takes effect (dso)."""
    status, answer = await service.create_emergency(who, body.model_dump(exclude_none=True), idempotency_key)
    response.status_code = status
    return answer


@router.get("/requests/{request_id}")
async def get_request(request_id: Annotated[str, Path(max_length=64)], who: Caller,
                      service: Service) -> dict[str, Any]:
    """A request's state, per-retailer and per-client progress and per-component trace (its issuer)."""
    return await service.get_request(who, request_id)
