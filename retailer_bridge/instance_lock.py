"""One active bridge process among several of one retailer: an exclusive lock on a file next to its store.

Several ``retailer-bridge run`` processes of one retailer, on one host, are given the same ``db_path`` and the same
``instance_lock_path``. The one that holds the lock (``flock(LOCK_EX)``) is the bridge: it opens the store, both
MQTT links and the personal area. The others wait as standbys, trying the lock every ``poll_s``. The kernel drops
the lock when its holder's process ends, however it ends (``kill -9`` included), so a standby takes over within
one poll, opens the same store and re-sends what its outboxes hold unacknowledged: nothing is lost, and what was
sent twice is dropped by its receiver (``docs/decisions.md``, "A retailer's bridge scales out").

The holder writes its pid into the file (for operators and the scale-out test: which process is active); the
file's content is informative only, the lock is the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger(__name__)

POLL_S = 0.2
"""How often a standby tries the lock: the longest a takeover waits after the active process has died."""


class InstanceLock:
    """An exclusive, process-lifetime lock on ``path`` (created if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True when held (now or already)."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        """Give the lock up (closing the descriptor releases it)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def holder_pid(path: Path) -> int | None:
    """The pid the lock's current holder wrote into ``path`` (None when none is written)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


@contextlib.asynccontextmanager
async def active_instance(path: Path, poll_s: float = POLL_S) -> AsyncIterator[InstanceLock]:
    """Wait (as a standby) until this process holds the lock on ``path``; hold it for the block."""
    lock = InstanceLock(path)
    if not lock.try_acquire():
        log.info("another bridge process holds %s: waiting as its standby", path)
        while True:  # a kernel lock has no wake-up to await: it is tried again every poll_s
            await asyncio.sleep(poll_s)
            if lock.try_acquire():
                break
        log.warning("took over as the active bridge (the lock %s was released)", path)
    try:
        yield lock
    finally:
        lock.release()
