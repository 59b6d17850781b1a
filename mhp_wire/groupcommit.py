"""The one group commit of the platform: writes that arrive while a commit is in flight are committed together.

No artificial wait: the first item starts a commit at once (at the next turn of the event loop, by which time every
message read in the same turn has queued its item), and everything that arrives meanwhile forms the next one, of at
most ``max_batch`` items (0: no bound). :meth:`GroupCommit.submit` returns the item's own result once its commit
has ended; :meth:`GroupCommit.submit_many` queues several items with one future for all their results (a caller that
handles a turn's messages together pays one future per turn, not per message). ``commit(items)`` returns one result
per item, in order; a result that is a :class:`Failed` is raised to that item's caller alone (its write was rolled
back, the others stand); ``commit`` raising fails every item of the batch with that error, and the items queued
behind it still get their own commit. The hub (outcomes and acks, in its book), the bridge (every SQLite write) and
any future writer keep their own storage and use this for the batching.

One exception, asked for by name: ``pace_s`` with ``pace_after(items)`` spaces commits out after a batch that
``pace_after`` calls large: the next commit starts no sooner than ``pace_s`` after that one started, and what arrives
meanwhile joins it. The hub paces its outcome commits so after one that carries a fan-out's worth of one request's
outcomes (fewer, larger commits: each pays a fixed part, the request's meta, its change-feed event, the reads and
the sync), never after the batches of ordinary traffic, whose latency it would add to (docs/decisions.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class Failed:
    """One item's own failure inside a commit that otherwise went through."""

    error: BaseException


class _Many(Generic[T]):
    """Items queued together by :meth:`GroupCommit.submit_many`: one entry of the queue, never split across commits."""

    __slots__ = ("items",)

    def __init__(self, items: list[T]) -> None:
        self.items = items


