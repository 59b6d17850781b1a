"""Gateway crash-resume (issue 13, item 10): a real ``hems-gateway run`` process against a real Mosquitto and a
simulated home over Modbus TCP is killed with SIGKILL in the middle of an emergency and started again. The loads it
shed stay off until the emergency's end and are switched back on exactly once after it, judged by counting the coil
writes the simulated relay board receives. An emergency whose outcome was not yet reported when the gateway was
killed (it waited for its start, or for the meter to show the shedding) is reported after the restart, once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import tomli_w
from pymodbus.constants import ExcCodes

from device_drivers.sim.home import Plug, SimulatedHome, split_device_entries
from device_drivers.sim.server import ModbusSimServer
from hems_firmware.store import add_reported_column as _add_reported_column
from mhp_wire import topics
from mhp_wire.messages import (
    Ack,
    ClientState,
    Command,
    EmergencyParams,
    LoadShiftParams,
    Outcome,
    RequestKind,
    encode,
)
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.mqtt_party import Party, parties
from tests.waiting import eventually

LEAD_S, DURATION_S = 1.0, 9.0


class CoilWrites:
    """Every coil write the simulated relay board receives: ``(wall time, coil, on)``."""

    def __init__(self, home: SimulatedHome) -> None:
        self.writes: list[tuple[float, int, bool]] = []
        board = home.relays
        answer = board.on_request

        def counting(function_code: int, start_address: int, address: int, count: int, registers: list[int],
                     values: list[int] | list[bool] | None) -> ExcCodes | None:
            if function_code in (5, 15) and values is not None:
                self.writes += [(time.time(), address + i, bool(v)) for i, v in enumerate(values)]
            return answer(function_code, start_address, address, count, registers, values)

        board.on_request = counting  # type: ignore[method-assign]

    def of(self, coil: int) -> list[tuple[float, bool]]:
        return [(at, on) for at, c, on in self.writes if c == coil]


@asynccontextmanager
async def gateway_process(config: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``hems-gateway run --config FILE`` as its own process; killed at the end if still running."""
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "hems_firmware.cli", "run", "--config",
                                                    str(config), stdout=out, stderr=out)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_a_gateway_killed_mid_emergency_restores_what_it_shed_once_at_the_end(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    home = SimulatedHome(0.3, [Plug(0, 2.0, "heater", 1, True), Plug(1, 3.7, "ev", 2, True),
                               Plug(3, 0.15, "fridge", 9, False)])
    writes = CoilWrites(home)
    log = tmp_path / "gateway.log"
    async with ModbusSimServer({1: home.meter}, port=0) as meter, ModbusSimServer({1: home.relays}, port=0) as relay:
        config = tmp_path / "gateway.toml"
        config.write_text(tomli_w.dumps({
            "gateway": {"id": "gw-1", "client_id": "c1", "state_dir": str(tmp_path / "state"), "poll_interval_s": 0.2,
                        "telemetry_interval_s": 0.5, "restore_interval_s": 0.1, "contracted_power_kw": 6.9,
                        "uplink": {"host": broker.host, "port": broker.port,
                                   "password": broker.identities["gw-1"].password}},
            "devices": split_device_entries(home, "127.0.0.1", meter.port, relay.port)}))
        with parties(Party(broker, "bridge", topics.all_up("gateways"))) as (bridge,):
            async with gateway_process(config, log) as first:
                await bridge.next("telemetry", timeout=30)
                start = datetime.now(UTC) + timedelta(seconds=LEAD_S)
                params = EmergencyParams(start=start, end=start + timedelta(seconds=DURATION_S), power_limit_kw=1.0)
                cmd = Command(request_id="em-1", client_id="c1", kind=RequestKind.EMERGENCY, params=params,
                              expires_at=params.end)
                await bridge.publish(topics.down("gateways", "gw-1"), cmd)
                out = await bridge.next("outcome", timeout=10)
                assert isinstance(out, Outcome) and out.state is ClientState.EXECUTED, out
                assert out.detail["shed"] == ["heater", "ev"]
                await bridge.publish(topics.down("gateways", "gw-1"), Ack(ack_ids=[out.msg_id]))
                await asyncio.sleep(0.5)  # the acknowledgement is applied; the emergency is in force
                first.send_signal(signal.SIGKILL)
                assert await first.wait() == -signal.SIGKILL
            killed_at = time.time()
            assert not home.coil_state(0) and not home.coil_state(1), "the board holds what was shed"
            async with gateway_process(config, log):
                end = params.end.timestamp()
                while time.time() < end + 5:
                    if home.coil_state(0) and home.coil_state(1) and time.time() > end + 1:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)  # would a second restore come?
                late = [m for m in await _drain(bridge) if isinstance(m, Outcome) and m.request_id == "em-1"]
    assert killed_at < end - 3, "killed well inside the emergency"
    for coil in (0, 1):
        offs = [at for at, on in writes.of(coil) if not on]
        ons = [at for at, on in writes.of(coil) if on]
        assert len(offs) == 1 and offs[0] >= start.timestamp() - 0.05, (coil, writes.writes)
        assert len(ons) == 1, f"coil {coil} switched back on exactly once: {writes.writes}"
        assert end - 0.05 <= ons[0] <= end + 3, f"coil {coil} back on at the emergency's end, not before: " \
                                                f"{ons[0] - end:+.2f} s"
    assert writes.of(3) == [], "the fridge is never switched"
    assert home.coil_state(0) and home.coil_state(1) and home.coil_state(3)
    assert late == [], "the resumed emergency is not reported again"


