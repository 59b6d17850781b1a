"""An outcome ready at once stands for the command's ``ack`` (issue 14, seventh round), through the real chain: the
hub (uvicorn, real SQLite) and its Mosquitto, retailer r1's bridge and its Mosquitto, and gateway gw-1 (the real
daemon, in this process, over real Modbus TCP to a simulated home). Gateway gw-2 is played by a paho client where a
test needs a gateway that sends exactly what it is told (an older gateway: ``ack`` and ``outcome``; or the outcome
alone).

The bridge counts every message it decodes from its gateways (``relay.received``), so what a gateway sent is read
there; the hub's view says what the DSO sees."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import tomli_w

from broker_config.render import LOG_NAME
from device_drivers.sim.home import Plug, SimulatedHome, split_device_entries
from device_drivers.sim.server import ModbusSimServer
from hems_firmware.config import GatewayConfig
from hems_firmware.daemon import Gateway
from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Command, Outcome
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from tests.broker_fixtures import BROKER_DEBUG_LOG, BrokerHandle, MosquittoFactory, all_acknowledged, deliveries
from tests.cloud_hub.test_relay import post_emergency, wait_state
from tests.hems_firmware.test_crash_resume import CoilWrites, gateway_process
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties
from tests.test_late_outcome_after_unreachable import client_state
from tests.waiting import eventually

ACK_TIMEOUT_S = 0.8
"""The bridge's ``gateway_ack_timeout_s`` here: short, so that "nothing is re-sent after it" is seen in a second."""
LOADED_RETRY_S = 3.0
"""The bridge's first re-send delay where a test counts one send and no ``ack``: long enough that a gateway
answering late on a loaded machine (Modbus round trips, SQLite commits on two shared cores) is not re-sent to."""
LOADED_HOLD = {"ack_hold_s": 1.0}
"""The gateway's longest ack hold (its setting's bound), where a test counts no ``ack``: the outcome is committed
within it however loaded the machine."""


@dataclass
class Chain:
    hub: HubHandle
    bridge: Bridge
    local: BrokerHandle
    home: SimulatedHome
    gateway: Gateway

    @property
    def relay(self) -> BridgeRelay:
        return self.bridge.relay

    async def command(self, request_id: str, client_id: str) -> dict[str, Any]:
        """The bridge's stored command of ``client_id`` in ``request_id``."""
        return {c["client_id"]: c for c in await self.relay.store.commands_of(request_id)}[client_id]


def _bridge(hub: HubHandle, local: BrokerHandle, tmp_path: Path, **settings: Any) -> Bridge:
    """r1's bridge on ``local`` with its store in ``tmp_path`` (the same store each time: a restart)."""
    return Bridge(BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub.broker.host, hub_mqtt_port=hub.broker.port,
        hub_mqtt_password=hub.broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", telemetry_store="none", customers={"c1": "gw-1", "c2": "gw-2"},
        **settings))


def _home() -> SimulatedHome:
    """gw-1's home: a heater and an EV charger that may be shed, a fridge that may not."""
    return SimulatedHome(0.3, [Plug(0, 2.0, "heater", 1, True), Plug(1, 3.7, "ev", 2, True),
                               Plug(3, 0.15, "fridge", 9, False)])


@asynccontextmanager
async def chain(hub: HubHandle, tmp_path: Path, mosquitto_factory: MosquittoFactory, *, retry_s: float = 0.5,
                ack_timeout_s: float = ACK_TIMEOUT_S, clock: Callable[[], float] | None = None,
                gateway: dict[str, Any] | None = None) -> AsyncIterator[Chain]:
    """The hub, r1's bridge (first re-send ``retry_s``, ack timeout ``ack_timeout_s``) and gw-1's daemon (its
    monotonic ``clock``, ``gateway`` settings added to the rig's) running, connected."""
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    local = mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")
    b = _bridge(hub, local, tmp_path, gateway_ack_timeout_s=ack_timeout_s, gateway_retry_s=retry_s)
    home = _home()
    async with ModbusSimServer({1: home.meter}, port=0) as meter, ModbusSimServer({1: home.relays}, port=0) as relay:
        cfg = GatewayConfig.model_validate({
            "gateway": {"id": "gw-1", "client_id": "c1", "state_dir": str(tmp_path / "gw"), "poll_interval_s": 0.2,
                        "restore_interval_s": 0.1, "contracted_power_kw": 6.9, "telemetry_interval_s": 0.5,
                        # the simulated meter shows a switch at once: no need to wait for it to settle
                        "outcome_settle_s": 0.2, "outcome_poll_s": 0.1, **(gateway or {}),
                        "uplink": {"host": local.host, "port": local.port,
                                   "password": local.identities["gw-1"].password}},
            "devices": split_device_entries(home, "127.0.0.1", meter.port, relay.port)})
        gw = Gateway(cfg) if clock is None else Gateway(cfg, clock=clock)
        tasks = [asyncio.create_task(b.run()), asyncio.create_task(gw.run())]
        try:
            await eventually(lambda: b.relay.hub is not None and b.relay.hub.connected and b.relay.local is not None
                             and b.relay.local.connected and gw.link is not None and gw.link.connected
                             and bool(gw.state) and b.relay.gateway_presence.get("gw-1") == "online",
                             "the bridge and the gateway are connected", timeout_s=20)
            yield Chain(hub, b, local, home, gw)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t


