"""The whole chain of a customer's choice: signed in to the retailer's personal area, the customer marks the water
heater "never switch off"; the bridge pushes the schedule to the real gateway; the next emergency relayed by the
bridge sheds the EV charger instead — on the simulated relay board, over real Modbus TCP."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

from device_drivers.sim.home import Plug, SimulatedHome, split_device_entries
from device_drivers.sim.server import ModbusSimServer
from hems_firmware.config import GatewayConfig
from hems_firmware.daemon import Gateway
from mhp_wire import topics
from mhp_wire.messages import ClientState, EmergencyParams, Outcome, Request, RequestKind
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import Party, parties
from tests.retailer_bridge.personal_area_rig import ALICE, customer, home, running_area


async def test_a_schedule_set_in_the_personal_area_changes_what_the_gateway_sheds(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    sim = SimulatedHome(0.3, [Plug(0, 2.0, "heater", 1, True), Plug(1, 3.7, "ev", 2, True)])
    async with running_area(tmp_path, mosquitto_factory) as rig:
        async with ModbusSimServer({1: sim.meter}, port=0) as meter, ModbusSimServer({1: sim.relays}, port=0) as relay:
            devices = split_device_entries(sim, "127.0.0.1", meter.port, relay.port, timeout_s=1.0)
            gateway = Gateway(GatewayConfig.model_validate({
                "gateway": {"id": "gw-1", "client_id": "c1", "state_dir": str(tmp_path / "gw"),
                            "poll_interval_s": 0.2, "telemetry_interval_s": 0.2,
                            "uplink": {"host": rig.local.host, "port": rig.local.port,
                                       "password": rig.local.identities["gw-1"].password}},
                "devices": devices}))
            task = asyncio.create_task(gateway.run())
            try:
                for _ in range(100):
                    tel = rig.bridge.relay.latest_telemetry.get("gw-1")
                    if tel is not None and "heater" in tel.devices and tel.devices["heater"].get("on") is not None:
                        break
                    await asyncio.sleep(0.05)
                async with customer(rig, ALICE) as alice:
                    _, csrf = await home(alice)
                    r = await alice.post("/appliances/heater", data={
                        "csrf": csrf, "windows": "", "hours": "", "max_interruption_min": "", "priority": "",
                        "never_shed": "on"})
                    assert r.status_code in (200, 303), r.text
                    for _ in range(100):
                        if gateway.schedule is not None and await rig.outbox() == []:
                            break
                        await asyncio.sleep(0.05)
                    page, _ = await home(alice)
                    assert "applied" in page
                assert gateway.appliance("heater") is not None and gateway.appliance("heater").never_shed  # type: ignore[union-attr]
                with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers"))) as (hub,):
                    start = datetime.now(UTC)
                    params = EmergencyParams(start=start, end=start + timedelta(minutes=1), power_limit_kw=1.0)
                    await hub.publish(topics.down("retailers", "r1"), Request(
                        request_id="em-1", kind=RequestKind.EMERGENCY, client_ids=["c1"], params=params,
                        expires_at=params.end))
                    while True:
                        out = await hub.next("outcome", timeout=10)
                        if isinstance(out, Outcome) and out.state.terminal:
                            break
                # the heater the customer keeps on holds the home over the 1 kW limit: not `executed` (issue 13)
                assert out.state is ClientState.LIMIT_NOT_MET, out
                assert out.detail["shed"] == ["ev"]
                assert sim.coil_state(0), "the heater stays on: the customer said never"
                assert not sim.coil_state(1)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
