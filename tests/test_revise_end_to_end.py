"""A revised emergency through the whole chain: ``POST /v1/emergencies`` and ``POST /v1/requests/{id}/revise`` on
the hub (uvicorn) -> hub broker (Mosquitto from broker_config) -> retailer bridge -> retailer broker -> gateway ->
Modbus TCP coils of a simulated relay board, read back through a simulated SDM630. The limit goes from 3 kW to
1.5 kW: the gateway sheds one more load and reports against revision 2; revision 1 delivered late (published as
the bridge would) is ignored and the gateway says so; ``GET`` shows both revisions. A revision that removes a
client cancels it at its gateway, which restores its loads, while the others apply the revision."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from device_drivers.sim.home import Plug, SimulatedHome, split_device_entries
from device_drivers.sim.server import ModbusSimServer
from hems_firmware.config import GatewayConfig
from hems_firmware.daemon import Gateway
from mhp_wire import topics
from mhp_wire.messages import Ack, Cancel, ClientState, Command, EmergencyParams, ErrorReply, RequestKind
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from retailer_bridge.store import BridgeStore, NewCommand
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties
from tests.waiting import eventually

PLUGS = [Plug(0, 2.0, "water-heater", 1, True), Plug(1, 3.7, "ev-charger", 2, True),
         Plug(2, 1.2, "washing-machine", 3, True), Plug(3, 0.15, "fridge", 9, False)]
"""The stack's home (sim.stack): 0.3 kW base load, 7.35 kW with every plug on."""


@dataclass
class Chain:
    """The hub, retailer r1's broker (with a ``tester`` identity privileged like the bridge), and per client its
    simulated home and gateway."""

    hub: HubHandle
    local: BrokerHandle
    homes: dict[str, SimulatedHome]
    gateways: dict[str, Gateway]


