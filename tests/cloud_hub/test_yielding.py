"""The pieces that let the hub's event loop go inside a large request (``cloud_hub/yielding.py``, and the first
sends' storage rounds of ``cloud_hub/book.py``): the same results as one loop, in chunks."""

from __future__ import annotations

import asyncio

import pytest

from cloud_hub.book import SENT_CHUNK_CLIENTS, OutboxItem, _sent_chunks, _SentMark
from cloud_hub.yielding import chunked_map


async def test_chunked_map_gives_the_loops_result_and_lets_other_tasks_run_between_chunks() -> None:
    ticks = 0
    seen: list[int] = []

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    def step(x: int) -> int:
        seen.append(ticks)
        return x * 2

    task = asyncio.create_task(other())
    await asyncio.sleep(0)
    try:
        out = await chunked_map(step, range(10), chunk=3)
    finally:
        task.cancel()
    assert out == [x * 2 for x in range(10)]
    # Within a chunk the other task does not run; between chunks it does.
    assert seen[0] == seen[1] == seen[2] < seen[3] == seen[4] == seen[5] < seen[6] == seen[7] == seen[8] < seen[9]


def item(msg_id: str, request_id: str, n: int) -> OutboxItem:
    return OutboxItem(msg_id, request_id, "r1", "request", b"{}", [f"{msg_id}-{i}" for i in range(n)])


@pytest.mark.parametrize(("sizes", "expected"), [
    ([], []),
    ([10], [["m0"]]),
    ([3_000, 3_000], [["m0", "m1"]]),
    ([3_000, 3_000, 3_000], [["m0", "m1"], ["m2"]]),
    ([SENT_CHUNK_CLIENTS + 1, 5], [["m0"], ["m1"]]),  # a message is never split, even one over the bound
    ([0, 0], [["m0", "m1"]]),
])
def test_sent_chunks_keep_messages_whole_and_in_order(sizes: list[int], expected: list[list[str]]) -> None:
    marks = [_SentMark(i, 0.0, i.clients) for i in (item(f"m{k}", "q1", n) for k, n in enumerate(sizes))]
    first: dict[str, list[_SentMark]] = {}
    for m in marks:
        first.setdefault(m.item.request_id, []).append(m)
    chunks = _sent_chunks(first)
    got = [sorted(m.item.msg_id for marks_ in c.values() for m in marks_) for c in chunks]
    assert got == expected
    flat = [m for c in chunks for rid in sorted(c) for m in c[rid]]
    assert sorted(m.item.msg_id for m in flat) == sorted(m.item.msg_id for m in marks)
    for c in chunks:
        for rid, its in c.items():
            assert all(m.item.request_id == rid for m in its)
            assert its == [m for m in first[rid] if m in its]  # each request's marks in their order


def _stops_at_three(x: int) -> int:
    if x == 3:
        raise StopIteration  # e.g. a bare next() on an exhausted iterator inside fn
    return x


async def test_a_stop_iteration_out_of_fn_is_an_error_not_a_short_list() -> None:
    """s14-hub's ``list.extend(map(...))`` took it for the end of the items and returned [0, 1, 2] (found in review)."""
    with pytest.raises(RuntimeError):
        await chunked_map(_stops_at_three, range(10), chunk=4)


async def test_a_chunk_of_zero_is_refused_not_an_endless_loop() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        await asyncio.wait_for(chunked_map(str, range(5), chunk=0), 1.0)
