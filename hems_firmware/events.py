"""A small in-process event feed of the gateway, for the field testers' live page and ``hems-gateway watch``.

Subscribers get their own bounded queue; a subscriber that does not keep up loses its oldest events (and is told
how many), never slowing the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

MAX_QUEUED = 1000


class EventFeed:
    """Publish dict events; subscribe with ``async for event in feed.subscribe()``."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()
        self.published = 0

    def publish(self, event: dict[str, Any]) -> None:
        """Hand ``event`` to every subscriber (dropping a slow subscriber's oldest event)."""
        self.published += 1
        for q in self._queues:
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
                q.put_nowait({"type": "dropped", "count": 1})
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(event)

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        """Events published from now on, until the caller stops iterating."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_QUEUED)
        self._queues.add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._queues.discard(q)

    @property
    def subscribers(self) -> int:
        """How many subscribers are listening."""
        return len(self._queues)
