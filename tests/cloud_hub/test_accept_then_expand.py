"""A client request is answered after one compact write; its per-client entries come right after (issue 14, third
round, ``cloud_hub/fanout.py``). A hub killed between the two writes finishes the expansion when it starts again:
every client is sent its request once, executes once, and gets its data-access-log line once.

The hub is a real ``cloud-hub serve`` process killed with SIGKILL, its retailer a real MQTT identity on a real
Mosquitto, its store a real SQLite file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import tomli_w

from cloud_hub.authz import Principal
from cloud_hub.book import RequestBook
from cloud_hub.metrics import HubMetrics
from cloud_hub.service import HubService
from cloud_hub.storage.sqlite import SqliteKV
from cloud_hub.store import HubStore
from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Outcome, Request
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.cloud_hub.test_restart import HubProcess, wait_ready
from tests.mqtt_party import Party, parties

N = 1500
CLIENTS = [f"c{i:05d}" for i in range(N)]


@pytest.fixture
def hub_process(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> Iterator[tuple[HubProcess, BrokerHandle]]:
    broker = mosquitto_factory("hub", ["r1"], "hub")
    hub = HubProcess(tmp_path, broker)
    # The retailer below reports 1,500 outcomes at once: the hub's per-retailer MQTT rate limit is not under test.
    config = tomli_w.dumps({"hub": {
        "http_port": hub.port, "db_path": str(tmp_path / "hub.db"), "tokens_file": str(hub.book.path),
        "mqtt_host": broker.host, "mqtt_port": broker.port, "mqtt_password": broker.identities["hub"].password,
        "mqtt_rate_limit_per_s": 100_000.0, "mqtt_rate_limit_burst": 100_000}})
    hub.config.write_text(config)
    try:
        yield hub, broker
    finally:
        hub.stop()


def emergency(clients: list[str]) -> dict[str, object]:
    start = datetime.now(UTC) + timedelta(seconds=30)
    return {"client_ids": clients, "start": start.isoformat(), "duration_s": 600, "power_limit_kw": 1.5}


def plan_stored(db: Path, request_id: str) -> bool:
    """Whether the request row still holds its plan (accepted, not expanded), read from the file a killed hub left."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return con.execute("SELECT 1 FROM cells WHERE tbl='requests' AND row=? AND col='r:plan'",
                           (request_id,)).fetchone() is not None


async def execute_all(r1: Party, request_id: str, timeout_s: float = 60) -> Counter[str]:
    """Play the retailer: acknowledge every request message, report each client it names ``executed`` (the
    first time it is named); returns how many times each client was named."""
    named: Counter[str] = Counter()
    deadline = time.monotonic() + timeout_s
    while set(named) < set(CLIENTS):
        assert time.monotonic() < deadline, f"{len(named)} of {N} clients were sent the request"
        msg = await r1.next("request", timeout=deadline - time.monotonic())
        assert isinstance(msg, Request) and msg.request_id == request_id
        await r1.publish(topics.up("retailers", "r1"), Ack(ack_ids=[msg.msg_id]))
        for cid in msg.client_ids:
            named[cid] += 1
            if named[cid] == 1:
                await r1.publish(topics.up("retailers", "r1"),
                                 Outcome(request_id=request_id, client_id=cid, state=ClientState.EXECUTED))
    return named


async def settled(http: httpx.AsyncClient, request_id: str, dso: dict[str, str], timeout_s: float = 60
                  ) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        got = (await http.get(f"/v1/requests/{request_id}", headers=dso)).json()
        if got["state"] == "completed" or time.monotonic() > deadline:
            return dict(got)
        await asyncio.sleep(0.1)


async def audit_lines(http: httpx.AsyncClient, dso: dict[str, str], client_id: str, request_id: str) -> int:
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    until = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    r = await http.get("/v1/audit", headers=dso, params={"client_id": client_id, "from": since, "to": until})
    assert r.status_code == 200, r.text
    return sum(1 for e in r.json()["entries"] if e["ref"] == request_id and e["action"] == "trigger_emergency")


