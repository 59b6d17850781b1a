"""A Server-Sent Events reader for tests: an httpx stream, parsed frame by frame as a browser's EventSource does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Frame:
    """One dispatched SSE frame (``event`` None: a comment-only frame, e.g. a keep-alive)."""

    id: str | None
    event: str | None
    data: Any
    comments: list[str]


class SseStream:
    """Frames of one open stream."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def close(self) -> None:
        """Close the line reader."""
        await self._lines.aclose()  # type: ignore[attr-defined]

    async def frame(self, timeout: float = 10.0) -> Frame:
        """The next frame, comments included."""
        return await asyncio.wait_for(self._frame(), timeout)

    async def _frame(self) -> Frame:
        fid: str | None = None
        event: str | None = None
        data: list[str] = []
        comments: list[str] = []
        seen = False
        async for line in self._lines:
            if line == "":
                if seen:
                    return Frame(fid, event, json.loads("\n".join(data)) if data else None, comments)
                continue
            seen = True
            if line.startswith(":"):
                comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                fid = value
            elif name == "event":
                event = value
            elif name == "data":
                data.append(value)
        raise EOFError("the stream ended")

    async def event(self, timeout: float = 10.0) -> Frame:
        """The next frame that carries an event (comments and ``retry`` frames skipped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            f = await self.frame(max(0.01, deadline - loop.time()))
            if f.event is not None:
                return f

    async def until(self, done: Any, timeout: float = 15.0) -> list[Frame]:
        """Events up to and including the first for which ``done(frame)`` is true."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        got = []
        while True:
            f = await self.event(max(0.01, deadline - loop.time()))
            got.append(f)
            if done(f):
                return got

    async def quiet(self, within: float) -> list[Frame]:
        """Every event frame that arrives within ``within`` seconds (the stream stays open)."""
        got: list[Frame] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while (left := deadline - loop.time()) > 0:
            try:
                f = await self.frame(left)
            except TimeoutError:
                break
            if f.event is not None:
                got.append(f)
        return got


@asynccontextmanager
async def sse(http: httpx.AsyncClient, path: str, headers: dict[str, str], **params: Any
              ) -> AsyncIterator[SseStream]:
    """Open an SSE stream; fails unless it is answered 200 with ``text/event-stream``."""
    async with http.stream("GET", path, headers={**headers, "Accept": "text/event-stream"}, params=params,
                           timeout=httpx.Timeout(10.0, read=None)) as response:
        if response.status_code != 200:
            await response.aread()
            raise AssertionError(f"{path}: {response.status_code} {response.text}")
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = SseStream(response)
        try:
            yield stream
        finally:  # closed here, not left to the garbage collector (whose finalizer would leave a task behind)
            await stream.close()
