"""What the DSO's console reads: the platform now, the client registry, a feeder's measured power, its requests."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import AwareDatetime

from cloud_hub.api.deps import Caller
from cloud_hub.api.health import readiness
from cloud_hub.api.models import Document, Page, errors
from cloud_hub.views import PAGE_MAX, ConsoleViews
from mhp_wire.ids import ID_PATTERN

router = APIRouter(prefix="/v1", tags=["console"])

FEEDER_PATTERN = r"^[^|]{1,64}$"
"""A feeder id as registered (``PUT /v1/clients``: up to 64 characters); ``|`` separates the feeders index's keys."""
REQUEST_CURSOR = r"^[0-9]{15}\|[A-Za-z0-9_.\-]{1,64}$"
Limit = Annotated[int, Query(ge=1, le=PAGE_MAX)]
RequestStateName = Literal["accepted", "dispatching", "completed", "partially_completed", "failed", "expired",
                           "cancelled"]
RequestType = Literal["emergency", "load_shift", "load_reduction", "billing", "tariff", "customers"]


async def get_views(request: Request) -> ConsoleViews:
    """The console's views, opened in the app's lifespan."""
    views: ConsoleViews = request.app.state.views
    return views


Views = Annotated[ConsoleViews, Depends(get_views)]


@router.get("/status", response_model=Document, responses=errors(403))
async def status(request: Request, who: Caller, views: Views) -> dict[str, Any]:
    """The platform now: retailers online or offline and since when, open requests by type and state, refusals and
    errors in the last hour, the hub's readiness (dso)."""
    views.authorize_status(who)
    return await views.status(who, await readiness(request.app.state))


@router.get("/clients", response_model=Page, responses=errors(403))
async def list_clients(who: Caller, views: Views,
                       feeder_id: Annotated[str | None, Query(pattern=FEEDER_PATTERN)] = None,
                       retailer_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
                       limit: Limit = 100,
                       after: Annotated[str | None, Query(pattern=ID_PATTERN)] = None) -> dict[str, Any]:
    """The client registry in client-id order, paged by ``after`` (the ``next_after`` of the previous page), each
    client with its current retailer, contracted power, feeder and supplier history (dso)."""
    return await views.clients(who, feeder_id=feeder_id, retailer_id=retailer_id, limit=limit, after=after)


@router.get("/feeders/{feeder_id}/measurements", response_model=Document, responses=errors(403, 404))
async def feeder_measurements(feeder_id: Annotated[str, Path(pattern=FEEDER_PATTERN)], who: Caller, views: Views,
                              from_: Annotated[AwareDatetime, Query(alias="from")],
                              to: Annotated[AwareDatetime, Query()],
                              step_s: Annotated[int, Query(ge=1, le=86_400)] = 60) -> dict[str, Any]:
    """A feeder's measured active power per bucket of ``step_s``: each client's mean in the bucket, summed, with
    how many clients reported (dso)."""
    return await views.feeder_measurements(who, feeder_id, from_.timestamp(), to.timestamp(), step_s)


@router.get("/requests", response_model=Page, responses=errors(403))
async def list_requests(who: Caller, views: Views, state: RequestStateName | None = None,
                        kind: Annotated[RequestType | None, Query(alias="type")] = None,
                        since: Annotated[AwareDatetime | None, Query()] = None, limit: Limit = 100,
                        after: Annotated[str | None, Query(pattern=REQUEST_CURSOR)] = None) -> dict[str, Any]:
    """The caller's requests, newest first, paged by ``after`` (the ``next_after`` of the previous page) (dso)."""
    return await views.requests(who, state=state, kind=kind, since=None if since is None else since.timestamp(),
                                limit=limit, after=after)