@pytest.fixture
async def chain(hub: HubHandle, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[Chain]:
    """Clients c1 and c2 of retailer r1, each with its gateway (gw-1, gw-2) on a simulated meter and relay board,
    every plug on, behind r1's bridge."""
    clients = {"c1": "gw-1", "c2": "gw-2"}
    await hub.setup_registry(dict.fromkeys(clients, "r1"))
    local = mosquitto_factory("retailer", list(clients.values()), "bridge", extra_privileged=["tester"])
    bridge = Bridge(BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub.broker.host, hub_mqtt_port=hub.broker.port,
        hub_mqtt_password=hub.broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", customers=clients, gateway_ack_timeout_s=5))
    homes = {cid: SimulatedHome(0.3, PLUGS) for cid in clients}
    async with contextlib.AsyncExitStack() as stack:
        gateways = {}
        for cid, gid in clients.items():
            home = homes[cid]
            meter = await stack.enter_async_context(ModbusSimServer({1: home.meter}, port=0))
            relay = await stack.enter_async_context(ModbusSimServer({1: home.relays}, port=0))
            for p in PLUGS:
                home.relays.set_coil(p.coil, True)
            gateways[cid] = Gateway(GatewayConfig.model_validate({
                "gateway": {"id": gid, "client_id": cid, "state_dir": str(tmp_path / gid), "poll_interval_s": 0.2,
                            "telemetry_interval_s": 0.5, "restore_interval_s": 0.2,
                            "uplink": {"host": local.host, "port": local.port,
                                       "password": local.identities[gid].password}},
                "devices": split_device_entries(home, "127.0.0.1", meter.port, relay.port, timeout_s=1.0)}))
        tasks = [asyncio.create_task(bridge.run(), name="test-bridge"),
                 *(asyncio.create_task(g.run(), name=f"test-{g.id}") for g in gateways.values())]
        try:
            for _ in range(200):
                if all(bridge.relay.gateway_presence.get(g.id) == "online" and g.measured_kw() is not None
                       for g in gateways.values()):
                    break
                await asyncio.sleep(0.05)
            for g in gateways.values():
                assert g.measured_kw() == pytest.approx(7.35, abs=0.01)
            yield Chain(hub, local, homes, gateways)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def wait_for(hub: HubHandle, request_id: str, revision: int, state: str, client_id: str = "c1",
                   timeout_s: float = 20) -> dict[str, Any]:
    """The request once ``client_id`` is in ``state`` for ``revision``."""

    async def arrived() -> dict[str, Any] | None:
        req: dict[str, Any] = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
        c = req["clients"][client_id]
        return req if c.get("revision", 1) == revision and c["state"] == state else None

    return await eventually(arrived, f"{client_id} {state} for revision {revision}", timeout_s=timeout_s,
                            interval_s=0.05)


async def test_a_revised_emergency_sheds_more_and_a_late_old_revision_is_ignored(chain: Chain) -> None:
    hub, local, home, gateway = chain.hub, chain.local, chain.homes["c1"], chain.gateways["c1"]
    start = datetime.now(UTC) + timedelta(seconds=1)
    r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json={
        "client_ids": ["c1"], "start": start.isoformat(), "duration_s": 120, "power_limit_kw": 3.0})
    assert r.status_code == 202, r.text
    request_id = r.json()["request_id"]

    req = await wait_for(hub, request_id, 1, "executed")
    assert req["state"] == "completed"
    assert req["clients"]["c1"]["detail"]["shed"] == ["water-heater", "ev-charger"]  # 7.35 -> 1.65 kW < 3 kW
    assert home.coil_state(2), "the washing machine stays on under 3 kW"

    r = await hub.http.post(f"/v1/requests/{request_id}/revise", headers=hub.auth("dso"),
                            json={"power_limit_kw": 1.5})
    assert r.status_code == 202, r.text
    assert r.json() == {"request_id": request_id, "revision": 2, "state": "dispatching"}

    req = await wait_for(hub, request_id, 2, "executed")
    c1 = req["clients"]["c1"]
    assert c1["detail"]["limit_kw"] == 1.5
    assert c1["detail"]["shed"] == ["water-heater", "ev-charger", "washing-machine"]  # 1.65 -> 0.45 kW < 1.5 kW
    assert not home.coil_state(2) and not home.coil_state(0) and not home.coil_state(1)
    assert home.coil_state(3), "the fridge is never shed"
    assert home.total_power_kw() == pytest.approx(0.45)
    assert req["state"] == "completed"

    # Revision 1 again, late, on the gateway's command topic as the bridge would send it.
    params = EmergencyParams(start=start, end=start + timedelta(seconds=120), power_limit_kw=3.0)
    late = Command(request_id=request_id, client_id="c1", kind=RequestKind.EMERGENCY, params=params,
                   expires_at=params.end, revision=1)
    with parties(Party(local, "tester", topics.up("gateways", "gw-1"))) as (tester,):
        await tester.publish(topics.down("gateways", "gw-1"), late)
        acked = refused = None
        while acked is None or refused is None:
            msg = await tester.next(timeout=10)
            if isinstance(msg, Ack) and late.msg_id in msg.ack_ids:
                acked = msg
            elif isinstance(msg, ErrorReply) and msg.ref_msg_id == late.msg_id:
                refused = msg
    assert refused.code == "stale_revision"
    assert refused.message == (f"request {request_id}: revision 1 arrived after revision 2, which this gateway "
                               "applies; ignored")
    assert gateway.active[request_id].limit_kw == 1.5, "the gateway still holds revision 2"
    await asyncio.sleep(0.5)  # a few polls: nothing comes back on
    assert not home.coil_state(2) and home.total_power_kw() == pytest.approx(0.45)

    req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
    assert req["revision"] == 2
    assert [(v["revision"], v["request"]["power_limit_kw"]) for v in req["revisions"]] == [(1, 3.0), (2, 1.5)]
    assert req["revisions"][1]["changes"] == {"power_limit_kw": 1.5}
    c1 = req["clients"]["c1"]
    assert (c1["state"], c1["revision"]) == ("executed", 2)
    assert [(h["revision"], h["state"], h["detail"]["shed"]) for h in c1["history"]] == [
        (1, ClientState.EXECUTED.value, ["water-heater", "ev-charger"])]


async def test_a_revision_that_removes_a_client_cancels_it_at_its_gateway(chain: Chain) -> None:
    hub = chain.hub
    r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json={
        "client_ids": ["c1", "c2"], "start": (datetime.now(UTC) + timedelta(seconds=1)).isoformat(),
        "duration_s": 120, "power_limit_kw": 3.0})
    assert r.status_code == 202, r.text
    request_id = r.json()["request_id"]
    await wait_for(hub, request_id, 1, "executed", "c1")
    await wait_for(hub, request_id, 1, "executed", "c2")
    assert not chain.homes["c2"].coil_state(0) and not chain.homes["c2"].coil_state(1)

    r = await hub.http.post(f"/v1/requests/{request_id}/revise", headers=hub.auth("dso"),
                            json={"client_ids": ["c1"], "power_limit_kw": 1.5})
    assert r.status_code == 202, r.text
    req = await wait_for(hub, request_id, 2, "executed", "c1")
    assert req["clients"]["c1"]["detail"]["shed"] == ["water-heater", "ev-charger", "washing-machine"]
    c2 = req["clients"]["c2"]
    assert (c2["state"], c2["revision"], c2["detail"]) == (
        "cancelled", 2, {"reason": "removed from the request by revision 2"})
    assert req["state"] == "completed", "a removed client does not make the request cancelled"

    # c2's gateway got the removal: its action ends and its loads come back, one per restore interval.
    gw2 = chain.gateways["c2"]
    for _ in range(200):
        if request_id not in gw2.active and all(chain.homes["c2"].coil_state(p.coil) for p in PLUGS):
            break
        await asyncio.sleep(0.05)
    assert request_id not in gw2.active
    assert all(chain.homes["c2"].coil_state(p.coil) for p in PLUGS), "c2's loads are restored"
    assert chain.gateways["c1"].active[request_id].limit_kw == 1.5
    assert not chain.homes["c1"].coil_state(2)

    # A removal from an older revision arriving late (a client removed by one revision and added back by the next
    # would see one) does not stop the revision the gateway holds.
    with parties(Party(chain.local, "tester", topics.up("gateways", "gw-1"))) as (tester,):
        stale = Cancel(request_id=request_id, client_ids=["c1"], revision=1)
        await tester.publish(topics.down("gateways", "gw-1"), stale)
        refused = await tester.next("error", timeout=10)
    assert isinstance(refused, ErrorReply) and refused.ref_msg_id == stale.msg_id
    assert refused.code == "stale_revision"
    assert chain.gateways["c1"].active[request_id].limit_kw == 1.5


