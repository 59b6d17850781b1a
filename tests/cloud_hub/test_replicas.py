"""Two hub replicas (real ``cloud-hub serve`` processes) on one SQLite file and one real Mosquitto: the retailers'
messages are shared between them, outcomes reach the replica that owns the request, and a replica killed with
``kill -9`` mid-request has its requests adopted by the survivor: every request completes, none is lost, none is
executed twice. Also: only the replicas may use the ``hub/replicas`` topics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import tomli_w
from pydantic import ValidationError

from broker_config.launcher import die_with_parent
from cloud_hub.settings import HubSettings
from cloud_hub.store import HubStore
from cloud_hub.tokens import TokenBook
from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Customers, Outcome, Request
from tests.broker_fixtures import BrokerHandle, MosquittoFactory, free_port
from tests.hub_fixtures import IN_FORCE_SINCE
from tests.mqtt_party import Party, parties
from tests.waiting import eventually

CLIENTS = ["c1", "c2", "c3"]
NOT_AUTHORIZED = 0x87


class Replica:
    """One hub replica as a child process, so that it can be killed for real."""

    def __init__(self, tmp: Path, broker: BrokerHandle, replica_id: str, username: str, tokens_file: Path,
                 storage: dict[str, object]) -> None:
        self.replica_id = replica_id
        self.config = tmp / f"hub-{replica_id}.toml"
        self.settings: dict[str, object] = {
            "db_path": str(tmp / "hub.db"), "tokens_file": str(tokens_file),
            "mqtt_host": broker.host, "mqtt_port": broker.port, "mqtt_username": username,
            "mqtt_password": broker.identities[username].password, "replica_id": replica_id,
            "replica_settle_s": 0.5, "replica_scan_s": 2.0, **storage}
        self.log = tmp / f"hub-{replica_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_from = 0
        """Where this start's output begins in the log."""
        self.new_port()

    def new_port(self) -> None:
        """Listen on another free port (the one chosen was taken by another process before the replica bound it)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config.write_text(tomli_w.dumps({"hub": {"http_port": self.port, **self.settings}}))

    def start(self) -> None:
        self.log_from = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "cloud_hub.cli", "--log-level", "INFO", "serve",
                                          "--config", str(self.config)], stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=die_with_parent())

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
            ) -> Iterator[tuple[Replica, Replica, BrokerHandle, dict[str, str]]]:
    """Replicas ``a`` (identity ``hub``) and ``b`` (identity ``hub-b``), each its own MQTT identity, one store:
    one SQLite file, or (``indirect`` parameter ``hbase``) one HBase through the Thrift test double."""
    storage: dict[str, object] = {}
    if getattr(request, "param", "sqlite") == "hbase":
        double = request.getfixturevalue("hbase_double")
        storage = {"storage": "hbase", "hbase_hosts": [f"127.0.0.1:{double.port}"]}
    broker = mosquitto_factory("hub", ["r1"], "hub", extra_privileged=["hub-b"])
    book = TokenBook(tmp_path / "tokens.json")
    tokens = {p: book.issue(p) for p in ("dso", "admin")}
    a = Replica(tmp_path, broker, "a", "hub", book.path, storage)
    b = Replica(tmp_path, broker, "b", "hub-b", book.path, storage)
    try:
        yield a, b, broker, tokens
    finally:
        a.stop()
        b.stop()


async def started(cluster: tuple[Replica, Replica, BrokerHandle, dict[str, str]]
                  ) -> tuple[Replica, Replica, BrokerHandle, dict[str, str]]:
    """Start both replicas of ``cluster``, wait until each is ready and register the retailers and clients."""
    a, b, _, tokens = cluster
    a.start()
    b.start()
    await asyncio.gather(wait_ready(a), wait_ready(b))
    await register(a.url, tokens)
    return cluster


async def wait_ready(replica: Replica, timeout_s: float = 30) -> None:
    """Wait for the replica's /readyz; on a timeout, say what it last answered and show its log."""
    last = "no answer"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert replica.proc is not None
        if replica.proc.poll() is not None and b"address already in use" in replica.log.read_bytes()[replica.log_from:]:
            replica.new_port()  # free_port() is a race with every other process binding one; a real one
            replica.start()
        with contextlib.suppress(httpx.HTTPError):
            async with httpx.AsyncClient(base_url=replica.url, timeout=2) as http:
                r = await http.get("/readyz")
            if r.status_code == 200:
                return
            last = r.text
        await asyncio.sleep(0.05)
    raise TimeoutError(f"replica {replica.replica_id} at {replica.url} not ready: {last}\n"
                       f"{replica.log.read_text()[-3000:]}")



