"""A supplier switch at the hub reaches the retailers' bridges (issue 13, item 6), through the real chain: the hub
(FastAPI on a real socket, SQLite), a real hub broker, two real bridges each with its own real retailer broker, and
the homes' gateways as MQTT parties on those brokers.

The DSO registers a switch of client ``c-move`` from retailer r1 to r2 a few seconds ahead. Both bridges are told
over the hub's outbox; r1 withdraws a command it held for a time after the switch; until the switch r2 refuses the
home's reports and r1 accepts them, after it the other way round, and r1's personal area tells the customer they
have moved. What the bridges learnt survives their restart; a message lost in a hub-broker crash is re-sent by the
restarted hub until acknowledged, and never applied twice."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from mhp_wire import topics
from mhp_wire.messages import Ack, ErrorReply, Message, Outcome, Telemetry
from retailer_bridge.accounts import Accounts, ScryptCost
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.hub_fixtures import start_hub
from tests.mqtt_party import Party, parties
from tests.retailer_bridge.personal_area_rig import CHEAP_SCRYPT_N, csrf_of, sign_in
from tests.waiting import eventually

MOVER = ("c-move", "mover@example.com", "a long enough passphrase")
HOME_DEVICES: dict[str, dict[str, float | bool | None]] = {"meter": {"kw": 2.5}, "heater": {"on": True}}



@dataclass
class Hub:
    """The running hub: its server task and an HTTP client as the DSO and the admin."""

    server: uvicorn.Server
    task: asyncio.Task[None]
    http: httpx.AsyncClient
    tokens: dict[str, str]
    app: Any

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    async def stop(self) -> None:
        await self.http.aclose()
        self.server.should_exit = True
        await self.task


@dataclass
class World:
    """The brokers, the hub and the two bridges (restartable over their own stores)."""

    tmp_path: Path
    hub_broker: BrokerHandle
    local: dict[str, BrokerHandle]
    hub: Hub | None = None
    bridges: dict[str, Bridge] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def settings(self, rid: str) -> BridgeSettings:
        local = self.local[rid]
        extra: dict[str, Any] = {"personal_area_port": 0, "personal_area_scrypt_n": CHEAP_SCRYPT_N} if rid == "r1" \
            else {}
        return BridgeSettings(
            retailer_id=rid, hub_mqtt_host=self.hub_broker.host, hub_mqtt_port=self.hub_broker.port,
            hub_mqtt_password=self.hub_broker.identities[rid].password, local_mqtt_host=local.host,
            local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
            db_path=self.tmp_path / f"bridge-{rid}.db", telemetry_db_path=self.tmp_path / f"telemetry-{rid}.db",
            # The installation records: r1 installed gw-1 in the home of c-move, r2 installs its own gw-9 there.
            customers={"c-move": "gw-1", "c-stay": "gw-2"} if rid == "r1" else {"c-move": "gw-9"},
            measurement_interval_s=0.3, gateway_ack_timeout_s=60, **extra)

    async def start_hub(self) -> Hub:
        server, task, tokens, url = await start_hub(self.tmp_path, self.hub_broker)
        http = httpx.AsyncClient(base_url=url, timeout=10)
        self.hub = Hub(server, task, http, tokens, server.config.app)
        await eventually(lambda: self._ready(http), "the hub is ready", timeout_s=20.0)
        return self.hub

    @staticmethod
    async def _ready(http: httpx.AsyncClient) -> bool:
        return (await http.get("/readyz")).status_code == 200

    async def start_bridge(self, rid: str) -> Bridge:
        bridge = Bridge(self.settings(rid))
        self.bridges[rid] = bridge
        self.tasks[rid] = asyncio.create_task(bridge.run(), name=f"test-bridge-{rid}")
        assert self.hub is not None
        relay = self.hub.app.state.relay
        await eventually(lambda: bridge.relay.hub is not None and bridge.relay.hub.connected
                    and relay.presence.get(rid) == "online", f"bridge {rid} online at the hub", timeout_s=20.0)
        return bridge

    async def stop_bridge(self, rid: str) -> None:
        task = self.tasks.pop(rid)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def close(self) -> None:
        for rid in list(self.tasks):
            await self.stop_bridge(rid)
        if self.hub is not None:
            await self.hub.stop()


@contextlib.asynccontextmanager
async def world(tmp_path: Path, mosquitto_factory: MosquittoFactory, **hub_broker_tuning: Any
                ) -> AsyncIterator[World]:
    """Brokers and the hub running, retailers r1 and r2 and the clients registered (both r1's since an hour
    ago), the mover's personal-area account at r1; the bridges are started by the test."""
    w = World(tmp_path, mosquitto_factory("hub", ["r1", "r2"], "hub", **hub_broker_tuning),
              {"r1": mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge"),
               "r2": mosquitto_factory("retailer", ["gw-9"], "bridge")})
    try:
        hub = await w.start_hub()
        for rid in ("r1", "r2"):
            r = await hub.http.put(f"/v1/retailers/{rid}", json={"name": rid.upper()}, headers=hub.auth("admin"))
            assert r.status_code in (200, 201), r.text
        an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        for cid in ("c-move", "c-stay"):
            r = await hub.http.put(f"/v1/clients/{cid}", headers=hub.auth("dso"), json={
                "retailer_id": "r1", "contracted_power_kw": 6.9, "valid_from": an_hour_ago})
            assert r.status_code == 201, r.text
        accounts = Accounts(w.settings("r1").db_path, cost=ScryptCost(n=CHEAP_SCRYPT_N))
        await accounts.open()
        try:
            await accounts.add(*MOVER)
        finally:
            await accounts.close()
        yield w
    finally:
        await w.close()