class GroupCommit(Generic[T, R]):
    """Items committed together by one call of ``commit``; see the module's docstring."""

    def __init__(self, commit: Callable[[list[T]], Awaitable[list[Any]]], *, name: str,
                 max_batch: int = 0, weight: Callable[[T], int] | None = None, pace_s: float = 0.0,
                 pace_after: Callable[[list[T]], bool] | None = None, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self._commit = commit
        self.pace_s = pace_s
        self.pace_after = pace_after if pace_s > 0 else None
        """Given a committed batch's items: whether the next commit waits until ``pace_s`` after this one started
        (see the module's doc; None: never)."""
        self._clock = clock
        """The pacing's clock (None: the event loop's); ``sleep`` waits on it: tests drive both."""
        self._sleep = sleep
        self._not_before: float | None = None
        """When the next commit may start, after a paced one (None: at once)."""
        self.paced = 0
        """Commits that waited for ``pace_s``."""
        self.max_batch = max_batch
        self.weight = weight
        """How much of ``max_batch`` an item takes (None: 1 each); a batch always takes at least one item."""
        self.name = name
        self._queue: list[tuple[T | _Many[T], asyncio.Future[Any]]] = []
        """Each entry: an item and its future, or a :class:`_Many` and the future of its list of results."""
        self._many = 0
        """:class:`_Many` entries in the queue (none: a batch is its items as they are, as before there were any)."""
        self._task: asyncio.Task[None] | None = None
        self.commits = 0
        """Commits that went through (for SQLite: the number of fsyncs)."""
        self.writes = 0
        """Items committed (each of :meth:`submit_many`'s counted); ``writes / commits`` is the mean batch."""
        self._queued = 0
        """Items ever queued."""
        self._settled = 0
        """Items whose commit has ended (committed or failed): batches end in the order they were queued."""
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next commit; returns its result once that commit has ended."""
        return await self.submit_nowait(item)

    def submit_nowait(self, item: T) -> asyncio.Future[R]:
        """Queue ``item`` for the next commit now; the future resolves with its result once that commit has ended
        (for callers that queue many items in one turn of the loop and await them after, without a task each)."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, done))
        self._queued += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=self.name)
        return done

    def submit_many(self, items: list[T]) -> asyncio.Future[list[R | Failed]]:
        """Queue ``items`` for the next commit now, together (never split across commits, even past ``max_batch``);
        the future resolves once that commit has ended with their results in order, an item's own failure left in
        the list as its :class:`Failed` (the commit's failure raises from the future, for all of them)."""
        done: asyncio.Future[list[R | Failed]] = asyncio.get_running_loop().create_future()
        if not items:
            done.set_result([])
            return done
        self._queue.append((_Many(items), done))
        self._many += 1
        self._queued += len(items)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=self.name)
        return done

    def settled(self) -> asyncio.Future[None]:
        """A future done once every item queued so far has had its commit end (committed or failed), whatever is
        queued after: a barrier for a reader that must know the writes before it are in (unlike :meth:`drain`,
        which under a steady stream of items would wait for ever)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._settled >= self._queued:
            done.set_result(None)
        else:
            self._waiters.append((self._queued, done))
        return done

    def _ended(self, n: int) -> None:
        """``n`` more items' commit ended: wake the barriers they held."""
        self._settled += n
        if not self._waiters:
            return
        still = []
        for target, fut in self._waiters:
            if target <= self._settled:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((target, fut))
        self._waiters = still

    async def drain(self) -> None:
        """Wait until everything queued is committed (or failed)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    def _batch_len(self) -> int:
        """How many queued entries the next batch takes: as many as fit ``max_batch`` (items, or their weight), at
        least one."""
        if self.weight is None and not self._many:
            return self.max_batch  # each entry is one item: no walk over the queue
        total = 0
        for n, (item, _) in enumerate(self._queue):
            total += self._weight(item)
            if total > self.max_batch:
                return max(1, n)
        return len(self._queue)

    def _weight(self, entry: T | _Many[T]) -> int:
        weight = self.weight
        if type(entry) is _Many:
            return len(entry.items) if weight is None else sum(weight(i) for i in entry.items)
        return 1 if weight is None else weight(entry)  # type: ignore[arg-type]  # not a _Many: a T

    def _next_batch(self) -> tuple[list[tuple[T | _Many[T], asyncio.Future[Any]]], list[T], bool]:
        """The queue's entries the next commit takes, their items in order, and whether any entry is a
        :class:`_Many`."""
        if self.max_batch > 0:
            n = self._batch_len()
            batch, self._queue = self._queue[:n], self._queue[n:]
        else:
            batch, self._queue = self._queue, []
        if not self._many:
            return batch, [entry for entry, _ in batch], False  # type: ignore[misc]  # no _Many queued: each a T
        items: list[T] = []
        for entry, _ in batch:
            if type(entry) is _Many:
                items += entry.items
                self._many -= 1
            else:
                items.append(entry)  # type: ignore[arg-type]  # not a _Many: a T
        return batch, items, True

    async def _run(self) -> None:
        clock = self._clock or asyncio.get_running_loop().time
        while self._queue:
            if self._not_before is not None:
                wait, self._not_before = self._not_before - clock(), None
                if wait > 0:
                    self.paced += 1
                    await self._sleep(wait)  # what arrives meanwhile joins this commit
            started = clock()
            batch, items, many = self._next_batch()
            try:
                results = await self._commit(items)
                if len(results) != len(items):
                    raise RuntimeError(f"{self.name}: the commit gave {len(results)} results for {len(items)} items")
            except Exception as exc:  # nothing of this batch is committed; the ones queued behind it still go
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            finally:  # committed, failed or cancelled: a barrier no longer waits for this batch
                self._ended(len(items))
            self.commits += 1
            self.writes += len(items)
            _resolve(batch, results, many)
            if self.pace_after is not None and self.pace_after(items):
                self._not_before = started + self.pace_s


def _resolve(batch: list[tuple[Any, asyncio.Future[Any]]], results: list[Any], many: bool) -> None:
    """Each entry's future with its result (a :class:`Failed` raised from it), or a :class:`_Many`'s with its
    list of results (``many``: the batch holds some); a future already done (its caller was cancelled) is left: its
    write is committed all the same."""
    k = 0
    for entry, fut in batch:
        if many and type(entry) is _Many:
            n = len(entry.items)
            if not fut.done():
                fut.set_result(results[k:k + n])
            k += n
            continue
        result = results[k]
        k += 1
        if fut.done():
            continue
        if isinstance(result, Failed):
            fut.set_exception(result.error)
        else:
            fut.set_result(result)
