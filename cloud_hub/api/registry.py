"""Retailers and clients."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from cloud_hub.api.deps import Caller, Service

router = APIRouter(prefix="/v1", tags=["registry"])

IdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]


class RetailerBody(BaseModel):
    """A retailer's registration."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)


class ClientBody(BaseModel):
    """A client's registration; a different ``retailer_id`` with a later ``valid_from`` is a supplier switch."""

    model_config = ConfigDict(extra="forbid")
    retailer_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    contracted_power_kw: float = Field(gt=0, le=10_000)
    feeder_id: str | None = Field(None, max_length=64)
    valid_from: AwareDatetime | None = None


@router.put("/retailers/{retailer_id}")
async def put_retailer(retailer_id: IdPath, body: RetailerBody, who: Caller, service: Service,
                       response: Response) -> dict[str, str]:
    """Register or rename a retailer (admin, dso)."""
    created = await service.put_retailer(who, retailer_id, body.name)
    response.status_code = 201 if created else 200
    return {"retailer_id": retailer_id, "name": body.name}


@router.put("/clients/{client_id}")
async def put_client(client_id: IdPath, body: ClientBody, who: Caller, service: Service,
                     response: Response) -> dict[str, object]:
    """Register or change a client (dso)."""
    created = await service.put_client(who, client_id, body.model_dump())
    response.status_code = 201 if created else 200
    return await service.get_client(who, client_id)


@router.get("/clients/{client_id}")
async def get_client(client_id: IdPath, who: Caller, service: Service) -> dict[str, object]:
    """A client with its supplier history (dso; its current retailer)."""
    return await service.get_client(who, client_id)