async def test_an_emergency_that_starts_now_is_answered_by_its_outcome_alone(
        hub: HubHandle, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """One uplink message per command (on main: two, the ``ack`` and the ``outcome``); the bridge closes the command
    on the outcome, the hub's request completes, and nothing is re-sent after the bridge's ack timeout."""
    async with chain(hub, tmp_path, mosquitto_factory, retry_s=LOADED_RETRY_S, gateway=LOADED_HOLD) as c:
        request_id = await post_emergency(hub, ["c1"], lead_s=0)
        req = await wait_state(hub, request_id, "completed", timeout=15)
        assert req["state"] == "completed", req
        assert req["clients"]["c1"]["state"] == "executed", req["clients"]
        cmd = await c.command(request_id, "c1")
        assert cmd["state"] == "closed" and cmd["attempts"] == 1, cmd
        # Past the ack timeout and the first re-send (counted from the command's first send: an open command would
        # be due now, and reported unreachable), a sending round sends nothing again and reports nothing
        # unreachable: the command is closed.
        past = max(ACK_TIMEOUT_S, LOADED_RETRY_S) + 0.2
        await eventually(lambda: c.relay.commands_out.clock() - cmd["first_sent_at"] > past,
                         "the bridge's ack timeout and first re-send have passed", timeout_s=past + 5)
        await c.relay.dispatch_gateways()
        after = await c.command(request_id, "c1")
        assert after["state"] == "closed" and after["attempts"] == 1, after
        req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
        assert req["clients"]["c1"]["state"] == "executed" and req["state"] == "completed", req
        assert "superseded" not in req["clients"]["c1"], "never reported unreachable"
        # What the gateway sent for the command: its outcome, and no ack.
        assert c.relay.received["gateway_outcome"] == 1, c.relay.received
        assert c.relay.received["gateway_ack"] == 0, c.relay.received  # on main: 1
        assert [(a.device, a.on) for a in c.gateway.actuations] == [("heater", False), ("ev", False)]
        # The bridge's first re-send delay learnt the round trip from the outcome, as it did from the ack.
        assert c.relay.gateway_rtt.srtt is not None


class ManualClock:
    """The gateway's monotonic clock, moved by the test: its ack hold ends when the test says."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_command_whose_outcome_is_not_ready_gets_its_ack_at_the_holds_end(
        hub: HubHandle, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """An emergency that starts later: no outcome within the hold, so the ``ack`` goes at the hold's end (on the
    gateway's own clock, driven here), the hub sees ``delivered``, then ``executed`` at the start."""
    clock = ManualClock()
    # The bridge re-sends late here, so that only the hold (not a re-send's duplicate) can release the ack.
    async with chain(hub, tmp_path, mosquitto_factory, retry_s=30.0, ack_timeout_s=60.0, clock=clock,
                     gateway={"ack_hold_s": 0.2}) as c:
        request_id = await post_emergency(hub, ["c1"], lead_s=2.0)
        await eventually(lambda: len(c.gateway.uplink.acks) == 1, "the gateway stored the command and holds its ack")
        assert await c.gateway.store.held_revision(request_id) == 1, "stored before its ack goes"
        clock.now += 0.19
        c.gateway.uplink._acks_due.set()  # the ack loop looks again at once (it would within the hold anyway)
        await eventually(lambda: not c.gateway.uplink._acks_due.is_set(), "the ack loop looked")
        assert len(c.gateway.uplink.acks) == 1 and c.relay.received["gateway_ack"] == 0, "not before the hold's end"
        clock.now += 0.01
        await eventually(lambda: c.relay.received["gateway_ack"] == 1, "the ack at the hold's end", timeout_s=5)
        assert c.relay.received["gateway_outcome"] == 0, "the outcome comes at the start, later"
        assert (await client_state(hub, request_id, "c1", "delivered"))["clients"]["c1"]["state"] == "delivered"
        req = await wait_state(hub, request_id, "completed", timeout=15)
        assert req["clients"]["c1"]["state"] == "executed", req["clients"]
        assert c.relay.received["gateway_ack"] == 1 and c.relay.received["gateway_outcome"] == 1, c.relay.received
        cmd = await c.command(request_id, "c1")
        assert cmd["state"] == "closed" and cmd["attempts"] == 1, cmd


async def test_a_load_shift_is_answered_by_its_acknowledged_outcome_alone(
        hub: HubHandle, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """A load shift is reported ``acknowledged`` on arrival: that outcome stands for the ack, whatever the window."""
    async with chain(hub, tmp_path, mosquitto_factory, retry_s=LOADED_RETRY_S, gateway=LOADED_HOLD) as c:
        start = datetime.now(UTC) + timedelta(seconds=60)
        r = await hub.http.post("/v1/load-shifts", headers=hub.auth("dso"), json={
            "client_ids": ["c1"], "window_start": start.isoformat(),
            "window_end": (start + timedelta(seconds=600)).isoformat()})
        assert r.status_code == 202, r.text
        request_id = r.json()["request_id"]
        req = await client_state(hub, request_id, "c1", "acknowledged")
        assert req["clients"]["c1"]["state"] == "acknowledged", req["clients"]
        cmd = await c.command(request_id, "c1")
        assert cmd["state"] == "closed" and cmd["attempts"] == 1, cmd
        assert c.relay.received["gateway_outcome"] == 1 and c.relay.received["gateway_ack"] == 0, c.relay.received


async def test_an_older_gateway_that_sends_ack_and_outcome_is_served_as_before(
        hub: HubHandle, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """gw-2 acknowledges, then reports (as every gateway did before): the command is closed, the hub's client ends
    ``executed``, the outcome is acknowledged, the round trip is learnt once, and nothing is re-sent."""
    async with chain(hub, tmp_path, mosquitto_factory) as c:
        with parties(Party(c.local, "gw-2", topics.down("gateways", "gw-2"))) as (gw2,):
            request_id = await post_emergency(hub, ["c2"], lead_s=0)
            cmd = await gw2.next("command")
            assert isinstance(cmd, Command)
            await gw2.publish(topics.up("gateways", "gw-2"), Ack(ack_ids=[cmd.msg_id]))
            out = Outcome(request_id=request_id, client_id="c2", state=ClientState.EXECUTED, revision=cmd.revision)
            await gw2.publish(topics.up("gateways", "gw-2"), out)
            ack = await gw2.next("ack")
            assert isinstance(ack, Ack) and ack.ack_ids == [out.msg_id]
            req = await wait_state(hub, request_id, "completed", timeout=15)
            assert req["clients"]["c2"]["state"] == "executed", req["clients"]
            stored = await c.command(request_id, "c2")
            assert stored["state"] == "closed" and stored["attempts"] == 1, stored
            assert c.relay.received["gateway_ack"] == 1 and c.relay.received["gateway_outcome"] == 1
            assert c.relay.gateway_rtt.srtt is not None and c.relay.gateway_rtt.samples == 1, "learnt once"
            await gw2.nothing("command", ACK_TIMEOUT_S + 0.5)


async def test_an_outcome_alone_teaches_the_bridge_the_gateways_round_trip(
        hub: HubHandle, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """The bridge's first re-send delay follows the gateways' measured round trips (``RoundTrip``, from commands
    sent once). A gateway whose outcome stands for its ack must still give it a sample (on main none: only an
    ``ack`` was sampled, so a fleet answering with outcomes alone left the delay at its floor)."""
    async with chain(hub, tmp_path, mosquitto_factory, retry_s=LOADED_RETRY_S) as c:
        assert c.relay.gateway_rtt.srtt is None
        with parties(Party(c.local, "gw-2", topics.down("gateways", "gw-2"))) as (gw2,):
            request_id = await post_emergency(hub, ["c2"], lead_s=0)
            cmd = await gw2.next("command")
            assert isinstance(cmd, Command)
            out = Outcome(request_id=request_id, client_id="c2", state=ClientState.EXECUTED, revision=cmd.revision)
            await gw2.publish(topics.up("gateways", "gw-2"), out)
            assert isinstance(await gw2.next("ack"), Ack)
            req = await wait_state(hub, request_id, "completed", timeout=15)
            assert req["clients"]["c2"]["state"] == "executed", req["clients"]
        assert c.relay.received["gateway_ack"] == 0
        assert c.relay.gateway_rtt.srtt is not None, "the outcome's round trip was sampled"  # on main: None
        stored = await c.command(request_id, "c2")
        assert stored["state"] == "closed" and stored["attempts"] == 1, stored


async def test_an_outcome_to_a_re_sent_command_gives_no_round_trip_sample(
        hub: HubHandle, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """Karn's rule holds for an outcome standing for its ack: gw-2 answers only after the bridge sent the command
    again, so the answer could be to either send, and the bridge learns nothing of the round trip from it."""
    async with chain(hub, tmp_path, mosquitto_factory, retry_s=0.3, ack_timeout_s=10.0) as c:
        with parties(Party(c.local, "gw-2", topics.down("gateways", "gw-2"))) as (gw2,):
            request_id = await post_emergency(hub, ["c2"], lead_s=0)
            cmd = await gw2.next("command")
            again = await gw2.next("command", timeout=10)
            assert isinstance(cmd, Command) and isinstance(again, Command) and again.msg_id == cmd.msg_id
            out = Outcome(request_id=request_id, client_id="c2", state=ClientState.EXECUTED, revision=cmd.revision)
            await gw2.publish(topics.up("gateways", "gw-2"), out)
            assert isinstance(await gw2.next("ack"), Ack)
            req = await wait_state(hub, request_id, "completed", timeout=15)
            assert req["clients"]["c2"]["state"] == "executed", req["clients"]
        stored = await c.command(request_id, "c2")
        assert stored["state"] == "closed" and stored["attempts"] >= 2, stored
        assert c.relay.gateway_rtt.samples == 0 and c.relay.gateway_rtt.srtt is None


def _stored(db: Path, request_id: str) -> bool:
    """Whether the gateway's real SQLite store holds the command (read-only: the gateway process writes it)."""
    if not db.exists():
        return False
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        return conn.execute("SELECT 1 FROM commands WHERE request_id=?", (request_id,)).fetchone() is not None


async def test_a_gateway_killed_inside_the_hold_gets_the_command_again_and_executes_it_once(
        hub: HubHandle, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """``hems-gateway run`` as its own process stores an emergency (starting in 6 s) and is killed with SIGKILL
    while its ack is held (its longest hold, 1 s, from the store's commit: the test kills it as soon as it sees the
    command stored and its PUBACK at the broker, well within that on a loaded machine): neither ack nor outcome
    went. The bridge re-sends the command; the restarted gateway recognises it (acknowledged at once), executes it
    once at its start, and the hub's request completes.

    The PUBACK is waited for because the gateway sends it after the store's commit, not with it: a kill between the
    two left the command in flight in the gateway's broker session, the broker handed it to the restarted gateway
    itself, which acknowledged it before the bridge re-sent it, and the command closed sent once (``attempts`` 1:
    10 runs in 130 with four copies of this test and two busy loops on two cores, none in 20 alone). That delivery
    is right too (the command again, executed once), but not the bridge's re-send this test is about."""
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    local = mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge", log_types=BROKER_DEBUG_LOG)
    broker_log = local.data_dir / LOG_NAME
    # The first re-send (3 s) comes after the kill (which lands within the 1 s hold), so that the first process
    # never sees a duplicate, however loaded the machine; the start (6 s) after both.
    bridge = _bridge(hub, local, tmp_path, gateway_retry_s=LOADED_RETRY_S)
    relay = bridge.relay
    home = _home()
    writes = CoilWrites(home)
    log = tmp_path / "gateway.log"
    gateway_db = tmp_path / "state" / "gateway-gw-1.db"
    task = asyncio.create_task(bridge.run())
    try:
        async with ModbusSimServer({1: home.meter}, port=0) as meter, \
                ModbusSimServer({1: home.relays}, port=0) as relay_board:
            config = tmp_path / "gateway.toml"
            config.write_text(tomli_w.dumps({
                "gateway": {"id": "gw-1", "client_id": "c1", "state_dir": str(tmp_path / "state"),
                            "poll_interval_s": 0.2, "telemetry_interval_s": 0.5, "restore_interval_s": 0.1,
                            "contracted_power_kw": 6.9, **LOADED_HOLD,
                            "uplink": {"host": local.host, "port": local.port,
                                       "password": local.identities["gw-1"].password}},
                "devices": split_device_entries(home, "127.0.0.1", meter.port, relay_board.port)}))
            async with gateway_process(config, log) as first:
                await eventually(lambda: relay.hub is not None and relay.hub.connected
                                 and relay.gateway_presence.get("gw-1") == "online",
                                 "the bridge and the gateway are connected", timeout_s=30)
                sent_before, _ = deliveries(broker_log, "gw-1")
                request_id = await post_emergency(hub, ["c1"], lead_s=6.0)
                await eventually(lambda: _stored(gateway_db, request_id), "the gateway stored the command",
                                 interval_s=0.005)
                # ...and the broker has its PUBACK (the command is not in flight: only the bridge sends it again).
                await eventually(lambda: all_acknowledged(broker_log, "gw-1", sent_before),
                                 "the broker has the gateway's PUBACK of the command", interval_s=0.005)
                first.send_signal(signal.SIGKILL)
                assert await first.wait() == -signal.SIGKILL
            assert relay.received["gateway_ack"] == 0 and relay.received["gateway_outcome"] == 0, \
                f"killed inside the hold: nothing answered the command yet ({relay.received})"
            async with gateway_process(config, log):
                req = await wait_state(hub, request_id, "completed", timeout=30)
                assert req["state"] == "completed", req
                assert req["clients"]["c1"]["state"] == "executed", req["clients"]
                cmd = {c["client_id"]: c for c in await relay.store.commands_of(request_id)}["c1"]
                assert cmd["state"] == "closed" and cmd["attempts"] >= 2, cmd  # re-sent after the kill
                assert relay.received["gateway_ack"] >= 1, "the re-sent command was recognised and acknowledged"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for coil in (0, 1):  # executed once: each load switched off once (the emergency holds it for 300 s)
        assert [on for _, on in writes.of(coil)] == [False], writes.writes
    with contextlib.closing(sqlite3.connect(f"file:{gateway_db}?mode=ro", uri=True)) as conn:
        assert conn.execute("SELECT reported FROM commands WHERE request_id=?", (request_id,)).fetchall() == [(1,)]


async def test_an_outcome_that_waited_out_a_bridge_restart_gives_no_round_trip_sample(
        hub: HubHandle, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """gw-2 reports its outcome while the bridge is down: the broker keeps it in the bridge's session and hands it
    to the restarted bridge, which closes the command (sent once: no re-send went while it was down). Its round
    trip spans the outage, not the gateways' pace, so it is not sampled (on main it was: one outage-long sample
    pinned the first re-send delay at its cap for dozens of samples). A command sent after the restart still is."""
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    local = mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")
    # No re-send within the test: the command stays sent once across the restart.
    settings: dict[str, Any] = {"gateway_retry_s": 30.0, "gateway_ack_timeout_s": 60.0}
    with parties(Party(local, "gw-2", topics.down("gateways", "gw-2"))) as (gw2,):
        first = _bridge(hub, local, tmp_path, **settings)
        task = asyncio.create_task(first.run())
        try:
            await eventually(lambda: first.relay.hub is not None and first.relay.hub.connected
                             and first.relay.local is not None and first.relay.local.connected,
                             "the first bridge is connected", timeout_s=20)
            request_id = await post_emergency(hub, ["c2"], lead_s=0)
            cmd = await gw2.next("command")
            assert isinstance(cmd, Command)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        out = Outcome(request_id=request_id, client_id="c2", state=ClientState.EXECUTED, revision=cmd.revision)
        await gw2.publish(topics.up("gateways", "gw-2"), out)  # QoS 1: kept in the bridge's session
        second = _bridge(hub, local, tmp_path, **settings)
        task = asyncio.create_task(second.run())
        try:
            assert isinstance(await gw2.next("ack", timeout=20), Ack), "the restarted bridge took the outcome"
            req = await wait_state(hub, request_id, "completed", timeout=15)
            assert req["clients"]["c2"]["state"] == "executed", req["clients"]
            stored = {c["client_id"]: c for c in await second.relay.store.commands_of(request_id)}["c2"]
            assert stored["state"] == "closed" and stored["attempts"] == 1, stored
            assert second.relay.received["gateway_outcome"] == 1, second.relay.received
            assert second.relay.gateway_rtt.srtt is None, "sent before the restart: not sampled"  # on main: sampled
            assert second.relay.gateway_rtt.samples == 0
            # A command sent by the restarted bridge is sampled as ever.
            request_id = await post_emergency(hub, ["c2"], lead_s=0)
            cmd = await gw2.next("command")
            assert isinstance(cmd, Command)
            out = Outcome(request_id=request_id, client_id="c2", state=ClientState.EXECUTED, revision=cmd.revision)
            await gw2.publish(topics.up("gateways", "gw-2"), out)
            await wait_state(hub, request_id, "completed", timeout=15)
            await eventually(lambda: second.relay.gateway_rtt.samples == 1, "the new command's round trip sampled")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