async def register(http: httpx.AsyncClient, admin: dict[str, str], dso: dict[str, str]) -> None:
    assert (await http.put("/v1/retailers/r1", json={"name": "R1"}, headers=admin)).status_code in (200, 201)
    since = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    for k in range(0, N, 500):
        r = await http.put("/v1/clients", headers=dso, json={"clients": [
            {"client_id": c, "retailer_id": "r1", "contracted_power_kw": 5, "valid_from": since}
            for c in CLIENTS[k:k + 500]]})
        assert r.status_code == 200, r.text


async def check_after_restart(hub: HubProcess, broker: BrokerHandle, request_id: str) -> None:
    """Start the hub again and play the retailer: every client is sent the request, executes once, and has its
    audit line once."""
    hub.start()
    async with httpx.AsyncClient(base_url=hub.url, timeout=10) as http:
        await wait_ready(http)
        dso = {"Authorization": f"Bearer {hub.tokens['dso']}"}
        with parties(Party(broker, "r1", topics.down("retailers", "r1"))) as (r1,):
            named = await execute_all(r1, request_id)
            got = await settled(http, request_id, dso)
        assert set(named) == set(CLIENTS)
        assert got["state"] == "completed", got["state"]
        clients = got["clients"]
        assert isinstance(clients, dict) and set(clients) == set(CLIENTS)
        assert Counter(e["state"] for e in clients.values()) == {"executed": N}
        for cid in (CLIENTS[0], CLIENTS[N // 2], CLIENTS[-1]):
            assert await audit_lines(http, dso, cid, request_id) == 1, cid


async def test_a_hub_killed_right_after_the_202_sends_every_client_once_after_its_restart(
        hub_process: tuple[HubProcess, BrokerHandle], record_property: pytest.RecordProperty) -> None:
    hub, broker = hub_process
    hub.start()
    async with httpx.AsyncClient(base_url=hub.url, timeout=10) as http:
        await wait_ready(http)
        admin, dso = ({"Authorization": f"Bearer {hub.tokens[p]}"} for p in ("admin", "dso"))
        await register(http, admin, dso)
        r = await http.post("/v1/emergencies", json=emergency(CLIENTS), headers={**dso, "Idempotency-Key": "k1"})
        hub.kill()
    assert r.status_code == 202, r.text
    request_id = r.json()["request_id"]
    # Where the kill landed (before or after the expansion was durable) is recorded; the outcome must not depend on
    # it. The next test puts the hub exactly between the two writes.
    record_property("killed_before_expansion", plan_stored(Path(hub.config.parent) / "hub.db", request_id))
    await check_after_restart(hub, broker, request_id)


async def test_a_request_stored_but_not_expanded_is_expanded_then_sent_by_the_next_hub(
        hub_process: tuple[HubProcess, BrokerHandle]) -> None:
    hub, broker = hub_process
    db = Path(hub.config.parent) / "hub.db"
    # The hub's own use case on the hub's own file, stopped exactly where a kill between the two writes stops it:
    # the 202's write is durable, the expansion never ran.
    store = HubStore.embedded(db)
    await store.open()
    try:
        metrics = HubMetrics()
        book = RequestBook(store, metrics)
        service = HubService.build(store, book, metrics)
        await store.put_retailer("r1", "R1")
        since = time.time() - 86_400
        await store.put_clients([(c, "r1", 5.0, None, since) for c in CLIENTS])
        accepted = await service.flexibility.create_emergency(Principal.parse("dso"), emergency(CLIENTS), None)
        await book.close()  # the expansion task is cancelled before its first step
        stored = await store.get_request(accepted.request_id)
        assert stored is not None and "plan" in stored, "the row holds its plan, not yet its clients' entries"
        # A reader meanwhile sees every client pending, as the expansion will write them.
        assert Counter(e["state"] for e in stored["clients"].values()) == {"pending": N}
        assert stored["meta"]["counts"] == {"pending": N} and stored["meta"]["targets"] == N
        assert not book.outbox, "nothing is queued before the expansion is durable"
    finally:
        await store.close()
    assert plan_stored(db, accepted.request_id)
    await check_after_restart(hub, broker, accepted.request_id)
    assert not plan_stored(db, accepted.request_id), "the plan is dropped with the expansion"


async def test_a_small_request_is_stored_whole_in_its_accepting_write_and_a_large_one_with_its_plan(
        tmp_path: Path) -> None:
    store = HubStore.embedded(tmp_path / "hub.db")
    await store.open()
    try:
        metrics = HubMetrics()
        book = RequestBook(store, metrics, expand_after_accept_min_clients=100)
        service = HubService.build(store, book, metrics)
        await store.put_retailer("r1", "R1")
        await store.put_clients([(c, "r1", 5.0, None, time.time() - 86_400) for c in CLIENTS[:100]])
        dso = Principal.parse("dso")
        small = await service.flexibility.create_emergency(dso, emergency(CLIENTS[:99]), None)
        stored = await store.get_request(small.request_id)
        assert stored is not None and "plan" not in stored and len(stored["clients"]) == 99
        assert book.knows(small.request_id) and [i.clients for i in book.outbox.values()] == [CLIENTS[:99]]
        large = await service.flexibility.create_emergency(dso, emergency(CLIENTS[:100]), None)
        stored = await store.get_request(large.request_id)
        assert stored is not None and "plan" in stored and book.knows(large.request_id)
        await book.expanded(large.request_id)
        stored = await store.get_request(large.request_id)
        assert stored is not None and "plan" not in stored and len(stored["clients"]) == 100
        assert sorted(len(i.clients) for i in book.outbox.values()) == [99, 100]
        audit = await store.get_audit(CLIENTS[0], time.time() - 60, time.time() + 60)
        assert sorted(a["ref"] for a in audit) == sorted([small.request_id, large.request_id])
    finally:
        await book.close()
        await store.close()


async def test_an_expansion_storage_refuses_is_tried_again_holding_the_request_and_a_cancel_waits(
        tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    store = HubStore(SqliteKV(db, busy_timeout_ms=50))
    await store.open()
    blocker = sqlite3.connect(db, isolation_level=None)
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:  # the book's back-off, driven here: storage is back after two
        pauses.append(seconds)
        if len(pauses) == 2:
            blocker.execute("ROLLBACK")
        await asyncio.sleep(0)

    try:
        metrics = HubMetrics()
        book = RequestBook(store, metrics, expand_after_accept_min_clients=1, sleep=sleep)
        service = HubService.build(store, book, metrics)
        await store.put_retailer("r1", "R1")
        await store.put_clients([(c, "r1", 5.0, None, time.time() - 86_400) for c in CLIENTS[:3]])
        dso = Principal.parse("dso")
        accepted = await service.flexibility.create_emergency(dso, emergency(CLIENTS[:3]), None)
        # Another process takes the database's write lock before the expansion's first step.
        blocker.execute("BEGIN IMMEDIATE")
        cancel = asyncio.create_task(service.flexibility.cancel(dso, accepted.request_id))
        await book.expanded(accepted.request_id)
        assert pauses == [0.2, 0.4], "tried again after a back-off while storage refused it"
        stored = await store.get_request(accepted.request_id)
        assert stored is not None and "plan" not in stored and set(stored["clients"]) == set(CLIENTS[:3])
        audit = await store.get_audit(CLIENTS[0], time.time() - 60, time.time() + 60)
        assert [a["ref"] for a in audit] == [accepted.request_id]
        # The cancel waited for the expansion (the request's lock), so it cancelled the expanded request.
        answer = await cancel
        assert answer.state == "cancelled"
        stored = await store.get_request(accepted.request_id)
        assert stored is not None and stored["meta"]["state"] == "cancelled"
        assert {e["state"] for e in stored["clients"].values()} <= {"cancelled", "expired", "unreachable"}
        assert not [i for i in book.outbox.values() if i.kind == "request"], "the request is never sent"
    finally:
        await book.close()
        blocker.close()
        await store.close()