async def test_a_bridge_database_from_before_revisions_takes_them(tmp_path: Path) -> None:
    """A bridge upgraded in place: its stored commands (no revision column) count as revision 1, and a newer
    revision replaces one; an older or equal one changes nothing."""
    path = tmp_path / "bridge.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(
            "CREATE TABLE commands (request_id TEXT NOT NULL, client_id TEXT NOT NULL, gateway_id TEXT NOT NULL, "
            "msg_id TEXT NOT NULL UNIQUE, payload BLOB NOT NULL, state TEXT NOT NULL, received_at REAL NOT NULL, "
            "first_sent_at REAL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, "
            "deadline REAL NOT NULL, handling_ms REAL NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0, "
            "PRIMARY KEY (request_id, client_id))")
        db.execute("INSERT INTO commands (request_id, client_id, gateway_id, msg_id, payload, state, received_at, "
                   "first_sent_at, attempts, next_attempt_at, deadline) VALUES "
                   "('q1', 'c1', 'gw-1', 'm1', x'7b7d', 'closed', 1, 2, 3, 4, 9e9)")
        db.commit()
    store = BridgeStore(path)
    await store.open()
    try:
        [old] = await store.commands_of("q1")
        assert (old["revision"], old["state"], old["msg_id"]) == (1, "closed", "m1")
        again = NewCommand("q1", "c1", "gw-1", "m1-again", b"{}", 10, 9e9, 0, revision=1)
        assert await store.accept_request([again], []) == 0
        newer = NewCommand("q1", "c1", "gw-1", "m2", b'{"revision":2}', 10, 9e9, 5, revision=2)
        assert await store.accept_request([newer], []) == 1
        [row] = await store.commands_of("q1")
        assert (row["revision"], row["state"], row["msg_id"], row["attempts"], row["first_sent_at"]) == (
            2, "sending", "m2", 0, None)
        assert await store.accept_request([again], []) == 0
        assert (await store.commands_of("q1"))[0]["msg_id"] == "m2"
    finally:
        await store.close()
