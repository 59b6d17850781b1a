"""A change-feed follower stops when it is cancelled, even as an event reaches it (issue 14, fifth round).

The fourth round's suite run hung 120 s in a hub's teardown (``test_revise_api.py::test_an_ended_request_is_409``):
the tasks left pending were the hub's whole lifespan, its relay, and the OpenADR 3 notifier waiting in
``ChangeFeed.follow`` on ``Queue.get``. The notifier follows the feed with a keep-alive of an hour through
``asyncio.wait_for``, which on Python 3.11 returns the event instead of raising when the cancellation arrives in
the loop turn after the event reached the follower's queue: the follower goes on, the shutdown (``notifier.close``)
waits for it, and the hub never stops. Here, on the real embedded store, a follower is cancelled exactly in that
turn: it must end (having seen the event or not: a follower that resumes does so from its last id).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from cloud_hub.authz import Principal
from cloud_hub.feed import ChangeFeed, FeedItem
from cloud_hub.openadr3 import Notifier
from cloud_hub.storage.sqlite import SqliteKV
from tests.broker_fixtures import MosquittoFactory
from tests.hub_fixtures import start_hub
from tests.waiting import eventually

META = {"type": "emergency", "issuer": "dso", "state": "accepted"}


@pytest.fixture
async def feed(tmp_path: Path) -> AsyncIterator[ChangeFeed]:
    kv = SqliteKV(tmp_path / "hub.db")
    await kv.open()
    try:
        f = ChangeFeed(kv)
        await f.open()
        yield f
    finally:
        await kv.close()


async def test_a_follower_cancelled_as_an_event_arrives_stops(feed: ChangeFeed) -> None:
    got: list[FeedItem] = []

    async def follow() -> None:  # as the OpenADR 3 notifier follows the feed
        async for item in feed.follow(Principal("dso"), keepalive_s=3600, announce=True):
            got.append(item)

    follower = asyncio.create_task(follow(), name="test-follower")
    await eventually(lambda: got, "the follower is registered")
    staged = await feed.stage([("q1", {"c:a": {"state": "pending", "retailers": {"r1": "pending"},
                                               "detail": {}}}, META)])
    await feed.kv.batch(staged.mutations)
    feed.settle(staged, durable=True)  # the event is in the follower's queue, its getter woken
    await asyncio.sleep(0)  # one turn: the getter has taken it; the follower itself has not run yet
    follower.cancel()
    await eventually(follower.done, "the cancelled follower ended", timeout_s=5)
    assert follower.cancelled()
    assert [i.kind for i in got] in (["open"], ["open", "request"])


async def test_the_hub_stops_when_an_event_reaches_its_notifier_as_it_stops(
        tmp_path: Path, mosquitto_factory: MosquittoFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same turn through a real hub's shutdown: its notifier is stopped just as a change reaches it."""
    broker = mosquitto_factory("hub", ["r1", "r2"], "hub")
    server, serving, _, url = await start_hub(tmp_path, broker)
    original_close = Notifier.close

    async def close(self: Notifier) -> None:
        staged = await self.feed.stage([("q-late", {"c:a": {"state": "pending", "retailers": {"r1": "pending"},
                                                             "detail": {}}}, META)])
        await self.feed.kv.batch(staged.mutations)
        self.feed.settle(staged, durable=True)
        await asyncio.sleep(0)
        await original_close(self)

    monkeypatch.setattr(Notifier, "close", close)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            await eventually(lambda: _ready(http), "the hub is ready")
    finally:
        server.should_exit = True
        done, _ = await asyncio.wait({serving}, timeout=30)  # a guard: it stops in well under a second
    assert serving in done, "the hub's shutdown did not end"
    serving.result()


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200
