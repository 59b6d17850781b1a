"""The OpenADR 3.1 VTN's REST paths, under ``/openadr3/3.1.0`` (``mapping.BASE_PATH``) and, the same routes in
OpenADR 3.0's shape of ``targets``, under ``/openadr3/3.0.1`` (``mapping.BASE_PATH_30``).

Thin: the bearer token is the hub's (``cloud_hub.api.deps.Caller``), every decision on client data is
``cloud_hub.authz.decide`` (through the service), the objects are built by ``cloud_hub.openadr3.mapping``.
Errors keep the hub's JSON shape (``{"error", "message"}``) and status codes.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qs, unquote_plus

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cloud_hub.api.deps import Caller, IdempotencyKey, Service
from cloud_hub.api.models import errors
from cloud_hub.authz import Action, Context, Principal, decide
from cloud_hub.book import ReportedOutcome
from cloud_hub.openadr3 import mapping
from cloud_hub.openadr3.models import (
    AuthServerInfo,
    ClientCredentialResponse,
    Event,
    Notifiers,
    NotifierTopics,
    OAuthError,
    Program,
    Report,
    Resource,
    Subscription,
    Ven,
)
from cloud_hub.openadr3.notifier import TABLE, Notifier
from cloud_hub.service import Forbidden, HubService, NotFound
from cloud_hub.storage import Mutation, prefix_stop
from cloud_hub.timeline import supplier_at
from mhp_wire import topics
from mhp_wire.messages import Measurement, Measurements, new_id

router = APIRouter(tags=["openadr3"])
"""Mounted once per base path of ``mapping.VERSIONS`` (``cloud_hub.openadr3.mount``)."""

ObjId = Annotated[str, Path(min_length=1, max_length=128)]
Skip = Annotated[int, Query(ge=0, le=1_000_000)]
Limit = Annotated[int, Query(ge=1, le=500)]
MAX_RESOURCES = 10_000
"""The most resources ``GET /vens/{id}/resources`` lists (the clients are scanned in id order)."""


def _notifier(request: Request) -> Notifier:
    notifier: Notifier = request.app.state.openadr3
    return notifier


def _ven_of(who: Principal) -> str:
    """The VEN a principal is: a retailer (or aggregator) only."""
    if who.kind != "retailer" or who.retailer_id is None:
        raise Forbidden("only a retailer or aggregator (a VEN) may do this")
    return who.retailer_id


def _version(request: Request) -> str:
    """The OpenADR version of the base path a request came in on (its shape of ``targets``)."""
    path = request.url.path
    for base, version in mapping.VERSIONS.items():
        if path.startswith(base + "/"):
            return version
    return mapping.SPEC_VERSION


def _shaped(obj: dict[str, Any], version: str) -> dict[str, Any]:
    """An event or subscription with its ``targets`` in ``version``'s shape (``mapping.targets_out``)."""
    if "targets" not in obj:
        return obj
    return {**obj, "targets": mapping.targets_out(obj["targets"], version)}


def _page(items: list[Any], skip: int, limit: int) -> list[Any]:
    return items[skip:skip + limit]


# -- OAuth2 client credentials ------------------------------------------------------------------------------

TOKEN_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OAuthError, "description": "a grant type other than client_credentials"},
    401: {"model": OAuthError, "description": "an unknown client or a wrong secret"},
}
"""The errors of the token endpoint, in OAuth2's shape (RFC 6749 5.2), not the hub's."""

@router.get("/auth/server", response_model=AuthServerInfo, response_model_exclude_unset=True)
async def auth_server(request: Request) -> dict[str, Any]:
    """Where to get a token: this VTN's own token endpoint (the hub's token book)."""
    url = str(request.url.replace(query=""))  # this base path's token endpoint (each version has its own)
    return {"tokenURL": url.removesuffix("/auth/server") + "/auth/token"}