async def test_loads_handed_to_a_longer_emergency_come_back_after_it_across_a_kill(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """Two emergencies overlap; the stricter one ends first and hands what it shed to the other, which holds them
    until its own end. The gateway is killed between the two ends: the loads must still come back, once, when the
    longer emergency ends (before, the hand-over lived only in memory and the loads stayed off for good)."""
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    home = SimulatedHome(0.3, [Plug(0, 2.0, "heater", 1, True), Plug(1, 3.7, "ev", 2, True),
                               Plug(3, 0.15, "fridge", 9, False)])
    writes = CoilWrites(home)
    log = tmp_path / "gateway.log"
    async with ModbusSimServer({1: home.meter}, port=0) as meter, ModbusSimServer({1: home.relays}, port=0) as relay:
        config = tmp_path / "gateway.toml"
        config.write_text(tomli_w.dumps({
            "gateway": {"id": "gw-1", "client_id": "c1", "state_dir": str(tmp_path / "state"), "poll_interval_s": 0.2,
                        "telemetry_interval_s": 0.5, "restore_interval_s": 0.1, "contracted_power_kw": 6.9,
                        "uplink": {"host": broker.host, "port": broker.port,
                                   "password": broker.identities["gw-1"].password}},
            "devices": split_device_entries(home, "127.0.0.1", meter.port, relay.port)}))
        with parties(Party(broker, "bridge", topics.all_up("gateways"))) as (bridge,):
            async with gateway_process(config, log) as first:
                await bridge.next("telemetry", timeout=30)
                start = datetime.now(UTC) + timedelta(seconds=LEAD_S)
                short = EmergencyParams(start=start, end=start + timedelta(seconds=2.5), power_limit_kw=1.0)
                long = EmergencyParams(start=start, end=start + timedelta(seconds=DURATION_S), power_limit_kw=4.5)
                for rid, params in (("em-short", short), ("em-long", long)):
                    await bridge.publish(topics.down("gateways", "gw-1"), Command(
                        request_id=rid, client_id="c1", kind=RequestKind.EMERGENCY, params=params,
                        expires_at=params.end))
                for _ in range(2):
                    out = await bridge.next("outcome", timeout=10)
                    assert isinstance(out, Outcome)
                    await bridge.publish(topics.down("gateways", "gw-1"), Ack(ack_ids=[out.msg_id]))
                await asyncio.sleep(max(0.0, short.end.timestamp() + 1.0 - time.time()))  # the short one ended
                assert not home.coil_state(0) and not home.coil_state(1), "the longer emergency holds them"
                first.send_signal(signal.SIGKILL)
                await first.wait()
            async with gateway_process(config, log):
                end = long.end.timestamp()
                while time.time() < end + 5:
                    if home.coil_state(0) and home.coil_state(1) and time.time() > end + 1:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)
    for coil in (0, 1):
        ons = [at for at, on in writes.of(coil) if on]
        assert len(ons) == 1, f"coil {coil} switched back on exactly once: {writes.writes}"
        assert end - 0.05 <= ons[0] <= end + 3, f"coil {coil} back on at the end: {ons[0] - end:+.2f} s"
    assert home.coil_state(0) and home.coil_state(1)


