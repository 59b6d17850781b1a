"""The suite's one way to wait for something to happen: poll a condition until it holds, or fail saying what did
not happen. Tests wait on conditions, never on fixed sleeps (a sleep is too short on a loaded machine and too
long everywhere else)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_INTERVAL_S = 0.02


async def eventually(check: Callable[[], T | Awaitable[T]], what: str = "", *, timeout_s: float = DEFAULT_TIMEOUT_S,
                     interval_s: float = DEFAULT_INTERVAL_S) -> T:
    """Poll ``check()`` (a function or a coroutine function) until it returns something true, and return that;
    after ``timeout_s`` raise :class:`AssertionError` naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what or _name(check)} (last: {value!r})")
        await asyncio.sleep(interval_s)


async def throughout(check: Callable[[], object], what: str = "", *, within_s: float = 1.0,
                     interval_s: float = DEFAULT_INTERVAL_S) -> None:
    """Poll ``check()`` for ``within_s`` seconds and fail the moment it does not hold: how a test shows that
    something does NOT happen (a link cut, a message delivered again); ``within_s`` is the time it is given to."""
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if not value:
            raise AssertionError(f"stopped holding: {what or _name(check)} (last: {value!r})")
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(interval_s)


def eventually_blocking(check: Callable[[], T], what: str = "", *, timeout_s: float = DEFAULT_TIMEOUT_S,
                        interval_s: float = DEFAULT_INTERVAL_S) -> T:
    """:func:`eventually` for code without an event loop (paho's threaded clients, a process's output)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what or _name(check)} (last: {value!r})")
        time.sleep(interval_s)


def _name(check: Callable[..., Any]) -> str:
    code = getattr(check, "__code__", None)
    where = f" ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})" if code is not None else ""
    return f"{getattr(check, '__qualname__', repr(check))}{where}"
