"""Client data: meter readings, consumption profiles, active-power measurements, the data access log."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from cloud_hub.api.deps import Caller, Service
from cloud_hub.api.models import ReadingsStored, Series, errors
from mhp_wire.ids import ID_PATTERN

router = APIRouter(prefix="/v1", tags=["data"])

ClientId = Annotated[str, Field(pattern=ID_PATTERN)]
Time = Annotated[AwareDatetime, Query()]


class ReadingBlockBody(BaseModel):
    """Consecutive readings of one client: ``values_kwh[i]`` covers ``start + i * resolution_s``."""

    model_config = ConfigDict(extra="forbid")
    client_id: ClientId
    start: AwareDatetime
    resolution_s: int = Field(gt=0, le=86_400)
    values_kwh: list[Annotated[float, Field(ge=0, le=100_000)]] = Field(min_length=1, max_length=10_000)
    quality: Literal["measured", "estimated"] = "measured"


class ReadingsBody(BaseModel):
    """An upload of meter readings."""

    model_config = ConfigDict(extra="forbid")
    readings: list[ReadingBlockBody] = Field(min_length=1, max_length=10_000)


@router.post("/meter-readings", response_model=ReadingsStored, responses=errors(403, 404))
async def post_readings(body: ReadingsBody, who: Caller, service: Service) -> dict[str, Any]:
    """Upload meter readings; a later upload of the same interval is a correction (dso)."""
    return await service.data.upload_readings(who, [r.model_dump() for r in body.readings])


@router.get("/clients/{client_id}/consumption-profile", response_model=Series, responses=errors(403, 404))
async def consumption_profile(
    client_id: Annotated[str, Path(pattern=ID_PATTERN)], who: Caller, service: Service,
    request: Request, from_: Annotated[AwareDatetime, Query(alias="from")], to: Time,
    resolution_s: Annotated[int, Query(gt=0, le=31 * 86_400)] = 900,
) -> dict[str, Any]:
    """A client's consumption series (dso; the retailer that supplied it over the whole range; a party under the
    customer's permission, clipped to it: docs/consent.md)."""
    if who.kind == "party":
        return await request.app.state.consent.consumption_profile(
            who, client_id, from_.timestamp(), to.timestamp(), resolution_s)
    return await service.data.consumption_profile(who, client_id, from_.timestamp(), to.timestamp(), resolution_s)


@router.get("/clients/{client_id}/billing-data", response_model=Series, responses=errors(403, 404))
async def billing_data(client_id: Annotated[str, Path(pattern=ID_PATTERN)], who: Caller, service: Service,
                       request: Request, from_: Annotated[AwareDatetime, Query(alias="from")], to: Time
                       ) -> dict[str, Any]:
    """A client's meter readings as used for its bills (dso; a party under the customer's permission with the
    ``billing_data`` scope, clipped to its period and resolution: docs/consent.md)."""
    if who.kind == "party":
        return await request.app.state.consent.billing_data(who, client_id, from_.timestamp(), to.timestamp())
    return await service.data.billing_data(who, client_id, from_.timestamp(), to.timestamp())


@router.get("/measurements", response_model=Series, responses=errors(403, 404))
async def measurements(client_id: Annotated[str, Query(max_length=64)], who: Caller, service: Service,
                       request: Request, from_: Annotated[AwareDatetime, Query(alias="from")], to: Time
                       ) -> dict[str, Any]:
    """A client's active-power series sent by its retailers (dso; a party under the customer's permission)."""
    if who.kind == "party":
        return await request.app.state.consent.measurements(
            who, client_id, from_.timestamp(), to.timestamp())
    return await service.data.get_measurements(who, client_id, from_.timestamp(), to.timestamp())


@router.get("/audit", response_model=Series, responses=errors(403))
async def audit(client_id: Annotated[str, Query(max_length=64)], who: Caller, service: Service,
                from_: Annotated[AwareDatetime, Query(alias="from")], to: Time) -> dict[str, Any]:
    """The data access log of one client: who read or triggered what, when, under which right (dso)."""
    return await service.data.get_audit(who, client_id, from_.timestamp(), to.timestamp())
