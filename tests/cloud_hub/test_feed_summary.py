"""A follower of the change feed that reads only a request's own fields (the OpenADR 3 notifier) gets each event
without its clients and retailers (issue 14, fourteenth round): an event of a fan-out's outcome commit names
hundreds of clients, and the notifier's copy of them was built per event only to be dropped.

The feed on a real SQLite store in ``tmp_path`` (events made by the store's own request writes), and a real hub
(uvicorn, SQLite, its Mosquitto) for the notifier's follower.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cloud_hub.authz import Principal
from cloud_hub.feed import ChangeFeed, FeedItem
from cloud_hub.metrics import HubMetrics
from cloud_hub.store import HubStore
from tests.broker_fixtures import MosquittoFactory
from tests.hub_fixtures import running_hub
from tests.waiting import eventually

FIELDS = ("event_id", "request_id", "type", "state", "at")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[HubStore]:
    s = HubStore.embedded(tmp_path / "hub.db")
    await s.open()
    feed = ChangeFeed(s.kv, HubMetrics())
    await feed.open()
    s.feed = feed
    try:
        yield s
    finally:
        await s.close()


async def requests_written(store: HubStore) -> None:
    """A request created for two clients of two retailers, then one client's outcome (two events)."""
    meta = {"type": "emergency", "issuer": "dso", "state": "accepted", "created_at": 1.0, "deadline": 2.0,
            "counts": {"pending": 2}}
    clients = {"a": {"state": "pending", "retailers": {"r1": "pending"}, "detail": {}},
               "b": {"state": "pending", "retailers": {"r2": "pending"}, "detail": {}}}
    await store.create_request("q1", meta, clients, {}, {}, [], None)
    await store.update_requests([("q1", {"c:a": {"state": "executed", "retailers": {"r1": "executed"},
                                                 "detail": {"shed": ["heater"]}}}, None, False)])


async def taken(items: AsyncIterator[FeedItem], n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async for item in items:
        if item.kind == "request":
            out.append(item.data)
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("who", ["dso", "retailer:r2"])
async def test_a_summary_follower_sees_the_same_events_without_their_clients_live_and_replayed(
        store: HubStore, who: str) -> None:
    feed = store.feed
    assert feed is not None
    principal = Principal.parse(who)
    async with contextlib.aclosing(feed.follow(principal, announce=True)) as whole, \
            contextlib.aclosing(feed.follow(principal, announce=True, summary=True)) as summary:
        assert (await anext(whole)).kind == "open" and (await anext(summary)).kind == "open"
        await requests_written(store)
        n = 2 if who == "dso" else 1  # r2 sees the creation (its client b), not a's outcome
        full, light = await taken(whole, n), await taken(summary, n)
    assert [{k: e[k] for k in FIELDS} for e in full] == light
    assert all(e["clients"] for e in full)
    # resumed from before the first event: the stored events, the same way
    async with contextlib.aclosing(feed.follow(principal, since=full[0]["event_id"] - 1, summary=True)) as replay:
        assert await taken(replay, n) == light


async def test_the_openadr3_notifier_follows_the_feed_in_summary(
        request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    async for hub in running_hub(request, tmp_path, mosquitto_factory, "sqlite"):
        feed: ChangeFeed = hub.app.state.feed
        await eventually(functools.partial(dso_followers, feed), "the notifier follows the feed")
        assert [f.summary for f in feed._followers if f.who == Principal("dso")] == [True]


async def dso_followers(feed: ChangeFeed) -> bool:
    await asyncio.sleep(0)
    return any(f.who == Principal("dso") for f in feed._followers)


def _event(clients: dict[str, list[str]], retailers: dict[str, str], state_changed: bool,
           audience: list[str]) -> dict[str, Any]:
    return {"event_id": 7, "request_id": "rq1", "type": "outcome", "state": "dispatching", "at": 1.0,
            "issuer": "dso", "state_changed": state_changed, "audience": audience, "revision": None,
            "retailers": retailers,
            "clients": {c: {"state": "executed", "detail": {}, "retailers": rs} for c, rs in clients.items()}}


@pytest.mark.parametrize(("event", "seen"), [
    (_event({"c1": ["r1"], "c2": ["r2"]}, {}, False, []), True),           # one of its clients
    (_event({"c2": ["r2"]}, {"r1": "delivered"}, False, []), True),        # its own delivery
    (_event({"c2": ["r2"]}, {}, True, ["r1", "r2"]), True),                # a state change it is told of
    (_event({"c2": ["r2"]}, {"r2": "delivered"}, True, ["r2"]), False),    # none of these
    (_event({"c2": ["r2"]}, {}, False, ["r1"]), False),                    # in the audience, no state change
])
def test_a_retailer_sees_an_event_in_summary_exactly_when_it_sees_it_whole(event: dict[str, Any], seen: bool) -> None:
    from cloud_hub.feed import view

    who = Principal.parse("retailer:r1")
    whole, summary = view(event, who), view(event, who, summary=True)
    assert (whole is not None, summary is not None) == (seen, seen)
    if whole is not None and summary is not None:
        assert summary == {k: v for k, v in whole.items() if k not in ("clients", "retailers")}
        assert all(c == "c1" for c in whole["clients"]) and set(whole["retailers"]) <= {"r1"}
