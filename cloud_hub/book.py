"""The request book: every open request's lifecycle, its stored outbox, its targets' states.

The request row is the truth (one atomic row per request, see ``docs/storage.md``); the book keeps in memory what
it needs to act quickly (the outbox with retry times, open requests with deadlines) and rebuilds it from storage
on start, so a hub killed at any moment resumes every unfinished request. One lock per request serialises the
read-modify-write of its row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloud_hub import fanout, lifecycle, partition_acks
from cloud_hub.authz import Action
from cloud_hub.lifecycle import (
    Allowed,
    OutcomeVerdict,
    ReportedOutcome,
    RequestState,
    addressed_only,
    apply,
    reduction_outcome,
    retry_delay_s,
)
from cloud_hub.metrics import HubMetrics
from cloud_hub.storage import Mutation
from cloud_hub.store import AuditEntry, HubStore, RequestCodec, StoreUnavailable
from mhp_wire.backoff import delay_s
from mhp_wire.messages import SEND_PAYLOAD_BYTES, AckPartition, ClientState, encode

log = logging.getLogger(__name__)

C = ClientState
EXPAND_RETRY_S = 0.2
EXPAND_RETRY_MAX_S = 5.0
"""The back-off of an expansion while storage fails (:func:`mhp_wire.backoff.delay_s`)."""
STORAGE_MS_KEPT = 20_000
"""Measured storage times kept in memory until stored with their request (see :attr:`RequestBook.storage_ms`)."""
__all__ = ["OutboxItem", "OutcomeVerdict", "Phase", "ReportedOutcome", "RequestBook", "reduction_outcome"]


DELIVERIES = ("billing", "tariff", "customers")
"""Outbox kinds that deliver something to a retailer: its acknowledgement ends that retailer's part."""


@dataclass(slots=True)
class OutboxItem:
    """A message to one retailer, kept until that retailer acknowledges it."""

    msg_id: str
    request_id: str
    retailer_id: str
    kind: str
    """``request``, ``cancel``, ``billing``, ``tariff``, ``customers``, or ``removal`` (a cancel of the clients a
    revision removed)."""
    payload: bytes
    clients: list[str] = field(default_factory=list)
    attempts: int = 0
    next_at: float = 0.0
    revision: int = 1
    """The request's revision a ``request`` message carries: its being sent never marks a newer revision sent."""
    partitions_acked: dict[int, frozenset[int]] = field(default_factory=dict, compare=False)
    """The partitions of a partitioned bridge that have acknowledged it so far (in memory only; see
    :mod:`cloud_hub.partition_acks`)."""

    def stored(self) -> dict[str, Any]:
        """The form kept in the request row."""
        d = {"retailer_id": self.retailer_id, "kind": self.kind, "payload": self.payload.decode(),
             "clients": self.clients}
        return d if self.revision == 1 else {**d, "revision": self.revision}

    @classmethod
    def load(cls, msg_id: str, request_id: str, d: dict[str, Any]) -> OutboxItem:
        """Back from the request row."""
        return cls(msg_id, request_id, d["retailer_id"], d["kind"], d["payload"].encode(), d.get("clients", []),
                   revision=d.get("revision", 1))


class _Outbox(dict[str, OutboxItem]):
    """The book's queued messages by id, with an index of their ids by request: whether a request still has a
    message queued is asked for every row the book writes (:meth:`RequestBook._closes`), and scanning every queued
    message for it grew with the backlog."""

    def __init__(self) -> None:
        super().__init__()
        self._by_request: dict[str, dict[str, None]] = {}

    def __setitem__(self, msg_id: str, item: OutboxItem) -> None:
        old = self.get(msg_id)
        if old is not None:
            self._unindex(msg_id, old)
        super().__setitem__(msg_id, item)
        self._by_request.setdefault(item.request_id, {})[msg_id] = None

    def __delitem__(self, msg_id: str) -> None:
        item = self[msg_id]
        super().__delitem__(msg_id)
        self._unindex(msg_id, item)

    def pop(self, msg_id: str, default: Any = None) -> Any:
        """Remove and return a message (``default`` when it is not queued)."""
        if msg_id not in self:
            return default
        item = self[msg_id]
        del self[msg_id]
        return item

    def setdefault(self, msg_id: str, item: OutboxItem) -> OutboxItem:
        """Queue ``item`` unless a message with its id is queued; the queued one."""
        if msg_id not in self:
            self[msg_id] = item
        return self[msg_id]

    def update(self, other: Any = (), /, **kw: OutboxItem) -> None:
        """Queue every message of ``other``."""
        for msg_id, item in dict(other, **kw).items():
            self[msg_id] = item

    def clear(self) -> None:
        """Drop every message."""
        super().clear()
        self._by_request.clear()

    def of(self, request_id: str) -> list[OutboxItem]:
        """The queued messages of one request, in the order they were queued."""
        return [self[m] for m in self._by_request.get(request_id, ())]

    def has(self, request_id: str) -> bool:
        """Whether a message of ``request_id`` is queued."""
        return request_id in self._by_request

    def _unindex(self, msg_id: str, item: OutboxItem) -> None:
        ids = self._by_request.get(item.request_id)
        if ids is not None:
            ids.pop(msg_id, None)
            if not ids:
                del self._by_request[item.request_id]


def _message_cells(items: list[OutboxItem]) -> dict[str, Any]:
    """The cells of queued messages in the request row."""
    return RequestCodec.messages({i.msg_id: i.stored() for i in items})


