"""Retailers and clients."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from cloud_hub.api.deps import Caller, Service
from cloud_hub.api.models import ClientAnswer, ClientsStored, RetailerAnswer, errors
from mhp_wire.ids import ID_PATTERN

router = APIRouter(prefix="/v1", tags=["registry"])

IdPath = Annotated[str, Path(pattern=ID_PATTERN)]


class RetailerBody(BaseModel):
    """A retailer's registration."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)


class ClientBody(BaseModel):
    """A client's registration; a different ``retailer_id`` with a later ``valid_from`` is a supplier switch."""

    model_config = ConfigDict(extra="forbid")
    retailer_id: str = Field(pattern=ID_PATTERN)
    contracted_power_kw: float = Field(gt=0, le=10_000)
    feeder_id: str | None = Field(None, max_length=64)
    valid_from: AwareDatetime | None = None


class ClientItem(ClientBody):
    """One client of a bulk registration."""

    client_id: str = Field(pattern=ID_PATTERN)


class ClientsBody(BaseModel):
    """Many clients at once (a DSO's import); each client id at most once."""

    model_config = ConfigDict(extra="forbid")
    clients: list[ClientItem] = Field(min_length=1, max_length=10_000)

    @model_validator(mode="after")
    def _unique(self) -> ClientsBody:
        counts = Counter(c.client_id for c in self.clients)
        twice = sorted(cid for cid, n in counts.items() if n > 1)
        if twice:
            raise ValueError(f"client id(s) given more than once: {', '.join(twice[:20])}")
        return self


@router.put("/retailers/{retailer_id}", response_model=RetailerAnswer,
            responses={201: {"model": RetailerAnswer, "description": "a new retailer"}, **errors(403)})
async def put_retailer(retailer_id: IdPath, body: RetailerBody, who: Caller, service: Service,
                       response: Response) -> dict[str, str]:
    """Register or rename a retailer (admin, dso); a new one is sent the current tariff (``tariff_request_id``)."""
    created = await service.registry.put_retailer(who, retailer_id, body.name)
    response.status_code = 201 if created else 200
    answer = {"retailer_id": retailer_id, "name": body.name}
    if created:
        delivery = await service.tariffs.deliver_current_tariff(who, retailer_id)
        if delivery is not None:
            answer["tariff_request_id"] = delivery
    return answer


@router.put("/clients/{client_id}", response_model=ClientAnswer,
            responses={201: {"model": ClientAnswer, "description": "a new client"}, **errors(403, 404, 409)})
async def put_client(client_id: IdPath, body: ClientBody, who: Caller, service: Service,
                     response: Response) -> dict[str, object]:
    """Register or change a client (dso); a change of its supplier history is announced to the retailers concerned
    by the request ``customer_change_request_id`` (follow it with ``GET /v1/requests/{id}``)."""
    registered = await service.registry.register_client(who, client_id, body.model_dump())
    response.status_code = 201 if registered.created else 200
    answer = await service.registry.get_client(who, client_id)
    if registered.customer_change_request_id is not None:
        answer["customer_change_request_id"] = registered.customer_change_request_id
    return answer


@router.put("/clients", response_model=ClientsStored, responses=errors(403, 404, 409))
async def put_clients(body: ClientsBody, who: Caller, service: Service) -> dict[str, int]:
    """Register or change up to 10,000 clients in one call, all or nothing (dso)."""
    return await service.registry.put_clients(who, [c.model_dump() for c in body.clients])


@router.get("/clients/{client_id}", response_model=ClientAnswer, responses=errors(403, 404))
async def get_client(client_id: IdPath, who: Caller, service: Service) -> dict[str, object]:
    """A client with its supplier history (dso; its current retailer)."""
    return await service.registry.get_client(who, client_id)
