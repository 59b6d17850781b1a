"""A hub that stops while an outcome commit is still running stores it before closing its store (issue 14, fifth
round: the hub's commits now let the loop go between chunks, so a shutdown overlaps them more often).

A real hub (uvicorn, SQLite in ``tmp_path``, its real Mosquitto), one emergency to one client, the retailer's
``executed`` outcome. The hub is told to stop the moment its outcome commit begins (``RequestBook.apply`` is
wrapped), and that commit goes on only once the hub's MQTT side has stopped, and once the store has been closed or
has stayed open for a while. Before the fix the hub's lifespan closed the store meanwhile, the commit failed
(``storage is not open``) and the outcome was lost until the retailer sent it again; now the lifespan waits for the
commit (``HubRelay.drain``). The hub is started again on the same database: the client's outcome is there.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud_hub.book import RequestBook
from cloud_hub.store import HubStore
from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Outcome, Request
from tests.broker_fixtures import MosquittoFactory
from tests.hub_fixtures import HubHandle, start_hub
from tests.mqtt_party import Party, parties
from tests.waiting import eventually

STORE_LEFT_OPEN_S = 2.0
"""How long the held commit waits for the store to close before it goes on (with the fix it never closes first)."""


def relay_running() -> bool:
    return any(t.get_name() == "hub-relay" for t in asyncio.all_tasks())


async def test_an_outcome_commit_running_at_shutdown_is_stored(tmp_path: Path, mosquitto_factory: MosquittoFactory,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    broker = mosquitto_factory("hub", ["r1", "r2"], "hub")
    server, serving, tokens, url = await start_hub(tmp_path, broker)
    store_closed = asyncio.Event()
    seen: dict[str, Any] = {}
    original_close, original_apply = HubStore.close, RequestBook.apply

    async def close(self: HubStore) -> None:
        store_closed.set()
        await original_close(self)

    async def apply(self: RequestBook, outcomes: list[Any], *args: Any, **kwargs: Any) -> Any:
        server.should_exit = True  # the hub stops while this commit runs
        await eventually(lambda: not relay_running(), "the hub's MQTT side stopped")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(store_closed.wait(), STORE_LEFT_OPEN_S)
        seen["store closed before the commit"] = store_closed.is_set()
        return await original_apply(self, outcomes, *args, **kwargs)

    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            hub = HubHandle(url, tokens, broker, http, server.config.app)
            await eventually(lambda: _ready(http), "the hub is ready")
            await hub.setup_registry({"c1": "r1"})
            with parties(Party(broker, "r1", topics.down("retailers", "r1"))) as (r1,):
                start = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()
                r = await http.post("/v1/emergencies", headers=hub.auth("dso"), json={
                    "client_ids": ["c1"], "start": start, "duration_s": 600, "power_limit_kw": 1.5})
                assert r.status_code == 202, r.text
                request_id = r.json()["request_id"]
                msg = await r1.next("request")
                assert isinstance(msg, Request)
                await r1.publish(topics.up("retailers", "r1"), Ack(ack_ids=[msg.msg_id]))
                monkeypatch.setattr(RequestBook, "apply", apply)
                monkeypatch.setattr(HubStore, "close", close)
                await r1.publish(topics.up("retailers", "r1"), Outcome(
                    request_id=request_id, client_id="c1", state=ClientState.EXECUTED))
                await serving  # the hub stops (its outcome commit held as above)
    finally:
        server.should_exit = True
        await serving
    assert seen == {"store closed before the commit": False}

    monkeypatch.undo()
    server, serving, tokens, url = await start_hub(tmp_path, broker)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            await eventually(lambda: _ready(http), "the hub is ready again")
            r = await http.get(f"/v1/requests/{request_id}", headers={"Authorization": f"Bearer {tokens['dso']}"})
            assert r.status_code == 200, r.text
            assert r.json()["clients"]["c1"]["state"] == ClientState.EXECUTED.value, r.json()["clients"]
    finally:
        server.should_exit = True
        await serving


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200
