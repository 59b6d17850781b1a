"""The gateway daemon against a real retailer broker (a paho test bridge) and a simulated home served over real
Modbus TCP: acknowledge, execute at start, report, never twice; refuse late and foreign commands."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_drivers.sim.home import Plug, SimulatedHome, split_device_entries
from device_drivers.sim.server import ModbusSimServer
from hems_firmware.config import GatewayConfig
from hems_firmware.daemon import Gateway
from mhp_wire import topics
from mhp_wire.messages import (
    Ack,
    ApplianceSchedule,
    Cancel,
    ClientState,
    Command,
    EmergencyParams,
    ErrorReply,
    LoadReductionParams,
    LoadShiftParams,
    Outcome,
    RequestKind,
    Schedule,
    Telemetry,
)
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.mqtt_party import Party, parties


@dataclass
class Rig:
    home: SimulatedHome
    gateway: Gateway
    broker: BrokerHandle


@pytest.fixture
async def rig(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[Rig]:
    broker = mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")
    home = SimulatedHome(0.3, [Plug(0, 2.0, "heater", 1, True), Plug(1, 3.7, "ev", 2, True),
                               Plug(3, 0.15, "fridge", 9, False)])
    async with ModbusSimServer({1: home.meter}, port=0) as meter, ModbusSimServer({1: home.relays}, port=0) as relay:
        devices = split_device_entries(home, "127.0.0.1", meter.port, relay.port)
        cfg = GatewayConfig.model_validate({
            "gateway": {"id": "gw-1", "client_id": "c1", "state_dir": str(tmp_path / "gw"), "poll_interval_s": 0.2,
                        "restore_interval_s": 0.1, "contracted_power_kw": 6.9,
                        "telemetry_interval_s": 0.2,
                        # the simulated meter shows a switch at once: no need to wait for it to settle
                        "outcome_settle_s": 0.2, "outcome_poll_s": 0.1,
                        "uplink": {"host": broker.host, "port": broker.port,
                                   "password": broker.identities["gw-1"].password}},
            "devices": devices})
        gw = Gateway(cfg)
        task = asyncio.create_task(gw.run())
        for _ in range(200):
            if gw.link is not None and gw.link.connected and gw.state:
                break
            await asyncio.sleep(0.02)
        try:
            yield Rig(home, gw, broker)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def command(client_id: str = "c1", lead_s: float = 0.3, duration_s: float = 30, limit: float = 1.0,
            request_id: str = "q1") -> Command:
    start = datetime.now(UTC) + timedelta(seconds=lead_s)
    params = EmergencyParams(start=start, end=start + timedelta(seconds=duration_s), power_limit_kw=limit)
    return Command(request_id=request_id, client_id=client_id, kind=RequestKind.EMERGENCY, params=params,
                   expires_at=params.end)


async def test_emergency_is_acked_executed_at_start_reported_once_and_restored_at_the_end(rig: Rig) -> None:
    with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
        cmd = command(lead_s=0.5, duration_s=1.5)
        await bridge.publish(topics.down("gateways", "gw-1"), cmd)
        ack = await bridge.next("ack")
        assert isinstance(ack, Ack) and ack.ack_ids == [cmd.msg_id]
        assert rig.home.coil_state(0), "nothing switches before the emergency starts"
        out = await bridge.next("outcome", timeout=5)
        assert isinstance(out, Outcome)
        assert out.state is ClientState.EXECUTED and out.client_id == "c1"
        assert out.detail["measured_kw_before"] == pytest.approx(6.15, abs=0.01)
        assert out.detail["shed"] == ["heater", "ev"]
        assert out.trace["waited_ms"] >= 300
        assert not rig.home.coil_state(0) and not rig.home.coil_state(1) and rig.home.coil_state(3)
        assert rig.home.total_power_kw() == pytest.approx(0.45)
        # The same command again (QoS 1 redelivery): acknowledged, not executed twice.
        await bridge.publish(topics.down("gateways", "gw-1"), cmd)
        assert (await bridge.next("ack")).ack_ids == [cmd.msg_id]  # type: ignore[union-attr]
        # Until the bridge acknowledges the outcome, the gateway sends it again.
        again = await bridge.next("outcome", timeout=3)
        assert again.msg_id == out.msg_id
        await bridge.publish(topics.down("gateways", "gw-1"), Ack(ack_ids=[out.msg_id]))
        for _ in range(60):
            if rig.home.coil_state(0) and rig.home.coil_state(1):
                break
            await asyncio.sleep(0.05)
        assert rig.home.coil_state(0) and rig.home.coil_state(1), "loads restored after the end"
        assert [a.request_id for a in rig.gateway.actuations] == ["q1"] * 4


async def test_a_command_starting_during_a_poll_switches_each_load_once(rig: Rig,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The poll loop and a starting command each read the devices, plan and switch: one control step at a time, or
    one plans while the other is switching and switches the same loads again (duplicate rows on the gateway page)."""
    for sw in rig.gateway.switches.values():
        fast_set = sw.set

        async def slow_set(on: bool, fast_set: Callable[[bool], Awaitable[bool]] = fast_set) -> bool:
            await asyncio.sleep(0.12)  # a slow bus: a plan made meanwhile still sees the load on
            return await fast_set(on)

        monkeypatch.setattr(sw, "set", slow_set)
    with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
        for i in range(3):
            await bridge.publish(topics.down("gateways", "gw-1"), command(lead_s=0, request_id=f"q{i}"))
            out = await bridge.next("outcome", timeout=5)
            assert isinstance(out, Outcome) and out.state is ClientState.EXECUTED
    offs = Counter(a.device for a in rig.gateway.actuations if not a.on)
    assert offs == {"heater": 1, "ev": 1}, rig.gateway.actuations


