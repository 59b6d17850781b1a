"""The hub's change feed: one event per stored change of a request, kept in an event log and pushed to followers.

Events are made in ONE place, the store's request writes (:class:`~cloud_hub.store.HubStore`): every write of a
request row that changes its state, a client's entry or a retailer's delivery adds an event row to the same storage
batch (one transaction on SQLite), so an event exists exactly when its change does. Once the batch is durable the
event is published, in id order, to every live follower (Server-Sent Events streams, webhook workers).

Event ids are integers that order: ``milliseconds since the epoch * 1000 + a sequence`` (never below the last id
stored, so a hub restarted on a clock that went back still counts up). A follower that reconnects with the last id it
saw gets exactly the events after it: those already published are read back from the log, the rest arrive live.
What a principal sees of an event is decided by :func:`view` (neutral: a retailer only its own clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cloud_hub import codec
from cloud_hub.authz import Principal
from cloud_hub.metrics import HubMetrics
from cloud_hub.storage import KVStore, Mutation
from cloud_hub.yielding import chunked_map

log = logging.getLogger(__name__)

TABLE = "events"
LAST_ROW = "~last"
"""A row after every event row: the highest event id written (a hint; the rows after it are scanned on start)."""
KNOWN_KEPT = 50_000
"""Requests whose type, issuer, state and retailers the feed keeps in memory (oldest forgotten, read again)."""
PAGE = 500
BATCH_MAX = 500
"""The most live events a follower is handed at once (:meth:`ChangeFeed.follow_batches`)."""


def event_key(event_id: int) -> str:
    """The row key of an event: fixed width, so that keys sort as ids do."""
    return f"{event_id:020d}"


def id_time(event_id: int) -> float:
    """When an event id was allocated (epoch seconds)."""
    return event_id / 1_000_000


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass(slots=True)
class Known:
    """What the feed remembers of a request to describe its changes."""

    type: str
    issuer: str
    state: str
    revision: int | None
    audience: set[str]
    """Every retailer the request concerns (its clients' retailers, its deliveries)."""


@dataclass(slots=True)
class Staged:
    """Events of one storage batch: their rows, written with the batch, and the events, published once durable."""

    mutations: list[Mutation] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    known: dict[str, Known] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class Follower:
    """One live follower: what it may see, and a bounded queue of the events it sees, each as :func:`view` shows
    it to the follower (made once, when the event is published, and shared by the followers with the same
    principal and request: read only)."""

    who: Principal
    request_id: str | None
    queue: asyncio.Queue[dict[str, Any]]
    overflowed: bool = False
    summary: bool = False
    """The events without their clients and retailers (:func:`view`'s ``summary``)."""


@dataclass(frozen=True, slots=True)
class FeedItem:
    """What a stream yields: ``request`` (an event as the follower sees it), ``reset`` (its resume point is older
    than the replay window: re-read with GET), ``keepalive``, or first, when asked for, ``open`` (the follower is
    registered)."""

    kind: str
    event_id: int = 0
    data: dict[str, Any] = field(default_factory=dict)


def _concerns(event: dict[str, Any], retailer_id: str | None) -> bool:
    """Whether a retailer sees the stored event at all (in either view): its own delivery, a change of the
    request's state it is in the audience of, or one of its own clients (the cheapest tests first)."""
    return (retailer_id in event["retailers"] or (event["state_changed"] and retailer_id in event["audience"])
            or any(retailer_id in e["retailers"] for e in event["clients"].values()))


def view(event: dict[str, Any], who: Principal, request_id: str | None = None, *,
         summary: bool = False) -> dict[str, Any] | None:
    """What ``who`` sees of a stored event (None: nothing). The DSO sees the requests it issued, whole; a retailer
    only its own clients' entries and its own delivery, of requests that concern it (a change of the request's state
    is shown to every retailer it concerns, with its own clients only); an administrator sees none. ``summary``: the
    same events, without their ``clients`` and ``retailers`` (for a follower that reads only the request's fields,
    the OpenADR 3 notifier: an event of a fan-out's outcome commit names hundreds of clients)."""
    if request_id is not None and event["request_id"] != request_id:
        return None
    if who.kind == "retailer":
        rid = who.retailer_id
        if not _concerns(event, rid):
            return None
    elif who.kind != "dso" or event["issuer"] != str(who):
        return None
    out: dict[str, Any] = {"event_id": event["event_id"], "request_id": event["request_id"], "type": event["type"],
                           "state": event["state"], "at": event["at"]}
    if not summary:
        if who.kind == "retailer":
            out["clients"] = {c: {"state": e["state"], "detail": e["detail"]} for c, e in event["clients"].items()
                              if rid in e["retailers"]}
            out["retailers"] = {r: s for r, s in event["retailers"].items() if r == rid}
        else:
            out["clients"] = {c: {"state": e["state"], "detail": e["detail"]} for c, e in event["clients"].items()}
            out["retailers"] = dict(event["retailers"])
    if event.get("revision") is not None:
        out["revision"] = event["revision"]
    return out


def _client_event(item: tuple[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """One client's part of an event, from one cell ``(column, value)`` of a write (None: not a client entry).
    Per client of the write (thousands): the cheapest tests first, and one retailer is already sorted."""
    col, e = item
    if col[:2] == "c:" and isinstance(e, dict) and "state" in e:
        r = e.get("retailers", {})
        return col[2:], {"state": e["state"], "detail": e.get("detail", {}),
                         "retailers": list(r) if len(r) < 2 else sorted(r)}
    return None


def describe(request_id: str, known: Known, put: dict[str, Any], created: bool,
             clients: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The event of one write of a request row (``put``: its cells, decoded), or None when the write changes
    nothing a follower sees (an outbox entry, a stored timing). Updates ``known``. ``clients``: the clients' part,
    when the caller made it already (:meth:`ChangeFeed.stage`, in chunks)."""
    if clients is None:
        clients = dict(c for c in map(_client_event, put.items()) if c is not None)
    retailers = {col[2:]: e["state"] for col, e in put.items()
                 if col.startswith("p:") and isinstance(e, dict) and "state" in e}
    state = put.get("r:state", known.state)
    state_changed = created or state != known.state
    if "r:revision" in put:
        known.revision = put["r:revision"]
    known.state = state
    for e in clients.values():
        known.audience.update(e["retailers"])
    known.audience.update(retailers)
    if not clients and not retailers and not state_changed:
        return None
    return {"request_id": request_id, "type": known.type, "state": state, "revision": known.revision,
            "clients": clients, "retailers": retailers, "issuer": known.issuer, "state_changed": state_changed,
            "audience": sorted(known.audience)}


class ChangeFeed:
    """The event log of request changes and its live followers."""

    def __init__(self, kv: KVStore, metrics: HubMetrics | None = None, *, replay_s: float = 86_400.0,
                 queue_max: int = 1000, clock: Callable[[], float] = time.time) -> None:
        self.kv = kv
        self.metrics = metrics
        self.replay_s = replay_s
        """How far back a follower may resume; older resume points get a ``reset``."""
        self.queue_max = queue_max
        self.clock = clock
        self.watermark = 0
        """The highest event id published: every event up to it is durable and has been handed to the followers."""
        self._last = 0
        self._pending: set[int] = set()
        self._ready: dict[int, dict[str, Any]] = {}
        self._known: dict[str, Known] = {}
        self._followers: set[Follower] = set()

    async def open(self) -> None:
        """Continue the ids after the last event stored."""
        last = await self.kv.get(TABLE, LAST_ROW)
        start = int(last["e:id"]) if last else 0
        rows = await self.kv.scan(TABLE, start=event_key(start), stop=LAST_ROW, columns=["e:d"])
        top = max([start, *(int(r) for r, _ in rows)])
        self._last = self.watermark = top

    # -- writing ------------------------------------------------------------------------------------------

    def _allocate(self) -> int:
        self._last = max(self._last + 1, int(self.clock() * 1000) * 1000)
        self._pending.add(self._last)
        return self._last

    async def _known_of(self, request_id: str) -> Known | None:
        known = self._known.get(request_id)
        if known is not None:
            return known
        row = await self.kv.get("requests", request_id, ["r:type", "r:issuer", "r:state", "r:revision", "c:", "p:"])
        if "r:type" not in row:
            return None
        audience: set[str] = set()
        for col, raw in row.items():
            if col.startswith("c:"):
                audience.update(codec.loads(raw).get("retailers", {}))
            elif col.startswith("p:"):
                audience.add(col[2:])
        rev = codec.loads(row["r:revision"]) if "r:revision" in row else None
        known = Known(codec.loads(row["r:type"]), codec.loads(row["r:issuer"]), codec.loads(row["r:state"]), rev,
                      audience)
        self._remember(request_id, known)
        return known

    def _remember(self, request_id: str, known: Known) -> None:
        self._known[request_id] = known
        if len(self._known) > KNOWN_KEPT:
            self._known.pop(next(iter(self._known)))

    async def stage(self, writes: Iterable[tuple[str, dict[str, Any], dict[str, Any] | None]]) -> Staged:
        """The events of request-row writes ``(request_id, put, meta)`` (``meta``: the new request's, at creation),
        to be written in the same batch; :meth:`settle` once the batch succeeded or failed."""
        staged = Staged()
        try:
            await self._stage_into(staged, writes)
        except BaseException:
            # Cut short (cancelled between two chunks of a large write, or a storage read failed): the ids given
            # out so far are given back, or every later event would wait behind them and no follower would see it.
            self.settle(staged, durable=False)
            raise
        return staged

    async def _stage_into(self, staged: Staged,
                          writes: Iterable[tuple[str, dict[str, Any], dict[str, Any] | None]]) -> None:
        for request_id, put, meta in writes:
            if meta is None and not any(c.startswith(("c:", "p:")) or c == "r:state" for c in put):
                continue  # an outbox entry, a timing: nothing a follower sees, and no read of the row for it
            if meta is not None:
                audience = {r for e in put.values() if isinstance(e, dict) for r in e.get("retailers", {})}
                audience.update(c[2:] for c in put if c.startswith("p:"))
                known: Known | None = Known(meta["type"], meta["issuer"], meta["state"], meta.get("revision"),
                                            audience)
            else:
                base = await self._known_of(request_id)
                known = None if base is None else Known(base.type, base.issuer, base.state, base.revision,
                                                        set(base.audience))
            if known is None:
                continue
            # The clients' part in chunks (cloud_hub.yielding): a write naming 100,000 clients held the loop.
            parts = await chunked_map(_client_event, put.items())
            event = describe(request_id, known, put, meta is not None, dict(c for c in parts if c is not None))
            staged.known[request_id] = known
            if event is None:
                continue
            event_id = self._allocate()
            now = self.clock()
            event = {"event_id": event_id, "at": _iso(now), **event}
            staged.events.append(event)
            staged.mutations.append(Mutation(TABLE, event_key(event_id), {"e:d": codec.dumps(event)}))
        if staged.events:
            staged.mutations.append(Mutation(TABLE, LAST_ROW, {"e:id": str(staged.events[-1]["event_id"]).encode()}))

    def settle(self, staged: Staged, durable: bool) -> None:
        """The batch of ``staged`` was written (``durable``) or not: publish, in id order, every event that no
        lower id still waits for."""
        for event in staged.events:
            self._pending.discard(event["event_id"])
            if durable:
                self._ready[event["event_id"]] = event
        if durable:  # otherwise the row did not change: what was known before still holds
            for request_id, known in staged.known.items():
                self._remember(request_id, known)
        lowest = min(self._pending, default=None)
        for event_id in sorted(self._ready):
            if lowest is not None and event_id > lowest:
                break
            self._publish(self._ready.pop(event_id))

    def _publish(self, event: dict[str, Any]) -> None:
        self.watermark = max(self.watermark, event["event_id"])
        if self.metrics is not None:
            self.metrics.feed_events.inc()
        # Followers with the same principal and request see the same view (the DSO's streams and its OpenADR 3
        # notifier): made once per event and shared, read only.
        views: dict[tuple[Principal, str | None, bool], dict[str, Any] | None] = {}
        for f in self._followers:
            if f.overflowed:
                continue
            whose = (f.who, f.request_id, f.summary)
            if whose not in views:
                views[whose] = view(event, f.who, f.request_id, summary=f.summary)
            seen = views[whose]
            if seen is None:
                continue
            try:
                f.queue.put_nowait(seen)
            except asyncio.QueueFull:
                f.overflowed = True  # its stream ends once it has drained the queue; it resumes from its last id
                if self.metrics is not None:
                    self.metrics.feed_overflows.inc()

    # -- reading ------------------------------------------------------------------------------------------

    def too_old(self, since: int) -> bool:
        """Whether a resume point is older than the replay window."""
        return id_time(since) < self.clock() - self.replay_s

    async def follow(self, who: Principal, since: int | None = None, request_id: str | None = None,
                     keepalive_s: float = 15.0, *, announce: bool = False, summary: bool = False
                     ) -> AsyncIterator[FeedItem]:
        """The events ``who`` sees after ``since`` (None: from now): the stored ones, then live ones, with a
        ``keepalive`` item after each quiet ``keepalive_s``; a ``reset`` first when ``since`` is older than the
        replay window. Ends when the follower fell ``queue_max`` events behind (it resumes from its last id).
        ``announce``: an ``open`` item comes first, once the follower is registered, so that a stream can tell its
        reader from when on "from now" holds (every change stored after that item is in the stream).
        One item at a time: :meth:`follow_batches` taking one live event per list, so that a slow follower (a
        webhook worker, the OpenADR 3 notifier) overflows at ``queue_max`` events behind, not more. ``summary``: the
        events without their clients and retailers (:func:`view`)."""
        async with contextlib.aclosing(self.follow_batches(who, since, request_id, keepalive_s, announce=announce,
                                                           batch_max=1, summary=summary)) as batches:
            async for batch in batches:
                for item in batch:
                    yield item

    async def follow_batches(self, who: Principal, since: int | None = None, request_id: str | None = None,
                             keepalive_s: float = 15.0, *, announce: bool = False, batch_max: int = BATCH_MAX,
                             summary: bool = False) -> AsyncGenerator[list[FeedItem], None]:
        """:meth:`follow`'s items, in the same order, as lists: each live list is every event queued for the
        follower when it woke (up to :data:`BATCH_MAX`), so that a stream writes them in one chunk (one socket
        write, one pass through the ASGI layers) instead of one per event; never an empty list."""
        follower = Follower(who, request_id, asyncio.Queue(self.queue_max), summary=summary)
        self._followers.add(follower)
        upto = self.watermark  # no await since adding the follower: every later event reaches its queue
        if self.metrics is not None:
            self.metrics.feed_followers.inc()
        try:
            if announce:
                yield [FeedItem("open", upto)]
            if since is not None and since < upto:
                async for items in self._history(who, since, upto, request_id, summary):
                    yield items
            while True:
                if follower.overflowed and follower.queue.empty():
                    return
                try:
                    # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives just as an event
                    # reaches the queue, and the follower (the OpenADR 3 notifier's, say) then never stops: the
                    # hub's shutdown waited for it for ever (mhp_wire.process.wait_or_timeout has the same note).
                    async with asyncio.timeout(keepalive_s):
                        event = await follower.queue.get()
                except TimeoutError:
                    yield [FeedItem("keepalive")]
                    continue
                seen = [event]  # as the follower sees it (_publish)
                while len(seen) < batch_max and not follower.queue.empty():
                    seen.append(follower.queue.get_nowait())
                yield [FeedItem("request", e["event_id"], e) for e in seen]
        finally:
            self._followers.discard(follower)
            if self.metrics is not None:
                self.metrics.feed_followers.dec()

    async def _history(self, who: Principal, since: int, upto: int, request_id: str | None, summary: bool = False
                       ) -> AsyncIterator[list[FeedItem]]:
        """What a follower resuming after ``since`` sees of the events up to ``upto``: the stored ones, a page at a
        time, or a ``reset`` when ``since`` is older than the replay window."""
        if self.too_old(since):
            yield [FeedItem("reset", upto, {"reason": "the resume point is older than the replay window; read the "
                                                      "requests again with GET, then follow from this event",
                                            "event_id": upto})]
            return
        async for page in self._replay(since, upto):
            items = [FeedItem("request", event["event_id"], seen) for event in page
                     if (seen := view(event, who, request_id, summary=summary)) is not None]
            if items:
                yield items

    async def _replay(self, since: int, upto: int) -> AsyncIterator[list[dict[str, Any]]]:
        """The stored events after ``since`` up to ``upto``, a page of rows at a time."""
        start = event_key(since + 1)
        stop = event_key(upto + 1)
        while True:
            rows = await self.kv.scan(TABLE, start=start, stop=stop, limit=PAGE)
            yield [codec.loads(cells["e:d"]) for _row, cells in rows]
            if len(rows) < PAGE:
                return
            start = event_key(int(rows[-1][0]) + 1)

    async def prune(self, limit: int = 5000) -> int:
        """Delete events older than the replay window (at most ``limit`` at a time); returns how many."""
        cutoff = int((self.clock() - self.replay_s) * 1_000_000)
        rows = await self.kv.scan(TABLE, start=event_key(0), stop=event_key(max(0, cutoff)), limit=limit,
                                  columns=["e:d"])
        if rows:
            await self.kv.batch([Mutation(TABLE, r, delete=[]) for r, _ in rows])
        return len(rows)
