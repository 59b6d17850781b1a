"""DSO requests: creating them, following them to their last client, cancelling them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from cloud_hub.api.deps import Caller, IdempotencyKey, Service
from cloud_hub.service import InvalidBody
from mhp_wire.ids import ID_PATTERN

router = APIRouter(prefix="/v1", tags=["requests"])

ClientId = Annotated[str, Field(pattern=ID_PATTERN)]
RequestId = Annotated[str, Path(max_length=64)]


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


class LoadShiftBody(Targets):
    """Load information: move flexible loads out of the window."""

    window_start: AwareDatetime
    window_end: AwareDatetime
    reason: str | None = Field(None, max_length=500)


class LoadReductionBody(Targets):
    """Reduce load by ``reduction_kw`` from ``start`` for ``duration_s``; retailers answer within the time given."""

    reduction_kw: float = Field(gt=0, le=1_000_000)
    start: AwareDatetime
    duration_s: int = Field(gt=0, le=7 * 24 * 3600)
    respond_within_s: float = Field(gt=0, le=3600)


class BillingBody(BaseModel):
    """Deliver billing data of these clients for a period to the retailer(s) that supplied them."""

    model_config = ConfigDict(extra="forbid")
    client_ids: list[ClientId] = Field(min_length=1, max_length=100_000)
    period_start: AwareDatetime
    period_end: AwareDatetime


class TariffPeriodBody(BaseModel):
    """A price for a time span."""

    model_config = ConfigDict(extra="forbid")
    start: AwareDatetime
    end: AwareDatetime
    price_eur_per_kwh: float = Field(ge=-10, le=100)


class TariffBody(BaseModel):
    """A network tariff calendar."""

    model_config = ConfigDict(extra="forbid")
    tariff_id: ClientId
    valid_from: AwareDatetime
    valid_to: AwareDatetime
    periods: list[TariffPeriodBody] = Field(min_length=1, max_length=10_000)


class RevisionBody(BaseModel):
    """The fields of a request that a revision changes (which ones a type allows: docs/decisions.md)."""

    model_config = ConfigDict(extra="forbid")
    client_ids: list[ClientId] | None = Field(None, min_length=1, max_length=100_000)
    feeder_id: str | None = Field(None, min_length=1, max_length=64)
    start: AwareDatetime | None = None
    duration_s: int | None = Field(None, gt=0, le=7 * 24 * 3600)
    power_limit_kw: float | None = Field(None, ge=0, le=10_000)
    window_start: AwareDatetime | None = None
    window_end: AwareDatetime | None = None
    reason: str | None = Field(None, max_length=500)
    reduction_kw: float | None = Field(None, gt=0, le=1_000_000)

    @model_validator(mode="after")
    def _changes_something(self) -> RevisionBody:
        if not self.model_dump(exclude_none=True):
            raise ValueError("give at least one field to change")
        return self


_BODIES: dict[str, type[BaseModel]] = {"emergency": EmergencyBody, "load_shift": LoadShiftBody,
                                       "load_reduction": LoadReductionBody}


def validate_body(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """A whole request body of type ``kind`` validated by the model its creating POST uses."""
    try:
        return _BODIES[kind].model_validate(body).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise InvalidBody([{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                           for e in exc.errors()]) from None


def _answer(response: Response, result: tuple[int, dict[str, Any]]) -> dict[str, Any]:
    response.status_code = result[0]
    return result[1]


@router.post("/emergencies", status_code=202)
async def post_emergency(body: EmergencyBody, who: Caller, service: Service, response: Response,
                         idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Announce an emergency to the targeted clients, before it takes effect (dso)."""
    return _answer(response, await service.create_emergency(who, body.model_dump(exclude_none=True), idempotency_key))


@router.post("/load-shifts", status_code=202)
async def post_load_shift(body: LoadShiftBody, who: Caller, service: Service, response: Response,
                          idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Ask the targeted clients to shift flexible loads out of a window (dso)."""
    return _answer(response, await service.create_load_shift(who, body.model_dump(exclude_none=True),
                                                             idempotency_key))


@router.post("/load-reductions", status_code=202)
async def post_load_reduction(body: LoadReductionBody, who: Caller, service: Service, response: Response,
                              idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Two-phase load reduction: availability first, then disconnects until the reduction is covered (dso)."""
    return _answer(response, await service.create_load_reduction(who, body.model_dump(exclude_none=True),
                                                                 idempotency_key))


@router.post("/billing-data", status_code=202)
async def post_billing(body: BillingBody, who: Caller, service: Service, response: Response,
                       idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Deliver each client's readings of the period to the retailer(s) that supplied it (dso)."""
    return _answer(response, await service.request_billing(who, body.model_dump(), idempotency_key))


@router.post("/tariffs", status_code=202)
async def post_tariff(body: TariffBody, who: Caller, service: Service, response: Response,
                      idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """Publish a network tariff calendar to every retailer and gateway (dso)."""
    return _answer(response, await service.publish_tariff(who, body.model_dump(mode="json"), idempotency_key))


@router.get("/requests/{request_id}")
async def get_request(request_id: RequestId, who: Caller, service: Service) -> dict[str, Any]:
    """A request's state, per-retailer and per-client progress and per-component trace (its issuer)."""
    return await service.get_request(who, request_id)


@router.post("/requests/{request_id}/cancel")
async def cancel_request(request_id: RequestId, who: Caller, service: Service) -> dict[str, Any]:
    """Cancel a request that has not ended; the cancellation reaches every home that got it (its issuer)."""
    return await service.cancel(who, request_id)


@router.post("/requests/{request_id}/revise", status_code=202)
async def revise_request(request_id: RequestId, body: RevisionBody, who: Caller, service: Service,
                         response: Response, idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
    """A new numbered revision of an emergency, load shift or load reduction that has not ended: the fields that
    change, delivered like the first revision (its issuer)."""
    return _answer(response, await service.revise(who, request_id, body.model_dump(exclude_none=True),
                                                  idempotency_key, validate_body))