async def test_the_limiter_holds_the_home_when_load_appears_during_the_emergency(rig: Rig) -> None:
    with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
        await bridge.publish(topics.down("gateways", "gw-1"), command(lead_s=0, limit=4.5))
        out = await bridge.next("outcome", timeout=5)
        assert out.detail["shed"] == ["heater"]  # type: ignore[union-attr]
        assert rig.home.coil_state(1)
        rig.home.set_base_load_kw(1.5)  # the household switches on the oven: 5.35 kW, over the limit
        for _ in range(60):
            if not rig.home.coil_state(1):
                break
            await asyncio.sleep(0.05)
        assert not rig.home.coil_state(1), "the next poll sheds the EV charger"
        assert rig.home.total_power_kw() <= 4.5


async def test_late_and_foreign_commands_and_garbage_are_refused(rig: Rig) -> None:
    with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
        late = command(lead_s=-60, duration_s=30)
        await bridge.publish(topics.down("gateways", "gw-1"), late)
        out = await bridge.next("outcome")
        assert isinstance(out, Outcome) and out.state is ClientState.REFUSED
        assert "expired" in out.detail["reason"]
        foreign = command(client_id="c2", request_id="q2")
        await bridge.publish(topics.down("gateways", "gw-1"), foreign)
        err = await bridge.next("error")
        assert isinstance(err, ErrorReply) and err.code == "forbidden"
        await bridge.publish(topics.down("gateways", "gw-1"), b"{not json")
        err = await bridge.next("error")
        assert isinstance(err, ErrorReply) and err.code == "invalid"
        assert rig.gateway.rejected == 2
        assert all(rig.home.coil_state(c) for c in (0, 1, 3)), "nothing was switched"
        telemetry = await bridge.next("telemetry")
        assert isinstance(telemetry, Telemetry)
        assert telemetry.devices["meter"]["active_power_kw"] == pytest.approx(6.15, abs=0.01)


async def test_a_gateway_cannot_command_another_gateway(rig: Rig) -> None:
    """The broker ACL stops gw-2 from publishing on gw-1's command topic: gw-1 never sees it."""
    with parties(Party(rig.broker, "gw-2"), Party(rig.broker, "bridge", topics.all_up("gateways"))) as (gw2, bridge):
        rc = await asyncio.to_thread(gw2.client.publish, topics.down("gateways", "gw-1"),
                                     command(lead_s=0).model_dump_json().encode(), 1)
        assert rc is not None and rc.is_failure, "Mosquitto refuses the publish (MQTT 5 reason code)"
        await bridge.nothing("ack", within=1.0)
        assert rig.home.coil_state(0)