def _write_config(tmp_path: Path, broker: BrokerHandle, home: SimulatedHome, meter_port: int, relay_port: int,
                  **gateway: float) -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(tomli_w.dumps({
        "gateway": {"id": "gw-1", "client_id": "c1", "state_dir": str(tmp_path / "state"), "poll_interval_s": 0.2,
                    "telemetry_interval_s": 0.5, "restore_interval_s": 0.1, "contracted_power_kw": 6.9,
                    "uplink": {"host": broker.host, "port": broker.port,
                               "password": broker.identities["gw-1"].password}} | gateway,
        "devices": split_device_entries(home, "127.0.0.1", meter_port, relay_port)}))
    return config


async def _outcomes_until(bridge: Party, request_id: str, until: float, got: list[Outcome],
                          stop_after: int | None = None) -> None:
    """Collect (into ``got``) and acknowledge, as the bridge does, every outcome of ``request_id`` until ``until``
    (or until ``got`` holds ``stop_after`` of them)."""
    while (left := until - time.time()) > 0 and (stop_after is None or len(got) < stop_after):
        try:
            msg = await bridge.next("outcome", timeout=min(left, 0.5))
        except TimeoutError:
            continue
        if isinstance(msg, Outcome) and msg.request_id == request_id:
            got.append(msg)
            await bridge.publish(topics.down("gateways", "gw-1"), Ack(ack_ids=[msg.msg_id]))


def _assert_shed_at_start_and_restored_once(writes: CoilWrites, start: float, end: float) -> None:
    for coil in (0, 1):
        offs = [at for at, on in writes.of(coil) if not on]
        ons = [at for at, on in writes.of(coil) if on]
        assert len(offs) == 1 and offs[0] >= start - 0.05, (coil, writes.writes)
        assert len(ons) == 1, f"coil {coil} switched back on exactly once: {writes.writes}"
        assert end - 0.05 <= ons[0] <= end + 3, f"coil {coil} back on at the emergency's end: {ons[0] - end:+.2f} s"
    assert writes.of(3) == [], "the fridge is never switched"


