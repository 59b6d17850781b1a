"""Large synchronous loops cut into chunks, the event loop let go between them (issue 14, fourth round).

A request that names 100,000 clients makes loops of 100,000 steps (encoding entries and audit lines, describing
the change-feed event, marking the first sends): run in one go, each held the hub's event loop for seconds, and on
a loaded machine for tens of seconds, so that no HTTP request was answered and the hub broker dropped the hub on
keep-alive. Each chunk here is a few milliseconds of work; ``await asyncio.sleep(0)`` between chunks lets every
other ready callback run. Nothing is written between the chunks: what the loops build is still written in one
batch, so durability and ordering are those of the write.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

CHUNK = 2_000
"""Steps per chunk: ~2-10 ms of encoding or describing on this machine."""


async def chunked_map(fn: Callable[[T], R], items: Iterable[T], chunk: int = CHUNK) -> list[R]:
    """``[fn(x) for x in items]``, the event loop let go after every ``chunk`` items (``chunk`` >= 1). A
    ``StopIteration`` out of ``fn`` is an error (as in any coroutine), never the end of ``items``: a comprehension,
    not ``list.extend(map(...))``, which would take it for the end and return a short list."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, not {chunk}")
    out: list[R] = []
    it = iter(items)
    while True:
        part = [fn(x) for x in itertools.islice(it, chunk)]
        out += part
        if len(part) < chunk:
            return out
        await asyncio.sleep(0)


async def chunked_apply(fn: Callable[[list[T]], list[R]], items: Sequence[T], chunk: int = CHUNK) -> list[R]:
    """``fn(items)`` for a ``fn`` that maps a list to a list item by item (``audit_mutations``), run on ``chunk``
    items at a time with the event loop let go between them."""
    out: list[R] = []
    for start in range(0, len(items), chunk):
        if start:
            await asyncio.sleep(0)
        out.extend(fn(list(items[start:start + chunk])))
    return out
