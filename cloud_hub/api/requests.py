"""DSO requests: creating them, following them to their last client, cancelling them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, ValidationError

from cloud_hub.api.deps import Caller, IdempotencyKey, Service
from cloud_hub.api.models import RequestView, errors
from cloud_hub.errors import InvalidBody
from cloud_hub.usecases.results import Accepted, Cancelled, Revised, TariffAccepted
from mhp_wire.dso_api import (
    BillingBody,
    EmergencyBody,
    LoadReductionBody,
    LoadShiftBody,
    RevisionBody,
    TariffBody,
)

router = APIRouter(prefix="/v1", tags=["requests"])

REQUEST_ID_MAX = 64
"""The longest request id a path takes (also read by the lean path, ``cloud_hub.lean``)."""
RequestId = Annotated[str, Path(max_length=REQUEST_ID_MAX)]


_BODIES: dict[str, type[BaseModel]] = {"emergency": EmergencyBody, "load_shift": LoadShiftBody,
                                       "load_reduction": LoadReductionBody}


def validate_body(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """A whole request body of type ``kind`` validated by the model its creating POST uses."""
    try:
        return _BODIES[kind].model_validate(body).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise InvalidBody([{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                           for e in exc.errors()]) from None


CREATED = errors(403, 404, 409)
"""The errors of a request-creating POST (409: a reused ``Idempotency-Key``, a client no retailer supplies)."""


@router.post("/emergencies", status_code=202, response_model=Accepted, responses=CREATED)
async def post_emergency(body: EmergencyBody, who: Caller, service: Service,
                         idempotency_key: IdempotencyKey = None) -> Accepted:
    """Announce an emergency to the targeted clients, before it takes effect (dso)."""
    return await service.flexibility.create_emergency(who, body.model_dump(exclude_none=True), idempotency_key)


@router.post("/load-shifts", status_code=202, response_model=Accepted, responses=CREATED)
async def post_load_shift(body: LoadShiftBody, who: Caller, service: Service,
                          idempotency_key: IdempotencyKey = None) -> Accepted:
    """Ask the targeted clients to shift flexible loads out of a window (dso)."""
    return await service.flexibility.create_load_shift(who, body.model_dump(exclude_none=True), idempotency_key)


@router.post("/load-reductions", status_code=202, response_model=Accepted, responses=CREATED)
async def post_load_reduction(body: LoadReductionBody, who: Caller, service: Service,
                              idempotency_key: IdempotencyKey = None) -> Accepted:
    """Two-phase load reduction: availability first, then disconnects until the reduction is covered (dso)."""
    return await service.flexibility.create_load_reduction(who, body.model_dump(exclude_none=True), idempotency_key)


@router.post("/billing-data", status_code=202, response_model=Accepted, responses=CREATED)
async def post_billing(body: BillingBody, who: Caller, service: Service,
                       idempotency_key: IdempotencyKey = None) -> Accepted:
    """Deliver each client's readings of the period to the retailer(s) that supplied it (dso)."""
    return await service.data.request_billing(who, body.model_dump(), idempotency_key)


@router.post("/tariffs", status_code=202, response_model=TariffAccepted, response_model_exclude_none=True,
             responses=CREATED)
async def post_tariff(body: TariffBody, who: Caller, service: Service,
                      idempotency_key: IdempotencyKey = None) -> TariffAccepted:
    """Publish a network tariff calendar to every retailer and gateway (dso); ``version`` is the stored version
    (absent from the answer repeated to a retry with the same ``Idempotency-Key``)."""
    return await service.tariffs.publish_tariff(who, body.model_dump(mode="json"), idempotency_key)


@router.get("/requests/{request_id}", response_model=RequestView, responses=errors(403, 404))
async def get_request(request_id: RequestId, who: Caller, service: Service) -> dict[str, Any]:
    """A request's state, per-retailer and per-client progress and per-component trace (its issuer)."""
    return await service.requests.get_request(who, request_id)


@router.post("/requests/{request_id}/cancel", response_model=Cancelled, responses=errors(403, 404, 409))
async def cancel_request(request_id: RequestId, who: Caller, service: Service) -> Cancelled:
    """Cancel a request that has not ended; the cancellation reaches every home that got it (its issuer)."""
    return await service.flexibility.cancel(who, request_id)


@router.post("/requests/{request_id}/revise", status_code=202, response_model=Revised,
             responses=errors(403, 404, 409))
async def revise_request(request_id: RequestId, body: RevisionBody, who: Caller, service: Service,
                         idempotency_key: IdempotencyKey = None) -> Revised:
    """A new numbered revision of an emergency, load shift or load reduction that has not ended: the fields that
    change, delivered like the first revision (its issuer)."""
    return await service.revisions.revise(who, request_id, body.model_dump(exclude_none=True), idempotency_key,
                                          validate_body)
