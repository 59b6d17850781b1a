"""Use cases of the hub, between the HTTP/MQTT layers and storage: authorization first, then the work."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cloud_hub.authz import Action, Context, Principal, decide, visible_suppliers
from cloud_hub.book import OutboxItem, RequestBook
from cloud_hub.lifecycle import RequestState, request_state_from_counts
from cloud_hub.metrics import HubMetrics
from cloud_hub.replicas import OwnerUnavailable, Replicas
from cloud_hub.storage import Mutation
from cloud_hub.store import AuditEntry, Conflict, HubStore, StoreUnavailable
from cloud_hub.timeline import (
    choose_for_reduction,
    clip_blocks,
    covered_by,
    customer_changes,
    profile,
    reduction_targets,
    supplier_at,
    supply_spans,
    switches_in,
    whole_supplier,
    withhold_straddling,
)
from mhp_wire.messages import (
    AvailabilityParams,
    BillingClient,
    BillingData,
    Cancel,
    ClientState,
    CustomerChange,
    Customers,
    EmergencyParams,
    LoadReductionParams,
    LoadShiftParams,
    Measurements,
    Params,
    ReadingBlock,
    Request,
    RequestKind,
    SupplyPeriod,
    Tariff,
    encode,
    new_id,
    recipient_msg_id,
    tariff_msg_id,
)

log = logging.getLogger(__name__)

BILLING_CLIENTS_PER_MESSAGE = 100
REQUEST_CLIENTS_PER_MESSAGE = 3_000
"""Client ids per ``request`` message: 3,000 ids of at most 64 characters stay under the 256 KiB payload limit."""
BILLING_DELIVERY_S = 24 * 3600
TARIFF_DELIVERY_S = 3600
CUSTOMERS_DELIVERY_S = 7 * 24 * 3600
"""How long the hub keeps re-sending a ``customers`` message to a retailer that does not acknowledge it (as long
as a broker keeps an offline bridge's session)."""
CUSTOMERS_MESSAGE_BYTES = 200_000
"""A ``customers`` message is cut before it would pass this size (the payload limit is 256 KiB)."""


REGISTER_LOCK_STRIPES = 256
"""Locks serialising registrations of the same client (by a hash of its id)."""
AUDIT_REFUSALS_LOGGED = 100
"""A refusal is written to the data access log one line per registered client for at most this many client ids
of one request or message; the rest, and ids that name no client, are counted in one summary line (client
``*``)."""
AUDIT_SUMMARY_CLIENT = "*"
"""The ``client_id`` of a summary line of the data access log (``GET /v1/audit?client_id=*``)."""


def refusal_audit(principal: str, action: str, right: str, known: list[str], unknown: int, more: list[str],
                  ref: str | None = None) -> list[AuditEntry]:
    """The data access log of one refused request or message: a line per registered client it concerned (the first
    :data:`AUDIT_REFUSALS_LOGGED`), and one summary line (client ``*``, ``detail`` saying what it counts) for the
    rest of them, ``unknown`` ids that name no client and the ``more`` that were not looked up, when there are any."""
    lines = [AuditEntry(principal, cid, action, right, False, ref) for cid in known[:AUDIT_REFUSALS_LOGGED]]
    counted = list(more)
    if len(known) > AUDIT_REFUSALS_LOGGED:
        counted.insert(0, f"{len(known) - AUDIT_REFUSALS_LOGGED} more registered client(s), not logged one by one")
    if unknown:
        counted.insert(0, f"{unknown} id(s) that name no registered client")
    if counted:
        lines.append(AuditEntry(principal, AUDIT_SUMMARY_CLIENT, action, right, False, ref, detail="; ".join(counted)))
    return lines


def _customer_messages(items: list[CustomerChange]) -> list[Customers]:
    """``items`` in as few ``customers`` messages as fit the payload limit (and the 1,000 items a message holds)."""
    out: list[Customers] = []
    part: list[CustomerChange] = []
    size = 0
    for item in items:
        n = len(item.model_dump_json()) + 1
        if part and (size + n > CUSTOMERS_MESSAGE_BYTES or len(part) == 1_000):
            out.append(Customers(items=part))
            part, size = [], 0
        part.append(item)
        size += n
    if part:
        out.append(Customers(items=part))
    return out


class InvalidBody(ValueError):
    """A body that fails validation after the HTTP layer's (a revision merged into its request): HTTP 422 with
    ``problems``, each ``{"field", "message"}``, as for any invalid body."""

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__("invalid request: " + "; ".join(f"{p['field'] or 'body'}: {p['message']}"
                                                         for p in problems[:10]))
        self.problems = problems


BodyValidator = Callable[[str, dict[str, Any]], dict[str, Any]]
"""``(request type, body) -> body``: a whole request body validated as the creating POST validates it (raises
:class:`InvalidBody`); the HTTP layer owns the body models."""

REVISABLE: dict[str, frozenset[str]] = {
    "emergency": frozenset({"power_limit_kw", "start", "duration_s", "client_ids", "feeder_id"}),
    "load_shift": frozenset({"window_start", "window_end", "reason", "client_ids", "feeder_id"}),
    "load_reduction": frozenset({"reduction_kw", "start", "duration_s"}),
}
"""The fields a revision may change, per request type (docs/decisions.md, "Revisions")."""
REVISABLE_AFTER_SELECTION = frozenset({"start", "duration_s"})
"""A load reduction whose clients are chosen: only its window may change (the choice rests on ``reduction_kw``)."""
REVISION_HISTORY_MAX = 20
"""Earlier revisions' outcomes kept per client."""


def _revised_history(entry: dict[str, Any]) -> None:
    """Keep where a client stood in the revision a new one replaces."""
    if entry.get("state") == ClientState.PENDING.value and not entry.get("detail"):
        return
    entry["history"] = [*entry.get("history", []), {
        "revision": entry.get("revision", 1), "state": entry["state"], "detail": entry.get("detail", {}),
        "updated_at": entry.get("updated_at")}][-REVISION_HISTORY_MAX:]


def _wire_kind(kind: str) -> RequestKind:
    return {"emergency": RequestKind.EMERGENCY, "load_shift": RequestKind.LOAD_SHIFT}.get(
        kind, RequestKind.LOAD_REDUCTION)


def _revised_params(kind: str, phase: str | None, body: dict[str, Any]) -> tuple[float, float, Params]:
    """``(start, end, params)`` of a revised request's validated ``body``, as its creation derives them."""
    if kind == "load_shift":
        start, end = _ts(body["window_start"]), _ts(body["window_end"])
        if end <= start:
            raise InvalidBody([{"field": "window_end", "message": "window_end must be after window_start"}])
        return start, end, LoadShiftParams(start=body["window_start"], end=body["window_end"],
                                           reason=body.get("reason"))
    start = _ts(body["start"])
    end = start + body["duration_s"]
    until = datetime.fromtimestamp(end, UTC)
    if kind == "emergency":
        return start, end, EmergencyParams(start=body["start"], end=until, power_limit_kw=body["power_limit_kw"])
    if phase == "availability":
        return start, end, AvailabilityParams(start=body["start"], end=until, reduction_kw=body["reduction_kw"])
    # Not sent as it is: each chosen home is sent its own target (:func:`_reduction_items`).
    return start, end, LoadReductionParams(start=body["start"], end=until, target_kw=body["reduction_kw"])


def _reduction_items(request_id: str, by_retailer: dict[str, list[str]], targets: dict[str, float], start: Any,
                     end: float, revision: int) -> list[OutboxItem]:
    """The ``load_reduction`` messages of a load reduction's chosen clients (``by_retailer``), each home asked for
    its own target (:func:`cloud_hub.timeline.reduction_targets`: what it said it could shed, the last one chosen
    only the rest): one message per retailer and target, at the dispatch and at every later revision."""
    until = datetime.fromtimestamp(end, UTC)
    items = []
    for rid, all_cids in sorted(by_retailer.items()):
        by_target: dict[float, list[str]] = defaultdict(list)
        for cid in all_cids:
            by_target[targets[cid]].append(cid)
        for target_kw, same in sorted(by_target.items()):
            params = LoadReductionParams(start=start, end=until, target_kw=target_kw)
            for cids in _chunks(same, REQUEST_CLIENTS_PER_MESSAGE):
                msg = Request(request_id=request_id, kind=RequestKind.LOAD_REDUCTION, client_ids=cids,
                              params=params, expires_at=until, revision=revision)
                items.append(OutboxItem(msg.msg_id, request_id, rid, "request", encode(msg), cids,
                                        revision=revision))
    return items


CURRENT_TARIFF = "current"
"""Not a tariff id: ``GET /v1/tariffs/current`` names the tariff published last."""


def tariff_message(stored: dict[str, Any]) -> Tariff:
    """The ``tariff`` message of a stored tariff version; its ``msg_id`` names the tariff and version, so that a
    republication of the same version is recognisably the same."""
    return Tariff(msg_id=tariff_msg_id(stored["tariff_id"], stored["version"]), tariff_id=stored["tariff_id"],
                  version=stored["version"], valid_from=stored["valid_from"], valid_to=stored["valid_to"],
                  periods=stored["periods"], published=stored.get("published"))


class Forbidden(Exception):
    """The principal may not do this (HTTP 403)."""


class NotFound(Exception):
    """An id names nothing (HTTP 404)."""


def hidden_client(client_id: str) -> str:
    """The one answer a retailer gets for a client that is unknown or not its own (HTTP 404 ``not_found``)."""
    return f"client {client_id!r} not found"


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` was reused with a different body (HTTP 409)."""


class KeyInProgress(Exception):
    """The first attempt with this ``Idempotency-Key`` is still creating its request (HTTP 409, retry)."""


KEY_WAIT_S = 5.0
"""How long a repeated attempt waits for the first attempt with its ``Idempotency-Key`` to answer."""
KEY_CLAIM_STALE_S = 30.0
"""A claim on an ``Idempotency-Key`` this old whose request does not exist belongs to an attempt that died (a
crash, or storage lost while it released the claim); a retry takes it over."""


@dataclass(slots=True)
class LocalClaim:
    """A single hub's claim on an ``Idempotency-Key``: the body it was claimed with, set ``done`` when released."""

    digest: str
    done: asyncio.Event


@dataclass(slots=True)
class KeySlot:
    """What :meth:`HubService._keyed` decided: the stored ``answer`` to return, or the ``request_id`` to create
    (under ``claim``, the stored claim value, when a key was given)."""

    request_id: str = ""
    answer: tuple[int, dict[str, Any]] | None = None
    claim: bytes | None = None


def _chunks(items: list[str], size: int) -> list[list[str]]:
    """``items`` in consecutive parts of at most ``size``."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def iso(ts: float | None) -> str | None:
    """Epoch seconds as RFC 3339 (UTC)."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def body_hash(body: dict[str, Any]) -> str:
    """A stable hash of a request body, to tell an idempotent retry from a reused key."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _ts(value: datetime | float | str) -> float:
    if isinstance(value, str):
        return datetime.fromisoformat(value).timestamp()
    return value.timestamp() if isinstance(value, datetime) else float(value)


class HubService:
    """The hub's use cases."""

    def __init__(self, store: HubStore, book: RequestBook, metrics: HubMetrics,
                 replicas: Replicas | None = None) -> None:
        self.store = store
        self.book = book
        self.metrics = metrics
        self.replicas = replicas
        """Set when the hub runs as several replicas: a cancel goes to the replica that owns the request."""
        self._register_locks = [asyncio.Lock() for _ in range(REGISTER_LOCK_STRIPES)]
        """Registrations of one client run one at a time (a client maps to one lock: a bounded set, not a map)."""
        self._claims_here: dict[tuple[str, str], LocalClaim] = {}
        """A single hub's ``Idempotency-Key`` claims (replicas claim in storage)."""
        self.publish_tariff_retained: Any = None
        """Set by the relay: ``async (payload: bytes) -> None`` publishing the retained public tariff."""

    def authorize(self, who: Principal, action: Action, ctx: Context | None = None) -> str:
        """Raise :class:`Forbidden` unless allowed; returns the right the permission rests on."""
        verdict = decide(who, action, ctx)
        if not verdict.allowed:
            raise Forbidden(verdict.reason)
        return verdict.right

    async def _authorize_logged(self, who: Principal, action: Action, client_id: str,
                                ctx: Context | None = None, ref: str | None = None, *, exists: bool = True) -> str:
        """Authorize an operation on one client's data and write it to the data access log either way.

        ``exists`` False: the client is not registered. A principal allowed to know that (the DSO) gets
        :class:`NotFound` and nothing is logged, as before any read; a refused one is logged and answered as the
        verdict says, so that a retailer gets the same answer for an unknown client as for another's."""
        verdict = decide(who, action, ctx)
        if not exists and verdict.allowed:
            raise NotFound(f"client {client_id!r} is not registered")
        await self.store.audit([AuditEntry(str(who), client_id, action.value, verdict.right, verdict.allowed, ref)])
        if verdict.conceal:
            raise NotFound(hidden_client(client_id))
        if not verdict.allowed:
            raise Forbidden(verdict.reason)
        return verdict.right

    async def _authorize_named(self, who: Principal, action: Action, client_ids: list[str] | None = None,
                               feeder_id: str | None = None) -> str:
        """Authorize an operation only the DSO may do on named clients (a trigger, an upload, a read); returns the
        right it rests on. A refusal is first written to the data access log for every registered client it
        named (an id that names no client is no one's data), then raised as :class:`Forbidden`."""
        verdict = decide(who, action)
        if verdict.allowed:
            return verdict.right
        # A refused body may name any number of ids: only the first AUDIT_REFUSALS_LOGGED are looked up and logged
        # per registered client, the rest counted in one summary line (the refusal costs a bounded read and write).
        named = list(dict.fromkeys(client_ids or []))
        looked = named[:AUDIT_REFUSALS_LOGGED]
        more: list[str] = []
        if len(named) > len(looked):
            more.append(f"{len(named) - len(looked)} more client id(s) named, not looked up")
        if feeder_id:
            room = AUDIT_REFUSALS_LOGGED - len(looked)
            on_feeder = await self.store.clients_on_feeder(feeder_id, limit=room + 1) if room > 0 else []
            looked = list(dict.fromkeys(looked + on_feeder[:max(room, 0)]))
            if room <= 0 or len(on_feeder) > room:
                more.append(f"more clients of feeder {feeder_id!r}, not looked up")
        known = sorted(await self.store.get_clients(looked)) if looked else []
        await self.store.audit(refusal_audit(str(who), action.value, verdict.right, known,
                                             len(looked) - len(known), more))
        raise Forbidden(verdict.reason)

    # -- registry -----------------------------------------------------------------------------------------

    async def put_retailer(self, who: Principal, retailer_id: str, name: str) -> bool:
        """Register or rename a retailer."""
        self.authorize(who, Action.MANAGE_RETAILER)
        return await self.store.put_retailer(retailer_id, name)

    async def put_client(self, who: Principal, client_id: str, body: dict[str, Any]) -> bool:
        """Register a client or change it (a new retailer with a later ``valid_from`` is a supplier switch)."""
        return (await self.register_client(who, client_id, body))[0]

    async def register_client(self, who: Principal, client_id: str, body: dict[str, Any]) -> tuple[bool, str | None]:
        """:meth:`put_client`, also returning the id of the request that announces the change to the retailers
        (None when the supplier history did not change)."""
        right = await self._authorize_named(who, Action.MANAGE_CLIENT, [client_id])
        if await self.store.get_retailer(body["retailer_id"]) is None:
            raise NotFound(f"retailer {body['retailer_id']!r} is not registered")
        valid_from = body.get("valid_from")
        created, announced = await self._register(who, [(
            client_id, body["retailer_id"], body["contracted_power_kw"], body.get("feeder_id"),
            _ts(valid_from) if valid_from else time.time())])
        await self.store.audit([AuditEntry(str(who), client_id, Action.MANAGE_CLIENT.value, right)])
        return created == 1, announced

    async def put_clients(self, who: Principal, clients: list[dict[str, Any]]) -> dict[str, int]:
        """Register or change many clients at once (a DSO's import), each as :meth:`put_client` would; all or
        nothing: an unknown retailer or a supplier switch without a later ``valid_from`` stores none of them."""
        right = await self._authorize_named(who, Action.MANAGE_CLIENT, [c["client_id"] for c in clients])
        wanted = sorted({c["retailer_id"] for c in clients})
        unknown = sorted(set(wanted) - await self.store.known_retailers(wanted))
        if unknown:
            raise NotFound(f"retailer(s) not registered: {', '.join(repr(r) for r in unknown[:20])}")
        now = time.time()
        created, _ = await self._register(who, [
            (c["client_id"], c["retailer_id"], c["contracted_power_kw"], c.get("feeder_id"),
             _ts(c["valid_from"]) if c.get("valid_from") else now) for c in clients])
        await self.store.audit([AuditEntry(str(who), c["client_id"], Action.MANAGE_CLIENT.value, right)
                                for c in clients])
        return {"created": created, "updated": len(clients) - created}

    async def _register(self, who: Principal, clients: list[tuple[str, str, float, str | None, float]]
                        ) -> tuple[int, str | None]:
        """Store client registrations; when a supplier history changes (a new client, a supplier switch), each
        retailer whose supply changes is told, in the same write, through the outbox: a ``customers`` message
        (re-sent until acknowledged, kept across restarts) with all its periods of those clients. Returns how
        many clients are new and the id of the announcing request (None: nothing to announce).

        Registrations of the same client are serialised in this process (planning reads the stored row and the
        write must follow from what was read: two at once announced contradictory periods with the same revision);
        hub replicas are not serialised with each other (docs/decisions.md, "Review fixes: data")."""
        stripes = sorted({hash(c[0]) % REGISTER_LOCK_STRIPES for c in clients})
        async with contextlib.AsyncExitStack() as held:
            for i in stripes:  # always in the same order: two batches cannot wait for each other
                await held.enter_async_context(self._register_locks[i])
            return await self._register_locked(who, clients)

    async def _register_locked(self, who: Principal, clients: list[tuple[str, str, float, str | None, float]]
                               ) -> tuple[int, str | None]:
        plan = await self.store.plan_clients(clients)
        per_retailer: dict[str, list[CustomerChange]] = defaultdict(list)
        for cid, (before, after) in sorted(plan.history.items()):
            for rid, spans in customer_changes(before, after).items():
                per_retailer[rid].append(CustomerChange(client_id=cid, revision=plan.revisions[cid], periods=[
                    SupplyPeriod(valid_from=datetime.fromtimestamp(f, UTC),
                                 valid_until=None if u is None else datetime.fromtimestamp(u, UTC))
                    for f, u in spans]))
        if not per_retailer:
            await self.store.kv.batch(plan.mutations)
            return plan.created, None
        t0 = time.perf_counter()
        request_id = new_id()
        now = time.time()
        outbox = [OutboxItem(msg.msg_id, request_id, rid, "customers", encode(msg))
                  for rid, items in sorted(per_retailer.items()) for msg in _customer_messages(items)]
        parties = {rid: {"retailers": {rid: ClientState.PENDING.value}, "state": ClientState.PENDING.value,
                         "detail": {"clients": len(items)}, "trace": {}, "updated_at": now}
                   for rid, items in per_retailer.items()}
        body = {"clients": sorted(plan.history)[:100], "client_count": len(plan.history)}
        # The data access log: which retailer is given which client's supply periods, on the right it rests on.
        audit = [AuditEntry(f"retailer:{rid}", item.client_id, "receive_supplier_periods",
                            "retailer:supplier-of-period", ref=request_id, at=now)
                 for rid, items in sorted(per_retailer.items()) for item in items]
        await self._create(who, None, body, request_id, "customers", now + CUSTOMERS_DELIVERY_S, {}, outbox,
                           parties, audit, t0, mutations=plan.mutations)
        log.info("supplier changes of %d client(s) announced to %s (request %s)", len(plan.history),
                 ", ".join(sorted(per_retailer)), request_id)
        return plan.created, request_id

    async def get_client(self, who: Principal, client_id: str) -> dict[str, Any]:
        """A client with its supplier history, for the DSO or its current retailer."""
        client = await self.store.get_client(client_id)
        current = None if client is None else supplier_at(client["suppliers"], time.time())
        await self._authorize_logged(who, Action.READ_CLIENT, client_id, Context(supplier_at_time=current),
                                     exists=client is not None)
        assert client is not None  # an unknown client was answered NotFound above
        return {"client_id": client_id, "retailer_id": current,
                "contracted_power_kw": client["contracted_power_kw"], "feeder_id": client["feeder_id"],
                "suppliers": [{"retailer_id": p["retailer_id"], "valid_from": iso(p["valid_from"])}
                              for p in visible_suppliers(who, client["suppliers"])]}

    async def _known_clients(self, client_ids: list[str]) -> dict[str, dict[str, Any]]:
        clients = await self.store.get_clients(client_ids)
        unknown = sorted(set(client_ids) - set(clients))
        if unknown:
            raise NotFound(f"unknown client(s): {', '.join(unknown[:20])}")
        return clients

    # -- meter readings, consumption, billing ---------------------------------------------------------------

    async def upload_readings(self, who: Principal, readings: list[dict[str, Any]]) -> dict[str, Any]:
        """Store meter readings; an upload for an interval already stored is a correction."""
        right = await self._authorize_named(who, Action.UPLOAD_READINGS, [r["client_id"] for r in readings])
        await self._known_clients(sorted({r["client_id"] for r in readings}))
        blocks = [{**r, "start": _ts(r["start"]), "quality": r.get("quality") or "measured"} for r in readings]
        stored, corrections = await self.store.put_readings(blocks)
        await self.store.audit([AuditEntry(str(who), cid, Action.UPLOAD_READINGS.value, right)
                                for cid in sorted({r["client_id"] for r in readings})])
        return {"stored": stored, "corrections": corrections}

    async def consumption_profile(self, who: Principal, client_id: str, start: float, end: float,
                                  resolution_s: int) -> dict[str, Any]:
        """A client's consumption series, for the DSO or the retailer that supplied it over the whole range."""
        if end <= start:
            raise ValueError("'to' must be after 'from'")
        if (end - start) / resolution_s > 100_000:
            raise ValueError("too many points: ask for a shorter range or a coarser resolution_s")
        client = await self.store.get_client(client_id)
        spans = [] if client is None else supply_spans(client["suppliers"], start, end)
        owner = spans[0][0] if len(spans) == 1 and covered_by(spans, spans[0][0], start, end) else None
        await self._authorize_logged(who, Action.READ_CONSUMPTION, client_id, Context(
            covered_by_supplier=owner, suppliers_in_range=tuple(sorted({rid for rid, _, _ in spans}))),
            exists=client is not None)
        assert client is not None  # an unknown client was answered NotFound above
        periods = client["suppliers"]

        def may_have(t0: float, t1: float) -> bool:  # the last interval may run past the range, into another's time
            return decide(who, Action.READ_CONSUMPTION,
                          Context(covered_by_supplier=whole_supplier(periods, t0, t1))).allowed

        blocks, withheld = withhold_straddling(
            clip_blocks(await self.store.readings(client_id, start, end), start, end), end, may_have)
        return {"client_id": client_id, "from": iso(start), "to": iso(end), "resolution_s": resolution_s,
                "series": [{**p, "start": iso(p["start"])} for p in profile(blocks, start, end, resolution_s)],
                "withheld": [self._withheld(w, periods, who) for w in withheld]}

    @staticmethod
    def _withheld(w: dict[str, Any], periods: list[dict[str, Any]], reader: Principal) -> dict[str, Any]:
        """A reading interval withheld from a retailer, as ``reader`` sees it (with the switch inside it): the
        retailers that supplied it are those ``reader`` may see (:func:`visible_suppliers`), so a retailer is not
        told who supplied the client before or after it."""
        switches = switches_in(periods, w["start"], w["end"])
        at = ", ".join(str(iso(t)) for t in switches)
        reason = (f"straddles a supplier switch ({at}): attributed to no retailer" if switches
                  else "not supplied by one retailer for the whole interval")
        visible = {p["retailer_id"] for p in visible_suppliers(reader, periods)}
        return {"start": iso(w["start"]), "end": iso(w["end"]), "resolution_s": w["resolution_s"],
                "retailers": [rid for rid, _, _ in supply_spans(periods, w["start"], w["end"]) if rid in visible],
                "reason": reason}

    async def request_billing(self, who: Principal, body: dict[str, Any], key: str | None
                              ) -> tuple[int, dict[str, Any]]:
        """Deliver each client's readings of the period to the retailer(s) that supplied it, split at switches."""
        right = await self._authorize_named(who, Action.REQUEST_BILLING, body.get("client_ids"))
        async with self._keyed(who, key, body) as slot:
            if slot.answer is not None:
                return slot.answer
            return await self._billing(who, body, key, right, slot.request_id)

    async def _billing(self, who: Principal, body: dict[str, Any], key: str | None, right: str, request_id: str
                       ) -> tuple[int, dict[str, Any]]:
        t0 = time.perf_counter()
        start, end = _ts(body["period_start"]), _ts(body["period_end"])
        if end <= start:
            raise ValueError("period_end must be after period_start")
        client_ids = list(dict.fromkeys(body["client_ids"]))
        clients = await self._known_clients(client_ids)
        per_retailer: dict[str, list[BillingClient]] = defaultdict(list)
        entries: dict[str, dict[str, Any]] = {}
        unsupplied = []
        spans_of = {cid: supply_spans(clients[cid]["suppliers"], start, end) for cid in client_ids}
        # Every client's readings of every supply span in one storage call (one per span was a thread hand-off each),
        # and of the unsupplied time before its first supplier, where an interval may reach into the first supply.
        queries = [(cid, s, e) for cid in client_ids for _, s, e in spans_of[cid]]
        queries += [(cid, start, spans[0][1]) for cid, spans in spans_of.items() if spans and spans[0][1] > start]
        found = dict(zip(queries, await self.store.readings_many(queries), strict=True))
        for cid in client_ids:
            spans = spans_of[cid]
            if not spans:
                unsupplied.append(cid)
                continue
            entries[cid] = {"retailers": {}, "state": ClientState.PENDING.value, "detail": {}, "trace": {},
                            "updated_at": time.time()}
            periods = clients[cid]["suppliers"]
            withheld: list[dict[str, Any]] = []
            if spans[0][1] > start:  # nobody supplied the start of the period: its readings go to no one
                _, held = withhold_straddling(clip_blocks(found[(cid, start, spans[0][1])], start, spans[0][1]),
                                              spans[0][1], lambda t0, t1: False)
                withheld += [self._withheld(w, periods, who) for w in held]
            for rid, s, e in spans:
                to = Principal("retailer", rid)

                def may_have(t0: float, t1: float, to: Principal = to, periods: list[dict[str, Any]] = periods
                             ) -> bool:  # an interval running past the span may straddle a supplier switch
                    return decide(to, Action.DELIVER_BILLING,
                                  Context(covered_by_supplier=whole_supplier(periods, t0, t1))).allowed

                blocks, held = withhold_straddling(clip_blocks(found[(cid, s, e)], s, e), e, may_have)
                withheld += [self._withheld(w, periods, who) for w in held]
                per_retailer[rid].append(BillingClient(
                    client_id=cid, period_start=datetime.fromtimestamp(s, UTC),
                    period_end=datetime.fromtimestamp(e, UTC),
                    readings=[ReadingBlock(**{**b, "start": datetime.fromtimestamp(b["start"], UTC)}) for b in blocks]))
                entries[cid]["retailers"][rid] = ClientState.PENDING.value
                entries[cid]["detail"].setdefault("corrected", False)
                entries[cid]["detail"]["corrected"] |= any(b["corrected"] for b in blocks)
            if withheld:  # the DSO sees which intervals went to no retailer, and why
                entries[cid]["detail"]["withheld"] = withheld
        if unsupplied:
            raise Conflict(f"no retailer supplied {', '.join(unsupplied[:20])} in the billed period")
        outbox = []
        for rid, items in sorted(per_retailer.items()):
            for i in range(0, len(items), BILLING_CLIENTS_PER_MESSAGE):
                chunk = items[i:i + BILLING_CLIENTS_PER_MESSAGE]
                msg = BillingData(request_id=request_id, period_start=body["period_start"],
                                  period_end=body["period_end"], clients=chunk)
                outbox.append(OutboxItem(msg.msg_id, request_id, rid, "billing", encode(msg),
                                         [c.client_id for c in chunk]))
        audit = [AuditEntry(str(who), cid, Action.REQUEST_BILLING.value, right, ref=request_id) for cid in client_ids]
        return await self._create(who, key, body, request_id, "billing", time.time() + BILLING_DELIVERY_S, entries,
                                  outbox, {}, audit, t0)

    # -- tariffs ------------------------------------------------------------------------------------------

    async def publish_tariff(self, who: Principal, body: dict[str, Any], key: str | None
                             ) -> tuple[int, dict[str, Any]]:
        """Store a new tariff version, publish it retained for late joiners, and deliver it to every retailer."""
        self.authorize(who, Action.PUBLISH_TARIFF)
        async with self._keyed(who, key, body) as slot:
            if slot.answer is not None:
                return slot.answer
            return await self._tariff(who, body, key, slot.request_id)

    async def _tariff(self, who: Principal, body: dict[str, Any], key: str | None, request_id: str
                      ) -> tuple[int, dict[str, Any]]:
        t0 = time.perf_counter()
        if _ts(body["valid_to"]) <= _ts(body["valid_from"]):
            raise ValueError("valid_to must be after valid_from")
        if body["tariff_id"] == CURRENT_TARIFF:
            raise ValueError(f"tariff_id {CURRENT_TARIFF!r} is reserved: GET /v1/tariffs/current names the latest")
        tariff = json.loads(json.dumps(body, default=str))
        version = await self.store.put_tariff(tariff)
        stored = await self.store.get_tariff(body["tariff_id"], version)
        msg = Tariff(tariff_id=body["tariff_id"], version=version, valid_from=body["valid_from"],
                     valid_to=body["valid_to"], periods=body["periods"],
                     published=None if stored is None else stored.get("published"))
        if self.publish_tariff_retained is not None:
            await self.publish_tariff_retained(encode(msg))
        retailers = await self.store.retailer_ids()
        parties = {rid: {"retailers": {rid: ClientState.PENDING.value}, "state": ClientState.PENDING.value,
                         "detail": {}, "trace": {}, "updated_at": time.time()} for rid in retailers}
        copies = {rid: msg.model_copy(update={"msg_id": recipient_msg_id(msg.msg_id, rid)}) for rid in retailers}
        outbox = [OutboxItem(copy.msg_id, request_id, rid, "tariff", encode(copy)) for rid, copy in copies.items()]
        status, answer = await self._create(who, key, body, request_id, "tariff", time.time() + TARIFF_DELIVERY_S,
                                            {}, outbox, parties, [], t0, extra={"version": version})
        return status, {**answer, "version": version}

    async def deliver_current_tariff(self, who: Principal, retailer_id: str) -> str | None:
        """A retailer registered after a tariff was published is sent the current one through its outbox (acked,
        like the first delivery; ``who`` registered it and may follow the delivery); returns that request's id,
        or None when no tariff has been published."""
        self.authorize(who, Action.MANAGE_RETAILER)
        stored = await self.store.current_tariff()
        if stored is None:
            return None
        t0 = time.perf_counter()
        request_id = new_id()
        msg = tariff_message(stored)
        msg = msg.model_copy(update={"msg_id": new_id()})
        parties = {retailer_id: {"retailers": {retailer_id: ClientState.PENDING.value},
                                 "state": ClientState.PENDING.value, "detail": {}, "trace": {},
                                 "updated_at": time.time()}}
        outbox = [OutboxItem(msg.msg_id, request_id, retailer_id, "tariff", encode(msg))]
        body = {"tariff_id": stored["tariff_id"], "version": stored["version"], "retailer_id": retailer_id,
                "reason": "retailer registered after the tariff was published"}
        await self._create(who, None, body, request_id, "tariff", time.time() + TARIFF_DELIVERY_S, {}, outbox,
                           parties, [], t0, extra={"version": stored["version"]})
        log.info("retailer %s registered: tariff %s v%d queued for it (request %s)", retailer_id,
                 stored["tariff_id"], stored["version"], request_id)
        return request_id

    async def current_tariff(self, who: Principal) -> dict[str, Any]:
        """The tariff published last, from storage (anyone with a token)."""
        self.authorize(who, Action.READ_TARIFF)
        stored = await self.store.current_tariff()
        if stored is None:
            raise NotFound("no tariff has been published yet")
        found = await self.store.get_tariff(stored["tariff_id"], stored["version"])
        return found if found is not None else stored

    async def get_tariff(self, who: Principal, tariff_id: str, version: int | None) -> dict[str, Any]:
        """One stored version of a tariff, its latest when ``version`` is None (anyone with a token)."""
        self.authorize(who, Action.READ_TARIFF)
        found = await self.store.get_tariff(tariff_id, version)
        if found is None:
            what = f"tariff {tariff_id!r}" + ("" if version is None else f" version {version}")
            raise NotFound(f"{what} does not exist")
        return found

    # -- flexibility requests -------------------------------------------------------------------------------

    async def create_emergency(self, who: Principal, body: dict[str, Any], key: str | None
                               ) -> tuple[int, dict[str, Any]]:
        """Announce emergency mode to the targeted clients' retailers before it takes effect."""
        start = _ts(body["start"])
        end = start + body["duration_s"]
        params = EmergencyParams(start=body["start"], end=datetime.fromtimestamp(end, UTC),
                                 power_limit_kw=body["power_limit_kw"])
        return await self._client_request(who, Action.TRIGGER_EMERGENCY, RequestKind.EMERGENCY, body, key, params,
                                          at=start, deadline=end)

    async def create_load_shift(self, who: Principal, body: dict[str, Any], key: str | None
                                ) -> tuple[int, dict[str, Any]]:
        """Ask the targeted clients' gateways to move flexible loads out of a window."""
        start, end = _ts(body["window_start"]), _ts(body["window_end"])
        if end <= start:
            raise ValueError("window_end must be after window_start")
        params = LoadShiftParams(start=body["window_start"], end=body["window_end"], reason=body.get("reason"))
        return await self._client_request(who, Action.TRIGGER_LOAD_SHIFT, RequestKind.LOAD_SHIFT, body, key, params,
                                          at=start, deadline=end)

    async def create_load_reduction(self, who: Principal, body: dict[str, Any], key: str | None
                                    ) -> tuple[int, dict[str, Any]]:
        """Phase one of a load reduction: ask the retailers which targeted clients are available."""
        start = _ts(body["start"])
        end = start + body["duration_s"]
        params = AvailabilityParams(start=body["start"], end=datetime.fromtimestamp(end, UTC),
                                    reduction_kw=body["reduction_kw"])
        return await self._client_request(
            who, Action.TRIGGER_LOAD_REDUCTION, RequestKind.AVAILABILITY, body, key, params, at=start, deadline=end,
            request_type="load_reduction",
            extra={"phase": "availability", "phase_due": time.time() + body["respond_within_s"], "answered": 0})

    async def _client_request(self, who: Principal, action: Action, kind: RequestKind, body: dict[str, Any],
                              key: str | None, params: Params, *, at: float, deadline: float,
                              request_type: str | None = None, extra: dict[str, Any] | None = None
                              ) -> tuple[int, dict[str, Any]]:
        t0 = time.perf_counter()
        right = await self._authorize_named(who, action, body.get("client_ids"), body.get("feeder_id"))
        async with self._keyed(who, key, body) as slot:
            if slot.answer is not None:
                return slot.answer
            return await self._new_client_request(who, action, kind, body, key, params, at=at, deadline=deadline,
                                                  request_type=request_type, extra=extra, right=right, t0=t0,
                                                  request_id=slot.request_id)

    async def _new_client_request(self, who: Principal, action: Action, kind: RequestKind, body: dict[str, Any],
                                  key: str | None, params: Params, *, at: float, deadline: float,
                                  request_type: str | None, extra: dict[str, Any] | None, right: str, t0: float,
                                  request_id: str) -> tuple[int, dict[str, Any]]:
        if deadline <= time.time():
            raise ValueError("the request would already be over: its end is in the past")
        client_ids = await self._targets(body)
        clients = await self._known_clients(client_ids)
        by_retailer: dict[str, list[str]] = defaultdict(list)
        unsupplied = []
        for cid in client_ids:
            rid = supplier_at(clients[cid]["suppliers"], at)
            if rid is None:
                unsupplied.append(cid)
            else:
                by_retailer[rid].append(cid)
        if unsupplied:
            raise Conflict(f"no retailer supplies {', '.join(unsupplied[:20])} at {iso(at)}")
        expires = datetime.fromtimestamp(deadline, UTC)
        now = time.time()
        entries = {cid: {"retailers": {rid: ClientState.PENDING.value}, "state": ClientState.PENDING.value,
                         "detail": {}, "trace": {}, "updated_at": now}
                   for rid, cids in by_retailer.items() for cid in cids}
        if kind is RequestKind.AVAILABILITY:  # the bound of each client's availability claim (cloud_hub.book)
            for cid, e in entries.items():
                e["max_kw"] = clients[cid]["contracted_power_kw"]
        outbox = []
        for rid, all_cids in sorted(by_retailer.items()):
            for cids in _chunks(all_cids, REQUEST_CLIENTS_PER_MESSAGE):
                msg = Request(request_id=request_id, kind=kind, client_ids=cids, params=params, expires_at=expires)
                outbox.append(OutboxItem(msg.msg_id, request_id, rid, "request", encode(msg), cids))
        audit = [AuditEntry(str(who), cid, action.value, right, ref=request_id, at=now) for cid in client_ids]
        return await self._create(who, key, body, request_id, request_type or kind.value, deadline, entries, outbox,
                                  {}, audit, t0, extra={**(extra or {}), "targets": len(entries)})

    async def finish_availability(self, request_id: str) -> None:
        """Phase two of a load reduction: disconnect the most available clients until the reduction is covered."""
        async with self.book.lock(request_id):
            req = await self.store.get_request(request_id, ["r:", "c:"])
            if req is None or req["meta"].get("phase") != "availability":
                self.book.phases.pop(request_id, None)
                return
            meta = req["meta"]
            available = {cid: e.get("available_kw", 0.0) for cid, e in req["clients"].items()
                         if e.get("availability") == "available"}
            chosen = choose_for_reduction(available, meta["body"]["reduction_kw"])
            now = time.time()
            put: dict[str, Any] = {}
            counts: dict[str, int] = defaultdict(int)
            by_retailer: dict[str, list[str]] = defaultdict(list)
            for cid, e in req["clients"].items():
                if cid in chosen:
                    rid = next(iter(e["retailers"]))
                    e["retailers"][rid] = ClientState.PENDING.value
                    e["state"] = ClientState.PENDING.value
                    e["revision"] = meta.get("revision", 1)
                    by_retailer[rid].append(cid)
                elif not ClientState(e["state"]).terminal:  # a refused client keeps its state
                    answer = e.get("availability")
                    e["state"] = answer if answer in ("available", "unavailable") else ClientState.UNREACHABLE.value
                    if answer is None:
                        e["detail"] = {"reason": "no availability answer within respond_within_s"}
                e["updated_at"] = now
                counts[e["state"]] += 1
                put[f"c:{cid}"] = e
            selected_kw = round(sum(available[c] for c in chosen), 3)
            targets = reduction_targets(available, chosen, meta["body"]["reduction_kw"])
            items = _reduction_items(request_id, by_retailer, targets, meta["body"]["start"], meta["deadline"],
                                     meta.get("revision", 1))
            put.update({"r:phase": "dispatch", "r:counts": dict(counts),
                        "r:selection": {"chosen": chosen, "selected_kw": selected_kw,
                                        "reduction_kw": meta["body"]["reduction_kw"],
                                        "covered": selected_kw >= meta["body"]["reduction_kw"]}})
            if not chosen:  # the available answers cover nothing: nothing was reduced
                state = RequestState.FAILED
                put.update({"r:state": state.value, "r:completed_at": now, "r:phase": "done"})
                await self.book._write(request_id, put)
                return
            await self.book.add_messages(request_id, items, put)
            # Only now: when the write fails (storage unavailable), the phase stays due and is closed again.
            self.book.phases.pop(request_id, None)

    async def cancel(self, who: Principal, request_id: str, forwarded: bool = False) -> dict[str, Any]:
        """Cancel a request that has not ended; every retailer it was sent to is told, and so every home.
        On a replica that does not own the request, the owner does it (``forwarded``: asked by another replica)."""
        req = await self.store.get_request(request_id, ["r:", "c:", "p:"])
        if req is None:
            raise NotFound(f"request {request_id!r} does not exist")
        self.authorize(who, Action.CANCEL_REQUEST, Context(issuer=req["meta"]["issuer"]))
        owner = req["meta"].get("owner")
        if self.replicas is not None and owner != self.replicas.me:
            if forwarded or owner is None:
                raise OwnerUnavailable(f"request {request_id} is changing owner replica; retry shortly")
            status, body = await self.replicas.forward_cancel(owner, str(who), request_id)
            if status == 200:
                return body
            raise {403: Forbidden, 404: NotFound, 409: Conflict}.get(status, OwnerUnavailable)(body.get("message", ""))
        if self.replicas is not None:
            self.replicas.check_ready()
        async with self.book.lock(request_id):
            req = await self.store.get_request(request_id, ["r:", "c:", "p:"])
            assert req is not None
            meta = req["meta"]
            if RequestState(meta["state"]).terminal:
                raise Conflict(f"request {request_id} has already ended ({meta['state']})")
            now = time.time()
            put: dict[str, Any] = {}
            reached: dict[str, list[str]] = defaultdict(list)
            counts: dict[str, int] = defaultdict(int)
            for cid, e in req["clients"].items():
                # Every retailer the request addressed, even one whose entry still reads pending: a round is
                # published before it is recorded as sent (and a revision resets its clients to pending), so the
                # message may be at the broker already. A bridge that never got it stops nothing, and acknowledges.
                for rid in e["retailers"]:
                    reached[rid].append(cid)
                if not ClientState(e["state"]).terminal:
                    e["state"] = ClientState.CANCELLED.value
                    e["updated_at"] = now
                    put[f"c:{cid}"] = e
                counts[e["state"]] += 1
            dropped = [m for m, i in self.book.outbox.items() if i.request_id == request_id]
            items = []
            for rid, cids in sorted(reached.items()):
                msg = Cancel(request_id=request_id, client_ids=cids)
                items.append(OutboxItem(msg.msg_id, request_id, rid, "cancel", encode(msg), []))
            put.update({"r:state": RequestState.CANCELLED.value, "r:completed_at": now, "r:phase": "done",
                        "r:counts": dict(counts), "r:cancel": {"requested_at": now, "retailers": {}}})
            await self.store.update_request(request_id, {**put, **{f"o:{i.msg_id}": i.stored() for i in items}},
                                            [f"o:{m}" for m in dropped] or None, close=not items)
            # Forgotten only once the cancel is durable: if it cannot be stored, the request keeps its deadline,
            # phase and messages, as storage still has them.
            for m in dropped:
                self.book.outbox.pop(m, None)
            self.book.deadlines.pop(request_id, None)
            self.book.phases.pop(request_id, None)
            for item in items:
                self.book.outbox[item.msg_id] = item
            self.book.kick()
        self.metrics.requests_finished.labels(meta["type"], "cancelled").inc()
        return {"request_id": request_id, "state": RequestState.CANCELLED.value,
                "cancel_sent_to": sorted(reached)}

    # -- revisions ------------------------------------------------------------------------------------------

    async def revise(self, who: Principal, request_id: str, changes: dict[str, Any], key: str | None,
                     validate: BodyValidator) -> tuple[int, dict[str, Any]]:
        """A new numbered revision of an emergency, load shift or load reduction: ``changes`` (the fields that
        change) merged into the stored body, validated by ``validate`` as a new request of that type would be,
        and delivered through the same outboxes; clients the revision removes get a cancel, added ones the
        request (docs/decisions.md, "Revisions"). Honours ``Idempotency-Key`` as the creating POSTs do."""
        req = await self.store.get_request(request_id, ["r:"])
        if req is None:
            raise NotFound(f"request {request_id!r} does not exist")
        meta = req["meta"]
        right = self.authorize(who, Action.REVISE_REQUEST, Context(issuer=meta["issuer"]))
        if self.replicas is not None:
            if meta.get("owner") != self.replicas.me:
                raise OwnerUnavailable(f"request {request_id} is revised by the replica that owns it; retry shortly")
            self.replicas.check_ready()
        keyed = {"revise": request_id, **changes}
        async with self._keyed(who, key, keyed) as slot:
            if slot.answer is not None:
                return slot.answer
            idem = (str(who), key, body_hash(keyed)) if key else None
            return 202, await self._revise(who, request_id, changes, validate, right, idem)

    async def _revise(self, who: Principal, request_id: str, changes: dict[str, Any], validate: BodyValidator,
                      right: str, idem: tuple[str, str, str] | None) -> dict[str, Any]:
        async with self.book.lock(request_id):
            req = await self.store.get_request(request_id, ["r:", "c:"])
            assert req is not None  # a request row is never deleted
            meta, entries = req["meta"], req["clients"]
            kind, state, now = meta["type"], RequestState(meta["state"]), time.time()
            if kind not in REVISABLE:
                raise Conflict(f"a {kind} request cannot be revised")
            if state in (RequestState.CANCELLED, RequestState.EXPIRED) or meta["deadline"] <= now:
                why = state.value if state in (RequestState.CANCELLED, RequestState.EXPIRED) else "its window is over"
                raise Conflict(f"request {request_id} has ended ({why}): it cannot be revised")
            phase = meta.get("phase")
            if kind == "load_reduction" and phase != "availability":
                phase = "dispatch"  # its clients were chosen (a finished one has a selection too)
            allowed = REVISABLE[kind] if phase != "dispatch" else REVISABLE_AFTER_SELECTION
            refused = [f for f in changes if f not in allowed]
            if refused:
                why = ("the clients were chosen on the stored reduction" if kind == "load_reduction" and phase ==
                       "dispatch" else f"a {kind} revision may change only {', '.join(sorted(allowed))}")
                raise InvalidBody([{"field": f, "message": f"cannot be revised: {why}"} for f in sorted(refused)])
            merged = {**meta["body"], **changes}
            for one, other in (("client_ids", "feeder_id"), ("feeder_id", "client_ids")):
                if one in changes:
                    merged.pop(other, None)
            body = validate(kind, merged)
            revision = int(meta.get("revision", 1)) + 1
            start, end, params = _revised_params(kind, phase, body)
            if end <= now:
                raise ValueError("the revised request would already be over: its end is in the past")
            live = {cid for cid, e in entries.items() if not e.get("removed")}
            targets: list[str] = []
            added: list[str] = []
            removed: list[str] = []
            if phase == "dispatch":
                targets = sorted(set((meta.get("selection") or {}).get("chosen", [])) & live)
            elif phase != "availability":  # (in that phase nothing is sent: the answers stand, and the
                targets = await self._targets(body) if {"client_ids", "feeder_id"} & set(changes) else sorted(live)
                added = [c for c in targets if c not in entries or entries[c].get("removed")]
                removed = sorted(live - set(targets))  # selection uses the revised reduction_kw)
            # Every client the revision is sent to now (or, in the availability phase, at the dispatch) is looked up
            # as at creation: its supplier at the revised start. A kept client supplied then by another retailer than
            # the one the request went to is a conflict: the revision is not re-routed (docs/decisions.md).
            added_set = set(added)
            kept = [c for c in (sorted(live) if phase == "availability" else targets) if c not in added_set]
            supplier: dict[str, str | None] = {}
            if added or kept:
                known = await self._known_clients([*added, *kept])
                supplier = {cid: supplier_at(known[cid]["suppliers"], start) for cid in [*added, *kept]}
                unsupplied = [cid for cid, rid in supplier.items() if rid is None]
                if unsupplied:
                    raise Conflict(f"no retailer supplies {', '.join(unsupplied[:20])} at {iso(start)}")
                moved = [f"{cid} (sent to {was}, supplied by {supplier[cid]} then)" for cid in kept
                         if supplier[cid] != (was := next(iter(entries[cid]["retailers"])))]
                if moved:
                    raise Conflict(f"the revision would move {len(moved)} client(s) to another retailer at "
                                   f"{iso(start)}: {', '.join(moved[:20])}; a revision keeps each client's "
                                   f"retailer: cancel the request and create a new one")
            put: dict[str, Any] = {}
            counts = Counter({ClientState(k): v for k, v in (meta.get("counts") or {}).items()})
            by_retailer: dict[str, list[str]] = defaultdict(list)
            cancels: dict[str, list[str]] = defaultdict(list)
            for cid in targets:
                e = entries.get(cid)
                if e is None or e.get("removed"):
                    rid = supplier[cid]
                    assert rid is not None
                    if e is not None:
                        _revised_history(e)
                    e = {"retailers": {}, "state": ClientState.PENDING.value, "detail": {}, "trace": {},
                         "history": (e or {}).get("history", [])}
                    counts[ClientState.PENDING] += 1
                else:
                    rid = next(iter(e["retailers"]))
                    _revised_history(e)
                    counts[ClientState(e["state"])] -= 1
                    counts[ClientState.PENDING] += 1
                e.update({"retailers": {rid: ClientState.PENDING.value}, "state": ClientState.PENDING.value,
                          "detail": {}, "trace": {}, "updated_at": now, "revision": revision})
                put[f"c:{cid}"] = e
                by_retailer[rid].append(cid)
            for cid in removed:
                e = entries[cid]
                _revised_history(e)
                counts[ClientState(e["state"])] -= 1
                for rid in e["retailers"]:  # pending or not: it may be at the broker already (see cancel)
                    cancels[rid].append(cid)
                e.update({"state": ClientState.CANCELLED.value, "updated_at": now, "revision": revision,
                          "removed": revision, "detail": {"reason": f"removed from the request by revision "
                                                                     f"{revision}"}})
                put[f"c:{cid}"] = e
            dropped = [m for m, i in self.book.outbox.items() if i.request_id == request_id and i.kind == "request"]
            items = []
            expires = datetime.fromtimestamp(end, UTC)
            if phase == "dispatch":  # the chosen homes keep their own targets (in the order chosen): the window moves
                selection: dict[str, Any] = meta.get("selection") or {}
                sent_to = set(targets)
                chosen = [c for c in selection.get("chosen", []) if c in sent_to]
                available = {c: float(entries[c].get("available_kw") or 0.0) for c in chosen}
                # (reduction_kw cannot change in this phase: the body's is the one the selection rests on)
                shares = reduction_targets(available, chosen, float(body["reduction_kw"]))
                items = _reduction_items(request_id, by_retailer, shares, body["start"], end, revision)
            else:
                for rid, all_cids in sorted(by_retailer.items()):
                    for cids in _chunks(all_cids, REQUEST_CLIENTS_PER_MESSAGE):
                        msg = Request(request_id=request_id, kind=_wire_kind(kind), client_ids=cids, params=params,
                                      expires_at=expires, revision=revision)
                        items.append(OutboxItem(msg.msg_id, request_id, rid, "request", encode(msg), cids,
                                                revision=revision))
            for rid, cids in sorted(cancels.items()):
                notice = Cancel(request_id=request_id, client_ids=cids, revision=revision)
                items.append(OutboxItem(notice.msg_id, request_id, rid, "removal", encode(notice), []))
            history = meta.get("revisions") or [{"revision": 1, "at": meta["created_at"], "request": meta["body"]}]
            body_json = json.loads(json.dumps(body, default=str))
            history = [*history, {"revision": revision, "at": now, "by": str(who), "request": body_json,
                                  "changes": json.loads(json.dumps(changes, default=str)),
                                  "added": added, "removed": removed}]
            counts = Counter({k: v for k, v in counts.items() if v > 0})
            new_state = RequestState.DISPATCHING if targets or phase == "availability" else (
                request_state_from_counts(RequestState.DISPATCHING, counts))
            put.update({"r:body": body_json, "r:revision": revision, "r:revisions": history, "r:deadline": end,
                        "r:state": new_state.value, "r:counts": {k.value: v for k, v in counts.items()},
                        "r:completed_at": None})
            if kind == "load_reduction":
                put["r:phase"] = phase
            else:
                put["r:phase"] = None
                put["r:targets"] = len(targets)
            answer = {"request_id": request_id, "revision": revision, "state": new_state.value}
            audit = [AuditEntry(str(who), cid, Action.REVISE_REQUEST.value, right, ref=request_id, at=now)
                     for cid in sorted({*targets, *removed})]
            owner = self.replicas.me if self.replicas is not None else None
            await self.store.update_request(
                request_id, {**put, **{f"o:{i.msg_id}": i.stored() for i in items}},
                [f"o:{m}" for m in dropped] or None, audit, reopen=(end, owner),
                idempotency=(*idem, 202, answer) if idem else None)
            for m in dropped:  # only once the revision is durable (a failed write leaves storage as it was)
                self.book.outbox.pop(m, None)
            self.book.deadlines[request_id] = end
            if request_id in self.book.phases:
                self.book.phases[request_id].reduction_kw = body["reduction_kw"]
            for item in items:
                self.book.outbox[item.msg_id] = item
            self.book.kick()
        log.info("request %s revised to revision %d by %s (%d client(s) sent it, %d removed)", request_id, revision,
                 who, len(targets), len(removed))
        return answer

    # -- shared ---------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _keyed(self, who: Principal, key: str | None, body: dict[str, Any]) -> AsyncIterator[KeySlot]:
        """The ``Idempotency-Key`` protocol around creating a request: the first attempt claims the key (a single
        hub in memory, replicas in storage with a compare-and-set), so that two attempts at once, on one hub or on
        two replicas, cannot both create, and gets the request id to create; a later attempt gets the stored
        answer, or waits for the first attempt's answer, or (replicas) takes over a claim whose attempt died before
        creating anything. An attempt that fails before creating its request releases its claim, so that the DSO's
        retry is tried afresh."""
        if not key:
            yield KeySlot(new_id())
            return
        principal, digest = str(who), body_hash(body)
        if self.replicas is None:  # one hub process: every attempt is here, the claim is kept in memory
            slot, here = await self._claim_here(principal, key, digest)
            if here is None:
                yield slot
                return
            try:
                yield slot
            finally:
                del self._claims_here[(principal, key)]
                here.done.set()
            return
        slot = await self._claim(principal, key, digest)
        if slot.answer is not None or slot.claim is None:
            yield slot
            return
        try:
            yield slot
        except asyncio.CancelledError:
            raise  # its storage write may still land (a thread cannot be stopped): the claim goes stale instead
        except BaseException:
            with contextlib.suppress(StoreUnavailable):  # else it goes stale and is taken over by a retry
                if not await self.store.request_exists(slot.request_id):
                    await self.store.release_idempotency(principal, key, slot.claim)
            raise

    async def _claim_here(self, principal: str, key: str, digest: str) -> tuple[KeySlot, LocalClaim | None]:
        """The claim of a single hub: an attempt with a key another attempt holds waits for it (then reads its
        stored answer); costs no storage call beyond reading the answer, as the key had before claims."""
        waited_until = time.monotonic() + KEY_WAIT_S
        while True:
            held = self._claims_here.get((principal, key))
            if held is None:
                break
            if held.digest != digest:
                raise IdempotencyConflict(f"Idempotency-Key {key!r} is in use with a different body")
            left = waited_until - time.monotonic()
            if left <= 0:
                raise KeyInProgress(f"a request with Idempotency-Key {key!r} is still being created; retry shortly")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(held.done.wait(), left)
        here = self._claims_here[(principal, key)] = LocalClaim(digest, asyncio.Event())  # no await since the check
        try:
            answer, _ = await self.store.idempotency(principal, key)
        except BaseException:
            del self._claims_here[(principal, key)]
            here.done.set()
            raise
        if answer is None:
            return KeySlot(new_id()), here
        del self._claims_here[(principal, key)]
        here.done.set()
        if answer[0] != digest:
            raise IdempotencyConflict(f"Idempotency-Key {key!r} was already used with a different body")
        return KeySlot(answer=(answer[1], answer[2])), None

    def _new_claim(self, digest: str) -> bytes:
        return json.dumps({"hash": digest, "request_id": new_id(), "at": time.time(),
                           "by": self.replicas.me if self.replicas is not None else "hub"}).encode()

    async def _claim(self, principal: str, key: str, digest: str) -> KeySlot:
        mine = self._new_claim(digest)
        if await self.store.claim_idempotency(principal, key, None, mine):  # a new key: one storage call
            return KeySlot(json.loads(mine)["request_id"], claim=mine)
        waited_until = time.monotonic() + KEY_WAIT_S
        while True:
            answer, claim = await self.store.idempotency(principal, key)
            if answer is not None:
                if answer[0] != digest:
                    raise IdempotencyConflict(f"Idempotency-Key {key!r} was already used with a different body")
                return KeySlot(answer=(answer[1], answer[2]))
            held = json.loads(claim) if claim else None  # b"": released
            if held is not None:
                made = await self.store.request_exists(held["request_id"])
                if held["hash"] != digest and (made or time.time() - held["at"] <= KEY_CLAIM_STALE_S):
                    raise IdempotencyConflict(f"Idempotency-Key {key!r} is in use with a different body")
                if made and time.monotonic() > waited_until:
                    return KeySlot(answer=await self._repair(principal, key, held))
                if made or time.time() - held["at"] <= KEY_CLAIM_STALE_S:
                    if time.monotonic() > waited_until:
                        raise KeyInProgress(f"a request with Idempotency-Key {key!r} is still being created; "
                                            "retry shortly")
                    await asyncio.sleep(0.05)
                    continue
            mine = self._new_claim(digest)
            if await self.store.claim_idempotency(principal, key, claim, mine):
                if held is not None:
                    log.warning("Idempotency-Key %r of %s: took over a claim of %.0f s ago that created nothing",
                                key, principal, time.time() - held["at"])
                return KeySlot(json.loads(mine)["request_id"], claim=mine)
            # another attempt claimed it in the meantime: look again

    async def _repair(self, principal: str, key: str, held: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The claim's request was stored but its answer was not, for longer than a repeat waits: the attempt
        failed part-way (HBase writes row by row). The request is valid (its row is atomic): the owner queues it
        if it has not (this hub, or this replica when it owns it; another replica's is queued when it reloads)
        and the answer is written, so that every retry gets it."""
        request_id = held["request_id"]
        known = request_id in self.book.deadlines or any(o.request_id == request_id for o in self.book.outbox.values())
        owner = (await self.store.get_request_cells(request_id, ["r:owner"])).get("r:owner")
        if not known and (self.replicas is None or owner == self.replicas.me):
            await self.book.resume(request_id)
            log.warning("request %s of Idempotency-Key %r was stored without its answer; queued it now", request_id,
                        key)
        answer = {"request_id": request_id, "state": RequestState.ACCEPTED.value}
        await self.store.put_idempotent_answer(principal, key, held["hash"], 202, answer)
        return 202, answer

    async def _create(self, who: Principal, key: str | None, body: dict[str, Any], request_id: str, kind: str,
                      deadline: float, clients: dict[str, dict[str, Any]], outbox: list[OutboxItem],
                      parties: dict[str, dict[str, Any]], audit: list[AuditEntry], t0: float,
                      extra: dict[str, Any] | None = None, mutations: Sequence[Mutation] = ()
                      ) -> tuple[int, dict[str, Any]]:
        if self.replicas is not None:
            self.replicas.check_ready()
        now = time.time()
        answer = {"request_id": request_id, "state": RequestState.ACCEPTED.value}
        meta = {"type": kind, "issuer": str(who), "body": json.loads(json.dumps(body, default=str)),
                "created_at": now, "deadline": deadline, "hub_ms": round((time.perf_counter() - t0) * 1000, 3),
                **(extra or {})}
        idem = (str(who), key, body_hash(body), 202, answer) if key else None
        await self.book.create(request_id, meta, clients, outbox, parties, audit, idem, mutations)
        self.metrics.requests_created.labels(kind).inc()
        self.metrics.accept_seconds.labels(kind).observe(time.perf_counter() - t0)
        return 202, answer

    async def _targets(self, body: dict[str, Any]) -> list[str]:
        if body.get("client_ids"):
            return list(dict.fromkeys(body["client_ids"]))
        feeder = body.get("feeder_id")
        if feeder:
            found = await self.store.clients_on_feeder(feeder)
            if not found:
                raise NotFound(f"no client is registered on feeder {feeder!r}")
            return found
        raise ValueError("give client_ids or feeder_id")

    async def get_request(self, who: Principal, request_id: str) -> dict[str, Any]:
        """A request as its issuer sees it: state, per-retailer and per-client progress, per-component trace."""
        req = await self.store.get_request(request_id)
        if req is None:
            raise NotFound(f"request {request_id!r} does not exist")
        meta = req["meta"]
        self.authorize(who, Action.READ_REQUEST, Context(issuer=meta["issuer"]))
        retailers: dict[str, dict[str, Any]] = {}
        clients: dict[str, dict[str, Any]] = {}
        sums: dict[str, list[float]] = defaultdict(list)
        for cid, c in sorted(req["clients"].items()):
            for rid in c["retailers"]:
                r = retailers.setdefault(rid, {"clients": 0, "states": {}})
                r["clients"] += 1
                r["states"][c["state"]] = r["states"].get(c["state"], 0) + 1
            clients[cid] = {"state": c["state"], "retailer_id": next(iter(c["retailers"])),
                            "retailers": c["retailers"], "detail": c.get("detail", {}), "trace": c.get("trace", {}),
                            "updated_at": iso(c["updated_at"])}
            if "available_kw" in c:
                clients[cid]["available_kw"] = c["available_kw"]
            if "revision" in c:  # a revised request: the revision this state answers, and the earlier ones
                clients[cid]["revision"] = c["revision"]
                clients[cid]["history"] = [{**h, "updated_at": iso(h.get("updated_at"))} for h in c.get("history", [])]
            for k in ("retailer_ms", "gateway_ms", "total_ms"):
                if k in c.get("trace", {}):
                    sums[k].append(float(c["trace"][k]))
        for rid, p in sorted(req["parties"].items()):
            retailers[rid] = {"state": p["state"], "updated_at": iso(p["updated_at"])}
        trace: dict[str, Any] = {"hub_ms": meta["hub_ms"]}
        # Stored with the request by the write after its creation (until then only the replica that created it
        # knows it); absent when unknown (a request stored before it was recorded), never a made-up 0.
        storage_ms = meta.get("storage_ms", self.book.storage_ms.get(request_id))
        if storage_ms is not None:
            trace["storage_ms"] = storage_ms
        if meta.get("first_dispatch_at") is not None:
            trace["dispatch_ms"] = round((meta["first_dispatch_at"] - meta["created_at"]) * 1000, 3)
        for k, values in sums.items():
            trace[k] = round(sum(values) / len(values), 3)
            trace[k.replace("_ms", "_max_ms")] = round(max(values), 3)
        if meta.get("completed_at") is not None:
            trace["completion_ms"] = round((meta["completed_at"] - meta["created_at"]) * 1000, 3)
        out = {"request_id": request_id, "type": meta["type"], "state": meta["state"],
               "created_at": iso(meta["created_at"]), "completed_at": iso(meta.get("completed_at")),
               "deadline": iso(meta["deadline"]), "request": meta["body"], "retailers": retailers,
               "clients": clients, "trace": trace}
        for k in ("selection", "version"):
            if k in meta:
                out[k] = meta[k]
        out["revision"] = meta.get("revision", 1)
        out["revisions"] = [{**r, "at": iso(r["at"])} for r in meta.get("revisions") or [
            {"revision": 1, "at": meta["created_at"], "request": meta["body"]}]]
        if "cancel" in meta:
            out["cancel"] = {"requested_at": iso(meta["cancel"]["requested_at"]),
                             "acknowledged_by": {r: iso(t) for r, t in meta["cancel"]["retailers"].items()}}
        return out

    # -- the change feed ------------------------------------------------------------------------------------------

    async def may_follow(self, who: Principal, request_id: str | None) -> None:
        """Raise unless ``who`` may follow the change feed of ``request_id`` (None: of every request it may see):
        its issuer, or a retailer of some of its clients; a request that does not concern a retailer is answered
        as an unknown one (neutral, as the GET)."""
        if request_id is None:
            self.authorize(who, Action.READ_EVENTS)
            return
        req = await self.store.get_request(request_id, ["r:issuer", "c:", "p:"])
        if req is None:
            raise NotFound(f"request {request_id!r} does not exist")
        addressed = {r for c in req["clients"].values() for r in c.get("retailers", {})} | set(req["parties"])
        verdict = decide(who, Action.READ_EVENTS, Context(issuer=req["meta"]["issuer"],
                                                          addressed_retailers=tuple(sorted(addressed))))
        if verdict.conceal:
            raise NotFound(f"request {request_id!r} does not exist")
        if not verdict.allowed:
            raise Forbidden(verdict.reason)

    def may_manage_subscription(self, who: Principal, owner: str | None) -> None:
        """Raise unless ``who`` may create a subscription (``owner`` None) or read or delete one of ``owner``'s;
        another principal's subscription is answered as an unknown one."""
        verdict = decide(who, Action.MANAGE_SUBSCRIPTION, Context(issuer=owner))
        if verdict.conceal:
            raise NotFound("no such subscription")
        if not verdict.allowed:
            raise Forbidden(verdict.reason)

    # -- measurements and audit -------------------------------------------------------------------------------

    async def accept_measurements(self, retailer_id: str, msg: Measurements) -> list[str]:
        """Store the measurements a retailer may send (its own clients at that time); returns refused clients."""
        who = Principal("retailer", retailer_id)
        clients = await self.store.get_clients(sorted({m.client_id for m in msg.items}))
        ok, refused = [], []
        rights: dict[str, str] = {}
        for m in msg.items:
            c = clients.get(m.client_id)
            supplier = supplier_at(c["suppliers"], m.at.timestamp()) if c else None
            verdict = decide(who, Action.SEND_MEASUREMENT, Context(supplier_at_time=supplier))
            if verdict.allowed:
                ok.append((m.client_id, m.at.timestamp(), m.active_power_kw, retailer_id))
                rights[m.client_id] = verdict.right
            else:
                refused.append(m.client_id)
        refused = sorted(set(refused))
        # Every attempt is in the data access log, in the same write as the measurements and before them (if the
        # log cannot be written, nothing is stored or acknowledged): one line per client and message, accepted or
        # refused, for a refused registered client up to AUDIT_REFUSALS_LOGGED per message; unknown ids (no one's
        # data) and refused clients past that are counted in one summary line (client "*"), so that a message of
        # random ids cannot write a line per id. The retailer is answered the same for an unknown client as for
        # another's.
        refused_known = [cid for cid in refused if cid in clients]
        audit = refusal_audit(str(who), Action.SEND_MEASUREMENT.value, "none", refused_known,
                              len(refused) - len(refused_known), [], msg.msg_id)
        audit += [AuditEntry(str(who), cid, Action.SEND_MEASUREMENT.value, right, True, msg.msg_id)
                  for cid, right in sorted(rights.items())]
        await self.store.put_measurements(ok, audit)
        return refused

    async def get_measurements(self, who: Principal, client_id: str, start: float, end: float) -> dict[str, Any]:
        """A client's active-power series (DSO)."""
        await self._authorize_named(who, Action.READ_MEASUREMENTS, [client_id])
        if await self.store.get_client(client_id) is None:
            raise NotFound(f"client {client_id!r} is not registered")
        await self._authorize_logged(who, Action.READ_MEASUREMENTS, client_id)
        series = await self.store.measurements(client_id, start, end)
        return {"client_id": client_id, "from": iso(start), "to": iso(end),
                "series": [{"at": iso(s["at"]), "active_power_kw": s["active_power_kw"],
                            "retailer_id": s["retailer_id"]} for s in series]}

    async def get_audit(self, who: Principal, client_id: str, start: float, end: float) -> dict[str, Any]:
        """The data access log of one client (DSO)."""
        self.authorize(who, Action.READ_AUDIT)
        entries = await self.store.get_audit(client_id, start, end)
        return {"client_id": client_id, "from": iso(start), "to": iso(end),
                "entries": [{**e, "at": iso(e["at"])} for e in entries]}
