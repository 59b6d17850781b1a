"""``kill -9`` the hub under a steady stream of requests, start it again: every request that got a 202 reaches a
terminal state, none is executed twice, and the test reports how long restart-to-ready took."""

from __future__ import annotations

import asyncio
import contextlib
import os
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

from broker_config.launcher import die_with_parent
from cloud_hub.tokens import TokenBook
from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Outcome, Request
from tests.broker_fixtures import BrokerHandle, MosquittoFactory, free_port
from tests.hub_fixtures import IN_FORCE_SINCE
from tests.mqtt_party import Party, parties

CLIENTS = ["c1", "c2", "c3"]


class HubProcess:
    """``cloud-hub serve`` as a child process, so it can be killed for real."""

    def __init__(self, tmp: Path, broker: BrokerHandle) -> None:
        self.port = free_port()
        self.book = TokenBook(tmp / "tokens.json")
        self.tokens = {p: self.book.issue(p) for p in ("dso", "admin")}
        self.config = tmp / "hub.toml"
        self.config.write_text(tomli_w.dumps({"hub": {
            "http_port": self.port, "db_path": str(tmp / "hub.db"), "tokens_file": str(self.book.path),
            "mqtt_host": broker.host, "mqtt_port": broker.port, "mqtt_password": broker.identities["hub"].password}}))
        self.log = tmp / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "cloud_hub.cli", "--log-level", "WARNING", "serve",
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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def hub_process(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> Iterator[tuple[HubProcess, BrokerHandle]]:
    broker = mosquitto_factory("hub", ["r1"], "hub")
    hub = HubProcess(tmp_path, broker)
    try:
        yield hub, broker
    finally:
        hub.stop()


async def wait_ready(http: httpx.AsyncClient, timeout_s: float = 20) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get("/readyz")).status_code == 200:
                return time.monotonic() - t0
        await asyncio.sleep(0.01)
    raise TimeoutError("hub not ready")


class FakeRetailer:
    """A bridge that executes each (request, client) once, re-sends unacknowledged outcomes, and counts."""

    def __init__(self, party: Party) -> None:
        self.party = party
        self.executed: Counter[tuple[str, str]] = Counter()
        self.duplicates = 0
        self.pending: dict[str, Outcome] = {}

    async def run(self) -> None:
        last_resend = time.monotonic()
        while True:
            try:
                msg = await self.party.next(timeout=0.2)
            except TimeoutError:
                msg = None
            if isinstance(msg, Request):
                for cid in msg.client_ids:
                    if (msg.request_id, cid) in self.executed:
                        self.duplicates += 1
                        continue
                    self.executed[(msg.request_id, cid)] += 1
                    out = Outcome(request_id=msg.request_id, client_id=cid, state=ClientState.EXECUTED)
                    self.pending[out.msg_id] = out
                    await self.party.publish(topics.up("retailers", "r1"), out)
                await self.party.publish(topics.up("retailers", "r1"), Ack(ack_ids=[msg.msg_id]))
            elif isinstance(msg, Ack):
                for mid in msg.ack_ids:
                    self.pending.pop(mid, None)
            if time.monotonic() - last_resend > 1.0:
                last_resend = time.monotonic()
                for out in list(self.pending.values()):
                    await self.party.publish(topics.up("retailers", "r1"), out)


async def test_hub_killed_under_load_loses_nothing_and_executes_nothing_twice(
        hub_process: tuple[HubProcess, BrokerHandle], record_property: pytest.RecordProperty) -> None:
    hub, broker = hub_process
    hub.start()
    accepted: list[str] = []
    async with httpx.AsyncClient(base_url=hub.url, timeout=5) as http:
        await wait_ready(http)
        admin, dso = ({"Authorization": f"Bearer {hub.tokens[p]}"} for p in ("admin", "dso"))
        await http.put("/v1/retailers/r1", json={"name": "R1"}, headers=admin)
        for cid in CLIENTS:
            await http.put(f"/v1/clients/{cid}", headers=dso, json={
                "retailer_id": "r1", "contracted_power_kw": 5, "valid_from": IN_FORCE_SINCE})
        with parties(Party(broker, "r1", topics.down("retailers", "r1"))) as (r1,):
            fake = FakeRetailer(r1)
            worker = asyncio.create_task(fake.run())

            failed: list[tuple[str, dict[str, object]]] = []

            async def post(key: str, body: dict[str, object]) -> None:
                try:
                    r = await http.post("/v1/emergencies", headers={**dso, "Idempotency-Key": key}, json=body)
                except httpx.HTTPError:
                    failed.append((key, body))  # no answer: the DSO retries with the same key
                    return
                assert r.status_code == 202, r.text
                accepted.append(r.json()["request_id"])

            async def post_some(n: int) -> None:
                for i in range(n):
                    start = datetime.now(UTC) + timedelta(seconds=2)
                    await post(f"k-{i}", {"client_ids": CLIENTS, "start": start.isoformat(), "duration_s": 120,
                                          "power_limit_kw": 1})
                    await asyncio.sleep(0.02)

            poster = asyncio.create_task(post_some(120))  # keeps posting through the kill and the restart
            await asyncio.sleep(1.0)
            hub.kill()
            killed_at = time.monotonic()
            hub.start()
            ready_s = await wait_ready(http)
            restart_to_ready = time.monotonic() - killed_at
            await poster
            retries = len(failed)
            while failed:
                await post(*failed.pop())
            states: dict[str, str] = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                for rid in accepted:
                    if states.get(rid) != "completed":
                        states[rid] = (await http.get(f"/v1/requests/{rid}", headers=dso)).json()["state"]
                if all(s == "completed" for s in states.values()):
                    break
                await asyncio.sleep(0.2)
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
    record_property("restart_to_ready_s", round(restart_to_ready, 3))
    print(f"\nrestart-to-ready after kill -9: {restart_to_ready:.3f} s (ready probe {ready_s:.3f} s); "
          f"{len(accepted)} requests accepted, {retries} posts retried with their Idempotency-Key, "
          f"{fake.duplicates} duplicate deliveries dropped by the retailer")
    assert len(accepted) == 120 and len(set(accepted)) == 120
    assert Counter(states.values()) == {"completed": len(accepted)}, "every 202 reached a terminal state"
    assert set(fake.executed) == {(rid, cid) for rid in accepted for cid in CLIENTS}
    assert max(fake.executed.values()) == 1, "nothing executed twice"
    assert restart_to_ready < 10
