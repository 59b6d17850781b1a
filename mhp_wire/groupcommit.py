"""The one group commit of the platform: writes that arrive while a commit is in flight are committed together.

No artificial wait: the first item starts a commit at once (at the next turn of the event loop, by which time every
message read in the same turn has queued its item), and everything that arrives meanwhile forms the next one, of at
most ``max_batch`` items (0: no bound). :meth:`GroupCommit.submit` returns the item's own result once its commit
has ended. ``commit(items)`` returns one result per item, in order; a result that is a :class:`Failed` is raised to
that item's caller alone (its write was rolled back, the others stand); ``commit`` raising fails every item of the
batch with that error, and the items queued behind it still get their own commit. The hub (outcomes and acks, in
its book), the bridge (every SQLite write) and any future writer keep their own storage and use this for the
batching.
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


class GroupCommit(Generic[T, R]):
    """Items committed together by one call of ``commit``; see the module's docstring."""

    def __init__(self, commit: Callable[[list[T]], Awaitable[list[Any]]], *, name: str, max_batch: int = 0,
                 weight: Callable[[T], int] | None = None) -> None:
        self._commit = commit
        self.max_batch = max_batch
        self.weight = weight
        """How much of ``max_batch`` an item takes (None: 1 each); a batch always takes at least one item."""
        self.name = name
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None
        self.commits = 0
        """Commits that went through (for SQLite: the number of fsyncs)."""
        self.writes = 0
        """Items committed; ``writes / commits`` is the mean batch."""
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
        """How many queued items the next batch takes: ``max_batch`` of them, or as many as fit its weight."""
        if self.weight is None:
            return self.max_batch
        total = 0
        for n, (item, _) in enumerate(self._queue):
            total += self.weight(item)
            if total > self.max_batch:
                return max(1, n)
        return len(self._queue)

    async def _run(self) -> None:
        while self._queue:
            if self.max_batch > 0:
                n = self._batch_len()
                batch, self._queue = self._queue[:n], self._queue[n:]
            else:
                batch, self._queue = self._queue, []
            try:
                results = await self._commit([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: the commit gave {len(results)} results for {len(batch)} items")
            except Exception as exc:  # nothing of this batch is committed; the ones queued behind it still go
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            finally:  # committed, failed or cancelled: a barrier no longer waits for this batch
                self._ended(len(batch))
            self.commits += 1
            self.writes += len(batch)
            for (_, fut), result in zip(batch, results, strict=True):
                if fut.done():  # the caller was cancelled; its write is committed all the same
                    continue
                if isinstance(result, Failed):
                    fut.set_exception(result.error)
                else:
                    fut.set_result(result)
