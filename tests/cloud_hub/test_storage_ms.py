"""``trace.storage_ms`` is the truth (issue 13, item 5): the time the request's creating write took, stored with the
request by the next write of its row, so it survives a ``kill -9`` of the hub and another replica reads it too;
absent, not a made-up 0, when it was never stored. Each runs ``cloud-hub serve`` as real processes (killed for
real) with their real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w

from cloud_hub.tokens import TokenBook
from tests.broker_fixtures import BrokerHandle, MosquittoFactory, free_port
from tests.cloud_hub import test_replicas as replicas
from tests.cloud_hub.test_restart import HubProcess, wait_ready


@pytest.fixture
def hub_process(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> Iterator[tuple[HubProcess, BrokerHandle]]:
    broker = mosquitto_factory("hub", ["r1"], "hub")
    hub = HubProcess(tmp_path, broker)
    try:
        yield hub, broker
    finally:
        hub.stop()


async def wait_alive(http: httpx.AsyncClient, timeout_s: float = 20) -> None:
    """Until the hub answers HTTP (``/healthz``): without its broker it serves the API but is not ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get("/healthz")).status_code == 200:
                return
        await asyncio.sleep(0.02)
    raise TimeoutError("hub does not answer")


async def register_and_post(http: httpx.AsyncClient, hub: HubProcess) -> tuple[str, dict[str, str]]:
    """r1 and its client c1, then an emergency for c1; returns its request id and the DSO's headers."""
    admin, dso = ({"Authorization": f"Bearer {hub.tokens[p]}"} for p in ("admin", "dso"))
    assert (await http.put("/v1/retailers/r1", json={"name": "R1"}, headers=admin)).status_code in (200, 201)
    yesterday = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    r = await http.put("/v1/clients/c1", headers=dso, json={
        "retailer_id": "r1", "contracted_power_kw": 5, "valid_from": yesterday})
    assert r.status_code in (200, 201), r.text
    posted = time.perf_counter()
    r = await http.post("/v1/emergencies", headers=dso, json={
        "client_ids": ["c1"], "start": (datetime.now(UTC) + timedelta(minutes=5)).isoformat(), "duration_s": 600,
        "power_limit_kw": 1})
    round_trip_ms = (time.perf_counter() - posted) * 1000
    assert r.status_code == 202, r.text
    request_id = r.json()["request_id"]
    trace = await get_trace(http, request_id, dso)
    assert 0 < trace["storage_ms"] < round_trip_ms, "the creating write took time, within the POST's round trip"
    return request_id, dso


async def get_trace(http: httpx.AsyncClient, request_id: str, dso: dict[str, str]) -> dict[str, Any]:
    r = await http.get(f"/v1/requests/{request_id}", headers=dso)
    assert r.status_code == 200, r.text
    trace: dict[str, Any] = r.json()["trace"]
    return trace


async def test_storage_ms_survives_a_kill_of_the_hub(hub_process: tuple[HubProcess, BrokerHandle]) -> None:
    hub, _ = hub_process
    hub.start()
    async with httpx.AsyncClient(base_url=hub.url, timeout=5) as http:
        await wait_ready(http)
        request_id, dso = await register_and_post(http, hub)
        deadline = time.monotonic() + 10
        while "dispatch_ms" not in (before := await get_trace(http, request_id, dso)):  # the next write of the row
            assert time.monotonic() < deadline, f"never dispatched: {before}"
            await asyncio.sleep(0.05)
        hub.kill()
        hub.start()
        await wait_ready(http)
        after = await get_trace(http, request_id, dso)
    assert after["storage_ms"] == before["storage_ms"], f"before the kill {before}, after {after}"


async def test_storage_ms_never_stored_is_absent_not_zero(hub_process: tuple[HubProcess, BrokerHandle],
                                                          tmp_path: Path) -> None:
    """The hub's broker is unreachable, so nothing writes the request's row after its creation before the hub is
    killed: its storage time is unknown after the restart, and the answer says nothing rather than 0."""
    hub, broker = hub_process
    hub.config.write_text(tomli_w.dumps({"hub": {
        "http_port": hub.port, "db_path": str(tmp_path / "hub.db"), "tokens_file": str(hub.book.path),
        "mqtt_host": broker.host, "mqtt_port": free_port(), "mqtt_password": broker.identities["hub"].password}}))
    hub.start()
    async with httpx.AsyncClient(base_url=hub.url, timeout=5) as http:
        await wait_alive(http)
        request_id, dso = await register_and_post(http, hub)
        hub.kill()
        hub.start()
        await wait_alive(http)
        after = await get_trace(http, request_id, dso)
    assert "storage_ms" not in after, f"a storage time nobody measured: {after}"


async def test_another_replica_reads_the_storage_ms_of_the_replica_that_stored_the_request(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("hub", ["r1"], "hub", extra_privileged=["hub-b"])
    book = TokenBook(tmp_path / "tokens.json")
    tokens = {p: book.issue(p) for p in ("dso", "admin")}
    a = replicas.Replica(tmp_path, broker, "a", "hub", book.path, {})
    b = replicas.Replica(tmp_path, broker, "b", "hub-b", book.path, {})
    try:
        a.start()
        b.start()
        await asyncio.gather(replicas.wait_ready(a), replicas.wait_ready(b))
        await replicas.register(a.url, tokens)
        dso = {"Authorization": f"Bearer {tokens['dso']}"}
        async with httpx.AsyncClient(base_url=a.url, timeout=10) as ha, \
                httpx.AsyncClient(base_url=b.url, timeout=10) as hb:
            r = await ha.post("/v1/emergencies", headers=dso, json=replicas.emergency(["c1"]))
            assert r.status_code == 202, r.text
            request_id = r.json()["request_id"]
            deadline = time.monotonic() + 10
            while "dispatch_ms" not in (on_a := await get_trace(ha, request_id, dso)):
                assert time.monotonic() < deadline, f"never dispatched: {on_a}"
                await asyncio.sleep(0.05)
            on_b = await get_trace(hb, request_id, dso)
    finally:
        a.stop()
        b.stop()
    assert on_a["storage_ms"] > 0
    assert on_b["storage_ms"] == on_a["storage_ms"], f"replica a {on_a}, replica b {on_b}"
