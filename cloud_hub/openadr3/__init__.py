"""An OpenADR 3.1 VTN facade on the hub: programs, events, reports, VENs, resources, subscriptions, notifiers.

A VEN is a retailer or aggregator principal of the hub (its bearer tokens, its hub-broker identity); its resources
are its clients (supplier periods at the event's time). Events are the hub's flexibility requests, the tariff is
an event of a PRICE program. ``docs/openadr3.md`` has the mapping, what is unsupported, and how a VEN joins.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from cloud_hub.openadr3 import mapping
from cloud_hub.openadr3.mapping import BASE_PATH, BASE_PATH_30
from cloud_hub.openadr3.notifier import Notifier
from cloud_hub.openadr3.routes import router

__all__ = ["BASE_PATH", "BASE_PATH_30", "Notifier", "mount"]


def mount(app: FastAPI) -> None:
    """Serve the facade on ``app`` (the hub): its routes, and its notifier started inside the hub's lifespan once
    the store, the change feed, the relay and the webhooks are open (and stopped before them)."""
    for base in mapping.VERSIONS:  # the same routes at /openadr3/3.1.0 and /openadr3/3.0.1 (targets' shape differs)
        app.include_router(router, prefix=base)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(the_app: FastAPI) -> AsyncIterator[None]:
        async with inner(the_app):
            state = the_app.state
            notifier = Notifier(state.store, state.feed, state.relay, state.webhooks,
                                replica_id=state.settings.replica_id)
            state.openadr3, state.openadr3_started = notifier, time.time()
            await notifier.start()
            try:
                yield
            finally:
                await notifier.close()

    app.router.lifespan_context = lifespan
