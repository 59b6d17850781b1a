"""The gateway daemon's ack hold at the edges (a real daemon over Modbus TCP to a simulated home, a real retailer
broker, a real SQLite store; the bridge played by a paho party). The gateway's monotonic clock is the test's and
stands still unless moved, so an ``ack`` that arrives came at once, not at a hold's end."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from device_drivers.sim.home import Plug, SimulatedHome, split_device_entries
from device_drivers.sim.server import ModbusSimServer
from hems_firmware.config import GatewayConfig
from hems_firmware.daemon import Gateway
from mhp_wire import topics
from mhp_wire.messages import Ack, Command, ErrorReply
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.hems_firmware.test_gateway import command
from tests.mqtt_party import Party, parties
from tests.waiting import eventually


class ManualClock:
    """The gateway's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class HeldRig:
    gateway: Gateway
    broker: BrokerHandle
    clock: ManualClock
    db: Path


@pytest.fixture
async def held(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[HeldRig]:
    """gw-1 with the longest ack hold (1 s) on a clock that stands still."""
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    home = SimulatedHome(0.3, [Plug(0, 2.0, "heater", 1, True), Plug(1, 3.7, "ev", 2, True)])
    clock = ManualClock()
    async with ModbusSimServer({1: home.meter}, port=0) as meter, ModbusSimServer({1: home.relays}, port=0) as relay:
        cfg = GatewayConfig.model_validate({
            "gateway": {"id": "gw-1", "client_id": "c1", "state_dir": str(tmp_path / "gw"), "poll_interval_s": 0.2,
                        "restore_interval_s": 0.1, "contracted_power_kw": 6.9, "telemetry_interval_s": 5,
                        "ack_hold_s": 1.0,
                        "uplink": {"host": broker.host, "port": broker.port,
                                   "password": broker.identities["gw-1"].password}},
            "devices": split_device_entries(home, "127.0.0.1", meter.port, relay.port)})
        gw = Gateway(cfg, clock=clock)
        task = asyncio.create_task(gw.run())
        try:
            await eventually(lambda: gw.link is not None and gw.link.connected and bool(gw.state),
                             "the gateway is connected", timeout_s=20)
            yield HeldRig(gw, broker, clock, tmp_path / "gw" / "gateway-gw-1.db")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def revised(cmd: Command, revision: int) -> Command:
    """The same request's command at ``revision`` (a new message)."""
    return Command(request_id=cmd.request_id, client_id=cmd.client_id, kind=cmd.kind, params=cmd.params,
                   expires_at=cmd.expires_at, revision=revision)


async def test_a_duplicate_of_a_held_command_is_acknowledged_at_once(held: HeldRig) -> None:
    """The bridge's re-send arrives while the first copy's ack is held: the duplicate is acknowledged at once (the
    bridge waits no longer), the first copy's ack stays held, and the command is stored once."""
    with parties(Party(held.broker, "bridge", topics.up("gateways", "gw-1"))) as (bridge,):
        cmd = command(lead_s=60, duration_s=60)
        await bridge.publish(topics.down("gateways", "gw-1"), cmd)
        await eventually(lambda: len(held.gateway.uplink.acks) == 1, "the first copy's ack is held")
        await bridge.publish(topics.down("gateways", "gw-1"), cmd)
        ack = await bridge.next("ack")
        assert isinstance(ack, Ack) and ack.ack_ids == [cmd.msg_id], ack
        assert len(held.gateway.uplink.acks) == 1, "the clock stood still: the first copy's hold has not ended"
        assert await held.gateway.store.held_revision(cmd.request_id) == 1


async def test_a_stale_revision_is_acknowledged_at_once_and_refused(held: HeldRig) -> None:
    """Revision 1 arriving after revision 2 is stored: acknowledged at once (not held: nothing of it is stored)
    and refused ``stale_revision``."""
    with parties(Party(held.broker, "bridge", topics.up("gateways", "gw-1"))) as (bridge,):
        first = command(lead_s=60, duration_s=60)
        newer = revised(first, 2)
        await bridge.publish(topics.down("gateways", "gw-1"), newer)
        await eventually(lambda: len(held.gateway.uplink.acks) == 1, "revision 2's ack is held")
        await bridge.publish(topics.down("gateways", "gw-1"), first)
        acked: Ack | None = None
        refused: ErrorReply | None = None
        while acked is None or refused is None:
            msg = await bridge.next(timeout=10)
            if isinstance(msg, Ack):
                acked = msg
            elif isinstance(msg, ErrorReply):
                refused = msg
        assert acked.ack_ids == [first.msg_id], acked
        assert refused.ref_msg_id == first.msg_id and refused.code == "stale_revision", refused
        assert len(held.gateway.uplink.acks) == 1, "revision 2's ack is still held"
        assert await held.gateway.store.held_revision(first.request_id) == 2


async def test_an_expired_command_whose_refusal_could_not_be_stored_is_not_acknowledged(held: HeldRig) -> None:
    """An expired command's refusal stands for its ack. When the store cannot keep that refusal (a write the real
    SQLite refuses), no ack goes either: the bridge sends the command again rather than hear "stored" of nothing.
    On main the ack was held before the refusal was stored, and went at the hold's end."""
    with contextlib.closing(sqlite3.connect(held.db)) as db:
        db.execute("CREATE TRIGGER refuse_expired BEFORE INSERT ON outbox "
                   "WHEN instr(CAST(NEW.payload AS TEXT), 'expired') > 0 "
                   "BEGIN SELECT RAISE(ABORT, 'the disk refused the write'); END")
        db.commit()
    with parties(Party(held.broker, "bridge", topics.up("gateways", "gw-1"))) as (bridge,):
        later = command(lead_s=60, duration_s=60, request_id="later")
        await bridge.publish(topics.down("gateways", "gw-1"), later)
        await eventually(lambda: len(held.gateway.uplink.acks) == 1, "the later-starting command's ack is held")
        late = command(lead_s=-60, duration_s=30, request_id="late")
        await bridge.publish(topics.down("gateways", "gw-1"), late)
        link = held.gateway.link
        assert link is not None
        await eventually(lambda: link.stats.handler_errors == 1, "the expired command's refusal failed to be stored")
        # The clock past every hold: the acks due go in one message (the expired command's, had it been held,
        # with the other's).
        held.clock.now += 5.0
        ack = await bridge.next("ack", timeout=10)
        assert isinstance(ack, Ack) and ack.ack_ids == [later.msg_id], ack  # on main: [later, late]
        assert len(held.gateway.uplink.acks) == 0