def metric(text: str, name: str) -> float:
    """The sum of a Prometheus counter's samples (every label set) in an exposition."""
    return sum(float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


class FakeRetailer:
    """A bridge that executes each (request, client) once, re-sends unacknowledged outcomes, and counts.
    While ``holding`` it acknowledges requests but keeps their outcomes back."""

    def __init__(self, party: Party) -> None:
        self.party = party
        self.executed: Counter[tuple[str, str]] = Counter()
        self.duplicates = 0
        self.requests_seen = 0
        self.pending: dict[str, Outcome] = {}
        self.held: list[Outcome] = []
        self.holding = False
        self.silent: set[str] = set()
        """Clients never answered (their requests stay open, to be cancelled)."""

    async def run(self) -> None:
        last_resend = time.monotonic()
        while True:
            try:
                msg = await self.party.next(timeout=0.2)
            except TimeoutError:
                msg = None
            if isinstance(msg, Request):
                self.requests_seen += 1
                for cid in msg.client_ids:
                    if (msg.request_id, cid) in self.executed:
                        self.duplicates += 1
                        continue
                    if cid in self.silent:
                        continue
                    self.executed[(msg.request_id, cid)] += 1
                    out = Outcome(request_id=msg.request_id, client_id=cid, state=ClientState.EXECUTED)
                    if self.holding:
                        self.held.append(out)
                        continue
                    self.pending[out.msg_id] = out
                    await self.party.publish(topics.up("retailers", "r1"), out)
                await self.party.publish(topics.up("retailers", "r1"), Ack(ack_ids=[msg.msg_id]))
            elif isinstance(msg, Ack):
                for mid in msg.ack_ids:
                    self.pending.pop(mid, None)
            elif isinstance(msg, Customers):  # the registration's announcement (issue 13): taken, as a bridge does
                await self.party.publish(topics.up("retailers", "r1"), Ack(ack_ids=[msg.msg_id]))
            if not self.holding and self.held:
                for out in self.held:
                    self.pending[out.msg_id] = out
                    await self.party.publish(topics.up("retailers", "r1"), out)
                self.held.clear()
            if time.monotonic() - last_resend > 0.5:
                last_resend = time.monotonic()
                for out in list(self.pending.values()):
                    await self.party.publish(topics.up("retailers", "r1"), out)


def emergency(clients: list[str]) -> dict[str, object]:
    start = datetime.now(UTC) + timedelta(seconds=5)
    return {"client_ids": clients, "start": start.isoformat(), "duration_s": 300, "power_limit_kw": 1}


async def register(url: str, tokens: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        r = await http.put("/v1/retailers/r1", json={"name": "R1"}, headers={"Authorization": f"Bearer "
                                                                                           f"{tokens['admin']}"})
        assert r.status_code in (200, 201), r.text
        for cid in [*CLIENTS, "quiet"]:
            r = await http.put(f"/v1/clients/{cid}", headers={"Authorization": f"Bearer {tokens['dso']}"}, json={
                "retailer_id": "r1", "contracted_power_kw": 5, "valid_from": IN_FORCE_SINCE})
            assert r.status_code in (200, 201), r.text


async def wait_states(http: httpx.AsyncClient, dso: dict[str, str], ids: list[str], want: str = "completed",
                      timeout_s: float = 40) -> dict[str, str]:
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for rid in ids:
            if states.get(rid) != want:
                states[rid] = (await http.get(f"/v1/requests/{rid}", headers=dso)).json()["state"]
        if all(s == want for s in states.values()):
            break
        await asyncio.sleep(0.2)
    return states


async def owners(config: Path) -> Counter[str]:
    """Owners of the open requests, read from the replicas' shared store."""
    store = HubStore.from_settings(HubSettings.load(config))
    await store.open()
    try:
        return Counter(owner or "" for _, owner in await store.open_request_owners())
    finally:
        await store.close()


def test_replica_topics() -> None:
    assert topics.shared(topics.all_up_msg("retailers")) == "$share/hub/mhp/v1/retailers/+/up/msg"
    assert topics.replica_in("b") == "mhp/v1/hub/replicas/b/in"
    assert topics.parse_replica(topics.replica_status("b")) == ("b", "status")
    assert topics.parse_replica(topics.replica_in("b")) == ("b", "in")
    assert topics.parse_replica(topics.up("retailers", "r1")) is None
    with pytest.raises(topics.TopicError):
        topics.replica_in("a/b")
    # No party pattern reaches the replicas' subtree.
    assert not any(t.startswith(topics.REPLICAS) or t.startswith("mhp/v1/hub")
                   for _, t in topics.acl_patterns("retailers"))


def test_replica_settings() -> None:
    assert HubSettings.load(replica_id="b").mqtt_client_id == "hub-b"
    assert HubSettings.load(replica_id="b", mqtt_client_id="x").mqtt_client_id == "x"
    single = HubSettings.load()
    assert single.replica_id is None and single.mqtt_client_id == "hub-1"
    with pytest.raises(ValidationError, match="invalid id"):
        HubSettings.load(replica_id="a/b")


async def test_outcomes_are_shared_and_reach_the_owner(
        cluster: tuple[Replica, Replica, BrokerHandle, dict[str, str]]) -> None:
    a, b, broker, tokens = cluster
    a.start()
    b.start()
    await asyncio.gather(wait_ready(a), wait_ready(b))
    await register(a.url, tokens)
    dso = {"Authorization": f"Bearer {tokens['dso']}"}
    with parties(Party(broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        fake = FakeRetailer(r1)
        fake.silent.add("quiet")
        worker = asyncio.create_task(fake.run())
        try:
            async with httpx.AsyncClient(base_url=a.url, timeout=10) as ha, \
                    httpx.AsyncClient(base_url=b.url, timeout=10) as hb:
                ids = []
                for i in range(20):  # all owned by replica a
                    r = await ha.post("/v1/emergencies", headers={**dso, "Idempotency-Key": f"k{i}"},
                                      json=emergency(CLIENTS))
                    assert r.status_code == 202, r.text
                    ids.append(r.json()["request_id"])
                # The idempotency answer is shared: the same key on the other replica is the same request.
                again = await hb.post("/v1/emergencies", headers={**dso, "Idempotency-Key": "k0"},
                                      json=emergency(CLIENTS) | {"power_limit_kw": 2})
                assert again.status_code == 409, "same key, different body"
                # Attempts with one key at once on both replicas create one request (a claim in the shared store).
                body = emergency(CLIENTS)
                storm = await asyncio.gather(*((ha, hb)[i % 2].post(
                    "/v1/emergencies", headers={**dso, "Idempotency-Key": "storm"}, json=body) for i in range(10)))
                assert {r.status_code for r in storm} == {202}, [r.text for r in storm]
                assert len({r.json()["request_id"] for r in storm}) == 1
                ids.append(storm[0].json()["request_id"])
                quiet = (await hb.post("/v1/emergencies", headers=dso, json=emergency(["quiet"]))).json()
                states = await wait_states(hb, dso, ids)  # read on the replica that owns none of them
                assert Counter(states.values()) == {"completed": 21}
                # A cancel on the replica that does not own the request is done by its owner (b owns it).
                cancelled = await ha.post(f"/v1/requests/{quiet['request_id']}/cancel", headers=dso)
                assert cancelled.status_code == 200, cancelled.text
                assert (await ha.post(f"/v1/requests/{quiet['request_id']}/cancel", headers=dso)).status_code == 409
                assert (await hb.get(f"/v1/requests/{quiet['request_id']}", headers=dso)).json()["state"] == \
                    "cancelled"
                ma, mb = (await ha.get("/metrics")).text, (await hb.get("/metrics")).text
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
    # Both replicas received retailer messages (the shared subscription), b forwarded a's outcomes and acks.
    assert metric(mb, "mhp_mqtt_received_total") > 0 and metric(ma, "mhp_mqtt_received_total") > 0
    assert 'mhp_replica_forwarded_total{kind="outcome"}' in mb
    assert metric(mb, "mhp_replica_forwarded_total") > 0
    assert 'mhp_replica_forwarded_total{kind="cancel"}' in ma
    assert max(fake.executed.values()) == 1 and len(fake.executed) == 63


@pytest.mark.parametrize("cluster", ["sqlite", "hbase"], indirect=True)
async def test_killed_replica_requests_are_adopted_and_complete_once(
        cluster: tuple[Replica, Replica, BrokerHandle, dict[str, str]]) -> None:
    a, b, broker, tokens = cluster
    a.start()
    b.start()
    await asyncio.gather(wait_ready(a), wait_ready(b))
    dso = {"Authorization": f"Bearer {tokens['dso']}"}
    with parties(Party(broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        fake = FakeRetailer(r1)
        fake.holding = True  # requests are delivered and acknowledged, their outcomes kept back
        worker = asyncio.create_task(fake.run())
        try:
            await register(b.url, tokens)  # listening: it acks their announcements
            async with httpx.AsyncClient(base_url=a.url, timeout=10) as ha, \
                    httpx.AsyncClient(base_url=b.url, timeout=10) as hb:
                on_a = [(await ha.post("/v1/emergencies", headers=dso, json=emergency(CLIENTS))).json()["request_id"]
                        for _ in range(15)]
                on_b = [(await hb.post("/v1/emergencies", headers=dso, json=emergency(CLIENTS))).json()["request_id"]
                        for _ in range(5)]
                await eventually(lambda: len({k[0] for k in fake.executed}) == 20, timeout_s=20.0)
                assert len({k[0] for k in fake.executed}) == 20, "every request reached the retailer"
                assert await owners(a.config) == {"a": 15, "b": 5}
                a.kill()  # mid-request: every request of a is open, its outcomes not yet sent
                for _ in range(200):
                    if not (await owners(a.config)).get("a"):
                        break
                    await asyncio.sleep(0.1)
                assert await owners(a.config) == {"b": 20}, "the survivor adopted every open request"
                # The killed replica comes back before the outcomes: it takes back nothing that was adopted.
                a.start()
                await wait_ready(a)
                assert await owners(a.config) == {"b": 20}
                fake.holding = False
                states = await wait_states(hb, dso, on_a + on_b)
                assert Counter(states.values()) == {"completed": 20}
                later = (await ha.post("/v1/emergencies", headers=dso, json=emergency(CLIENTS))).json()["request_id"]
                assert (await wait_states(ha, dso, [later]))[later] == "completed"
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
    log_b = b.log.read_text()
    assert "adopted 15 open request(s)" in log_b, log_b[-2000:]
    assert set(fake.executed) == {(rid, cid) for rid in [*on_a, *on_b, later] for cid in CLIENTS}
    assert max(fake.executed.values()) == 1, "nothing executed twice"
    print(f"\n{fake.duplicates} duplicate request deliveries dropped by the retailer after the adoption")


async def test_only_replicas_use_the_replica_topics(
        cluster: tuple[Replica, Replica, BrokerHandle, dict[str, str]]) -> None:
    a, _, broker, _ = cluster
    a.start()
    await wait_ready(a)
    with parties(Party(broker, "r1", f"{topics.REPLICAS}/#", topics.down("retailers", "r1"))) as (r1,):
        rc = await asyncio.to_thread(r1.client.publish, topics.replica_in("a"), b'{"type":"ack"}', 1)
        assert rc is not None and rc.value == NOT_AUTHORIZED
        rc = await asyncio.to_thread(r1.client.publish, topics.replica_status("a"), b"x", 1)
        assert rc is not None and rc.value == NOT_AUTHORIZED
        # a's retained presence exists but is not delivered to a retailer; its own down topic still works.
        await asyncio.to_thread(broker_publish_as_hub, broker, topics.down("retailers", "r1"))
        got = await r1.raw(5)
        assert got.topic == topics.down("retailers", "r1")


def broker_publish_as_hub(broker: BrokerHandle, topic: str) -> None:
    """A sentinel from the privileged identity (messages arrive in order: anything forbidden would come first)."""
    from tests.broker_config.paho_client import TestClient

    hub = TestClient(broker.host, broker.port, "hub-b", broker.identities["hub-b"].password)
    assert not hub.connect().is_failure
    try:
        hub.publish(topic, Ack(ack_ids=["sentinel"]).model_dump_json().encode(), 1)
    finally:
        hub.close()


async def test_replica_that_lost_the_broker_rejoins_without_taking_back_adopted_requests(
        cluster: tuple[Replica, Replica, BrokerHandle, dict[str, str]]) -> None:
    """Replica a's connection is taken over (its client id reused), so its last will fires while it still runs:
    b adopts a's open requests; a, back on the broker, drops its book and loads only what it still owns."""
    from tests.broker_config.paho_client import TestClient

    a, b, broker, tokens = cluster
    a.start()
    b.start()
    await asyncio.gather(wait_ready(a), wait_ready(b))
    dso = {"Authorization": f"Bearer {tokens['dso']}"}
    with parties(Party(broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        fake = FakeRetailer(r1)
        fake.holding = True
        worker = asyncio.create_task(fake.run())
        try:
            await register(a.url, tokens)  # listening: it acks their announcements
            async with httpx.AsyncClient(base_url=a.url, timeout=10) as ha, \
                    httpx.AsyncClient(base_url=b.url, timeout=10) as hb:
                ids = [(await ha.post("/v1/emergencies", headers=dso, json=emergency(CLIENTS))).json()["request_id"]
                       for _ in range(8)]
                await eventually(lambda: len({k[0] for k in fake.executed}) == 8, timeout_s=20.0)
                assert await owners(a.config) == {"a": 8}
                intruder = TestClient(broker.host, broker.port, "hub", broker.identities["hub"].password,
                                      client_id="hub-a")
                assert not (await asyncio.to_thread(intruder.connect)).is_failure
                await asyncio.to_thread(intruder.close)
                for _ in range(200):
                    if (await owners(a.config)).get("b") == 8:
                        break
                    await asyncio.sleep(0.1)
                assert await owners(a.config) == {"b": 8}, "b adopted a's requests when a's will fired"
                await wait_ready(a)  # a reconnected and rejoined
                assert await owners(a.config) == {"b": 8}
                fake.holding = False
                states = await wait_states(hb, dso, ids)
                assert Counter(states.values()) == {"completed": 8}
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
    assert "lost the broker: dropped its 8 open request(s)" in a.log.read_text()
    assert max(fake.executed.values()) == 1, "nothing executed twice"
