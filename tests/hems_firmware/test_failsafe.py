"""The gateway's failsafe (issue 13, item 8): when it loses its bridge for longer than ``after_s`` it holds the home
under a configured import limit, never below the configured legal floor, for at most ``duration_s`` (or until the
uplink is back), reports it in its telemetry when it reconnects, and shows it on the live page.

Time is the gateway's injected clock, driven by the test; the uplink is lost by stopping the real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from device_drivers.sim.home import Plug, SimulatedHome, split_device_entries
from device_drivers.sim.server import ModbusSimServer
from hems_firmware.config import ConfigError, GatewayConfig
from hems_firmware.controller import Failsafe, failsafe_step
from hems_firmware.daemon import FAILSAFE_ID, Gateway
from hems_firmware.web import bound_address
from mhp_wire import topics
from mhp_wire.messages import Ack, Telemetry
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.mqtt_party import Party, parties
from tests.waiting import eventually

AFTER_S, DURATION_S = 60.0, 600.0


def test_the_failsafe_applies_after_the_delay_once_per_outage_and_is_bounded() -> None:
    steps = [  # (connected, now, action expected)
        (True, 0.0, None),
        (False, 10.0, None),       # lost at 10
        (False, 69.9, None),
        (False, 70.0, "apply"),    # 60 s later
        (False, 400.0, None),
        (False, 670.0, "release"),  # 600 s after it applied
        (False, 5000.0, None),     # not again in the same outage
        (True, 5001.0, None),
        (False, 6000.0, None),     # a new outage
        (False, 6060.0, "apply"),
        (True, 6100.0, "release"),  # the bridge is back before the end
    ]
    fs = Failsafe()
    for connected, now, expected in steps:
        fs, what = failsafe_step(fs, connected, now, AFTER_S, DURATION_S)
        assert what == expected, (connected, now)
    assert fs == Failsafe()


def test_a_failsafe_limit_below_the_legal_floor_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nid = "gw-1"\nclient_id = "c1"\n\n[gateway.failsafe]\nafter_s = 60\nlimit_kw = 0.5\n'
                    'duration_s = 3600\nfloor_kw = 1.5\n')
    with pytest.raises(ConfigError) as err:
        GatewayConfig.load(path)
    assert "gateway.failsafe: Value error, limit_kw (0.5 kW) is below the legal floor floor_kw (1.5 kW)" in str(
        err.value)
    path.write_text(path.read_text().replace("limit_kw = 0.5", "limit_kw = 2.0"))
    fs = GatewayConfig.load(path).gateway.failsafe
    assert fs is not None and (fs.after_s, fs.limit_kw, fs.duration_s, fs.floor_kw) == (60, 2.0, 3600, 1.5)


class FakeClock:
    """The gateway's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    home: SimulatedHome
    gateway: Gateway
    broker: BrokerHandle
    clock: FakeClock


@asynccontextmanager
async def running(tmp_path: Path, factory: MosquittoFactory) -> AsyncIterator[Rig]:
    broker = factory("retailer", ["gw-1"], "bridge")
    home = SimulatedHome(0.3, [Plug(0, 2.0, "heater", 1, True), Plug(1, 3.7, "ev", 2, True),
                               Plug(3, 0.15, "fridge", 9, False)])
    clock = FakeClock()
    async with ModbusSimServer({1: home.meter}, port=0) as meter, ModbusSimServer({1: home.relays}, port=0) as relay:
        cfg = GatewayConfig.model_validate({
            "gateway": {"id": "gw-1", "client_id": "c1", "state_dir": str(tmp_path / "gw"), "poll_interval_s": 0.1,
                        "restore_interval_s": 5, "contracted_power_kw": 6.9, "telemetry_interval_s": 0.2,
                        "web_port": 0,
                        "failsafe": {"after_s": AFTER_S, "limit_kw": 4.5, "duration_s": DURATION_S,
                                     "floor_kw": 4.0},
                        "uplink": {"host": broker.host, "port": broker.port,
                                   "password": broker.identities["gw-1"].password}},
            "devices": split_device_entries(home, "127.0.0.1", meter.port, relay.port, timeout_s=0.3)})
        gw = Gateway(cfg, clock=clock)
        task = asyncio.create_task(gw.run())
        await eventually(lambda: gw.link is not None and gw.link.connected and "heater" in gw.state
                    and bound_address(gw) is not None)
        try:
            yield Rig(home, gw, broker, clock)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task



async def polls(gw: Gateway, n: int = 3) -> None:
    """Let the gateway's poll loop run ``n`` more control steps."""
    await asyncio.sleep(n * gw.cfg.gateway.poll_interval_s + 0.05)


async def lose_the_bridge(rig: Rig) -> None:
    rig.broker.process.stop()
    await eventually(lambda: rig.gateway.link is not None and not rig.gateway.link.connected)
    await polls(rig.gateway)
    assert rig.gateway.failsafe.lost_at == rig.clock.now


async def page_state(gw: Gateway) -> dict[str, object]:
    address = bound_address(gw)
    assert address is not None
    async with httpx.AsyncClient(base_url=f"http://{address[0]}:{address[1]}") as http:
        state: dict[str, object] = (await http.get("/api/state")).json()
        return state


