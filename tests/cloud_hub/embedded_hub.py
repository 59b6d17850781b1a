"""The hub's use cases on an embedded store, in this process, without HTTP or MQTT, for the tests that drive them
directly (the in-process benchmarks in ``sim/`` build the same on their own, so that they also run against older
checkouts named by ``PYTHONPATH``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from cloud_hub.book import RequestBook
from cloud_hub.feed import ChangeFeed
from cloud_hub.metrics import HubMetrics
from cloud_hub.service import HubService
from cloud_hub.store import HubStore


@dataclass(frozen=True)
class EmbeddedHub:
    store: HubStore
    book: RequestBook
    service: HubService
    metrics: HubMetrics


@contextlib.asynccontextmanager
async def embedded_hub(db_path: Path, *, feed: bool = False, keep_entries: bool = False
                       ) -> AsyncIterator[EmbeddedHub]:
    """A hub store on ``db_path`` (SQLite), its request book and use cases (``feed``: with the change feed, as
    ``cloud-hub serve`` runs it; ``keep_entries``: the store holds expanded rows' client entries, as a hub without
    replicas does). The book's expansions are stopped and the store closed at the end."""
    store = HubStore.embedded(db_path, keep_entries=keep_entries)
    await store.open()
    book: RequestBook | None = None
    try:
        metrics = HubMetrics()
        if feed:
            store.feed = ChangeFeed(store.kv, metrics)
            await store.feed.open()
        book = RequestBook(store, metrics)
        yield EmbeddedHub(store, book, HubService.build(store, book, metrics), metrics)
    finally:
        if book is not None:
            await book.close()
        await store.close()