async def test_an_emergency_waiting_for_its_start_across_a_kill_is_reported_once(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """The emergency arrives before it takes effect; the gateway is killed while it waits and started again. It
    sheds at the start and reports ``executed`` once (before, the resumed run never reported: the bridge and the hub
    marked the home expired/unreachable although its loads were shed)."""
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    home = SimulatedHome(0.3, [Plug(0, 2.0, "heater", 1, True), Plug(1, 3.7, "ev", 2, True),
                               Plug(3, 0.15, "fridge", 9, False)])
    writes = CoilWrites(home)
    log = tmp_path / "gateway.log"
    outcomes: list[Outcome] = []
    async with ModbusSimServer({1: home.meter}, port=0) as meter, ModbusSimServer({1: home.relays}, port=0) as relay:
        config = _write_config(tmp_path, broker, home, meter.port, relay.port)
        with parties(Party(broker, "bridge", topics.all_up("gateways"))) as (bridge,):
            async with gateway_process(config, log) as first:
                await bridge.next("telemetry", timeout=30)
                start = datetime.now(UTC) + timedelta(seconds=4)
                params = EmergencyParams(start=start, end=start + timedelta(seconds=6), power_limit_kw=1.0)
                cmd = Command(request_id="em-1", client_id="c1", kind=RequestKind.EMERGENCY, params=params,
                              expires_at=params.end)
                await bridge.publish(topics.down("gateways", "gw-1"), cmd)
                ack = await bridge.next("ack", timeout=10)
                assert isinstance(ack, Ack) and cmd.msg_id in ack.ack_ids  # stored: the gateway holds it
                first.send_signal(signal.SIGKILL)
                assert await first.wait() == -signal.SIGKILL
            killed_at = time.time()
            assert writes.writes == [], "nothing switched before the start"
            async with gateway_process(config, log):
                end = params.end.timestamp()
                await _outcomes_until(bridge, "em-1", end + 3, outcomes)
    assert killed_at < start.timestamp(), "killed while the emergency waited for its start"
    assert len({o.msg_id for o in outcomes}) == 1, f"exactly one outcome: {outcomes}"
    assert outcomes[0].state is ClientState.EXECUTED and outcomes[0].revision == 1, outcomes[0]
    assert outcomes[0].detail["shed"] == ["heater", "ev"]
    _assert_shed_at_start_and_restored_once(writes, start.timestamp(), end)
    assert home.coil_state(0) and home.coil_state(1) and home.coil_state(3)


async def test_a_gateway_killed_while_its_outcome_settles_reports_it_once_after_the_restart(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """The loads are shed at the start, but the meter shows it only seconds later, so the outcome waits (the settle
    window); the gateway is killed in that window and started again: exactly one outcome arrives."""
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    home = SimulatedHome(0.3, [Plug(0, 2.0, "heater", 1, True), Plug(1, 3.7, "ev", 2, True),
                               Plug(3, 0.15, "fridge", 9, False)], meter_lag_s=4.0)
    writes = CoilWrites(home)
    log = tmp_path / "gateway.log"
    outcomes: list[Outcome] = []
    async with ModbusSimServer({1: home.meter}, port=0) as meter, ModbusSimServer({1: home.relays}, port=0) as relay:
        config = _write_config(tmp_path, broker, home, meter.port, relay.port, outcome_settle_s=30.0)
        with parties(Party(broker, "bridge", topics.all_up("gateways"))) as (bridge,):
            async with gateway_process(config, log) as first:
                await bridge.next("telemetry", timeout=30)
                start = datetime.now(UTC) + timedelta(seconds=LEAD_S)
                params = EmergencyParams(start=start, end=start + timedelta(seconds=12), power_limit_kw=1.0)
                cmd = Command(request_id="em-1", client_id="c1", kind=RequestKind.EMERGENCY, params=params,
                              expires_at=params.end)
                await bridge.publish(topics.down("gateways", "gw-1"), cmd)
                await _until_shed_is_stored(tmp_path / "state" / "gateway-gw-1.db", "em-1", ["heater", "ev"])
                first.send_signal(signal.SIGKILL)
                assert await first.wait() == -signal.SIGKILL
            killed_at = time.time()
            early = [m for m in await _drain(bridge) if isinstance(m, Outcome)]
            async with gateway_process(config, log):
                end = params.end.timestamp()
                await _outcomes_until(bridge, "em-1", end + 3, outcomes)
    assert early == [], "killed before the outcome was sent: inside the settle window"
    assert killed_at < start.timestamp() + home.meter_lag_s, "killed before the meter showed the shedding"
    assert len({o.msg_id for o in outcomes}) == 1, f"exactly one outcome: {outcomes}"
    assert outcomes[0].state is ClientState.EXECUTED and outcomes[0].revision == 1, outcomes[0]
    _assert_shed_at_start_and_restored_once(writes, start.timestamp(), end)


async def test_a_revision_killed_before_it_reported_is_reported_once_after_the_restart(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """Revision 1 of an emergency is executed and reported (its limit asks for no shedding); revision 2 lowers the
    limit while it holds the home, and the gateway is killed while revision 2's outcome settles. The hub waits for
    revision 2 (it reset the client to pending): after the restart it arrives once (before, the row kept revision
    1's ``active`` state and the resumed run stayed silent)."""
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    home = SimulatedHome(0.3, [Plug(0, 2.0, "heater", 1, True), Plug(1, 3.7, "ev", 2, True),
                               Plug(3, 0.15, "fridge", 9, False)], meter_lag_s=3.0)
    log = tmp_path / "gateway.log"
    outcomes: list[Outcome] = []
    async with ModbusSimServer({1: home.meter}, port=0) as meter, ModbusSimServer({1: home.relays}, port=0) as relay:
        config = _write_config(tmp_path, broker, home, meter.port, relay.port, outcome_settle_s=30.0)
        with parties(Party(broker, "bridge", topics.all_up("gateways"))) as (bridge,):
            async with gateway_process(config, log) as first:
                await bridge.next("telemetry", timeout=30)
                start = datetime.now(UTC) + timedelta(seconds=LEAD_S)
                # Long enough for the kill (once the shedding is stored, at the start), a restart and revision 2's
                # settling (the meter shows the shedding 3 s after it) before the end, until which every outcome
                # is collected; 20 s only made the wait for a repeat longer.
                end = start + timedelta(seconds=12)
                for revision, limit in ((1, 6.5), (2, 1.0)):
                    params = EmergencyParams(start=start, end=end, power_limit_kw=limit)
                    await bridge.publish(topics.down("gateways", "gw-1"), Command(
                        request_id="em-1", client_id="c1", kind=RequestKind.EMERGENCY, params=params,
                        expires_at=end, revision=revision))
                    if revision == 1:
                        await _outcomes_until(bridge, "em-1", time.time() + 15, outcomes, stop_after=1)
                        assert [o.revision for o in outcomes] == [1], outcomes
                await _until_shed_is_stored(tmp_path / "state" / "gateway-gw-1.db", "em-1", ["heater", "ev"])
                first.send_signal(signal.SIGKILL)
                assert await first.wait() == -signal.SIGKILL
            early = [m for m in await _drain(bridge) if isinstance(m, Outcome) and m.revision == 2]
            async with gateway_process(config, log):
                await _outcomes_until(bridge, "em-1", end.timestamp() + 1, outcomes)
    assert early == [], "killed before revision 2's outcome was sent"
    second = [o for o in outcomes if o.revision == 2]
    assert len({o.msg_id for o in second}) == 1, f"revision 2 reported exactly once: {outcomes}"
    assert second[0].state is ClientState.EXECUTED, second[0]
    assert len({o.msg_id for o in outcomes if o.revision == 1}) == 1, "revision 1 is not reported again"


def test_an_older_database_gets_the_reported_column_without_repeating_outcomes(tmp_path: Path) -> None:
    """A gateway database from before ``commands.reported``: rows whose outcome the old rule had stored (an action
    that became ``active``, a load shift on arrival) count as reported; a command still waiting does not."""
    now = datetime.now(UTC)
    window = {"start": now + timedelta(minutes=5), "end": now + timedelta(minutes=35)}
    commands = {
        "active": Command(request_id="em-a", client_id="c1", kind=RequestKind.EMERGENCY, revision=2,
                          params=EmergencyParams(**window, power_limit_kw=1.0), expires_at=window["end"]),
        "scheduled": Command(request_id="em-s", client_id="c1", kind=RequestKind.EMERGENCY,
                             params=EmergencyParams(**window, power_limit_kw=1.0), expires_at=window["end"]),
        "scheduled-shift": Command(request_id="ls-s", client_id="c1", kind=RequestKind.LOAD_SHIFT,
                                   params=LoadShiftParams(**window),
                                   expires_at=window["end"]),
    }
    path = tmp_path / "gateway-gw-1.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE commands (request_id TEXT PRIMARY KEY, payload BLOB NOT NULL, state TEXT NOT NULL, "
               "received_at REAL NOT NULL, shed TEXT NOT NULL DEFAULT '[]')")
    for state, cmd in commands.items():
        db.execute("INSERT INTO commands (request_id, payload, state, received_at) VALUES (?,?,?,?)",
                   (cmd.request_id, encode(cmd), state.removesuffix("-shift"), time.time()))
    _add_reported_column(db)
    _add_reported_column(db)  # every start runs it: the second time it changes nothing
    reported = dict(db.execute("SELECT request_id, reported FROM commands").fetchall())
    db.close()
    assert reported == {"em-a": 2, "em-s": 0, "ls-s": 1}


async def _until_shed_is_stored(db_path: Path, request_id: str, names: list[str], timeout: float = 10.0) -> None:
    """Wait until the gateway's store holds ``names`` shed for ``request_id`` (read-only, beside the running
    gateway): the shedding is done and survives the kill."""

    def stored() -> bool:
        with contextlib.suppress(sqlite3.Error):
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
            try:
                row = db.execute("SELECT shed FROM commands WHERE request_id=?", (request_id,)).fetchone()
            finally:
                db.close()
            return row is not None and sorted(json.loads(row[0])) == sorted(names)
        return False

    await eventually(stored, f"the gateway stored {names} shed for {request_id}", timeout_s=timeout)


async def _drain(bridge: Party) -> list[object]:
    """Every message already waiting at the bridge."""
    got: list[object] = []
    with contextlib.suppress(TimeoutError):
        while True:
            got.append(await bridge.next(timeout=0.3))
    return got