async def reports_after_reconnect(rig: Rig, want: str) -> list[Telemetry]:
    """Start the broker again and collect the gateway's telemetry until one reports the failsafe ``want``."""
    rig.broker.process.start()
    seen: list[Telemetry] = []
    with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
        for _ in range(200):
            msg = await bridge.next("telemetry", timeout=10)
            assert isinstance(msg, Telemetry)
            seen.append(msg)
            await bridge.publish(topics.down("gateways", "gw-1"), Ack(ack_ids=[msg.msg_id]))
            if msg.failsafe is not None and msg.failsafe.state == want:
                break
    return seen


async def test_the_failsafe_holds_the_limit_for_its_duration_and_is_reported_on_reconnect(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    async with running(tmp_path, mosquitto_factory) as rig:
        gw = rig.gateway
        await lose_the_bridge(rig)
        rig.clock.now += AFTER_S - 1
        await polls(gw)
        assert FAILSAFE_ID not in gw.active and rig.home.coil_state(0), "not before after_s"
        rig.clock.now += 1
        await eventually(lambda: FAILSAFE_ID in gw.active and not rig.home.coil_state(0))
        assert gw.active[FAILSAFE_ID].limit_kw == 4.5
        assert rig.home.coil_state(1), "4.15 kW: the heater was enough to get under 4.5 kW"
        state = await page_state(gw)
        assert [a["kind"] for a in state["active"]] == ["failsafe"]  # type: ignore[index, union-attr]
        assert state["failsafe"]["report"]["state"] == "active"  # type: ignore[index, call-overload]
        rig.clock.now += DURATION_S - 1
        await polls(gw)
        assert FAILSAFE_ID in gw.active and not rig.home.coil_state(0), "held for its whole duration"
        rig.clock.now += 1
        await eventually(lambda: FAILSAFE_ID not in gw.active and rig.home.coil_state(0))
        rig.clock.now += 10 * DURATION_S
        await polls(gw)
        assert FAILSAFE_ID not in gw.active and rig.home.coil_state(0), "applied once per outage: bounded"
        seen = await reports_after_reconnect(rig, "ended")
    reports = [t.failsafe for t in seen if t.failsafe is not None]
    assert reports[0].state == "active" and reports[0].limit_kw == 4.5 and reports[0].offline_s == AFTER_S
    assert reports[0].shed == ["heater"]
    last = reports[-1]
    assert last.state == "ended" and last.ended_by == "duration" and last.shed == ["heater"]
    assert last.ended_at is not None and last.ended_at >= last.started_at
    assert gw.failsafe_report is None, "an ended failsafe is reported once"


async def test_the_failsafe_ends_when_the_bridge_is_back(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    async with running(tmp_path, mosquitto_factory) as rig:
        gw = rig.gateway
        await lose_the_bridge(rig)
        rig.clock.now += AFTER_S
        await eventually(lambda: FAILSAFE_ID in gw.active and not rig.home.coil_state(0))
        seen = await reports_after_reconnect(rig, "ended")
        assert FAILSAFE_ID not in gw.active
        for _ in range(50):  # loads come back one per restore interval on the gateway's clock
            if rig.home.coil_state(0):
                break
            rig.clock.now += 5
            await polls(gw, 1)
        assert rig.home.coil_state(0)
    last = seen[-1].failsafe
    assert last is not None and last.state == "ended" and last.ended_by == "reconnected"


async def test_loads_the_failsafe_shed_come_back_after_a_restart(tmp_path: Path,
                                                                 mosquitto_factory: MosquittoFactory) -> None:
    """The gateway stops while its failsafe holds loads off (its task ends without finishing anything, as in a
    crash) and starts again with its bridge reachable: the failsafe is not resumed, and what it shed comes back."""
    async with running(tmp_path, mosquitto_factory) as rig:
        await lose_the_bridge(rig)
        rig.clock.now += AFTER_S
        await eventually(lambda: FAILSAFE_ID in rig.gateway.active and not rig.home.coil_state(0))
        cfg, broker, home = rig.gateway.cfg, rig.broker, rig.home
    assert not home.coil_state(0), "the board holds what the failsafe shed"
    await restart_brings_the_heater_back(cfg, broker, home)


async def restart_brings_the_heater_back(cfg: GatewayConfig, broker: BrokerHandle, home: SimulatedHome) -> None:
    """Start the stopped gateway again (new device servers, its bridge's broker back) and see the heater come back
    on, the failsafe not resumed and nothing left to restore."""
    broker.process.start()
    async with ModbusSimServer({1: home.meter}, port=0) as meter, ModbusSimServer({1: home.relays}, port=0) as relay:
        devices = split_device_entries(home, "127.0.0.1", meter.port, relay.port, timeout_s=0.3)
        again = Gateway(cfg.model_copy(update={"devices": GatewayConfig.model_validate(
            {"gateway": cfg.gateway.model_dump(), "devices": devices}).devices}), clock=FakeClock())
        task = asyncio.create_task(again.run())
        try:
            # Both: the coil is on before the gateway's switch returns (it reads the coil back) and forgets the load.
            await eventually(lambda: home.coil_state(0) and not again.to_restore, "the heater back on and forgotten")
            assert FAILSAFE_ID not in again.active
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
