"""The read marker's bookkeeping (:class:`mhp_wire.outbox.ReadHorizon`) on a driven clock, and the group commit's
barrier it waits behind (:meth:`mhp_wire.groupcommit.GroupCommit.settled`)."""

from __future__ import annotations

import asyncio

from mhp_wire.groupcommit import Failed, GroupCommit
from mhp_wire.outbox import ReadHorizon


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_horizon_is_the_send_time_of_the_last_marker_read_back() -> None:
    clock = Clock()
    h = ReadHorizon(clock, retry_s=2.0, nonce="n1")
    assert h.at == 0.0
    first = h.probe()
    assert first is not None
    clock.t = 100.5
    assert h.probe() is None, "one marker in flight at a time"
    assert h.returned(first) and h.at == 100.0
    assert not h.returned(first), "a marker read twice moves nothing"
    second = h.probe()
    assert second is not None
    clock.t = 103.0  # second is lost (a dropped queue): after retry_s another goes
    third = h.probe()
    assert third is not None and h.probes == 3
    assert h.returned(third) and h.at == 103.0
    assert not h.returned(second), "an earlier marker is implied by a later one"


def test_foreign_stale_or_garbled_markers_are_ignored() -> None:
    clock = Clock()
    h = ReadHorizon(clock, nonce="mine")
    payload = h.probe()
    assert payload is not None
    for other in (b"theirs:1", b"mine:99", b"mine:x", b"\xff\xfe", b"", payload.replace(b"mine", b"min")):
        assert not h.returned(other)
    assert h.at == 0.0
    assert h.returned(payload)


def test_a_reconnection_lets_the_next_marker_go_at_once() -> None:
    clock = Clock()
    h = ReadHorizon(clock, retry_s=10.0, nonce="n")
    assert h.probe() is not None
    assert h.probe() is None
    h.lost()
    late = h.probe()
    assert late is not None
    clock.t = 101.0
    assert h.returned(late) and h.at == 100.0


def test_markers_that_never_return_are_bounded() -> None:
    clock = Clock()
    h = ReadHorizon(clock, retry_s=1.0, nonce="n")
    for _ in range(1500):
        assert h.probe() is not None
        clock.t += 1.0
    assert len(h._in_flight) == 1024


async def test_settled_waits_for_what_was_queued_before_it_not_after() -> None:
    gates: list[asyncio.Event] = []

    async def commit(items: list[int]) -> list[object]:
        gate = asyncio.Event()
        gates.append(gate)
        await gate.wait()
        return [Failed(ValueError("no")) if i < 0 else i for i in items]

    gc: GroupCommit[int, object] = GroupCommit(commit, name="t")
    assert gc.settled().done(), "nothing queued: settled at once"
    a = gc.submit_nowait(1)
    b = gc.submit_nowait(-1)  # an item's own failure still ends its commit
    barrier = gc.settled()
    await asyncio.sleep(0)
    c = gc.submit_nowait(2)  # queued after the barrier: not waited for
    await asyncio.sleep(0)
    assert not barrier.done()
    gates[0].set()
    await asyncio.wait_for(barrier, 1)
    assert a.result() == 1 and isinstance(b.exception(), ValueError) and not c.done()
    later = gc.settled()
    await asyncio.sleep(0)
    assert len(gates) == 2 and not later.done()
    gates[1].set()
    await asyncio.wait_for(later, 1)
    assert c.result() == 2


async def test_settled_counts_a_batch_whose_commit_raised() -> None:
    async def commit(items: list[int]) -> list[object]:
        raise OSError("disk")

    gc: GroupCommit[int, object] = GroupCommit(commit, name="t")
    fut = gc.submit_nowait(1)
    await asyncio.wait_for(gc.settled(), 1)
    assert isinstance(fut.exception(), OSError)


def test_a_marker_awaited_longer_than_max_lag_lets_the_horizon_lag_the_clock_by_at_most_that() -> None:
    clock = Clock()
    h = ReadHorizon(clock, max_lag_s=30.0, nonce="n")
    payload = h.probe()
    assert payload is not None and h.returned(payload)
    assert h.known(140.0) == 100.0 and h.stalls == 0, "none awaited: an old horizon only means nobody asked"
    clock.t = 140.0
    lost = h.probe()  # and never comes back
    assert lost is not None
    assert h.known(160.0) == 100.0 and h.stalls == 0, "awaited 20 s: still within the bound"
    assert h.known(180.0) == 150.0 and h.stalls == 1, "awaited 40 s: 30 s behind the clock at most"
    assert h.known(190.0) == 160.0 and h.stalls == 1, "one stall, counted (and logged) once"
    clock.t = 189.0
    late = h.probe()
    assert late is not None and h.returned(late)
    assert h.known(190.0) == 189.0 and h.stalls == 1


def test_an_idle_horizon_with_no_marker_awaited_is_not_a_stall() -> None:
    """Found in review: markers go only while re-sends wait, so at a start (``at`` 0) and after any quiet spell the
    horizon is old with nothing lost; before the mend each such round logged a stall."""
    clock = Clock()
    h = ReadHorizon(clock, max_lag_s=30.0, nonce="n")
    assert h.known(1_000_000.0) == 0.0 and h.stalls == 0
    payload = h.probe()
    assert payload is not None and h.returned(payload)
    assert h.known(1_000_000.0) == 100.0 and h.stalls == 0
    h.probe()
    h.lost()  # a reconnection: the wait counts from the next marker
    assert h.known(1_000_000.0) == 100.0 and h.stalls == 0


async def test_a_commit_that_gives_the_wrong_number_of_results_fails_its_items_and_ends_for_the_barrier() -> None:
    calls = 0

    async def commit(items: list[int]) -> list[object]:
        nonlocal calls
        calls += 1
        return [] if calls == 1 else list(items)

    gc: GroupCommit[int, object] = GroupCommit(commit, name="t")
    bad = gc.submit_nowait(1)
    await asyncio.wait_for(gc.settled(), 1)
    assert isinstance(bad.exception(), RuntimeError)
    assert await asyncio.wait_for(gc.submit(2), 1) == 2
    await asyncio.wait_for(gc.settled(), 1)
