"""The bridge after it declared a gateway ``unreachable``: the command may still reach the gateway from the broker's
queue, so its late outcome of the same revision still goes to the hub (issue 14); nothing the bridge itself decides
later (a supplier change's ``refused``) may pass for it. Between two real brokers, the hub and the gateway played by
paho test clients."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mhp_wire import topics
from mhp_wire.messages import (
    Ack,
    ClientState,
    Command,
    CustomerChange,
    Customers,
    EmergencyParams,
    Outcome,
    Request,
    RequestKind,
    SupplyPeriod,
)
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.mqtt_party import Party, parties


@dataclass
class Rig:
    hub: Party
    gw: Party
    bridge: Bridge


@pytest.fixture
async def rig(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[Rig]:
    hub_broker: BrokerHandle = mosquitto_factory("hub", ["r1"], "hub")
    local: BrokerHandle = mosquitto_factory("retailer", ["gw-1"], "bridge")
    bridge = Bridge(BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub_broker.host, hub_mqtt_port=hub_broker.port,
        hub_mqtt_password=hub_broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", telemetry_store="none", customers={"c1": "gw-1"},
        gateway_ack_timeout_s=0.5, gateway_retry_s=0.2))
    with parties(Party(hub_broker, "hub", topics.all_up("retailers"), topics.status("retailers", "r1")),
                 Party(local, "gw-1", topics.down("gateways", "gw-1"))) as (hub, gw):
        task = asyncio.create_task(bridge.run())
        try:
            await hub.next("presence", timeout=10)  # the bridge's own, retained: it is at the hub broker
            yield Rig(hub, gw, bridge)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def unreachable(rig: Rig, request_id: str) -> Command:
    """Send an emergency for c1 (starting now), let gw-1 stay silent until the bridge reports ``unreachable`` (the
    hub acknowledges it); the command gw-1 got."""
    start = datetime.now(UTC)
    params = EmergencyParams(start=start, end=start + timedelta(minutes=5), power_limit_kw=1.0)
    await rig.hub.publish(topics.down("retailers", "r1"), Request(
        request_id=request_id, kind=RequestKind.EMERGENCY, client_ids=["c1"], params=params, expires_at=params.end))
    await rig.hub.next("ack")
    cmd = await rig.gw.next("command")
    assert isinstance(cmd, Command)
    out = await rig.hub.next("outcome", timeout=10)
    assert isinstance(out, Outcome) and out.state is ClientState.UNREACHABLE and out.client_id == "c1"
    await rig.hub.publish(topics.down("retailers", "r1"), Ack(ack_ids=[out.msg_id]))
    return cmd


async def test_a_late_outcome_after_unreachable_goes_to_the_hub_once(rig: Rig) -> None:
    cmd = await unreachable(rig, "q-late")
    await rig.gw.publish(topics.up("gateways", "gw-1"), Ack(ack_ids=[cmd.msg_id]))  # late: no "delivered" now
    late = Outcome(request_id="q-late", client_id="c1", state=ClientState.EXECUTED, detail={"shed": ["heater"]},
                   trace={"gateway_ms": 9.0}, revision=cmd.revision)
    await rig.gw.publish(topics.up("gateways", "gw-1"), late)
    ack = await rig.gw.next("ack")
    assert isinstance(ack, Ack) and ack.ack_ids == [late.msg_id]
    fwd = await rig.hub.next("outcome")  # on main: nothing (the command was closed with "unreachable")
    assert isinstance(fwd, Outcome) and fwd.state is ClientState.EXECUTED and fwd.client_id == "c1"
    assert fwd.detail == {"shed": ["heater"]} and fwd.revision == cmd.revision and fwd.trace["gateway_ms"] == 9.0
    await rig.hub.publish(topics.down("retailers", "r1"), Ack(ack_ids=[fwd.msg_id]))
    [stored] = await rig.bridge.store.commands_of("q-late")
    assert stored["state"] == "closed"
    # The gateway re-sends its outcome (our ack was lost): acknowledged again, not forwarded again.
    await rig.gw.publish(topics.up("gateways", "gw-1"), late)
    await rig.gw.next("ack")
    await rig.hub.nothing("outcome", within=0.8)


async def test_a_supplier_change_does_not_withdraw_a_command_declared_unreachable(rig: Rig) -> None:
    """Its ``refused`` would reach the hub as if the home had refused; the home may still act on the command, and
    only its own outcome may replace ``unreachable``."""
    cmd = await unreachable(rig, "q-moved")
    now = datetime.now(UTC)
    moved = Customers(items=[CustomerChange(client_id="c1", revision=2, periods=[
        SupplyPeriod(valid_from=now - timedelta(days=30), valid_until=now - timedelta(minutes=1))])])
    await rig.hub.publish(topics.down("retailers", "r1"), moved)
    ack = await rig.hub.next("ack")
    assert isinstance(ack, Ack) and ack.ack_ids == [moved.msg_id]
    await rig.hub.nothing("outcome", within=0.8)
    [stored] = await rig.bridge.store.commands_of("q-moved")
    assert stored["state"] == "unanswered" and stored["msg_id"] == cmd.msg_id
