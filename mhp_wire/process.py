"""Running a service's main coroutine as a process: SIGTERM and SIGINT cancel it, so it shuts down cleanly
(presence ``offline``, databases closed) as systemd and the stack supervisor expect."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any


def run_service(main: Coroutine[Any, Any, None]) -> int:
    """Run ``main`` until it ends or the process is asked to stop; returns the exit code."""

    async def runner() -> None:
        task = asyncio.ensure_future(main)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(runner())
    return 0


async def wait_or_timeout(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``event`` is set or ``timeout_s`` passed, whichever comes first.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that arrives just as the inner wait
    completes, and a loop built on it then never stops (a gateway hung on SIGTERM that way).
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
