"""The hub lets its event loop go while it works through a large request (issue 14, fourth and fifth rounds): its
expansion, the recording of its first sends and its outcome commits run in chunks, and other tasks take turns
between them. ``docs/performance.md``, "Issue 14, fourth round: the hub's loop at 100,000 clients".

Counted, not timed: a real hub (uvicorn on a real port, SQLite in ``tmp_path``, its real Mosquitto), 20,000
clients registered through ``PUT /v1/clients``, an emergency to all of them POSTed, a retailer on the hub broker
acknowledging every request message and reporting every client ``executed``. Beside the hub, on its event loop, a
probe task does nothing but ``await asyncio.sleep(0)``: it is always ready, so it takes a turn every time the loop
is let go. The hub's own cell codec (``cloud_hub.store._j``, ``_u``, ``decode_cells``, ``audit_mutations``) is
wrapped to count, and the three steps
(``HubStore.expand_request``, ``RequestBook.mark_sent``, ``RequestBook.apply``) to name the step a cell belongs to
(a context variable, so that only the step's own task is counted). Each probe turn closes a segment: the cells
each step encoded or decoded since the probe's previous turn, that is, while the loop was held.

Before the fix (main at ``fe587b4``) the expansion encoded its 40,000 cells (entries and audit lines) in one
segment and the first sends decoded and encoded 20,000 each in one segment; with it, no segment holds more than
:data:`BOUND` of either.

The wall-clock check (the longest time ``/healthz`` goes unanswered) is a benchmark, not a test:
``python -m sim.bench_hub_loop``.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import cloud_hub.store
from cloud_hub.book import RequestBook
from cloud_hub.store import HubStore
from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, OutcomeReport, Outcomes, Request
from tests.broker_fixtures import MosquittoFactory
from tests.hub_fixtures import HubHandle, running_hub
from tests.mqtt_party import Party, parties
from tests.waiting import eventually

N = 20_000
CLIENTS = [f"c{i:05d}" for i in range(N)]
BOUND = 4_000
"""Cells of one kind a step may encode (or decode) between two turns of the probe: twice
``cloud_hub.yielding.CHUNK``, one chunk of one loop and what is left of the loop before it (fewer than a chunk),
which runs on without a turn between them (e.g. the last audit lines of an expansion, then the first chunk of its
entries). Written out, not imported: the same test runs on main, which has no ``cloud_hub.yielding``."""

STEPS = {"expansion": (HubStore, "expand_request"), "first sends": (RequestBook, "mark_sent"),
         "outcome commits": (RequestBook, "apply")}

_step: ContextVar[str | None] = ContextVar("step", default=None)


class TurnProbe:
    """Counts what the hub's steps do between two turns of a task that always waits to run."""

    def __init__(self) -> None:
        self.since_turn: Counter[tuple[str, str]] = Counter()
        self.segments: dict[tuple[str, str], list[int]] = defaultdict(list)
        """``(step, "encoded" | "decoded")``: the cells of each segment in which the step did any."""
        self.turns = 0
        self.inside = 0
        """Inside a counted call that counts its cells itself (its own ``_u`` calls are not counted again)."""

    def count(self, kind: str, n: int = 1) -> None:
        step = _step.get()
        if step is not None and not self.inside:
            self.since_turn[(step, kind)] += n

    def turn(self) -> None:
        for key, n in self.since_turn.items():
            self.segments[key].append(n)
        self.since_turn.clear()
        self.turns += 1

    async def run(self) -> None:
        while True:
            self.turn()
            await asyncio.sleep(0)

    def total(self, step: str, kind: str) -> int:
        return sum(self.segments[(step, kind)])

    def longest(self, step: str, kind: str) -> int:
        return max(self.segments[(step, kind)], default=0)


