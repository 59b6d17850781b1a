"""A revised emergency through the whole chain: ``POST /v1/emergencies`` and ``POST /v1/requests/{id}/revise`` on
the hub (uvicorn) -> hub broker (Mosquitto from broker_config) -> retailer bridge -> retailer broker -> gateway ->
Modbus TCP coils of a simulated relay board, read back through a simulated SDM630. The limit goes from 3 kW to
1.5 kW: the gateway sheds one more load and reports against revision 2; revision 1 delivered late (published as
the bridge would) is ignored and the gateway says so; ``GET`` shows both revisions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from device_drivers.sim.home import Plug, SimulatedHome, split_device_entries
from device_drivers.sim.server import ModbusSimServer
from hems_firmware.config import GatewayConfig
from hems_firmware.daemon import Gateway
from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Command, EmergencyParams, ErrorReply, RequestKind
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties

PLUGS = [Plug(0, 2.0, "water-heater", 1, True), Plug(1, 3.7, "ev-charger", 2, True),
         Plug(2, 1.2, "washing-machine", 3, True), Plug(3, 0.15, "fridge", 9, False)]
"""The stack's home (sim.stack): 0.3 kW base load, 7.35 kW with every plug on."""


@pytest.fixture
async def chain(hub: HubHandle, tmp_path: Path, mosquitto_factory: MosquittoFactory
                ) -> AsyncIterator[tuple[HubHandle, BrokerHandle, SimulatedHome, Gateway]]:
    """The hub, retailer r1's bridge and broker (with a ``tester`` identity privileged like the bridge), and the
    gateway of client c1 with its simulated meter and relay board, every plug on and its telemetry at the bridge."""
    await hub.setup_registry({"c1": "r1"})
    local = mosquitto_factory("retailer", ["gw-1"], "bridge", extra_privileged=["tester"])
    bridge = Bridge(BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub.broker.host, hub_mqtt_port=hub.broker.port,
        hub_mqtt_password=hub.broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", customers={"c1": "gw-1"}, gateway_ack_timeout_s=5))
    home = SimulatedHome(0.3, PLUGS)
    async with ModbusSimServer({1: home.meter}, port=0) as meter, ModbusSimServer({1: home.relays}, port=0) as relay:
        for p in PLUGS:
            home.relays.set_coil(p.coil, True)
        gateway = Gateway(GatewayConfig.model_validate({
            "gateway": {"id": "gw-1", "client_id": "c1", "state_dir": str(tmp_path / "gw"), "poll_interval_s": 0.2,
                        "telemetry_interval_s": 0.5,
                        "uplink": {"host": local.host, "port": local.port,
                                   "password": local.identities["gw-1"].password}},
            "devices": split_device_entries(home, "127.0.0.1", meter.port, relay.port, timeout_s=1.0)}))
        tasks = [asyncio.create_task(bridge.run(), name="test-bridge"),
                 asyncio.create_task(gateway.run(), name="test-gateway")]
        try:
            for _ in range(200):
                if bridge.relay.gateway_presence.get("gw-1") == "online" and gateway.measured_kw() is not None:
                    break
                await asyncio.sleep(0.05)
            assert gateway.measured_kw() == pytest.approx(7.35, abs=0.01)
            yield hub, local, home, gateway
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def wait_for(hub: HubHandle, request_id: str, revision: int, state: str, timeout_s: float = 20
                   ) -> dict[str, Any]:
    """The request once client c1 is in ``state`` for ``revision``."""
    for _ in range(int(timeout_s * 20)):
        req: dict[str, Any] = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
        c1 = req["clients"]["c1"]
        if c1.get("revision", 1) == revision and c1["state"] == state:
            return req
        await asyncio.sleep(0.05)
    raise AssertionError(f"c1 not {state} for revision {revision}: {req}")


async def test_a_revised_emergency_sheds_more_and_a_late_old_revision_is_ignored(
        chain: tuple[HubHandle, BrokerHandle, SimulatedHome, Gateway]) -> None:
    hub, local, home, gateway = chain
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