async def report(gateway: Party, gateway_id: str, seq: int, kw: float = 2.5) -> Message:
    """The gateway sends telemetry of ``c-move`` now and returns the bridge's answer to it (ack or error)."""
    tel = Telemetry(gateway_id=gateway_id, client_id="c-move", seq=seq, at=datetime.now(UTC), devices=HOME_DEVICES,
                    active_power_kw=kw, sheddable_kw=1.0, rated_sheddable_kw=2.0)
    await gateway.publish(topics.telemetry(gateway_id), tel)
    return await answer_to(gateway, tel.msg_id)


async def answer_to(gateway: Party, msg_id: str, timeout_s: float = 10.0) -> Message:
    """The bridge's ``ack`` or ``error`` naming ``msg_id`` (other messages are skipped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        msg = await gateway.next(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(msg, Ack) and msg_id in msg.ack_ids:
            return msg
        if isinstance(msg, ErrorReply) and msg.ref_msg_id == msg_id:
            return msg


def refused(answer: Message, *words: str) -> bool:
    """Whether the answer is a ``forbidden`` error whose text has every one of ``words``."""
    return isinstance(answer, ErrorReply) and answer.code == "forbidden" and all(w in answer.message for w in words)


async def test_a_supplier_switch_at_the_hub_moves_the_customer_between_the_bridges(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    async with world(tmp_path, mosquitto_factory) as w:
        hub = w.hub
        assert hub is not None
        dso = hub.auth("dso")
        r1, r2 = await w.start_bridge("r1"), await w.start_bridge("r2")
        with parties(Party(w.local["r1"], "gw-1", topics.down("gateways", "gw-1")),
                     Party(w.local["r2"], "gw-9", topics.down("gateways", "gw-9"))) as (gw1, gw9):
            assert isinstance(await report(gw1, "gw-1", 1), Ack), "r1 takes its customer's reports"
            switch_at = datetime.now(UTC) + timedelta(seconds=10)
            # An emergency for a time after the switch, announced while r1 still supplies c-move at that time: r1
            # gets the request and hands the command to its gateway, which acknowledges it.
            r = await hub.http.post("/v1/emergencies", headers=dso, json={
                "client_ids": ["c-move"], "start": (switch_at + timedelta(seconds=2)).isoformat(),
                "duration_s": 60, "power_limit_kw": 1.0})
            assert r.status_code == 202, r.text
            emergency = r.json()["request_id"]
            command = await gw1.next("command", timeout=10)
            await gw1.publish(topics.up("gateways", "gw-1"), Ack(ack_ids=[command.msg_id]))
            # The switch: r2 supplies c-move from switch_at.
            r = await hub.http.put("/v1/clients/c-move", headers=dso, json={
                "retailer_id": "r2", "contracted_power_kw": 6.9, "valid_from": switch_at.isoformat()})
            assert r.status_code == 200, r.text
            change = r.json().get("customer_change_request_id")
            # r1 learns that it loses c-move at switch_at: the command for after it is withdrawn from the home...
            cancel = await gw1.next("cancel", timeout=10)
            assert cancel.request_id == emergency and cancel.client_ids == ["c-move"]  # type: ignore[union-attr]
            # ...and the hub is told: the client is refused, for that reason.
            got: dict[str, Any] = {}

            async def client_closed() -> bool:
                got.update((await hub.http.get(f"/v1/requests/{emergency}", headers=dso)).json())
                return bool(got["clients"]["c-move"]["state"] == "refused")

            await eventually(client_closed, "the withdrawn command's client refused at the hub", timeout_s=20.0)
            assert "supplier change" in got["clients"]["c-move"]["detail"]["reason"]
            # r2 learns that it gains c-move from switch_at: before then its gateway's reports are refused.
            await eventually(lambda: r2.relay.customer_list.announced.get("c-move") is not None, "r2 told of c-move",
                       timeout_s=20.0)
            assert datetime.now(UTC) < switch_at, "the machine was too slow for the test's 10 s margin"
            assert refused(await report(gw9, "gw-9", 1), "starts at"), "r2 took a report before its supply"
            assert "gw-9" not in r2.relay.latest_telemetry
            assert isinstance(await report(gw1, "gw-1", 2), Ack), "r1 still supplies c-move until the switch"
            async with httpx.AsyncClient(base_url=r1.personal_area.url, follow_redirects=False, timeout=5) as area:  # type: ignore[union-attr]
                answer = await sign_in(area, MOVER[1], MOVER[2])
                assert answer.status_code == 303, "the customer signs in before the switch"
                page = await area.get("/")
                assert page.status_code == 200 and 'id="moved"' not in page.text
                csrf = csrf_of(page.text)
                # The switch time passes.
                await asyncio.sleep(max(0.0, (switch_at - datetime.now(UTC)).total_seconds()) + 0.2)
                # r1 refuses its former customer's reports, and any outcome for the withdrawn command...
                answer_gw1 = await report(gw1, "gw-1", 3)
                assert refused(answer_gw1, "moved to another supplier"), answer_gw1
                assert r1.relay.latest_telemetry["gw-1"].seq == 2
                late = Outcome(request_id=emergency, client_id="c-move", state="executed", detail={})  # type: ignore[arg-type]
                await gw1.publish(topics.up("gateways", "gw-1"), late)
                assert refused(await answer_to(gw1, late.msg_id), "moved to another supplier")
                # ...its personal area shows the customer they have moved and no longer takes schedules...
                page = await area.get("/")
                assert page.status_code == 200 and 'id="moved"' in page.text and "another supplier" in page.text
                change_form = {"csrf": csrf, "windows": "", "hours": "", "max_interruption_min": "",
                               "priority": "", "never_shed": "on"}
                r = await area.post("/appliances/heater", data=change_form)
                assert r.status_code == 403 and "moved to another supplier" in r.text
                assert await r1.personal_area.accounts.latest("c-move") is None  # type: ignore[union-attr]
            async with httpx.AsyncClient(base_url=r1.personal_area.url, follow_redirects=False, timeout=5) as area:  # type: ignore[union-attr]
                r = await sign_in(area, MOVER[1], MOVER[2])
                assert r.status_code == 403 and "moved to another supplier" in r.text
            # ...while r2 takes c-move's reports, and its measurements reach the hub as r2's.
            assert isinstance(await report(gw9, "gw-9", 2, kw=3.25), Ack)
            window = {"client_id": "c-move", "from": switch_at.isoformat(),
                      "to": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()}
            series: list[dict[str, Any]] = []

            async def measured() -> bool:
                series[:] = (await hub.http.get("/v1/measurements", headers=dso, params=window)).json()["series"]
                return bool(series)

            await eventually(measured, "c-move's measurement from r2 stored at the hub", timeout_s=20.0)
            assert [(m["retailer_id"], m["active_power_kw"]) for m in series] == [("r2", 3.25)]
            # The announcement was acknowledged by both retailers.
            assert change is not None
            req = (await hub.http.get(f"/v1/requests/{change}", headers=dso)).json()
            assert req["type"] == "customers" and req["state"] == "completed"
            assert {rid: v["state"] for rid, v in req["retailers"].items()} == {"r1": "acknowledged",
                                                                                "r2": "acknowledged"}
            # The data access log says which retailer was given c-move's supply periods, by which announcement.
            log = (await hub.http.get("/v1/audit", headers=dso, params={
                "client_id": "c-move", "from": (switch_at - timedelta(hours=1)).isoformat(),
                "to": (datetime.now(UTC) + timedelta(minutes=1)).isoformat()})).json()["entries"]
            given = {(e["principal"], e["right"]) for e in log
                     if e["action"] == "receive_supplier_periods" and e["ref"] == change}
            assert given == {("retailer:r1", "retailer:supplier-of-period"),
                             ("retailer:r2", "retailer:supplier-of-period")}
            # Both bridges restart over their stores: what the hub told them holds without a word from the hub.
            told = r1.relay.customer_list.announced["c-move"].revision  # the switch's (the hub's write time)
            await w.stop_bridge("r1")
            await w.stop_bridge("r2")
            r1, r2 = await w.start_bridge("r1"), await w.start_bridge("r2")
            assert refused(await report(gw1, "gw-1", 4), "moved to another supplier")
            assert isinstance(await report(gw9, "gw-9", 3), Ack)
            assert r1.relay.customer_changes_applied == 0 and r2.relay.customer_changes_applied == 0
            assert r1.relay.customer_list.announced["c-move"].revision == told > 2
            # c-stay, which did not move, is untouched at r1.
            assert r1.relay.customer_list.is_customer("c-stay", time.time())


async def test_a_customer_change_lost_with_the_broker_is_resent_by_the_restarted_hub_once(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    # The hub broker snapshots once an hour: a kill -9 loses everything it queued for an offline bridge.
    async with world(tmp_path, mosquitto_factory, autosave_interval=3600) as w:
        hub = w.hub
        assert hub is not None
        r1 = await w.start_bridge("r1")
        await w.start_bridge("r2")
        await w.stop_bridge("r2")  # r2's bridge is down; the broker keeps its session
        await eventually(lambda: hub.app.state.relay.presence.get("r2") == "offline", "r2 offline at the hub",
                   timeout_s=20.0)
        switch_at = datetime.now(UTC) + timedelta(hours=1)
        r = await hub.http.put("/v1/clients/c-move", headers=hub.auth("dso"), json={
            "retailer_id": "r2", "contracted_power_kw": 6.9, "valid_from": switch_at.isoformat()})
        assert r.status_code == 200, r.text
        change = r.json().get("customer_change_request_id")
        assert change is not None, "the switch is announced"
        states: dict[str, str] = {}

        async def delivered() -> bool:
            assert w.hub is not None
            got = (await w.hub.http.get(f"/v1/requests/{change}", headers=w.hub.auth("dso"))).json()
            states.update({rid: v["state"] for rid, v in got["retailers"].items()})
            return states.get("r1") == "acknowledged" and states.get("r2") == "sent"

        await eventually(delivered, "r1 acknowledged, r2's copy queued in the broker", timeout_s=20.0)
        r1_copies = r1.relay.received["hub_customers"]
        # The hub broker crashes with r2's copy queued; the hub stops; both come back.
        w.hub_broker.process.kill()
        await hub.stop()
        w.hub_broker.process.start()
        hub = await w.start_hub()
        r2 = await w.start_bridge("r2")
        with parties(Party(w.local["r2"], "gw-9", topics.down("gateways", "gw-9"))) as (gw9,):
            await eventually(lambda: r2.relay.customer_list.announced.get("c-move") is not None,
                        "the restarted hub re-sent the change to r2", timeout_s=20.0)
            answer = await report(gw9, "gw-9", 1)
            assert refused(answer, "starts at"), "r2 supplies c-move only from the switch"
        states.clear()

        async def completed() -> bool:
            got = (await hub.http.get(f"/v1/requests/{change}", headers=hub.auth("dso"))).json()
            states.update({rid: v["state"] for rid, v in got["retailers"].items()})
            return bool(got["state"] == "completed")

        await eventually(completed, "the announcement completed", timeout_s=20.0)
        assert states == {"r1": "acknowledged", "r2": "acknowledged"}
        assert r2.relay.customer_changes_applied == 1, "applied once"
        stored = await r2.store.customers()
        assert list(stored) == ["c-move"] and stored["c-move"][0] == r2.relay.customer_list.announced["c-move"].revision
        await asyncio.sleep(1.0)  # the restarted hub's dispatcher has run many rounds by now
        assert r1.relay.received["hub_customers"] == r1_copies, "r1 had acknowledged: nothing re-sent to it"