def counting(probe: TurnProbe, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        probe.count(kind)
        return fn(*args, **kwargs)
    return wrapper


def counting_cells(probe: TurnProbe, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A function over many cells at once (``decode_cells`` of a row, ``audit_mutations`` of entries): counted
    by the number of cells (or entries) it is given."""
    @functools.wraps(fn)
    def wrapper(cells: Any, *args: Any, **kwargs: Any) -> Any:
        probe.count(kind, len(cells))
        probe.inside += 1
        try:
            return fn(cells, *args, **kwargs)
        finally:
            probe.inside -= 1
    return wrapper


def named(step: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _step.set(step)
        try:
            return await fn(*args, **kwargs)
        finally:
            _step.reset(token)
    return wrapper


@pytest.fixture
async def big_hub(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
                  ) -> AsyncIterator[HubHandle]:
    # The first sends' marks written at once, in ``mark_sent``, by the chunks under test: with the default settle
    # time the retailer's outcomes (sent at once below) would be written before them, and the marks of the clients
    # they ended never made (issue 14, tenth round; the same chunks write the settled marks).
    # The retailer below reports 20,000 outcomes in ten messages at once: the per-retailer MQTT rate limit is not
    # under test.
    async for h in running_hub(request, tmp_path, mosquitto_factory, "sqlite", sent_settle_s=0.0,
                               mqtt_rate_limit_per_s=100_000.0, mqtt_rate_limit_burst=100_000):
        yield h


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> TurnProbe:
    p = TurnProbe()
    monkeypatch.setattr(cloud_hub.store, "_j", counting(p, "encoded", cloud_hub.store._j))
    monkeypatch.setattr(cloud_hub.store, "_u", counting(p, "decoded", cloud_hub.store._u))
    # Since the fifth round a row is decoded in one call and a request's audit lines encoded once per distinct
    # line: those count by the cells (entries) they are given.
    monkeypatch.setattr(cloud_hub.store, "decode_cells", counting_cells(p, "decoded", cloud_hub.store.decode_cells))
    monkeypatch.setattr(cloud_hub.store, "audit_mutations",
                        counting_cells(p, "encoded", cloud_hub.store.audit_mutations))
    # Since the fourteenth round an expanded row's client entries are read from the hub's memory, not decoded: the
    # copies a step is given of them count as its reads.
    monkeypatch.setattr(cloud_hub.store, "held_copies", counting_cells(p, "decoded", cloud_hub.store.held_copies))
    for step, (cls, name) in STEPS.items():
        monkeypatch.setattr(cls, name, named(step, getattr(cls, name)))
    return p


async def register(hub: HubHandle) -> None:
    for rid in ("r1", "r2"):
        r = await hub.http.put(f"/v1/retailers/{rid}", json={"name": rid.upper()}, headers=hub.auth("admin"))
        assert r.status_code in (200, 201), r.text
    since = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    for k in range(0, N, 5_000):
        r = await hub.http.put("/v1/clients", headers=hub.auth("dso"), timeout=120, json={"clients": [
            {"client_id": cid, "retailer_id": "r1", "contracted_power_kw": 6.9, "feeder_id": "f1",
             "valid_from": since} for cid in CLIENTS[k:k + 5_000]]})
        assert r.status_code == 200, r.text


async def play_retailer(r1: Party, request_id: str) -> set[str]:
    """Acknowledge every request message and report each client it names ``executed``; returns the clients named
    (once every client was)."""
    named_: set[str] = set()
    while named_ != set(CLIENTS):
        # A request message the broker drops comes again on the hub's back-off (up to 30 s).
        msg = await r1.next("request", timeout=60)
        assert isinstance(msg, Request) and msg.request_id == request_id
        await r1.publish(topics.up("retailers", "r1"), Ack(ack_ids=[msg.msg_id]))
        new = [cid for cid in msg.client_ids if cid not in named_]
        named_.update(new)
        for k in range(0, len(new), 2_000):
            await r1.publish(topics.up("retailers", "r1"), Outcomes(request_id=request_id, reports=[
                OutcomeReport(client_id=cid, state=ClientState.EXECUTED) for cid in new[k:k + 2_000]]))
    return named_


@pytest.mark.timeout(240)
async def test_the_hub_lets_its_loop_go_between_chunks_of_a_20000_client_emergency(big_hub: HubHandle,
                                                                                  probe: TurnProbe) -> None:
    hub = big_hub
    await register(hub)
    start = datetime.now(UTC) + timedelta(seconds=60)
    turning = asyncio.create_task(probe.run(), name="test-turn-probe")
    try:
        with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
            r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), timeout=120, json={
                "client_ids": CLIENTS, "start": start.isoformat(), "duration_s": 600, "power_limit_kw": 1.5})
            assert r.status_code == 202, r.text
            request_id = r.json()["request_id"]
            assert await play_retailer(r1, request_id) == set(CLIENTS)
            await eventually(lambda: _completed(hub), "the emergency completed", timeout_s=120, interval_s=0.2)
    finally:
        turning.cancel()
        await asyncio.gather(turning, return_exceptions=True)
    probe.turn()  # the last segment

    # Every step did its whole work (so the bounds below are about a real 20,000-client request) ...
    assert probe.total("expansion", "encoded") >= 2 * N  # an entry and an audit line per client
    assert probe.total("first sends", "decoded") >= N  # each client's entry read ...
    assert probe.total("first sends", "encoded") >= N  # ... and written `sent`
    assert probe.total("outcome commits", "decoded") >= N
    assert probe.total("outcome commits", "encoded") >= N
    # ... and let the loop go at least once per BOUND cells of it, never holding it for more.
    longest = {f"{step} {kind}": probe.longest(step, kind) for step in STEPS for kind in ("encoded", "decoded")}
    print("the most cells between two turns of the probe:", longest)
    assert all(n <= BOUND for n in longest.values()), f"cells between two turns of the probe: {longest}"
    for step in STEPS:
        for kind in ("encoded", "decoded"):
            assert len(probe.segments[(step, kind)]) >= probe.total(step, kind) // BOUND


async def _completed(hub: HubHandle) -> bool:
    # The counters: the request view of 20,000 entries is not what is counted here.
    text = (await hub.http.get("/metrics")).text
    return 'mhp_requests_finished_total{state="completed",type="emergency"} 1.0' in text
