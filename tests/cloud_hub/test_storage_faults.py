"""Storage goes away under a running hub and comes back: new requests get 503 with a clear message quickly, nothing
already accepted is lost, and the hub recovers by itself. On SQLite the fault is a database locked by another
process; on HBase it is the Thrift gateway (the test double) going away with all its connections."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from mhp_wire import topics
from mhp_wire.messages import ClientState, Outcome
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.test_relay_batching import executed, retailers
from tests.hub_fixtures import HubHandle, start_hub
from tests.mqtt_party import Party, parties


@pytest.fixture(params=["sqlite", "hbase"])
async def faulty_hub(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
                     ) -> AsyncIterator[tuple[HubHandle, Callable[[], None], Callable[[], None]]]:
    """A hub on each backend, with ``break_storage()`` and ``mend_storage()``."""
    broker = mosquitto_factory("hub", ["r1", "r2"], "hub")
    overrides: dict[str, Any] = {"sqlite_busy_timeout_ms": 300}
    lock: dict[str, sqlite3.Connection] = {}
    if request.param == "hbase":
        double = request.getfixturevalue("hbase_double")
        overrides = {"storage": "hbase", "hbase_hosts": [f"127.0.0.1:{double.port}"], "hbase_timeout_ms": 500}

        def break_storage() -> None:
            double.stop()

        def mend_storage() -> None:
            double.start()
    else:
        def break_storage() -> None:
            db = sqlite3.connect(tmp_path / "hub.db", isolation_level=None, check_same_thread=False)
            db.execute("BEGIN EXCLUSIVE")
            lock["db"] = db

        def mend_storage() -> None:
            db = lock.pop("db")
            db.execute("ROLLBACK")
            db.close()
    server, task, tokens, url = await start_hub(tmp_path, broker, **overrides)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(200):
            if (await http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.02)
        try:
            yield HubHandle(url, tokens, broker, http, server.config.app), break_storage, mend_storage
        finally:
            if "db" in lock:
                mend_storage()
            server.should_exit = True
            await task


def emergency(clients: list[str]) -> dict[str, Any]:
    start = datetime.now(UTC) + timedelta(seconds=60)
    return {"client_ids": clients, "start": start.isoformat(), "duration_s": 600, "power_limit_kw": 1}


async def test_storage_outage_gives_quick_503s_loses_nothing_and_recovers(
        faulty_hub: tuple[HubHandle, Callable[[], None], Callable[[], None]]) -> None:
    hub, break_storage, mend_storage = faulty_hub
    await hub.setup_registry({"c1": "r1"})
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        r = await hub.http.post("/v1/emergencies", json=emergency(["c1"]), headers=hub.auth("dso"))
        assert r.status_code == 202
        accepted = r.json()["request_id"]
        await r1.next("request")
        break_storage()
        t0 = time.monotonic()
        r = await hub.http.post("/v1/emergencies", json=emergency(["c1"]), headers=hub.auth("dso"))
        took = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "storage_unavailable" and "nothing was stored" in r.json()["message"]
        assert took < 3.0, f"a 503 must come quickly, took {took:.2f} s"
        ready = await hub.http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["storage"] != "ok"
        assert (await hub.http.get("/healthz")).status_code == 200, "the process itself is alive"
        # An outcome arriving during the outage is not acknowledged, so the bridge will send it again.
        out = Outcome(request_id=accepted, client_id="c1", state=ClientState.EXECUTED)
        await r1.publish(topics.up("retailers", "r1"), out)
        await asyncio.sleep(0.5)
        mend_storage()
        for _ in range(100):
            if (await hub.http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert (await hub.http.get("/readyz")).status_code == 200, "recovers by itself"
        r = await hub.http.post("/v1/emergencies", json=emergency(["c1"]), headers=hub.auth("dso"))
        assert r.status_code == 202
        await r1.publish(topics.up("retailers", "r1"), out)  # the bridge's re-send
        for _ in range(60):
            req = (await hub.http.get(f"/v1/requests/{accepted}", headers=hub.auth("dso"))).json()
            if req["state"] == "completed":
                break
            await asyncio.sleep(0.05)
        assert req["state"] == "completed", "the request accepted before the outage was not lost"


async def test_a_burst_of_outcomes_during_an_outage_is_not_acknowledged_and_its_resend_is_stored(
        faulty_hub: tuple[HubHandle, Callable[[], None], Callable[[], None]]) -> None:
    hub, break_storage, mend_storage = faulty_hub
    clients = [f"c{i}" for i in range(40)]
    await hub.setup_registry(dict.fromkeys(clients, "r1"))
    async with retailers(hub, "r1") as (r1,):
        r = await hub.http.post("/v1/emergencies", json=emergency(clients), headers=hub.auth("dso"))
        request_id = r.json()["request_id"]
        await r1.request_for(request_id)
        outcomes = [executed(request_id, c) for c in clients]
        break_storage()
        await r1.burst(outcomes)
        await asyncio.sleep(1.5)  # the group commit fails: nothing of it may be acknowledged
        assert r1.acks == [] and r1.errors == []
        mend_storage()
        for _ in range(100):
            if (await hub.http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        await r1.burst(outcomes)  # the bridge's re-send
        await r1.wait_acked([o.msg_id for o in outcomes])
        assert set(r1.acked()) == {o.msg_id for o in outcomes}
        req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
        assert req["state"] == "completed" and {c["state"] for c in req["clients"].values()} == {"executed"}