def _basic_credentials(header: str) -> tuple[str, str] | None:
    """``(client_id, client_secret)`` from an ``Authorization: Basic`` header (RFC 6749 2.3.1: each part
    form-urlencoded, then ``id:secret`` in base64), ``("", "")`` when it does not decode, ``None`` without one."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    client_id, sep, secret = decoded.partition(":")
    return (unquote_plus(client_id), unquote_plus(secret)) if sep else ("", "")


@router.post("/auth/token", name="auth_token", response_model=ClientCredentialResponse, responses=TOKEN_ERRORS)
async def auth_token(request: Request) -> JSONResponse:
    """OAuth2 client credentials (RFC 6749 4.4, form-encoded; the client authenticated by the body's
    ``client_id``/``client_secret`` or by HTTP Basic, RFC 6749 2.3.1): ``client_id`` is the principal's id (``dso``,
    ``admin`` or the retailer's id), ``client_secret`` one of its hub bearer tokens; the answer's ``access_token``
    is that token, with the OpenADR 3.1 scopes of the principal. Revoking the token revokes the access."""
    raw = (await request.body()).decode("utf-8", "replace")
    form = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
    if form.get("grant_type") != "client_credentials":
        return JSONResponse({"error": "unsupported_grant_type",
                             "error_description": "only grant_type=client_credentials is supported"}, 400)
    secret, client_id = form.get("client_secret", ""), form.get("client_id", "")
    basic = _basic_credentials(request.headers.get("authorization", ""))
    if basic is not None:
        # RFC 6749 2.3.1: the server MUST support HTTP Basic for a client with a password (openadr3-client's
        # token manager, through requests-oauthlib, sends only that); one method per request (2.3).
        if secret or (client_id and client_id != basic[0]):
            return JSONResponse({"error": "invalid_request", "error_description":
                                 "client credentials in both the Authorization header and the body"}, 400)
        client_id, secret = basic
    principal = request.app.state.tokens.principal(secret) if secret else None
    if principal is None or client_id != (principal.retailer_id if principal.kind == "retailer" else principal.kind):
        return JSONResponse({"error": "invalid_client", "error_description": "unknown client or wrong secret"}, 401,
                            headers={"WWW-Authenticate": "Basic"})
    scopes = mapping.SCOPES[principal.kind]
    return JSONResponse({"access_token": secret, "token_type": "Bearer", "expires_in": 3600,
                         "scope": " ".join(scopes)}, headers={"Cache-Control": "no-store"})


# -- programs ---------------------------------------------------------------------------------------------

@router.get("/programs", response_model=list[Program], response_model_exclude_unset=True, responses=errors())
async def get_programs(request: Request, who: Caller, skip: Skip = 0, limit: Limit = 50) -> list[dict[str, Any]]:
    """The hub's programs (public, like the tariff: anyone with a token)."""
    decide(who, Action.READ_TARIFF)
    return _page(mapping.programs(request.app.state.openadr3_started), skip, limit)


@router.get("/programs/{program_id}", response_model=Program, response_model_exclude_unset=True, responses=errors(404))
async def get_program(program_id: ObjId, request: Request, who: Caller) -> dict[str, Any]:
    """One program."""
    for p in mapping.programs(request.app.state.openadr3_started):
        if p["id"] == program_id:
            return p
    raise NotFound(f"program {program_id!r} does not exist")


# -- events -------------------------------------------------------------------------------------------------

async def _tariff_events(service: HubService, who: Principal) -> list[dict[str, Any]]:
    try:
        return [mapping.tariff_event(await service.tariffs.current_tariff(who))]
    except NotFound:
        return []


