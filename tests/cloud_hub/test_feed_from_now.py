"""A change feed followed "from now" (no ``Last-Event-ID``) has a defined now: the stream's first line, which the hub
writes once it follows the caller. A reader that posts a request right after that line gets the request's first
event (``accepted``), over a real uvicorn hub; on the feed itself, the ``open`` item comes once the follower is
registered, so a change stored at once after it reaches the follower."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud_hub.authz import Principal
from cloud_hub.feed import ChangeFeed
from cloud_hub.storage.sqlite import SqliteKV
from tests.cloud_hub.test_change_feed import post_emergency
from tests.hub_fixtures import HubHandle

META = {"type": "emergency", "issuer": "dso", "state": "accepted"}


async def test_a_request_posted_after_the_streams_first_line_is_followed_from_accepted(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    async with httpx.AsyncClient(base_url=hub.url, timeout=10) as http, \
            http.stream("GET", "/v1/events", headers=hub.auth("dso")) as r:
        assert r.status_code == 200
        lines = r.aiter_lines()
        assert await asyncio.wait_for(anext(lines), 10) == "retry: 1000"  # the hub follows the DSO from here
        request_id = await post_emergency(hub.http, hub.auth("dso"), ["c1"])
        event, data = await asyncio.wait_for(first_event(lines), 10)
        assert event == "request" and data["request_id"] == request_id
        assert data["state"] == "accepted" and set(data["clients"]) == {"c1"}


async def first_event(lines: AsyncIterator[str]) -> tuple[str, dict[str, Any]]:
    """The event name and data of the first event frame (keep-alive comments skipped)."""
    event = "message"
    async for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            return event, json.loads(line[6:])
    raise AssertionError("the stream ended before an event")


@pytest.fixture
async def feed(tmp_path: Path) -> AsyncIterator[ChangeFeed]:
    kv = SqliteKV(tmp_path / "feed.db")
    await kv.open()
    try:
        yield ChangeFeed(kv)
    finally:
        await kv.close()


async def test_the_open_item_comes_once_the_follower_is_registered(feed: ChangeFeed) -> None:
    stream = feed.follow(Principal("dso"), announce=True)
    opened = await anext(stream)
    assert opened.kind == "open" and opened.event_id == feed.watermark
    staged = await feed.stage([("q1", {"c:c1": {"state": "pending", "retailers": {"r1": "pending"}}}, META)])
    await feed.kv.batch(staged.mutations)
    feed.settle(staged, durable=True)
    item = await asyncio.wait_for(anext(stream), 5)
    seen: dict[str, Any] = item.data
    assert item.kind == "request" and seen["request_id"] == "q1" and seen["state"] == "accepted"
    await stream.aclose()  # type: ignore[attr-defined]
    # Without announce, the first item is the first event: the other followers (webhooks, OpenADR) are unchanged.
    plain = feed.follow(Principal("dso"), since=staged.events[0]["event_id"] - 1)
    first = await asyncio.wait_for(anext(plain), 5)
    assert first.kind == "request" and first.data["request_id"] == "q1"
    await plain.aclose()  # type: ignore[attr-defined]
