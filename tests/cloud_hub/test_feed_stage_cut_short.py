"""A change-feed event staged but never written must not hold back the events after it (issue 14, fifth round).

``ChangeFeed.stage`` gives each event its id as it goes; ``settle`` publishes an event only once no lower id is
still pending. A stage cut short after giving out an id (its task cancelled while it reads a row it does not know,
or, since the hub lets its loop go inside large writes, between two chunks of one: e.g. an expansion stopped at
shutdown, a dispatcher cancelled with its relay) left that id pending for ever, and from then on no follower (an
SSE stream, a webhook, the OpenADR notifier) saw any event. On the real embedded store: the stage is cut at either
point, then another request's write is staged, stored and settled, and a follower must receive it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cloud_hub import codec
from cloud_hub.authz import Principal
from cloud_hub.feed import ChangeFeed, FeedItem
from cloud_hub.storage import Mutation
from cloud_hub.storage.sqlite import SqliteKV
from cloud_hub.yielding import CHUNK

META = {"type": "emergency", "issuer": "dso", "state": "accepted"}


def entries(*client_ids: str) -> dict[str, Any]:
    return {f"c:{cid}": {"state": "pending", "retailers": {"r1": "pending"}, "detail": {}} for cid in client_ids}


@pytest.fixture
async def kv(tmp_path: Path) -> AsyncIterator[SqliteKV]:
    store = SqliteKV(tmp_path / "hub.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.mark.parametrize("cut", ["reading a row it does not know", "between two chunks of a large write"])
async def test_an_event_staged_and_cut_short_does_not_hold_back_later_ones(kv: SqliteKV, cut: str) -> None:
    # A request stored before this feed started: staging a write of it reads its row (an await on storage).
    await kv.batch([Mutation("requests", "q-old", {"r:type": codec.dumps("emergency"), "r:issuer": codec.dumps("dso"),
                                                   "r:state": codec.dumps("accepted")})])
    feed = ChangeFeed(kv)
    await feed.open()
    follower = feed.follow(Principal("dso"), keepalive_s=1.0, announce=True)
    assert (await anext(follower)).kind == "open"  # registered: every later event reaches it
    try:
        second: tuple[str, dict[str, Any], dict[str, Any] | None] = (
            ("q-old", entries("b"), None) if cut == "reading a row it does not know"
            else ("q-big", entries(*(f"b{i}" for i in range(3 * CHUNK))), META))
        # The first write gets its event id at once; the stage then waits in the second write.
        staging = asyncio.create_task(feed.stage([("q-first", entries("a"), META), second]))
        await asyncio.sleep(0)
        assert not staging.done(), "the stage did not wait where this test cuts it"
        staging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await staging

        staged = await feed.stage([("q-next", entries("c"), META)])
        await kv.batch(staged.mutations)
        feed.settle(staged, durable=True)
        item: FeedItem = await anext(follower)
        assert (item.kind, item.data.get("request_id")) == ("request", "q-next")
        assert feed.watermark == item.event_id
    finally:
        await follower.aclose()