@dataclass(slots=True)
class _RowWrite:
    """What a batch of outcomes does to one request row: the cells to write and what follows in memory."""

    request_id: str
    verdicts: list[OutcomeVerdict] = field(default_factory=list)
    put: dict[str, Any] = field(default_factory=dict)
    delete: list[str] | None = None
    close: bool = False
    phase_complete: bool = False
    finished: tuple[str, RequestState, float] | None = None


@dataclass(slots=True)
class Phase:
    """A load reduction waiting for availability answers until ``due``."""

    due: float
    reduction_kw: float


SENT_CHUNK_CLIENTS = 6_000
"""Clients whose first send :meth:`RequestBook.mark_sent` records in one storage round at most (a message is never
split): a round of 100,000 clients, read, decided, encoded and described in one go, held the hub's event loop for
seconds (issue 14, fourth round); each chunk's write lets it go."""
SENT_SETTLE_S = 2.0
"""How long a first send's ``pending`` → ``sent`` marks wait before they are written (:meth:`RequestBook.mark_sent`).
The ``sent`` state is informational (expiry treats ``sent`` and ``pending`` alike, a cancel reaches every retailer
addressed either way, delivery rests on the outbox), and a home that answers within this time after the send has
its outcome written instead: the mark, its cell rewrite and its change-feed entry are never made (issue 14, tenth
round). 2 s: on a quiet machine every one of 10,000 gateways has executed about 2 s after the POST; measured on a
loaded one (load 5-11), 0-30 % of them answered within 1 s of the first send, 0-60 % within 2 s, 0-100 % within
3 s (docs/performance.md, "Issue 14, tenth round"). The trade: the DSO's view shows such a client ``pending`` for up
to this long after its send."""


@dataclass(slots=True)
class _SentMark:
    """One first send waiting to be recorded: its message, its targets not answered since, and when it was sent."""

    item: OutboxItem
    at: float
    clients: list[str]
    """The message's clients still to mark (those answered since are dropped); empty for a party target."""
    party: bool = True
    """Without clients: whether the retailer's party entry is still to mark."""

    @property
    def live(self) -> bool:
        """Whether a target is left to mark."""
        return bool(self.clients) or (not self.item.clients and self.party)

    @property
    def size(self) -> int:
        return len(self.clients) or int(self.live)

    def sent(self) -> lifecycle.SentAt:
        return self.clients, self.item.retailer_id, self.item.revision, self.at


def _sent_chunks(first: dict[str, list[_SentMark]]) -> list[dict[str, list[_SentMark]]]:
    """``first`` (``{request_id: [mark, ...]}``) cut into chunks of about :data:`SENT_CHUNK_CLIENTS` clients, each
    mark whole and in its order (a mark with no target left counts for nothing: its send time may still be the
    request's first dispatch time)."""
    chunks: list[dict[str, list[_SentMark]]] = [{}]
    size = 0
    for marks in first.values():
        for mark in marks:
            n = mark.size
            if size and size + n > SENT_CHUNK_CLIENTS:
                chunks.append({})
                size = 0
            chunks[-1].setdefault(mark.item.request_id, []).append(mark)
            size += n
    return [c for c in chunks if c]


