"""Eligible parties and customers' permissions (docs/consent.md), and the hook that mounts them on the hub."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from cloud_hub.api.deps import Caller
from cloud_hub.api.models import Answer, PartyAnswer, PermissionAnswer, errors
from cloud_hub.consent import State
from cloud_hub.consent_service import ConsentService
from cloud_hub.views import PAGE_MAX
from mhp_wire import topics
from mhp_wire.ids import ID_PATTERN
from mhp_wire.messages import encode

router = APIRouter(prefix="/v1", tags=["consent"])

IdPath = Annotated[str, Path(pattern=ID_PATTERN)]
StateName = Literal["sent_to_pa", "accepted", "rejected", "timed_out", "revoked", "terminated", "fulfilled"]
"""The states a stored permission can be in (``created`` and ``validated`` pass within its request)."""
PERMISSION_CURSOR = r"^[0-9]{15}\|[A-Za-z0-9_.\-]{1,64}$"


async def get_consent(request: Request) -> ConsentService:
    """The consent use cases, opened with the app (:func:`attach`)."""
    consent: ConsentService = request.app.state.consent
    return consent


Consent = Annotated[ConsentService, Depends(get_consent)]


def attach(app: FastAPI) -> None:
    """Open the consent use cases on the app's store and let the relay carry their messages (called in the
    app's lifespan once the store and the relay are open)."""
    consent = ConsentService(app.state.store)
    relay = app.state.relay

    async def publish(retailer_id: str, msg: BaseModel) -> None:
        if relay.link is not None:
            await relay.link.publish(topics.down("retailers", retailer_id), encode(msg), wait_s=1.0)

    consent.publish = publish
    relay.on_consent = consent.on_retailer
    app.state.consent = consent


class PartyBody(BaseModel):
    """An eligible party's registration."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)


class PermissionBody(BaseModel):
    """A party's request for a customer's data."""

    model_config = ConfigDict(extra="forbid")
    client_id: str = Field(pattern=ID_PATTERN)
    purpose: str = Field(min_length=1, max_length=500)
    scopes: list[Literal["consumption_profile", "billing_data", "live_measurements"]] = Field(min_length=1,
                                                                                              max_length=3)
    resolution_s: int = Field(900, gt=0, le=31 * 86_400)
    data_from: AwareDatetime
    data_to: AwareDatetime
    valid_until: AwareDatetime


@router.put("/parties/{party_id}", response_model=PartyAnswer,
            responses={201: {"model": PartyAnswer, "description": "a new party"}, **errors(403)})
async def put_party(party_id: IdPath, body: PartyBody, who: Caller, consent: Consent,
                    response: Response) -> dict[str, str]:
    """Register or rename an eligible party (admin, dso); its tokens are issued like a retailer's
    (``cloud-hub token --principal party:<id>``)."""
    created = await consent.put_party(who, party_id, body.name)
    response.status_code = 201 if created else 200
    return {"party_id": party_id, "name": body.name}


@router.post("/permissions", status_code=201, response_model=PermissionAnswer, responses=errors(403, 404))
async def post_permission(body: PermissionBody, who: Caller, consent: Consent) -> dict[str, Any]:
    """Ask a customer for access to their data (a registered party); the customer decides in their retailer's
    personal area by ``decide_by``."""
    return await consent.request(who, body.model_dump())


class PermissionPage(Answer):
    """A page of the caller's permissions, newest first, with ``count`` and ``next_after`` (the cursor of the next
    page, or null)."""

    permissions: list[PermissionAnswer]
    count: int
    next_after: str | None


@router.get("/permissions", response_model=PermissionPage, responses=errors(403))
async def list_permissions(who: Caller, consent: Consent, state: StateName | None = None,
                           limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 100,
                           after: Annotated[str | None, Query(pattern=PERMISSION_CURSOR)] = None) -> dict[str, Any]:
    """The calling party's own permissions, newest first, in their state now (``state`` filters), paged by
    ``after`` (the ``next_after`` of the previous page) (a party)."""
    return await consent.of_party(who, state=None if state is None else State(state), limit=limit, after=after)


@router.get("/permissions/{permission_id}", response_model=PermissionAnswer, responses=errors(403, 404))
async def get_permission(permission_id: IdPath, who: Caller, consent: Consent) -> dict[str, Any]:
    """A permission and its history (the party that asked for it, the DSO)."""
    return await consent.get(who, permission_id)


@router.post("/permissions/{permission_id}/terminate", response_model=PermissionAnswer,
             responses=errors(403, 404, 409))
async def terminate_permission(permission_id: IdPath, who: Caller, consent: Consent) -> dict[str, Any]:
    """End a permission, or withdraw a request not yet decided (the party that asked for it)."""
    return await consent.terminate(who, permission_id)
