"""The request book: every open request's lifecycle, its stored outbox, its targets' states.

The request row is the truth (one atomic row per request, see ``docs/storage.md``); the book keeps in memory what
it needs to act quickly (the outbox with retry times, open requests with deadlines) and rebuilds it from storage
on start, so a hub killed at any moment resumes every unfinished request. One lock per request serialises the
read-modify-write of its row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloud_hub.lifecycle import (
    RequestState,
    combine,
    may_move,
    request_state_from_counts,
    retry_delay_s,
    state_after_deadline,
)
from cloud_hub.metrics import HubMetrics
from cloud_hub.store import AuditEntry, HubStore
from mhp_wire.messages import ClientState

log = logging.getLogger(__name__)

C = ClientState


@dataclass(slots=True)
class OutboxItem:
    """A message to one retailer, kept until that retailer acknowledges it."""

    msg_id: str
    request_id: str
    retailer_id: str
    kind: str
    """``request``, ``cancel``, ``billing`` or ``tariff``."""
    payload: bytes
    clients: list[str] = field(default_factory=list)
    attempts: int = 0
    next_at: float = 0.0

    def stored(self) -> dict[str, Any]:
        """The form kept in the request row."""
        return {"retailer_id": self.retailer_id, "kind": self.kind, "payload": self.payload.decode(),
                "clients": self.clients}

    @classmethod
    def load(cls, msg_id: str, request_id: str, d: dict[str, Any]) -> OutboxItem:
        """Back from the request row."""
        return cls(msg_id, request_id, d["retailer_id"], d["kind"], d["payload"].encode(), d.get("clients", []))


@dataclass(slots=True)
class OutcomeVerdict:
    """What the book did with one reported outcome."""

    known: bool
    addressed: list[str]
    changed: bool = False
    request_state: RequestState | None = None


@dataclass(slots=True)
class Phase:
    """A load reduction waiting for availability answers until ``due``."""

    due: float
    reduction_kw: float


def reduction_outcome(selection: dict[str, Any], counts: Counter[ClientState]) -> RequestState:
    """A finished load reduction: completed when every chosen client executed and the reduction was covered;
    clients that were unavailable, or available but not needed, do not make it partial."""
    chosen = len(selection.get("chosen", []))
    executed = counts.get(C.EXECUTED, 0)
    if chosen and executed == chosen and selection.get("covered"):
        return RequestState.COMPLETED
    if executed:
        return RequestState.PARTIALLY_COMPLETED
    return RequestState.FAILED


class RequestBook:
    """Open requests, their outbox and their targets."""

    def __init__(self, store: HubStore, metrics: HubMetrics, replica_id: str | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.replica_id = replica_id
        """Set when the hub runs as several replicas: the book holds only the requests this replica owns."""
        self.outbox: dict[str, OutboxItem] = {}
        self.deadlines: dict[str, float] = {}
        self.phases: dict[str, Phase] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.on_phase_due: Callable[[str], Any] | None = None
        self.kick: Callable[[], None] = lambda: None

    def lock(self, request_id: str) -> asyncio.Lock:
        """The lock of one request's row."""
        return self._locks.setdefault(request_id, asyncio.Lock())

    # -- start-up -----------------------------------------------------------------------------------------

    async def load(self) -> int:
        """Rebuild the in-memory view from storage; returns how many open requests were found. A replica
        (``replica_id`` set) loads only the open requests it owns."""
        if self.replica_id is None:
            ids = await self.store.open_request_ids()
        else:
            ids = [r for r, owner in await self.store.open_request_owners() if owner == self.replica_id]
        n = 0
        for request_id in ids:
            n += await self._load_one(request_id)
        return n

    async def _load_one(self, request_id: str) -> bool:
        req = await self.store.get_request(request_id, ["r:", "o:"])
        if req is None:  # crashed between writing the index and the row: nothing was accepted
            await self.store.update_request(request_id, {}, close=True)
            return False
        meta = req["meta"]
        for mid, d in req["outbox"].items():
            self.outbox[mid] = OutboxItem.load(mid, request_id, d)
        if not RequestState(meta["state"]).terminal:
            self.deadlines[request_id] = meta["deadline"]
            if meta.get("phase") == "availability":
                self.phases[request_id] = Phase(meta["phase_due"], meta["body"]["reduction_kw"])
        elif not req["outbox"]:
            await self.store.update_request(request_id, {}, close=True)
        return True

    # -- replicas -----------------------------------------------------------------------------------------

    def forget(self) -> int:
        """Drop the in-memory view (a replica that lost the broker may have had its requests adopted meanwhile: it
        loads again, after rejoining, only what it still owns); returns how many open requests were dropped."""
        n = len(self.deadlines)
        self.outbox.clear()
        self.deadlines.clear()
        self.phases.clear()
        return n

    async def adopt(self, request_id: str) -> bool:
        """Take over an open request of a replica that went offline: become its owner in storage, then load it
        (its unacknowledged messages are sent again at once; retailers drop what they already have)."""
        assert self.replica_id is not None, "only a replica adopts requests"
        async with self.lock(request_id):
            await self.store.set_owner(request_id, self.replica_id)
            loaded = await self._load_one(request_id)
        if loaded:
            self.kick()
        return loaded

    async def route(self, request_id: str, client_id: str) -> tuple[list[str] | None, str | None]:
        """What an outcome for ``(request_id, client_id)`` needs before it is applied: the retailers addressed for
        that client (None: no such pair) and the replica that owns the request (None: a hub without replicas)."""
        cells = await self.store.get_request_cells(request_id, [f"c:{client_id}", "r:owner"])
        entry = cells.get(f"c:{client_id}")
        return (None if entry is None else list(entry.get("retailers", {}))), cells.get("r:owner")

    # -- new requests -------------------------------------------------------------------------------------

    async def create(self, request_id: str, meta: dict[str, Any], clients: dict[str, dict[str, Any]],
                     outbox: list[OutboxItem], parties: dict[str, dict[str, Any]], audit: list[AuditEntry],
                     idempotency: tuple[str, str, str, int, dict[str, Any]] | None) -> None:
        """Store a new request (durably, before it is answered) and queue its messages."""
        counts = Counter(e["state"] for e in (clients or parties).values())
        meta = {**meta, "state": RequestState.ACCEPTED.value, "counts": dict(counts)}
        await self.store.create_request(request_id, meta, clients, {o.msg_id: o.stored() for o in outbox},
                                        parties, audit, idempotency, owner=self.replica_id)
        self.deadlines[request_id] = meta["deadline"]
        if meta.get("phase") == "availability":
            self.phases[request_id] = Phase(meta["phase_due"], meta["body"]["reduction_kw"])
        for item in outbox:
            self.outbox[item.msg_id] = item
        self.kick()

    async def add_messages(self, request_id: str, items: list[OutboxItem], put: dict[str, Any]) -> None:
        """Queue more messages of an existing request, with other cells of its row, atomically."""
        await self.store.update_request(request_id, {**put, **{f"o:{i.msg_id}": i.stored() for i in items}})
        for item in items:
            self.outbox[item.msg_id] = item
        self.kick()

    # -- dispatch -----------------------------------------------------------------------------------------

    def due(self, now: float, limit: int = 1000) -> list[OutboxItem]:
        """Messages whose next attempt is due."""
        return sorted((i for i in self.outbox.values() if i.next_at <= now), key=lambda i: i.next_at)[:limit]

    def next_due(self) -> float | None:
        """When the next message is due."""
        return min((i.next_at for i in self.outbox.values()), default=None)

    async def mark_sent(self, items: list[OutboxItem], now: float) -> None:
        """Record attempts; a request's pending targets of that retailer become ``sent``."""
        first: dict[str, list[OutboxItem]] = {}
        for item in items:
            item.attempts += 1
            item.next_at = now + retry_delay_s(item.attempts)
            if item.attempts == 1 and item.kind in ("request", "billing", "tariff"):
                first.setdefault(item.request_id, []).append(item)
        for request_id, sent in first.items():
            await self._advance_sent(request_id, sent, now)

    async def _advance_sent(self, request_id: str, sent: list[OutboxItem], now: float) -> None:
        async with self.lock(request_id):
            cols = ["r:state", "r:counts", "r:first_dispatch_at"]
            for item in sent:
                cols += [f"c:{c}" for c in item.clients] or [f"p:{item.retailer_id}"]
            cells = await self.store.get_request_cells(request_id, cols)
            if "r:state" not in cells or RequestState(cells["r:state"]).terminal:
                return
            counts = Counter({C(k): v for k, v in cells["r:counts"].items()})
            put: dict[str, Any] = {}
            for item in sent:
                for col in [f"c:{c}" for c in item.clients] or [f"p:{item.retailer_id}"]:
                    entry = put.get(col) or cells.get(col)
                    if entry is None:
                        continue
                    if entry.get("retailers", {}).get(item.retailer_id) == C.PENDING.value:
                        entry["retailers"][item.retailer_id] = C.SENT.value
                    new = combine(C(s) for s in entry["retailers"].values())
                    if new is not C(entry["state"]) and may_move(C(entry["state"]), new):
                        counts[C(entry["state"])] -= 1
                        counts[new] += 1
                        entry["state"] = new.value
                        entry["updated_at"] = now
                    put[col] = entry
            state = request_state_from_counts(RequestState(cells["r:state"]), counts)
            put["r:counts"] = {k.value: v for k, v in counts.items() if v}
            put["r:state"] = state.value
            if cells.get("r:first_dispatch_at") is None:
                put["r:first_dispatch_at"] = now
            await self.store.update_request(request_id, put)

    def retailer_online(self, retailer_id: str) -> int:
        """A retailer's bridge (re)connected: send it everything it has not acknowledged, now."""
        n = 0
        for item in self.outbox.values():
            if item.retailer_id == retailer_id:
                item.next_at = 0.0
                n += 1
        if n:
            self.kick()
        return n

    # -- answers from retailers ---------------------------------------------------------------------------

    async def on_ack(self, retailer_id: str, msg_ids: list[str]) -> None:
        """A retailer stored these messages: stop re-sending them; a billing or tariff delivery is complete."""
        by_request: dict[str, list[OutboxItem]] = {}
        for mid in msg_ids:
            item = self.outbox.get(mid)
            if item is not None and item.retailer_id == retailer_id:
                del self.outbox[mid]
                by_request.setdefault(item.request_id, []).append(item)
        for request_id, items in by_request.items():
            async with self.lock(request_id):
                await self._apply_acks(request_id, items)

    async def _apply_acks(self, request_id: str, items: list[OutboxItem]) -> None:
        now = time.time()
        delete = [f"o:{i.msg_id}" for i in items]
        deliveries = [i for i in items if i.kind in ("billing", "tariff")]
        cancels = [i for i in items if i.kind == "cancel"]
        put: dict[str, Any] = {}
        if deliveries or cancels:
            cols = ["r:state", "r:counts", "r:cancel"]
            for i in deliveries:
                cols += [f"c:{c}" for c in i.clients] or [f"p:{i.retailer_id}"]
            cells = await self.store.get_request_cells(request_id, cols)
            if "r:state" not in cells:
                return
            if cancels:
                cancel = cells.get("r:cancel") or {"retailers": {}}
                for i in cancels:
                    cancel["retailers"][i.retailer_id] = now
                put["r:cancel"] = cancel
            counts = Counter({C(k): v for k, v in cells["r:counts"].items()})
            for i in deliveries:
                for col in [f"c:{c}" for c in i.clients] or [f"p:{i.retailer_id}"]:
                    entry = put.get(col) or cells.get(col)
                    if entry is None:
                        continue
                    entry["retailers"][i.retailer_id] = C.ACKNOWLEDGED.value
                    self._set_state(entry, combine(C(s) for s in entry["retailers"].values()), counts, now)
                    put[col] = entry
            current = RequestState(cells["r:state"])
            state = request_state_from_counts(current, counts)
            put["r:counts"] = {k.value: v for k, v in counts.items() if v}
            self._finish(put, current, state, now)
        await self._write(request_id, put, delete)

    @staticmethod
    def _set_state(entry: dict[str, Any], new: ClientState, counts: Counter[ClientState], now: float) -> bool:
        old = C(entry["state"])
        if new is old or not may_move(old, new):
            return False
        counts[old] -= 1
        counts[new] += 1
        entry["state"] = new.value
        entry["updated_at"] = now
        return True

    def _finish(self, put: dict[str, Any], current: RequestState, state: RequestState, now: float) -> None:
        put["r:state"] = state.value
        if state is not current and state.terminal:
            put["r:completed_at"] = now
            put["r:phase"] = "done"

    async def _write(self, request_id: str, put: dict[str, Any], delete: list[str] | None = None) -> None:
        state = put.get("r:state")
        ended = state is not None and RequestState(state).terminal
        if ended:
            self.deadlines.pop(request_id, None)
            self.phases.pop(request_id, None)
        pending = any(i.request_id == request_id for i in self.outbox.values())
        close = ended and not pending
        if state is None and not pending and request_id not in self.deadlines:
            close = True
        await self.store.update_request(request_id, put, delete, close=close)
        if close:
            self._locks.pop(request_id, None)

    async def addressed(self, request_id: str, client_id: str) -> list[str] | None:
        """The retailers the hub addressed for this client in this request (None: no such pair)."""
        cells = await self.store.get_request_cells(request_id, [f"c:{client_id}"])
        entry = cells.get(f"c:{client_id}")
        return None if entry is None else list(entry.get("retailers", {}))

    async def on_outcome(self, retailer_id: str, request_id: str, client_id: str, state: ClientState,
                         detail: dict[str, Any], trace: dict[str, float]) -> OutcomeVerdict:
        """Apply one client's outcome reported by ``retailer_id`` (already authorized by the caller)."""
        now = time.time()
        async with self.lock(request_id):
            col = f"c:{client_id}"
            cells = await self.store.get_request_cells(
                request_id,
                [col, "r:state", "r:counts", "r:created_at", "r:phase", "r:type", "r:answered", "r:targets",
                 "r:selection"])
            entry = cells.get(col)
            if entry is None or "r:state" not in cells:
                return OutcomeVerdict(False, [])
            addressed = list(entry.get("retailers", {}))
            if retailer_id not in addressed:
                return OutcomeVerdict(True, addressed)
            current = RequestState(cells["r:state"])
            counts = Counter({C(k): v for k, v in cells["r:counts"].items()})
            if cells.get("r:phase") == "availability" and state in (C.AVAILABLE, C.UNAVAILABLE):
                if entry.get("answered"):
                    return OutcomeVerdict(True, addressed)
                entry["answered"] = True
                entry["available_kw"] = float(detail.get("available_kw", 0.0)) if state is C.AVAILABLE else 0.0
                entry["availability"] = state.value
                entry["detail"] = detail
                entry["updated_at"] = now
                answered = int(cells.get("r:answered") or 0) + 1
                await self._write(request_id, {col: entry, "r:answered": answered})
                if answered >= int(cells.get("r:targets") or 0) and request_id in self.phases:
                    self.phases[request_id].due = 0.0
                    self.kick()
                return OutcomeVerdict(True, addressed, changed=True, request_state=current)
            entry["retailers"][retailer_id] = state.value
            new = combine(C(s) for s in entry["retailers"].values())
            if not self._set_state(entry, new, counts, now):
                return OutcomeVerdict(True, addressed, request_state=current)
            entry["detail"] = detail
            full = {**entry.get("trace", {}), **trace}
            if new.terminal:
                full["total_ms"] = round((now - cells["r:created_at"]) * 1000, 3)
            entry["trace"] = full
            state_now = request_state_from_counts(current, counts)
            if cells.get("r:type") == "load_reduction" and state_now.terminal and state_now is not current:
                state_now = reduction_outcome(cells.get("r:selection") or {}, counts)
            put = {col: entry, "r:counts": {k.value: v for k, v in counts.items() if v}}
            self._finish(put, current, state_now, now)
            await self._write(request_id, put)
            if state_now is not current and state_now.terminal:
                self._finished_metrics(cells["r:type"], state_now, now - cells["r:created_at"])
            return OutcomeVerdict(True, addressed, changed=True, request_state=state_now)

    def _finished_metrics(self, kind: str, state: RequestState, seconds: float) -> None:
        self.metrics.requests_finished.labels(kind, state.value).inc()
        self.metrics.request_seconds.labels(kind).observe(seconds)

    # -- time ---------------------------------------------------------------------------------------------

    async def expire_due(self, now: float) -> list[str]:
        """Close every open target of every request past its deadline; returns the requests closed."""
        due = [r for r, d in self.deadlines.items() if d <= now]
        for request_id in due:
            async with self.lock(request_id):
                req = await self.store.get_request(request_id, ["r:", "c:", "p:"])
                if req is None:
                    self.deadlines.pop(request_id, None)
                    continue
                meta = req["meta"]
                current = RequestState(meta["state"])
                counts = Counter({C(k): v for k, v in meta["counts"].items()})
                put: dict[str, Any] = {}
                targets = {f"c:{k}": v for k, v in req["clients"].items()} or {
                    f"p:{k}": v for k, v in req["parties"].items()}
                for col, entry in targets.items():
                    new = state_after_deadline(C(entry["state"]))
                    if self._set_state(entry, new, counts, now):
                        entry["detail"] = {**entry.get("detail", {}),
                                           "reason": "no outcome before the request's deadline"}
                        put[col] = entry
                state = request_state_from_counts(current, counts)
                put["r:counts"] = {k.value: v for k, v in counts.items() if v}
                self._finish(put, current, state, now)
                dropped = [m for m, i in self.outbox.items() if i.request_id == request_id and i.kind != "cancel"]
                for mid in dropped:
                    del self.outbox[mid]
                await self._write(request_id, put, [f"o:{m}" for m in dropped] or None)
                if state is not current:
                    self._finished_metrics(meta["type"], state, now - meta["created_at"])
        return due

    def phases_due(self, now: float) -> list[str]:
        """Load reductions whose availability window has closed."""
        return [r for r, p in self.phases.items() if p.due <= now]