class RequestBook:
    """Open requests, their outbox and their targets."""

    def __init__(self, store: HubStore, metrics: HubMetrics, replica_id: str | None = None, *,
                 expand_after_accept_min_clients: int = 1000,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 sent_settle_s: float | None = None) -> None:
        self.store = store
        self.sent_settle_s = SENT_SETTLE_S if sent_settle_s is None else sent_settle_s
        """How long first sends' marks wait before they are written (default :data:`SENT_SETTLE_S`, read when the
        book is made; 0: at once)."""
        self._settling: deque[_SentMark] = deque()
        """First sends whose marks wait, in the order they were sent (:meth:`settle_due`)."""
        self._settling_n: Counter[str] = Counter()
        """How many marks of each request wait."""
        self._answered: dict[str, dict[str, int]] = {}
        """Per request with marks waiting: each target cell (``c:<client>``, ``p:<retailer>``) that reached a terminal
        state since, with the revision it answered: a mark of that revision or older is dropped unread."""
        self._dispatched: dict[str, None] = {}
        """Requests whose first dispatch time is known to be stored (:meth:`_first_dispatch`; bounded, oldest
        dropped: one dropped is read again)."""
        self.sleep = sleep
        """How an expansion that failed waits before it tries again (tests drive it)."""
        self.expand_after_accept_min_clients = expand_after_accept_min_clients
        """A request with a plan naming fewer clients is expanded in its accepting write (see :meth:`create`)."""
        self.metrics = metrics
        self.replica_id = replica_id
        """Set when the hub runs as several replicas: the book holds only the requests this replica owns."""
        self.outbox = _Outbox()
        self.deadlines: dict[str, float] = {}
        self.phases: dict[str, Phase] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.on_phase_due: Callable[[str], Any] | None = None
        self.kick: Callable[[], None] = lambda: None
        self._expanding: dict[str, asyncio.Task[None]] = {}
        """Requests accepted with a plan whose expansion is running (:mod:`cloud_hub.fanout`)."""
        self._generation = 0
        """Counts :meth:`forget`: an expansion that ends after one queues nothing (the book forgot it)."""
        self.storage_ms: dict[str, float] = {}
        """How long each new request's creating write took, until the next write of its row stores it as
        ``r:storage_ms`` (a write cannot hold its own duration); bounded, oldest dropped."""

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
        req = await self.store.get_request(request_id, RequestCodec.WITH_MESSAGES)
        if req is None:  # crashed between writing the index and the row: nothing was accepted
            await self.store.update_request(request_id, {}, close=True)
            return False
        meta = req["meta"]
        if "plan" in req:  # accepted, then killed before its expansion was durable: nothing was sent yet
            for item in await self._expand(request_id, meta, req["plan"]):
                self.outbox[item.msg_id] = item
        for mid, d in req["outbox"].items():
            item = OutboxItem.load(mid, request_id, d)
            if len(item.payload) > SEND_PAYLOAD_BYTES:  # queued by a hub before messages were sized (create)
                log.error("request %s: its %s message %s to retailer %s is %d bytes, over the %d the brokers pass, "
                          "and is not sent (it would cut the hub's link); its targets end at the deadline",
                          request_id, item.kind, mid, item.retailer_id, len(item.payload), SEND_PAYLOAD_BYTES)
                continue
            self.outbox[mid] = item
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
        self._generation += 1  # an expansion still running queues nothing: the replica that adopts it expands it
        self.outbox.clear()
        # Marks waiting are dropped too: the requests may be adopted by another replica, which sends and marks them
        # again; only the owner writes a row.
        self._settling.clear()
        self._settling_n.clear()
        self._answered.clear()
        self.deadlines.clear()
        self.phases.clear()
        return n

    async def resume(self, request_id: str) -> bool:
        """Queue a stored request this book does not hold (its creation failed after its row was written)."""
        async with self.lock(request_id):
            loaded = await self._load_one(request_id)
        if loaded:
            self.kick()
        return loaded

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
        col = RequestCodec.client(client_id)
        cells = await self.store.get_request_cells(request_id, [col, RequestCodec.meta("owner")])
        entry = cells.get(col)
        return (None if entry is None else list(entry.get("retailers", {}))), RequestCodec.owner(cells)

    # -- new requests -------------------------------------------------------------------------------------

    # Complexity (PLR0913): every part of a new request goes into its one atomic write (as HubStore.create_request).
    async def create(self, request_id: str, meta: dict[str, Any], clients: dict[str, dict[str, Any]],  # noqa: PLR0913
                     outbox: list[OutboxItem], parties: dict[str, dict[str, Any]], audit: list[AuditEntry],
                     idempotency: tuple[str, str, str, int, dict[str, Any]] | None,
                     extra: Sequence[Mutation] = (), plan: dict[str, Any] | None = None) -> None:
        """Store a new request (durably, before it is answered) and queue its messages; ``extra``: mutations of
        other rows written with it (see :meth:`HubStore.create_request`).

        ``plan`` (:mod:`cloud_hub.fanout`; ``clients`` and ``audit`` empty): only the compact record is written
        here; the expansion to per-client entries runs right after, in a task holding the request's lock (every
        other writer of the row waits for it), and the messages are queued once it is durable.

        A message whose payload would not fit the brokers' packet (:data:`~mhp_wire.messages.SEND_PAYLOAD_BYTES`)
        refuses the request (``ValueError``: 422, nothing stored): the hub broker would cut the hub's link for it,
        again at every reconnection, and no retailer would hear from the hub again. The use cases size their
        messages (billing data in parts, a tariff refused with its own reason); this is the last guard."""
        for o in outbox:
            if len(o.payload) > SEND_PAYLOAD_BYTES:
                raise ValueError(f"its {o.kind} message to retailer {o.retailer_id} would be {len(o.payload)} bytes, "
                                 f"over the {SEND_PAYLOAD_BYTES} bytes the brokers pass: nothing was stored")
        if plan is not None and fanout.targets(plan) < self.expand_after_accept_min_clients:
            # Small: expanded here and stored whole in the one accepting write (one transaction, as before plans).
            audit = [*audit, *self._audit_of(request_id, plan)]
            clients = fanout.entries(plan, meta["created_at"])
            outbox = [*outbox, *self._messages_of(request_id, plan)]
            plan = None
        if plan is None:
            counts = Counter(e["state"] for e in (clients or parties).values())
        else:
            counts = Counter({ClientState.PENDING.value: fanout.targets(plan)})
        meta = {**meta, "state": RequestState.ACCEPTED.value, "counts": dict(counts)}
        window = meta["body"]["respond_within_s"] if meta.get("phase") == "availability" else None
        if window is not None:  # stored: where a restarted hub takes the phase up
            meta["phase_due"] = time.time() + window
        lock = self.lock(request_id)
        if plan is not None:
            await lock.acquire()  # a new request id: never waits; released once the expansion is done
        t0 = time.perf_counter()
        try:
            await self.store.create_request(request_id, meta, clients, {o.msg_id: o.stored() for o in outbox},
                                            parties, audit, idempotency, owner=self.replica_id, extra=extra,
                                            plan=plan)
        except BaseException:
            if plan is not None:
                lock.release()
            raise
        self.storage_ms[request_id] = round((time.perf_counter() - t0) * 1000, 3)
        if len(self.storage_ms) > STORAGE_MS_KEPT:
            self.storage_ms.pop(next(iter(self.storage_ms)))
        if plan is None:
            self._queue(request_id, meta, outbox)
            return
        self._expanding[request_id] = asyncio.create_task(self._expand_after(request_id, meta, plan, lock),
                                                          name=f"hub-expand-{request_id}")

    def _queue(self, request_id: str, meta: dict[str, Any], outbox: list[OutboxItem]) -> None:
        """Hold a stored request's deadline, phase and messages in memory, and wake the dispatcher."""
        self.deadlines[request_id] = meta["deadline"]
        window = meta["body"]["respond_within_s"] if meta.get("phase") == "availability" else None
        if window is not None:
            # The retailers' window opens once the request is accepted (stored, its 202 on the way), not when its
            # use case began: reads and a write that waited behind a slow or locked storage must not use it up, or
            # a request is accepted already over, its clients "unreachable" though no retailer had time to answer.
            self.phases[request_id] = Phase(max(meta["phase_due"], time.time() + window),
                                            meta["body"]["reduction_kw"])
        for item in outbox:
            self.outbox[item.msg_id] = item
        self.kick()

    async def _expand(self, request_id: str, meta: dict[str, Any], plan: dict[str, Any]) -> list[OutboxItem]:
        """Write the per-client entries, audit lines and request messages of a request accepted with ``plan`` (its
        lock held); returns the messages, to be queued."""
        outbox = self._messages_of(request_id, plan)
        await self.store.expand_request(request_id, meta, fanout.entries(plan, meta["created_at"]),
                                        {o.msg_id: o.stored() for o in outbox}, self._audit_of(request_id, plan))
        return outbox

    @staticmethod
    def _audit_of(request_id: str, plan: dict[str, Any]) -> list[AuditEntry]:
        return [AuditEntry(principal, cid, action, right, ref=request_id, at=at)
                for principal, cid, action, right, at in fanout.audit_lines(plan)]

    @staticmethod
    def _messages_of(request_id: str, plan: dict[str, Any]) -> list[OutboxItem]:
        return [OutboxItem(m.msg_id, request_id, rid, "request", encode(m), list(m.client_ids))
                for rid, m in fanout.messages(plan, request_id)]

    async def _expand_after(self, request_id: str, meta: dict[str, Any], plan: dict[str, Any],
                            lock: asyncio.Lock) -> None:
        """The expansion right after the answer. While storage fails it is tried again after a back-off, the
        request's lock still held: no cancel, revision or outcome writes a row that is not expanded yet."""
        generation = self._generation
        attempt = 0
        try:
            while True:
                try:
                    outbox = await self._expand(request_id, meta, plan)
                    break
                except StoreUnavailable as exc:
                    attempt += 1
                    pause = delay_s(attempt, EXPAND_RETRY_S, EXPAND_RETRY_MAX_S)
                    log.warning("request %s: writing its clients' entries failed (%s); trying again in %.1f s",
                                request_id, exc, pause)
                    await self.sleep(pause)
                    if generation != self._generation:
                        return  # forgotten meanwhile: whoever loads it again expands it
            if generation == self._generation:
                self._queue(request_id, meta, outbox)
        finally:
            self._expanding.pop(request_id, None)
            lock.release()

    async def expanded(self, request_id: str) -> None:
        """Wait until the expansion of ``request_id`` running now, if any, has ended."""
        task = self._expanding.get(request_id)
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        """Stop the expansions still running (a restart finishes them from storage)."""
        tasks = list(self._expanding.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def add_messages(self, request_id: str, items: list[OutboxItem], put: dict[str, Any]) -> None:
        """Queue more messages of an existing request, with other cells of its row, atomically."""
        await self.store.update_request(request_id, {**put, **_message_cells(items)})
        for item in items:
            self.outbox[item.msg_id] = item
        self.kick()

    async def write(self, request_id: str, put: dict[str, Any]) -> None:
        """Write cells of a request's row as an outcome would (the request ends, and is closed, when ``put`` says
        it has ended): for a use case that decides a request's state itself (a load reduction nobody can serve)."""
        await self._write(request_id, put)

    def knows(self, request_id: str) -> bool:
        """Whether this book holds the unfinished request ``request_id`` (a deadline or a queued message)."""
        return request_id in self.deadlines or request_id in self._expanding or self.outbox.has(request_id)

    def end_phase(self, request_id: str) -> None:
        """Stop waiting for the end of the request's availability phase (it was handled, or is gone)."""
        self.phases.pop(request_id, None)

    async def replace_messages(self, request_id: str, put: dict[str, Any], items: list[OutboxItem],
                               drop: Callable[[OutboxItem], bool], *, deadline: float | None = None,
                               reduction_kw: float | None = None, **write: Any) -> None:
        """Swap a request's queued messages for ``items`` in one write of its row with ``put`` (a cancel, a
        revision): the queued ones ``drop`` selects are deleted. ``deadline`` None: the request ends here (no
        deadline, no phase); else its new deadline (and ``reduction_kw`` its phase's). ``write``: the other
        arguments of :meth:`HubStore.update_request` (``close``, ``audit``, ``reopen``, ``idempotency``)."""
        dropped = [i.msg_id for i in self.outbox.of(request_id) if drop(i)]
        await self.store.update_request(request_id, {**put, **_message_cells(items)},
                                        RequestCodec.message_cells(dropped), **write)
        # Forgotten only once the write is durable: when it fails (storage unavailable), the request keeps its
        # deadline, phase and messages here, as storage still has them.
        for m in dropped:
            self.outbox.pop(m, None)
        if deadline is None:
            self.deadlines.pop(request_id, None)
            self.phases.pop(request_id, None)
        else:
            self.deadlines[request_id] = deadline
            if reduction_kw is not None and request_id in self.phases:
                self.phases[request_id].reduction_kw = reduction_kw
        for item in items:
            self.outbox[item.msg_id] = item
        self.kick()

    async def cancel(self, request_id: str, messages: Callable[[dict[str, list[str]]], list[OutboxItem]],
                     now: float) -> tuple[RequestState, str | None, list[str]]:
        """Cancel a request that has not ended (:func:`~cloud_hub.lifecycle.cancelled`), under its lock: its queued
        messages are replaced by ``messages(reached)`` (``{retailer: clients}``) in the same write. Returns the
        request's state before (a terminal one: nothing was done), its type, and the retailers told."""
        async with self.lock(request_id):
            row = RequestCodec.row_state(await self.store.get_request_cells(request_id, RequestCodec.WHOLE))
            assert row is not None, "a request row is never deleted"
            if row.state.terminal:
                return row.state, row.kind, []
            changes, reached = lifecycle.cancelled(row, now)
            items = messages(reached)
            await self.replace_messages(request_id, RequestCodec.changes(changes), items, lambda _: True,
                                        close=not items)
        return row.state, row.kind, sorted(reached)

    async def finish_phase(self, request_id: str, put: dict[str, Any] | None = None,
                           items: Sequence[OutboxItem] = ()) -> None:
        """End a load reduction's availability phase: write its dispatch (``put``, cells from
        :class:`~cloud_hub.store.RequestCodec`, with the messages ``items``); with nothing to write, only stop
        waiting for it (it was handled, or is gone). The phase stays due when the write fails."""
        if put is not None:
            if items:
                await self.add_messages(request_id, list(items), put)
            else:
                await self._write(request_id, put)
        self.end_phase(request_id)

    # -- dispatch -----------------------------------------------------------------------------------------

    def due(self, now: float, limit: int = 1000) -> list[OutboxItem]:
        """Messages whose next attempt is due: every first send before any re-send, then oldest due first, so
        that no retailer's re-sends (a flapping bridge's, say) ever delay another retailer's new messages."""
        return sorted((i for i in self.outbox.values() if i.next_at <= now),
                      key=lambda i: (i.attempts > 0, i.next_at))[:limit]

    def next_due(self) -> float | None:
        """When the next message is due."""
        return min((i.next_at for i in self.outbox.values()), default=None)

    async def mark_sent(self, items: list[OutboxItem], now: float, next_at: Sequence[float] | None = None) -> None:
        """Record attempts (each item's next one at ``next_at``, by default after the one back-off from ``now``), in
        memory at once; a first send's pending targets of that retailer become ``sent`` in storage once the send has
        settled for :attr:`sent_settle_s` (:meth:`settle_due`, with ``now`` as their time), or at once when it is 0.
        Which retailer received which client's billing data goes to the data access log at once."""
        marks: list[_SentMark] = []
        for k, item in enumerate(items):
            item.attempts += 1
            item.next_at = now + retry_delay_s(item.attempts) if next_at is None else next_at[k]
            if item.attempts == 1 and item.kind in ("request", *DELIVERIES):
                marks.append(_SentMark(item, now, item.clients))
        # The right was decided per reading interval when the request was created (HubService._billing).
        audit = [AuditEntry(f"retailer:{m.item.retailer_id}", cid, Action.DELIVER_BILLING.value,
                            "retailer:supplier-of-period", True, m.item.request_id, at=now)
                 for m in marks if m.item.kind == "billing" for cid in m.item.clients]
        if audit:
            await self.store.update_requests([], audit)
        if self.sent_settle_s <= 0:
            await self._write_marks(marks)
            return
        self._settling.extend(marks)
        self._settling_n.update(m.item.request_id for m in marks)
        await self._first_dispatch({m.item.request_id for m in marks if m.item.request_id not in self._dispatched},
                                   now)

    async def _first_dispatch(self, request_ids: set[str], now: float) -> None:
        """Write ``now`` as the first dispatch time of those of ``request_ids`` that have none, at once: the trace's
        ``dispatch_ms`` of a request that ends before its marks settle is read as soon as it has ended. Two cells read
        and one written per request (with its ``storage_ms``), no client's: no change-feed entry."""
        if not request_ids:
            return
        async with contextlib.AsyncExitStack() as locks:
            for request_id in sorted(request_ids):
                await locks.enter_async_context(self.lock(request_id))
            rows = await self.store.get_requests_cells({rid: RequestCodec.sent_columns(()) for rid in request_ids})
            writes: list[tuple[str, dict[str, Any], list[str] | None, bool]] = []
            for rid in request_ids:
                row = RequestCodec.row_state(rows[rid])
                if row is not None and row.first_dispatch_at is None:
                    writes.append((rid, self._with_storage_ms(rid, RequestCodec.changes(
                        lifecycle.RowChanges(first_dispatch_at=now))), None, False))
            if writes:
                await self.store.update_requests(writes)
                self._storage_ms_stored(writes)
        for rid in request_ids:
            self._dispatched[rid] = None
            if len(self._dispatched) > STORAGE_MS_KEPT:
                self._dispatched.pop(next(iter(self._dispatched)))

    def next_settle(self) -> float | None:
        """When the oldest waiting mark is due (None: none waits)."""
        return self._settling[0].at + self.sent_settle_s if self._settling else None

    async def settle_due(self, now: float) -> int:
        """Write the marks of first sends that have settled by ``now``; returns how many were due."""
        due: list[_SentMark] = []
        while self._settling and self._settling[0].at + self.sent_settle_s <= now:
            due.append(self._settling.popleft())
        if due:
            await self._write_due(due)
        return len(due)

    async def settle_all(self) -> int:
        """Write every waiting mark now (at shutdown: else a restart re-sends those messages and marks them then)."""
        due = list(self._settling)
        self._settling.clear()
        if due:
            await self._write_due(due)
        return len(due)

    async def _write_due(self, due: list[_SentMark]) -> None:
        """Write ``due`` (taken off the queue) without the targets answered meanwhile."""
        answered = self._answered
        for mark in due:
            rid = mark.item.request_id
            seen = answered.get(rid)
            if seen:
                rev = mark.item.revision
                if mark.clients:
                    mark.clients = [c for c in mark.clients if seen.get("c:" + c, 0) < rev]
                else:
                    mark.party = seen.get("p:" + mark.item.retailer_id, 0) < rev
            left = self._settling_n[rid] - 1
            if left > 0:
                self._settling_n[rid] = left
            else:
                self._settling_n.pop(rid, None)
                answered.pop(rid, None)
        try:
            await self._write_marks(due)
        except StoreUnavailable:
            # Not written: a restart (or the outbox's re-send after it) marks them again; waiting here for storage
            # would hold every later mark. The view keeps ``pending`` until the client's outcome.
            log.warning("%d first send(s) not recorded as sent: storage unavailable", len(due))

    def _answered_in(self, request_id: str, put: dict[str, Any]) -> None:
        """Note the targets a durable write of ``put`` ended, while marks of the request wait (:meth:`_write_due`)."""
        if request_id not in self._settling_n:
            return
        seen = self._answered.setdefault(request_id, {})
        for col, e in put.items():
            if col[:2] in ("c:", "p:") and isinstance(e, dict) and e.get("state") in lifecycle.TERMINAL_VALUES:
                seen[col] = int(e.get("revision", 1))

    async def _write_marks(self, marks: list[_SentMark]) -> None:
        """Write the ``sent`` marks of ``marks`` (in send order), a chunk of requests per storage round."""
        first: dict[str, list[_SentMark]] = {}
        for mark in marks:
            first.setdefault(mark.item.request_id, []).append(mark)
        for part in _sent_chunks(first):
            await self._mark_first_sent(part)

    async def _mark_first_sent(self, first: dict[str, list[_SentMark]]) -> None:
        """The marks of one chunk (:func:`_sent_chunks`): each request's row read with the cells of the targets to
        mark, decided by :func:`~cloud_hub.lifecycle.sent`, and only what changed written."""
        # Every request of the chunk read in one storage call and written in one batch (each row atomically), as
        # the group commit does for outcomes; the locks are taken in request-id order, as there.
        async with contextlib.AsyncExitStack() as locks:
            for request_id in sorted(first):
                await locks.enter_async_context(self.lock(request_id))
            owner = [RequestCodec.meta("owner")] if self.replica_id is not None else []
            rows = await self.store.get_requests_cells({rid: [*RequestCodec.sent_columns(
                (m.clients, m.item.retailer_id) for m in marks if m.live), *owner] for rid, marks in first.items()},
                kept=True)
            # Only the owner writes a row, as for outcomes (:meth:`_apply_to_row`): a replica that lost the broker
            # while a settle was on its way may have had the request adopted meanwhile.
            writes: list[tuple[str, dict[str, Any], list[str] | None, bool]] = [
                (rid, self._with_storage_ms(rid, put), None, False) for rid, marks in first.items()
                if self._writes(rows[rid]) and (put := self._advance_sent(rows[rid], marks))]
            if writes:
                await self.store.update_requests(writes)
                self._storage_ms_stored(writes)
        for rid in first:
            if not self.knows(rid) and rid not in self._settling_n:
                self._locks.pop(rid, None)  # an ended request's lock, taken again here

    @staticmethod
    def _advance_sent(cells: dict[str, Any], marks: list[_SentMark]) -> dict[str, Any]:
        """The cells of a request row to write for ``marks`` (nothing when nothing changes; a request not known
        to storage writes nothing)."""
        row = RequestCodec.row_state(cells)
        if row is None:
            return {}
        # The row's entries were decoded for this write alone: sent() changes them in place, without copies.
        return RequestCodec.changes(lifecycle.sent(row, [m.sent() for m in marks if m.live], min(m.at for m in marks),
                                                   owned=True))

    def _with_storage_ms(self, request_id: str, put: dict[str, Any]) -> dict[str, Any]:
        """``put`` with the request's measured ``r:storage_ms`` when it is not stored yet."""
        ms = self.storage_ms.get(request_id)
        if ms is not None and put:
            RequestCodec.with_storage_ms(put, ms)
        return put

    def _storage_ms_stored(self, writes: list[tuple[str, dict[str, Any], list[str] | None, bool]]) -> None:
        for request_id, put, _, _ in writes:
            if RequestCodec.stores_storage_ms(put):
                self.storage_ms.pop(request_id, None)

    def retailer_online(self, retailer_id: str, now: float) -> int:
        """A retailer's bridge (re)connected: everything it has not acknowledged is due ``now`` (re-sends still
        go behind every first send, see :meth:`due`); returns how many messages that is."""
        n = 0
        for item in self.outbox.values():
            if item.retailer_id == retailer_id:
                item.next_at = min(item.next_at, now)
                n += 1
        if n:
            self.kick()
        return n

    # -- answers from retailers ---------------------------------------------------------------------------

    def acked_by_retailer(self, retailer_id: str, msg_ids: list[str], partition: AckPartition | None) -> list[str]:
        """The ids of ``msg_ids`` that ``retailer_id`` has now acknowledged as a whole, to hand to :meth:`on_acks`.
        A partition's acknowledgement of a message some other partition has not acknowledged yet is recorded on
        its outbox item, which stays queued and is re-sent at its back-off (the partitions that stored it
        deduplicate and acknowledge again). Without a partition, and for ids not in this book's outbox, the ids
        are returned as they are (:meth:`on_acks` ignores unknown ones)."""
        if partition is None:
            return msg_ids
        done = []
        for mid in msg_ids:
            item = self.outbox.get(mid)
            if item is None or item.retailer_id != retailer_id:
                done.append(mid)
                continue
            item.partitions_acked, complete = partition_acks.acknowledged(item.partitions_acked, partition)
            if complete:
                done.append(mid)
        return done

    async def on_ack(self, retailer_id: str, msg_ids: list[str]) -> None:
        """A retailer stored these messages: stop re-sending them; a billing or tariff delivery is complete."""
        await self.on_acks([(retailer_id, msg_ids)])

    async def on_acks(self, acks: list[tuple[str, list[str]]]) -> None:
        """:meth:`on_ack` for the ``(retailer_id, msg_ids)`` of several acks at once: each request row read and
        written once, every row in one storage batch (group commit, as for outcomes)."""
        by_request: dict[str, list[OutboxItem]] = {}
        for retailer_id, msg_ids in acks:
            for mid in msg_ids:
                item = self.outbox.get(mid)
                if item is not None and item.retailer_id == retailer_id:
                    del self.outbox[mid]
                    by_request.setdefault(item.request_id, []).append(item)
        if not by_request:
            return
        now = time.time()
        async with contextlib.AsyncExitStack() as locks:
            for request_id in sorted(by_request):
                await locks.enter_async_context(self.lock(request_id))
            writes: list[_RowWrite] = []
            try:
                for request_id, items in by_request.items():
                    write = await self._apply_acks(request_id, items, now)
                    if write is not None:
                        writes.append(write)
                if writes:
                    await self.store.update_requests([(w.request_id, w.put, w.delete, w.close) for w in writes])
            except StoreUnavailable:
                for item in (i for items in by_request.values() for i in items):  # still stored: send them again
                    self.outbox.setdefault(item.msg_id, item)
                raise
            for w in writes:
                self._after_write(w, now)

    async def _apply_acks(self, request_id: str, items: list[OutboxItem], now: float) -> _RowWrite | None:
        """The new cells of one request row once ``items`` are acknowledged (None: the row is gone)."""
        delete = [RequestCodec.message(i.msg_id) for i in items]
        deliveries = [(clients, i.retailer_id, i.revision) for i in items if i.kind in DELIVERIES
                      for clients in [self._delivered(i)] if clients or not i.clients]
        cancels = [i.retailer_id for i in items if i.kind == "cancel"]
        put: dict[str, Any] = {}
        if deliveries or cancels:
            cells = await self.store.get_request_cells(request_id,
                                                       RequestCodec.ack_columns((c, r) for c, r, _ in deliveries))
            row = RequestCodec.row_state(cells)
            if row is None:
                return None
            put = RequestCodec.changes(lifecycle.acknowledged(row, deliveries, cancels, now))
        close = self._closes(request_id, RequestCodec.state_written(put))
        return _RowWrite(request_id, put=put, delete=delete, close=close)

    def _delivered(self, item: OutboxItem) -> list[str]:
        """The clients whose delivery ``item``'s acknowledgement completes: those it names but no message of the same
        request and kind to the same retailer still unacknowledged also names (a client whose billing readings went
        in parts, one message each, or whose supply by that retailer came in two spans of the period)."""
        if not item.clients or not self.outbox.has(item.request_id):
            return item.clients
        held = {c for o in self.outbox.of(item.request_id) if o.kind == item.kind and o.retailer_id == item.retailer_id
                for c in o.clients}
        return [c for c in item.clients if c not in held] if held else item.clients

    async def _write(self, request_id: str, put: dict[str, Any], delete: list[str] | None = None) -> None:
        state = RequestCodec.state_written(put)
        ended = state is not None and state.terminal
        close = self._closes(request_id, state)
        put = self._with_storage_ms(request_id, put)
        await self.store.update_request(request_id, put, delete, close=close)
        # Forgotten only once the write is durable: a write that fails (storage unavailable) leaves the request's
        # deadline and phase here, so that the sweep and the dispatcher try again.
        if ended:
            self.deadlines.pop(request_id, None)
            self.phases.pop(request_id, None)
        self._storage_ms_stored([(request_id, put, delete, close)])
        if close:
            self._locks.pop(request_id, None)

    async def on_outcome(self, retailer_id: str, request_id: str, client_id: str, state: ClientState,
                         detail: dict[str, Any], trace: dict[str, float]) -> OutcomeVerdict:
        """Apply one client's outcome reported by ``retailer_id`` (a batch of one, see :meth:`apply`)."""
        return (await self.apply([ReportedOutcome(retailer_id, request_id, client_id, state, detail,
                                                           trace)]))[0]

    async def apply(self, outcomes: list[ReportedOutcome], allowed: Allowed = addressed_only) -> list[OutcomeVerdict]:
        """Apply outcomes reported by retailers, in order, all committed in one storage batch (group commit).

        Each request's row is read once and written once, under its lock (the locks of the batch are taken in
        request-id order, so two batches never wait on each other): the store decodes it to a
        :class:`~cloud_hub.lifecycle.RowState`, the pure :func:`~cloud_hub.lifecycle.apply` decides, the store
        encodes what changed. Before an outcome changes anything, ``allowed(retailer_id, addressed_retailers)``
        must say that its retailer may report on that client; one that may not, or for an unknown request or
        client, changes nothing and says so in its verdict. Returns one verdict per outcome, in order, once
        everything is durable; raises :class:`~cloud_hub.storage.StoreUnavailable` (nothing of the batch may be
        acknowledged then: the retailers re-send, and applying an outcome again changes nothing).
        """
        now = time.time()
        by_request: dict[str, list[int]] = {}
        for i, o in enumerate(outcomes):
            by_request.setdefault(o.request_id, []).append(i)
        verdicts: list[OutcomeVerdict] = [OutcomeVerdict(False, []) for _ in outcomes]
        async with contextlib.AsyncExitStack() as locks:
            for request_id in sorted(by_request):
                await locks.enter_async_context(self.lock(request_id))
            writes: list[_RowWrite] = []
            rows = await self.store.get_requests_cells(  # every row of the commit in one storage call
                {rid: RequestCodec.outcome_columns([outcomes[i].client_id for i in idx], self.replica_id is not None)
                 for rid, idx in by_request.items()}, kept=True)  # (its clients' entries from memory, when held)
            for request_id, idx in by_request.items():
                write = self._apply_to_row(request_id, rows[request_id], [outcomes[i] for i in idx], now, allowed)
                for i, v in zip(idx, write.verdicts, strict=True):
                    verdicts[i] = v
                if write.put:
                    writes.append(write)
            if writes:
                await self.store.update_requests([(w.request_id, w.put, None, w.close) for w in writes])
            for w in writes:
                self._after_write(w, now)
        return verdicts

    apply_outcomes = apply
    """The name the OpenADR 3 notifier calls :meth:`apply` by."""

    def _writes(self, cells: dict[str, Any]) -> bool:
        """Whether this book may write the request row read as ``cells`` (with its owner cell, when it is a replica):
        only the owner writes a row; a hub without replicas, and a row without an owner, are not checked."""
        return self.replica_id is None or RequestCodec.owner(cells) in (None, self.replica_id)

    def _apply_to_row(self, request_id: str, cells: dict[str, Any], batch: list[ReportedOutcome], now: float,
                      allowed: Allowed) -> _RowWrite:
        """What ``batch`` writes to one request row (``cells``: read by :meth:`RequestCodec.outcome_columns`);
        nothing is written here."""
        if not self._writes(cells):
            # Checked again at the commit: the relay saw this replica as the owner, but another has adopted the
            # request since (this one lost the broker meanwhile); only the owner writes the row. A refusal writes
            # nothing, so any replica gives it (as it does for an unknown pair).
            return _RowWrite(request_id, verdicts=self._held(cells, batch, allowed))
        row = RequestCodec.row_state(cells)
        if row is None:
            return _RowWrite(request_id, verdicts=[OutcomeVerdict(False, []) for _ in batch])
        # The row's entries were decoded for this commit alone: apply changes them in place, without copies.
        changes, verdicts = apply(row, batch, now, allowed, owned=True)
        write = _RowWrite(request_id, verdicts=verdicts, put=RequestCodec.changes(changes),
                          phase_complete=changes.phase_complete, finished=changes.finished)
        if write.put:
            write.close = self._closes(request_id, changes.state)
        return write

    @staticmethod
    def _held(cells: dict[str, Any], batch: list[ReportedOutcome], allowed: Allowed) -> list[OutcomeVerdict]:
        """The verdicts of outcomes for a request another replica owns: held when they would be applied."""
        verdicts = []
        for o in batch:
            entry = cells.get(RequestCodec.client(o.client_id))
            addressed = [] if entry is None else list(entry.get("retailers", {}))
            refused = entry is None or not allowed(o.retailer_id, addressed)
            verdicts.append(OutcomeVerdict(entry is not None, addressed, held=not refused))
        return verdicts

    def _closes(self, request_id: str, state: RequestState | None) -> bool:
        """Whether a write that leaves the request in ``state`` (None: does not change it) ends the request's life
        in the open index (as :meth:`_write` decides)."""
        pending = self.outbox.has(request_id)
        return (state is not None and state.terminal and not pending) or (
            state is None and not pending and request_id not in self.deadlines)

    def _after_write(self, w: _RowWrite, now: float) -> None:
        """What the book keeps in memory, once a row written by :meth:`apply` is durable."""
        self._answered_in(w.request_id, w.put)
        state = RequestCodec.state_written(w.put)
        if state is not None and state.terminal:
            self.deadlines.pop(w.request_id, None)
            self.phases.pop(w.request_id, None)
        if w.close:
            self._locks.pop(w.request_id, None)
        if w.phase_complete and w.request_id in self.phases:
            self.phases[w.request_id].due = 0.0
            self.kick()
        if w.finished is not None:
            self._finished_metrics(*w.finished)

    def _finished_metrics(self, kind: str, state: RequestState, seconds: float) -> None:
        self.metrics.requests_finished.labels(kind, state.value).inc()
        self.metrics.request_seconds.labels(kind).observe(seconds)

    # -- time ---------------------------------------------------------------------------------------------

    async def expire_due(self, now: float) -> list[str]:
        """Close every open target of every request past its deadline; returns the requests closed."""
        due = [r for r, d in self.deadlines.items() if d <= now]
        for request_id in due:
            async with self.lock(request_id):
                row = RequestCodec.row_state(await self.store.get_request_cells(request_id, RequestCodec.WHOLE))
                if row is None:
                    self.deadlines.pop(request_id, None)
                    continue
                changes = lifecycle.expired(row, now)
                put = RequestCodec.changes(changes)
                dropped = {i.msg_id: i for i in self.outbox.of(request_id) if i.kind != "cancel"}
                for mid in dropped:
                    del self.outbox[mid]
                try:
                    await self._write(request_id, put, RequestCodec.message_cells(dropped))
                except BaseException:
                    self.outbox.update(dropped)  # still stored: the next sweep drops them with the row's write
                    raise
                if changes.finished is not None:
                    self._finished_metrics(*changes.finished)
        return due

    def phases_due(self, now: float) -> list[str]:
        """Load reductions whose availability window has closed."""
        return [r for r, p in self.phases.items() if p.due <= now]