def shift_or_reduction(kind: str, lead_s: float = 0.3, duration_s: float = 30, request_id: str = "q9") -> Command:
    start = datetime.now(UTC) + timedelta(seconds=lead_s)
    end = start + timedelta(seconds=duration_s)
    params = (LoadShiftParams(start=start, end=end, reason="peak") if kind == "load_shift"
              else LoadReductionParams(start=start, end=end, target_kw=5.0))
    return Command(request_id=request_id, client_id="c1", kind=RequestKind(kind), params=params, expires_at=end)


async def test_load_shift_is_acknowledged_at_once_and_keeps_flexible_loads_off_in_the_window(rig: Rig) -> None:
    with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
        await bridge.publish(topics.down("gateways", "gw-1"), shift_or_reduction("load_shift", 0.8, 1.5))
        out = await bridge.next("outcome")
        assert isinstance(out, Outcome) and out.state is ClientState.ACKNOWLEDGED
        assert out.detail["will_shift"] == ["heater", "ev"]
        assert rig.home.coil_state(0), "nothing moves before the window"

        def switched(on: bool) -> set[str]:
            return {a.device for a in rig.gateway.actuations if a.request_id == "q9" and a.on is on}

        for _ in range(100):  # judged on the gateway's actuation log, not on a sample of coil states in time
            if switched(False) == {"heater", "ev"} and switched(True) == {"heater", "ev"}:
                break
            await asyncio.sleep(0.05)
        assert switched(False) == {"heater", "ev"}, "flexible loads off in the window"
        assert switched(True) == {"heater", "ev"}, "back on after the window"
        assert rig.home.coil_state(3), "the fridge is not flexible"
        offs = [a.at for a in rig.gateway.actuations if a.request_id == "q9" and not a.on]
        ons = [a.at for a in rig.gateway.actuations if a.request_id == "q9" and a.on]
        assert max(offs) < min(ons)
        assert rig.home.coil_state(0) and rig.home.coil_state(1)


async def test_load_reduction_sheds_every_sheddable_load_and_reports_executed(rig: Rig) -> None:
    with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
        await bridge.publish(topics.down("gateways", "gw-1"), shift_or_reduction("load_reduction", 0))
        out = await bridge.next("outcome")
        assert isinstance(out, Outcome) and out.state is ClientState.EXECUTED
        assert out.detail["shed"] == ["heater", "ev"]
        assert rig.home.total_power_kw() == pytest.approx(0.45)


async def test_cancel_before_start_and_while_active(rig: Rig) -> None:
    with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
        early = command(lead_s=30, request_id="qa")
        await bridge.publish(topics.down("gateways", "gw-1"), early)
        await bridge.next("ack")
        cancel = Cancel(request_id="qa", client_ids=["c1"])
        await bridge.publish(topics.down("gateways", "gw-1"), cancel)
        assert (await bridge.next("ack")).ack_ids == [cancel.msg_id]  # type: ignore[union-attr]
        assert "qa" not in rig.gateway._tasks, "the waiting emergency is dropped"
        now = command(lead_s=0, request_id="qb")
        await bridge.publish(topics.down("gateways", "gw-1"), now)
        await bridge.next("outcome")
        assert not rig.home.coil_state(0)
        cancel = Cancel(request_id="qb", client_ids=["c1"])
        await bridge.publish(topics.down("gateways", "gw-1"), cancel)
        await bridge.next("ack")
        assert "qb" not in rig.gateway.active
        for _ in range(40):
            if rig.home.coil_state(0) and rig.home.coil_state(1):
                break
            await asyncio.sleep(0.05)
        assert rig.home.coil_state(0) and rig.home.coil_state(1), "what it shed comes back, one load per interval"


async def test_telemetry_is_buffered_while_the_broker_is_down_and_replayed_in_order(rig: Rig) -> None:
    """The broker stops for a while: the gateway keeps polling and stores its telemetry; when the broker is back
    every telemetry message arrives, none lost, first deliveries in order; acknowledged ones are dropped."""
    seen: list[int] = []
    with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
        first = await bridge.next("telemetry")
        assert isinstance(first, Telemetry)
        rig.broker.process.stop()
        await asyncio.sleep(1.5)  # about seven polls without an uplink
        assert rig.gateway.link is not None and not rig.gateway.link.connected
    rig.broker.process.start()
    with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
        deadline = asyncio.get_running_loop().time() + 8
        while asyncio.get_running_loop().time() < deadline:
            try:
                msg = await bridge.next("telemetry", timeout=0.5)
            except TimeoutError:
                continue
            assert isinstance(msg, Telemetry)
            if msg.seq not in seen:
                seen.append(msg.seq)
                await bridge.publish(topics.down("gateways", "gw-1"), Ack(ack_ids=[msg.msg_id]))
            if len(seen) > 12 and seen[-1] >= first.seq + 12:
                break
    after = [s for s in seen if s > first.seq]
    assert after[:12] == list(range(first.seq + 1, first.seq + 13)), f"lost or reordered: {seen}"
    left = await rig.gateway.store.sql.read(lambda db: db.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0])
    assert left < 5, "acknowledged telemetry is dropped from the buffer"


