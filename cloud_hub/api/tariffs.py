"""Network tariffs as stored: the one published last, and any version of any tariff (anyone with a token).

The store, not the broker, is the tariff's source: what these answer is what the hub republishes on start and
sends to a retailer registered later (``POST /v1/tariffs`` is with the other requests, in ``requests.py``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from cloud_hub.api.deps import Caller, Service
from cloud_hub.api.models import Document, errors
from mhp_wire.ids import ID_PATTERN

router = APIRouter(prefix="/v1", tags=["tariffs"])

TariffId = Annotated[str, Path(pattern=ID_PATTERN)]


@router.get("/tariffs/current", response_model=Document, responses=errors(403, 404))
async def current_tariff(who: Caller, service: Service) -> dict[str, Any]:
    """The tariff published last, with its ``version`` and ``latest_version`` (404 before the first)."""
    return await service.tariffs.current_tariff(who)


@router.get("/tariffs/{tariff_id}", response_model=Document, responses=errors(403, 404))
async def get_tariff(tariff_id: TariffId, who: Caller, service: Service,
                     version: Annotated[int | None, Query(ge=1)] = None) -> dict[str, Any]:
    """One version of a tariff (its latest without ``version``); 404 for an unknown tariff or version."""
    return await service.tariffs.get_tariff(who, tariff_id, version)