EventFilter = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def _no_filter(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return events


def _target_filter(target_type: Annotated[str | None, Query(alias="targetType", max_length=64)] = None,
                   target_values: Annotated[list[str] | None, Query(alias="targetValues")] = None,
                   targets: Annotated[list[str] | None, Query(alias="targets", max_length=100)] = None,
                   ) -> EventFilter:
    """The events' target filters of the query: 3.0's ``targetType``/``targetValues`` (an event with any of the
    values), 3.1.0's ``targets`` (an event with every one of the strings, client ids, among its own)."""
    def keep(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if target_type is not None and target_values:
            events = _targeted(events, target_type, set(target_values))
        if targets:
            events = [e for e in events
                      if set(targets) <= set(mapping.targets_out(e.get("targets"), mapping.SPEC_VERSION) or [])]
        return events
    return keep


@router.get("/events", response_model=list[Event], response_model_exclude_unset=True, responses=errors(403))
async def get_events(request: Request, who: Caller, service: Service, skip: Skip = 0, limit: Limit = 50,
                     program_id: Annotated[str | None, Query(alias="programID", max_length=128)] = None,
                     targeted: Annotated[EventFilter, Depends(_target_filter)] = _no_filter,
                     ) -> list[dict[str, Any]]:
    """The events the caller may see: a VEN its own (only its clients in them) and the tariff; the DSO those of
    the requests it issued. Filters: 3.0's ``targetType``/``targetValues`` (any of the values), 3.1.0's
    ``targets`` (every one of the strings, client ids, among the event's)."""
    events: list[dict[str, Any]] = []
    if program_id in (None, mapping.TARIFF_PROGRAM):
        events += await _tariff_events(service, who)
    room = skip + limit - len(events)
    if who.kind == "retailer":
        events += await _ven_events(request, service, who, program_id, room)
    elif who.kind == "dso":
        events += await _dso_events(service, who, program_id, room)
    events = targeted(events)
    version = _version(request)
    return [_shaped(e, version) for e in _page(events, skip, limit)]


def _split_cells(cells: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A request's cells as its meta (``r:``) and its clients (``c:``), prefixes dropped."""
    meta = {k[2:]: v for k, v in cells.items() if k.startswith("r:")}
    clients = {k[2:]: v for k, v in cells.items() if k.startswith("c:")}
    return meta, clients


async def _ven_events(request: Request, service: HubService, who: Principal, program_id: str | None,
                      room: int) -> list[dict[str, Any]]:
    """Up to ``room`` of a VEN's events, from its index, of ``program_id`` if given."""
    ven = _ven_of(who)
    events: list[dict[str, Any]] = []
    for rid, entry in await _notifier(request).event_ids(ven):
        if len(events) >= room:
            break
        if program_id is not None and entry.get("program") != program_id:
            continue
        # Only this VEN's clients' cells (the index row names them): a VEN's poll costs its own clients,
        # not the whole request's.
        mine = entry.get("clients")
        cells = await service.book.store.get_request_cells(
            rid, ["r:", *(f"c:{c}" for c in mine)] if mine is not None else ["r:", "c:"])
        meta, clients = _split_cells(cells)
        event = mapping.event_for(rid, meta, clients, ven) if meta else None
        if event is not None:
            events.append(event)
    return events


async def _dso_events(service: HubService, who: Principal, program_id: str | None,
                      room: int) -> list[dict[str, Any]]:
    """The events of the requests the DSO issued (not cancelled), of ``program_id`` if given, page by page until
    there are ``room`` or more."""
    service.access.authorize(who, Action.LIST_REQUESTS)
    events: list[dict[str, Any]] = []
    after = None
    while len(events) < room:
        page = await service.book.store.issued_request_page(str(who), after, None, 200)
        if not page:
            break
        after = page[-1][0]
        reqs = await service.book.store.get_requests_cells({rid: ["r:", "c:"] for _, rid in page})
        for _, rid in page:
            meta, clients = _split_cells(reqs.get(rid) or {})
            if not meta or meta.get("state") == "cancelled":
                continue
            if program_id is not None and mapping.PROGRAM_OF_TYPE.get(meta.get("type", "")) != program_id:
                continue
            event = mapping.event_for(rid, meta, clients, None)
            if event is not None:
                events.append(event)
    return events


def _targeted(events: list[dict[str, Any]], target_type: str, want: set[str]) -> list[dict[str, Any]]:
    """The events with a target of ``target_type`` naming one of ``want``."""
    return [e for e in events if any(t["type"] == target_type and want & set(map(str, t["values"]))
                                     for t in e.get("targets") or [])]


async def _event(service: HubService, who: Principal, event_id: str) -> dict[str, Any]:
    """One event as ``who`` sees it; another VEN's is answered as an unknown one (neutral)."""
    if event_id.startswith("tariff-"):
        for e in await _tariff_events(service, who):
            if e["id"] == event_id:
                return e
        raise NotFound(f"event {event_id!r} does not exist")
    columns = ["r:", "c:"]
    if who.kind == "retailer":  # a VEN's own event names its clients in the index: read only their cells
        row = await service.book.store.kv.get(TABLE, f"evt|{who.retailer_id}|{event_id}")
        if row and json.loads(row["d:o"]).get("clients") is not None:
            columns = ["r:", *(f"c:{c}" for c in json.loads(row["d:o"])["clients"])]
    cells = await service.book.store.get_request_cells(event_id, columns)
    meta = {k[2:]: v for k, v in cells.items() if k.startswith("r:")}
    clients = {k[2:]: v for k, v in cells.items() if k.startswith("c:")}
    if meta.get("type") not in mapping.PROGRAM_OF_TYPE:
        raise NotFound(f"event {event_id!r} does not exist")
    verdict = decide(who, Action.READ_EVENTS, Context(issuer=meta["issuer"],
                                                      addressed_retailers=tuple(mapping.addressed_vens(clients))))
    if verdict.conceal or (not verdict.allowed and who.kind != "dso"):
        raise NotFound(f"event {event_id!r} does not exist")
    if not verdict.allowed:
        raise Forbidden(verdict.reason)
    event = mapping.event_for(event_id, meta, clients, who.retailer_id if who.kind == "retailer" else None)
    if event is None or meta.get("state") == "cancelled":
        raise NotFound(f"event {event_id!r} does not exist")
    return event


@router.get("/events/{event_id}", response_model=Event, response_model_exclude_unset=True, responses=errors(403, 404))
async def get_event(event_id: ObjId, request: Request, who: Caller, service: Service) -> dict[str, Any]:
    """One event (a VEN: one that concerns its clients, showing only them)."""
    return _shaped(await _event(service, who, event_id), _version(request))


class EventBody(BaseModel):
    """A new event (the DSO): becomes the hub request of its program; ``targets`` name the clients."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    programID: str = Field(min_length=1, max_length=128)
    intervals: list[dict[str, Any]] = Field(min_length=1, max_length=1)
    # {type, values} objects at /openadr3/3.0.1, strings (client ids) at /openadr3/3.1.0 (mapping.targets_in).
    targets: list[Any] = Field(default_factory=list, max_length=10_000)
    intervalPeriod: dict[str, Any] | None = None


@router.post("/events", status_code=201, response_model=Event, response_model_exclude_unset=True,
             responses=errors(403, 404, 409, 413))
async def create_event(body: EventBody, request: Request, who: Caller, service: Service,
                       key: IdempotencyKey = None) -> dict[str, Any]:
    """A DSO's event: the same request as ``POST /v1/emergencies`` (or load-shifts, load-reductions) would make,
    delivered to bridges and VENs alike; ``Idempotency-Key`` honoured as there."""
    version = _version(request)
    event_in = body.model_dump(by_alias=True)
    event_in["targets"] = mapping.targets_in(event_in.get("targets"), version)
    kind, hub_body = mapping.request_body(event_in)
    flex = service.flexibility
    create = {"emergency": flex.create_emergency, "load_shift": flex.create_load_shift,
              "load_reduction": flex.create_load_reduction}[kind]
    answer = await create(who, hub_body, key)
    return _shaped(await _event(service, who, answer.request_id), version)


@router.delete("/events/{event_id}",
               response_model=Event, response_model_exclude_unset=True, responses=errors(403, 404, 409))
async def delete_event(event_id: ObjId, request: Request, who: Caller, service: Service) -> dict[str, Any]:
    """Cancel the request behind an event (its issuer), as ``POST /v1/requests/{id}/cancel``."""
    event = await _event(service, who, event_id)
    await service.flexibility.cancel(who, event_id)
    return _shaped(event, _version(request))


# -- VENs and resources ---------------------------------------------------------------------------------

def _ven_object(name: str, stored: dict[str, Any]) -> dict[str, Any]:
    # clientID (OpenADR 3.1.0): the OAuth client the VEN authenticates as, which is its retailer id here.
    return {"id": name, "objectType": "VEN", "venName": name, "clientID": name,
            "createdDateTime": stored["createdDateTime"],
            "modificationDateTime": stored["createdDateTime"], **({"attributes": stored["attributes"]}
                                                                   if stored.get("attributes") else {})}


class VenBody(BaseModel):
    """A VEN registers under its name: a retailer's VEN name is its retailer id."""

    model_config = ConfigDict(extra="allow")
    venName: str = Field(min_length=1, max_length=64)
    attributes: list[dict[str, Any]] | None = Field(None, max_length=20)


@router.post("/vens", status_code=201,
             response_model=Ven, response_model_exclude_unset=True, responses=errors(403, 404, 413))
async def create_ven(body: VenBody, request: Request, who: Caller, service: Service) -> dict[str, Any]:
    """Register a VEN: a retailer its own (``venName`` = its id); the DSO any registered retailer's."""
    topics.check_id(body.venName)
    service.access.authorize(who, Action.READ_VEN, Context(issuer=f"retailer:{body.venName}"))
    if await service.book.store.get_retailer(body.venName) is None:
        raise NotFound(f"retailer {body.venName!r} is not registered: the DSO registers it first")
    kv = service.book.store.kv
    row = await kv.get(TABLE, f"ven|{body.venName}")
    stored = json.loads(row["d:o"]) if row else {"createdDateTime": mapping._iso(time.time())}
    stored["attributes"] = body.attributes
    version = _version(request)
    stored["version"] = version  # its MQTT notifications' shape of targets (registering again changes it)
    await kv.batch([Mutation(TABLE, f"ven|{body.venName}", {"d:o": json.dumps(stored).encode()})])
    _notifier(request).vens[body.venName] = version  # its events are indexed and notified from now on
    return _ven_object(body.venName, stored)


async def _ven(service: HubService, who: Principal, ven_id: str) -> dict[str, Any]:
    verdict = decide(who, Action.READ_VEN, Context(issuer=f"retailer:{ven_id}"))
    if verdict.conceal:
        raise NotFound(f"VEN {ven_id!r} does not exist")
    if not verdict.allowed:
        raise Forbidden(verdict.reason)
    row = await service.book.store.kv.get(TABLE, f"ven|{ven_id}")
    if not row:
        raise NotFound(f"VEN {ven_id!r} does not exist")
    return _ven_object(ven_id, json.loads(row["d:o"]))


@router.get("/vens", response_model=list[Ven], response_model_exclude_unset=True, responses=errors(403))
async def get_vens(who: Caller, service: Service, skip: Skip = 0, limit: Limit = 50) -> list[dict[str, Any]]:
    """The VENs the caller may see: a VEN itself; the DSO every one."""
    if who.kind == "retailer":
        try:
            return [await _ven(service, who, _ven_of(who))]
        except NotFound:
            return []
    service.access.authorize(who, Action.READ_VEN)
    rows = await service.book.store.kv.scan(TABLE, start="ven|", stop=prefix_stop("ven|"))
    return _page([_ven_object(r[4:], json.loads(c["d:o"])) for r, c in rows], skip, limit)


@router.get("/vens/{ven_id}", response_model=Ven, response_model_exclude_unset=True, responses=errors(403, 404))
async def get_ven(ven_id: ObjId, who: Caller, service: Service) -> dict[str, Any]:
    """One VEN (itself; the DSO any)."""
    return await _ven(service, who, ven_id)


@router.get("/vens/{ven_id}/resources", response_model=list[Resource], response_model_exclude_unset=True,
            responses=errors(403, 404))
async def get_resources(ven_id: ObjId, who: Caller, service: Service, skip: Skip = 0, limit: Limit = 50
                        ) -> list[dict[str, Any]]:
    """A VEN's resources: the clients it supplies now (supplier periods; neutral: its own only)."""
    await _ven(service, who, ven_id)
    now = time.time()
    out: list[dict[str, Any]] = []
    after = None
    scanned = 0
    while len(out) < skip + limit and scanned < MAX_RESOURCES:
        page = await service.book.store.client_page(after, 500)
        if not page:
            break
        scanned += len(page)
        after = page[-1]["client_id"]
        out += [{"id": c["client_id"], "objectType": "RESOURCE", "resourceName": c["client_id"], "venID": ven_id,
                 "attributes": [{"type": "MAX_POWER_CONSUMPTION", "values": [c["contracted_power_kw"]]}]}
                for c in page if supplier_at(c["suppliers"], now) == ven_id]
    return _page(out, skip, limit)


# -- reports --------------------------------------------------------------------------------------------

class ReportBody(BaseModel):
    """A VEN's report on one event."""

    model_config = ConfigDict(extra="allow")
    # Optional, as in OpenADR 3.1.0's report (openadr3-client sends none): the event's program when left out.
    programID: str | None = Field(None, min_length=1, max_length=128)
    eventID: str = Field(min_length=1, max_length=128)
    clientName: str = Field(min_length=1, max_length=128)
    reportName: str | None = Field(None, max_length=128)
    resources: list[dict[str, Any]] = Field(min_length=1, max_length=10_000)


@router.post("/reports", status_code=201, response_model=Report, response_model_exclude_unset=True,
             responses=errors(403, 404, 413))
async def create_report(body: ReportBody, request: Request, who: Caller, service: Service) -> dict[str, Any]:
    """A VEN's report: outcomes become the request's client states and ``DEMAND`` the clients' measurements, as
    its bridge's MQTT messages would. All or nothing: one client that is not the VEN's refuses the whole report."""
    ven = _ven_of(who)
    report = body.model_dump()
    items = mapping.report_items(report, time.time())
    named = sorted({i.client_id for i in items})
    # Only the named clients' cells of the request row: a report costs the same on a request of a million clients.
    cells = await service.book.store.get_request_cells(body.eventID, ["r:type", "r:issuer", "r:state", "r:revision"]
                                                  + [f"c:{c}" for c in named])
    addressed = {c: set((cells.get(f"c:{c}") or {}).get("retailers", {})) for c in named}
    verdict = decide(who, Action.READ_EVENTS, Context(
        issuer=cells.get("r:issuer"), addressed_retailers=tuple(sorted(set().union(*addressed.values())))))
    if (cells.get("r:type") not in mapping.PROGRAM_OF_TYPE or cells.get("r:state") == "cancelled"
            or not verdict.allowed):
        raise NotFound(f"event {body.eventID!r} does not exist")  # another VEN's event is an unknown one
    mine = {c for c, rs in addressed.items() if ven in rs}
    strangers = sorted({i.client_id for i in items if i.kind == "outcome" and i.client_id not in mine})
    demands = [i for i in items if i.kind == "demand"]
    clients = await service.book.store.get_clients(sorted({i.client_id for i in demands}))
    for i in demands:
        c = clients.get(i.client_id)
        owner = supplier_at(c["suppliers"], i.at) if c else None
        if not decide(who, Action.SEND_MEASUREMENT, Context(supplier_at_time=owner)).allowed:
            strangers.append(i.client_id)
    if strangers:
        raise Forbidden(f"not your client(s) in this event or at that time: {', '.join(sorted(set(strangers))[:20])};"
                        f" nothing of the report was stored")
    revision = int(cells.get("r:revision") or 1)
    outcomes = [ReportedOutcome(ven, body.eventID, i.client_id, i.state, {"available_kw": i.value}
                                if i.value is not None else {}, {}, revision)
                for i in items if i.kind == "outcome" and i.state is not None]
    if outcomes:
        verdicts = await _notifier(request).apply_outcomes(outcomes)
        refused = [o.client_id for o, v in zip(outcomes, verdicts, strict=True) if not v.known]
        if refused:
            raise Forbidden(f"not your client(s) in this event: {', '.join(refused[:20])}")
    if demands:
        await service.data.accept_measurements(ven, Measurements(items=[
            Measurement(client_id=i.client_id, at=datetime.fromtimestamp(i.at, UTC), active_power_kw=i.value or 0.0)
            for i in demands]))
    now = mapping._iso(time.time())
    if report.get("programID") is None:
        report["programID"] = mapping.PROGRAM_OF_TYPE[cells["r:type"]]
    stored = {**report, "id": new_id(), "objectType": "REPORT", "createdDateTime": now, "modificationDateTime": now,
              "clientName": report["clientName"], "clientID": ven}
    await service.book.store.kv.batch([Mutation(TABLE, f"rep|{ven}|{stored['id']}", {"d:o": json.dumps(
        stored, default=str).encode()})])
    return stored


@router.get("/reports", response_model=list[Report], response_model_exclude_unset=True, responses=errors(403))
async def get_reports(who: Caller, service: Service, skip: Skip = 0, limit: Limit = 50,
                      event_id: Annotated[str | None, Query(alias="eventID", max_length=128)] = None,
                      ) -> list[dict[str, Any]]:
    """A VEN's own reports."""
    ven = _ven_of(who)
    prefix = f"rep|{ven}|"
    rows = await service.book.store.kv.scan(TABLE, start=prefix, stop=prefix_stop(prefix))
    # clientID (OpenADR 3.1.0) is set by the hub: the reporting VEN's client (a report stored before it existed too).
    reports = [{**json.loads(c["d:o"]), "clientID": ven} for _, c in rows]
    if event_id is not None:
        reports = [r for r in reports if r.get("eventID") == event_id]
    return _page(reports, skip, limit)


# -- subscriptions ------------------------------------------------------------------------------------

class SubscriptionBody(BaseModel):
    """A VEN's webhook subscription to its objects' changes."""

    model_config = ConfigDict(extra="allow")
    clientName: str = Field(min_length=1, max_length=128)
    programID: str | None = Field(None, max_length=128)
    objectOperations: list[dict[str, Any]] = Field(min_length=1, max_length=10)
    targets: list[Any] | None = Field(None, max_length=10)  # in the path's version's shape (mapping.targets_in)


@router.post("/subscriptions", status_code=201, response_model=Subscription, response_model_exclude_unset=True,
             responses=errors(403, 404, 413))
async def create_subscription(body: SubscriptionBody, request: Request, who: Caller, service: Service
                              ) -> dict[str, Any]:
    """Subscribe a webhook (a VEN, to its own objects); every callback URL must pass the hub's webhook target
    check (no loopback, private or link-local addresses unless the hub allows them)."""
    _ven_of(who)
    service.access.authorize(who, Action.MANAGE_SUBSCRIPTION)
    version = _version(request)
    targets = mapping.targets_in(body.targets, version)
    if body.programID is not None and body.programID not in mapping.program_ids():
        raise NotFound(f"program {body.programID!r} does not exist")
    ops = []
    for oo in body.objectOperations:
        url, objects, operations = oo.get("callbackUrl"), oo.get("objects"), oo.get("operations")
        if not isinstance(url, str) or not isinstance(objects, list) or not isinstance(operations, list):
            raise ValueError("each objectOperation needs callbackUrl, objects and operations")
        if len(url) > 2000:
            raise ValueError("callbackUrl is longer than 2000 characters")
        await request.app.state.webhooks.check(url)
        token = oo.get("bearerToken")
        ops.append({"callbackUrl": url, "objects": [str(o) for o in objects][:10],
                    "operations": [str(o) for o in operations][:10],
                    **({"bearerToken": str(token)[:2000]} if token else {})})
    now = mapping._iso(time.time())
    sub = {"id": new_id(), "objectType": "SUBSCRIPTION", "createdDateTime": now, "modificationDateTime": now,
           "clientName": body.clientName, "objectOperations": ops, "owner": str(who), "version": version,
           **({"programID": body.programID} if body.programID else {}),
           **({"targets": targets} if targets else {})}
    await _notifier(request).put_subscription(sub)
    return _public(sub, version)


def _public(sub: dict[str, Any], version: str) -> dict[str, Any]:
    return _shaped({k: v for k, v in sub.items() if k not in ("owner", "version")}, version)


def _owned(request: Request, service: HubService, who: Principal, sub_id: str) -> dict[str, Any]:
    sub = _notifier(request).subscriptions.get(sub_id)
    if sub is None:
        raise NotFound("no such subscription")
    service.requests.may_manage_subscription(who, sub["owner"])
    return sub


@router.get("/subscriptions", response_model=list[Subscription], response_model_exclude_unset=True, responses=errors())
async def get_subscriptions(request: Request, who: Caller, service: Service, skip: Skip = 0, limit: Limit = 50
                            ) -> list[dict[str, Any]]:
    """The caller's own subscriptions."""
    mine = [_public(s, _version(request)) for s in _notifier(request).subscriptions.values() if s["owner"] == str(who)]
    return _page(sorted(mine, key=lambda s: s["createdDateTime"]), skip, limit)


@router.get("/subscriptions/{sub_id}",
            response_model=Subscription, response_model_exclude_unset=True, responses=errors(403, 404))
async def get_subscription(sub_id: ObjId, request: Request, who: Caller, service: Service) -> dict[str, Any]:
    """One of the caller's subscriptions (another's is an unknown one)."""
    return _public(_owned(request, service, who, sub_id), _version(request))


@router.delete("/subscriptions/{sub_id}", response_model=Subscription, response_model_exclude_unset=True,
               responses=errors(403, 404))
async def delete_subscription(sub_id: ObjId, request: Request, who: Caller, service: Service) -> dict[str, Any]:
    """Remove one of the caller's subscriptions."""
    sub = _owned(request, service, who, sub_id)
    await _notifier(request).delete_subscription(sub_id)
    return _public(sub, _version(request))


# -- notifiers ----------------------------------------------------------------------------------------

@router.get("/notifiers", response_model=Notifiers, response_model_exclude_unset=True, responses=errors())
async def get_notifiers(request: Request, who: Caller) -> dict[str, Any]:
    """The notifiers: webhooks, and MQTT on the hub broker (a VEN logs in with its hub-broker identity)."""
    settings = request.app.state.settings
    scheme = "mqtts" if settings.mqtt_tls_ca_file else "mqtt"
    host = settings.mqtt_host
    return {"WEBHOOK": True, "MQTT": {"URIS": [f"{scheme}://{host}:{settings.mqtt_port}"],
                                      "serialization": "JSON",
                                      "authentication": {"method": "X_MHP_BROKER_IDENTITY"}}}


@router.get("/notifiers/mqtt/topics/vens/{ven_id}/events",
            response_model=NotifierTopics, response_model_exclude_unset=True,
            responses=errors(403, 404))
async def ven_event_topics(ven_id: ObjId, who: Caller, service: Service) -> dict[str, Any]:
    """The MQTT topics of one VEN's events (itself; the DSO any)."""
    verdict = decide(who, Action.READ_VEN, Context(issuer=f"retailer:{ven_id}"))
    if not verdict.allowed:
        raise NotFound(f"VEN {ven_id!r} does not exist") if verdict.conceal else Forbidden(verdict.reason)
    topics.check_id(ven_id)
    return {"topics": {op: topics.openadr3_ven(ven_id, "events", op.lower()) for op in ("CREATE", "UPDATE",
                                                                                          "DELETE")}
            | {"ALL": topics.openadr3_ven(ven_id, "events", "+")}}