async def test_systemd_ready_and_watchdog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from hems_firmware.systemd import Notifier

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "2000000")
        n = Notifier()
        assert n.interval_s == 1.0
        n.ready()
        n.alive()
        n.alive()  # within half the watchdog period: not sent again
        assert sock.recv(64) == b"READY=1"
        assert sock.recv(64) == b"WATCHDOG=1"
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(64)
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert Notifier().notify("READY=1") is False


async def test_the_limiter_holds_a_home_through_a_scripted_day_end_to_end(rig: Rig) -> None:
    """A compressed day on the real gateway and simulated devices: the household's base load moves through the
    day's profile while an emergency at 3 kW holds; after each poll the import stays under the limit whenever
    shedding can achieve it, and once the emergency ends what was shed comes back under the contracted power."""
    profile = [0.3, 0.8, 1.5, 0.5, 2.2, 1.2, 0.4, 2.8, 0.6]  # kW, one step per few polls
    with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
        await bridge.publish(topics.down("gateways", "gw-1"), command(lead_s=0, duration_s=len(profile) * 0.6 + 0.5,
                                                                         limit=3.0, request_id="day"))
        await bridge.next("outcome")
        for kw in profile:
            rig.home.set_base_load_kw(kw)
            await asyncio.sleep(0.6)  # three polls
            feasible = kw + 0.15 <= 3.0
            if feasible:
                assert rig.home.total_power_kw() <= 3.0 + 1e-9, f"base {kw} kW: home at {rig.home.total_power_kw()}"
        rig.home.set_base_load_kw(0.3)
        for _ in range(60):
            if rig.home.coil_state(0) and rig.home.coil_state(1):
                break
            await asyncio.sleep(0.1)
        assert rig.home.coil_state(0) and rig.home.coil_state(1), "restored after the emergency"
        assert rig.home.total_power_kw() <= 6.9


async def test_the_customers_schedule_changes_what_the_gateway_sheds(rig: Rig) -> None:
    """The personal area's schedule reaches the gateway: an appliance marked never-shed is kept on, another's
    priority moves it first in line, and a bounded interruption brings a load back in time."""
    with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
        sched = Schedule(client_id="c1", version=1, appliances=[
            ApplianceSchedule(device="heater", never_shed=True),
            ApplianceSchedule(device="ev", priority=0, max_interruption_s=1.0)])
        await bridge.publish(topics.down("gateways", "gw-1"), sched)
        assert (await bridge.next("ack")).ack_ids == [sched.msg_id]  # type: ignore[union-attr]
        await bridge.publish(topics.down("gateways", "gw-1"), command(lead_s=0, limit=1.0, request_id="qs"))
        out = await bridge.next("outcome")
        assert out.detail["shed"] == ["ev"], "the heater is never shed, whatever the limit"  # type: ignore[union-attr]
        assert rig.home.coil_state(0) and not rig.home.coil_state(1)
        for _ in range(40):
            if rig.home.coil_state(1):
                break
            await asyncio.sleep(0.1)
        assert rig.home.coil_state(1), "the EV is back after its longest interruption"
        older = Schedule(client_id="c1", version=1, appliances=[])
        await bridge.publish(topics.down("gateways", "gw-1"), older)
        await bridge.next("ack")
        assert rig.gateway.schedule is not None and rig.gateway.schedule.appliances, "an older version changes nothing"
        foreign = Schedule(client_id="c2", version=5, appliances=[])
        await bridge.publish(topics.down("gateways", "gw-1"), foreign)
        err = await bridge.next("error")
        assert isinstance(err, ErrorReply) and err.code == "forbidden"
