"""The shared delivery core of ``mhp_wire``: one back-off formula, one id rule, one group commit.

Pure or in-process parts, driven by an injected clock and by the event loop: no sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from pydantic import BaseModel, Field, ValidationError

from mhp_wire.backoff import Backoff, delay_s
from mhp_wire.groupcommit import Failed, GroupCommit
from mhp_wire.ids import ID_PATTERN, is_id
from mhp_wire.messages import Id
from mhp_wire.topics import TopicError, check_id


@pytest.mark.parametrize(("attempts", "first_s", "max_s", "expected"), [
    (0, 0.5, 30.0, 0.5), (1, 0.5, 30.0, 0.5), (2, 0.5, 30.0, 1.0), (3, 0.5, 30.0, 2.0), (7, 0.5, 30.0, 30.0),
    (1, 2.0, 30.0, 2.0), (4, 2.0, 30.0, 16.0), (5, 2.0, 30.0, 30.0), (3, 0.02, 0.2, 0.08), (5, 0.02, 0.2, 0.2),
    (10_000, 0.5, 30.0, 30.0),  # no overflow however long a message has waited
])
def test_delay_s_is_the_one_formula(attempts: int, first_s: float, max_s: float, expected: float) -> None:
    assert delay_s(attempts, first_s, max_s) == pytest.approx(expected)


def test_the_copies_it_replaced_give_the_same_delays() -> None:
    from cloud_hub.lifecycle import retry_delay_s as hub_delay
    from retailer_bridge.telemetry import retry_delay_s as export_delay

    for n in range(0, 80):
        # The formulas that each component carried before, written out once here as the reference.
        assert hub_delay(n) == float(min(30.0, 0.5 * (2 ** max(0, n - 1))))
        assert export_delay(n, 0.5, 5.0) == float(min(5.0, 0.5 * 2 ** max(0, n - 1)))
        assert delay_s(n + 1, 2.0) == min(30.0, 2.0 * 2 ** n)  # the gateway's telemetry
        assert delay_s(n + 1, 0.02, 0.2) == min(0.2, 0.02 * 2 ** n)  # the HBase retry


def test_backoff_follows_the_injected_clock() -> None:
    b = Backoff(initial_s=0.1, max_s=5.0)
    now = 1_000.0
    assert [b.record_failure(now) for _ in range(8)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert b.blocked(now + 4.9) and not b.blocked(now + 5.0) and b.remaining(now + 1.0) == pytest.approx(4.0)
    b.record_success()
    assert b.failures == 0 and not b.blocked(now) and b.record_failure(now) == pytest.approx(0.1)


@pytest.mark.parametrize(("value", "ok"), [
    ("r1", True), ("client-00042", True), ("A.b_c-9", True), ("x" * 64, True), ("x" * 65, False), ("", False),
    ("-lead", False), ("_lead", False), ("a/b", False), ("a+b", False), ("a#", False), ("é", False), ("a b", False),
])
def test_one_id_rule_for_topics_and_models(value: str, ok: bool) -> None:
    class Thing(BaseModel):
        id: Id

    assert is_id(value) is ok
    if ok:
        assert check_id(value) == value and Thing(id=value).id == value
    else:
        with pytest.raises(TopicError):
            check_id(value)
        with pytest.raises(ValidationError):
            Thing(id=value)
    class Declared(BaseModel):  # what the HTTP layer declares with the pattern
        id: str = Field(pattern=ID_PATTERN)

    if ok:
        assert Declared(id=value).id == value
    else:
        with pytest.raises(ValidationError):
            Declared(id=value)


def gated_commit(batches: list[list[int]], gate: asyncio.Event,
                 result: Callable[[int], object] = lambda i: i * 10) -> Callable[[list[int]], Awaitable[list[object]]]:
    """A commit that records its batches, holds the first "in flight" until ``gate`` is set, fails as a whole a
    batch holding 99, and gives ``result(item)`` for each item."""

    async def commit(items: list[int]) -> list[object]:
        batches.append(items)
        if len(batches) == 1:
            await gate.wait()
        if 99 in items:
            raise OSError("disk gone")
        return [result(i) for i in items]

    return commit


async def test_group_commit_batches_what_arrives_during_a_commit() -> None:
    batches: list[list[int]] = []
    gate = asyncio.Event()
    gc: GroupCommit[int, int] = GroupCommit(gated_commit(batches, gate), name="test-commit")
    first = asyncio.create_task(gc.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    rest = [asyncio.create_task(gc.submit(i)) for i in range(2, 7)]
    await asyncio.sleep(0)
    gate.set()
    assert await first == 10 and [await t for t in rest] == [20, 30, 40, 50, 60]
    assert batches == [[1], [2, 3, 4, 5, 6]] and gc.commits == 2 and gc.writes == 6


async def test_group_commit_bounds_the_batch_and_fails_only_what_failed() -> None:
    batches: list[list[int]] = []

    async def commit(items: list[int]) -> list[object]:
        batches.append(items)
        if 13 in items:
            raise OSError("disk gone")  # the whole commit fails: every item of it, no other
        return [Failed(ValueError(f"bad {i}")) if i % 5 == 0 else i for i in items]

    gc: GroupCommit[int, int] = GroupCommit(commit, name="test-commit", max_batch=4)
    results = await asyncio.gather(*(gc.submit(i) for i in range(1, 17)), return_exceptions=True)
    assert [len(b) for b in batches] == [4, 4, 4, 4]
    assert isinstance(results[4], ValueError) and str(results[4]) == "bad 5"  # its own failure only
    assert [r for r in results[12:16] if isinstance(r, OSError)] == [results[12]] * 4  # the failed commit's batch
    assert [r for k, r in enumerate(results) if not isinstance(r, BaseException)] == [
        i for i in range(1, 13) if i % 5]
    assert gc.commits == 3 and gc.writes == 12
    await gc.drain()


async def test_group_commit_takes_items_submitted_together_with_one_future() -> None:
    batches: list[list[int]] = []
    gate = asyncio.Event()
    commit = gated_commit(batches, gate, lambda i: Failed(ValueError(f"bad {i}")) if i % 5 == 0 else i * 10)
    gc: GroupCommit[int, int] = GroupCommit(commit, name="test-commit", max_batch=3)
    first = gc.submit_nowait(1)
    await asyncio.sleep(0)  # the first commit starts alone
    many = gc.submit_many([2, 3, 4, 5, 6])  # more than max_batch: one entry all the same, never split
    single = gc.submit_nowait(7)
    settled = gc.settled()
    gate.set()
    assert await first == 10
    results = await many
    assert results[:3] == [20, 30, 40] and results[4] == 60
    assert isinstance(results[3], Failed) and str(results[3].error) == "bad 5"  # its own failure stays in the list
    assert await single == 70
    await settled
    assert batches == [[1], [2, 3, 4, 5, 6], [7]] and gc.commits == 3 and gc.writes == 7
    failing = gc.submit_many([98, 99])
    with pytest.raises(OSError, match="disk gone"):  # the commit's failure raises for the whole entry
        await failing
    assert gc.commits == 3 and gc.writes == 7
    assert await gc.submit_many([8]) == [80] and await gc.submit_many([]) == []
    assert gc.commits == 4 and gc.writes == 8


async def test_a_paced_group_commit_waits_only_after_a_batch_it_calls_large() -> None:
    """``pace_s``/``pace_after``: after a batch of at least 3 items the next commit starts no sooner than 10 s after
    that one started, and what arrives meanwhile joins it; after a small batch the next starts at once. The clock and
    the sleep are injected: nothing waits for real."""
    now = [100.0]
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(round(s, 6))
        now[0] += s
        await asyncio.sleep(0)

    batches: list[list[int]] = []

    async def commit(items: list[int]) -> list[object]:
        batches.append(items)
        now[0] += 1.0  # each commit takes 1 s of the injected clock
        await asyncio.sleep(0)
        return list(items)

    gc: GroupCommit[int, int] = GroupCommit(commit, name="test-commit", pace_s=10.0,
                                            pace_after=lambda items: len(items) >= 3, clock=lambda: now[0], sleep=sleep)
    assert await asyncio.gather(*(gc.submit(i) for i in (1, 2, 3))) == [1, 2, 3]  # large: the next one waits
    now[0] += 2.0
    late = [asyncio.create_task(gc.submit(4))]
    await asyncio.sleep(0)
    late.append(asyncio.create_task(gc.submit(5)))  # arrives during the wait: joins that commit
    assert [await t for t in late] == [4, 5]
    assert waits == [7.0] and batches[1] == [4, 5] and gc.paced == 1  # 10 s after the start at 100, it was 103
    assert await gc.submit(6) == 6  # after a small batch: at once
    assert waits == [7.0] and gc.commits == 3
    unpaced: GroupCommit[int, int] = GroupCommit(commit, name="test-commit", pace_after=lambda items: True,
                                                 clock=lambda: now[0], sleep=sleep)
    for i in (7, 8):
        await unpaced.submit(i)
    assert waits == [7.0] and unpaced.paced == 0  # no pace_s: pace_after is not even kept
