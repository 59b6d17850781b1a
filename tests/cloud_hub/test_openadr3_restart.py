"""The OpenADR 3 facade across a hub restart (the same SQLite file and broker): a VEN's subscription, its events
and the notifier's resume point are durable; an event notified before the restart is not notified again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import uvicorn

from cloud_hub.openadr3 import BASE_PATH
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.openadr3_parts import Receiver, emergency, join, receiver, wait_for
from tests.hub_fixtures import HubHandle, start_hub

__all__ = ["receiver"]


async def test_subscriptions_events_and_the_cursor_survive_a_restart(tmp_path: Path,
                                                                     mosquitto_factory: MosquittoFactory,
                                                                     receiver: Receiver) -> None:
    broker = mosquitto_factory("hub", ["r1", "r2"], "hub")
    settings = {"webhook_allow_private": True, "webhook_retry_initial_s": 0.05, "webhook_retry_max_s": 0.2}

    async def up() -> tuple[HubHandle, asyncio.Task[None], uvicorn.Server]:
        server, task, tokens, url = await start_hub(tmp_path, broker, **settings)
        http = httpx.AsyncClient(base_url=url, timeout=10)
        await wait_for(lambda: _ready(http))
        return HubHandle(url, tokens, broker, http, server.config.app), task, server

    hub, task, server = await up()
    try:
        await hub.setup_registry({"c1": "r1", "c2": "r2"})
        await join(hub, "r1")
        h1 = hub.auth("r1")
        r = await hub.http.post(f"{BASE_PATH}/subscriptions", headers=h1, json={
            "clientName": "ven-r1", "objectOperations": [{"objects": ["EVENT"], "operations": ["CREATE", "DELETE"],
                                                          "callbackUrl": receiver.url}]})
        assert r.status_code == 201, r.text
        first, _ = await emergency(hub.http, hub.auth("dso"), ["c1", "c2"])
        assert [n["object"]["id"] for n in await receiver.events(1)] == [first]
    finally:
        server.should_exit = True
        await task
        await hub.http.aclose()

    hub, task, server = await up()
    try:
        h1 = hub.auth("r1")  # the restarted hub's token book has this token too (same file)
        second, _ = await emergency(hub.http, hub.auth("dso"), ["c1"])
        notes = await receiver.events(2)
        assert [n["object"]["id"] for n in notes] == [first, second]
        await asyncio.sleep(0.3)  # a re-notification of the first event would have arrived by now
        assert len(receiver.delivered) == 2, "the first event was not notified again"
        listed = {e["id"] for e in (await hub.http.get(f"{BASE_PATH}/events", headers=h1)).json()}
        assert {first, second} <= listed
        subs = (await hub.http.get(f"{BASE_PATH}/subscriptions", headers=h1)).json()
        assert len(subs) == 1
    finally:
        server.should_exit = True
        await task
        await hub.http.aclose()


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200
