"""The retailer bridge between two real brokers, with the hub and the gateways played by paho test clients."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Command, EmergencyParams, ErrorReply, Outcome, Request, RequestKind
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.mqtt_party import Party, parties


@dataclass
class Rig:
    hub_broker: BrokerHandle
    local: BrokerHandle
    bridge: Bridge


@pytest.fixture
async def rig(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[Rig]:
    hub_broker = mosquitto_factory("hub", ["r1", "r2"], "hub")
    local = mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")
    settings = BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub_broker.host, hub_mqtt_port=hub_broker.port,
        hub_mqtt_password=hub_broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", customers={"c1": "gw-1", "c2": "gw-2"}, gateway_ack_timeout_s=1.5)
    bridge = Bridge(settings)
    task = asyncio.create_task(bridge.run())
    with parties(Party(hub_broker, "hub", topics.status("retailers", "r1"))) as (probe,):
        await probe.next("presence")
    await asyncio.sleep(0.3)
    try:
        yield Rig(hub_broker, local, bridge)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def request(clients: list[str], request_id: str = "q1", lead_s: float = 5) -> Request:
    start = datetime.now(UTC) + timedelta(seconds=lead_s)
    params = EmergencyParams(start=start, end=start + timedelta(minutes=5), power_limit_kw=1.0)
    return Request(request_id=request_id, kind=RequestKind.EMERGENCY, client_ids=clients, params=params,
                   expires_at=params.end)


async def test_request_is_relayed_to_the_right_gateways_and_outcomes_go_back(rig: Rig) -> None:
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers")),
                 Party(rig.local, "gw-1", topics.down("gateways", "gw-1")),
                 Party(rig.local, "gw-2", topics.down("gateways", "gw-2"))) as (hub, gw1, gw2):
        req = request(["c1", "c2", "c9"])
        await hub.publish(topics.down("retailers", "r1"), req)
        assert (await hub.next("ack")).ack_ids == [req.msg_id]  # type: ignore[union-attr]
        refused = await hub.next("outcome")
        assert isinstance(refused, Outcome) and refused.client_id == "c9" and refused.state is ClientState.REFUSED
        await hub.publish(topics.down("retailers", "r1"), Ack(ack_ids=[refused.msg_id]))
        cmd1, cmd2 = await gw1.next("command"), await gw2.next("command")
        assert isinstance(cmd1, Command) and isinstance(cmd2, Command)
        assert (cmd1.client_id, cmd2.client_id) == ("c1", "c2")
        for gw, cmd, gid in ((gw1, cmd1, "gw-1"), (gw2, cmd2, "gw-2")):
            await gw.publish(topics.up("gateways", gid), Ack(ack_ids=[cmd.msg_id]))
        delivered = {(await hub.next("outcome")).client_id for _ in range(2)}  # type: ignore[union-attr]
        assert delivered == {"c1", "c2"}
        out = Outcome(request_id="q1", client_id="c1", state=ClientState.EXECUTED, detail={"shed": ["heater"]},
                      trace={"gateway_ms": 12.0, "waited_ms": 4000.0})
        await gw1.publish(topics.up("gateways", "gw-1"), out)
        assert (await gw1.next("ack")).ack_ids == [out.msg_id]  # type: ignore[union-attr]
        fwd = await hub.next("outcome")
        assert isinstance(fwd, Outcome) and fwd.state is ClientState.EXECUTED and fwd.client_id == "c1"
        assert fwd.detail == {"shed": ["heater"]}
        assert fwd.trace["gateway_ms"] == 12.0 and "retailer_ms" in fwd.trace and "gateway_rtt_ms" in fwd.trace
        # The same request redelivered by the hub creates no second command.
        await hub.publish(topics.down("retailers", "r1"), req)
        await hub.next("ack")
        await gw1.nothing("command", within=0.8)


async def test_a_silent_gateway_is_reported_unreachable(rig: Rig) -> None:
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers"))) as (hub,):
        await hub.publish(topics.down("retailers", "r1"), request(["c1"], "q2", lead_s=0))
        await hub.next("ack")
        out = await hub.next("outcome", timeout=6)
        assert isinstance(out, Outcome) and out.state is ClientState.UNREACHABLE
        assert out.detail["gateway_id"] == "gw-1"


async def test_a_gateway_may_report_only_for_its_own_client_and_garbage_is_refused(rig: Rig) -> None:
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers")),
                 Party(rig.local, "gw-2", topics.down("gateways", "gw-2"))) as (hub, gw2):
        await hub.publish(topics.down("retailers", "r1"), request(["c1"], "q3"))
        await hub.next("ack")
        forged = Outcome(request_id="q3", client_id="c1", state=ClientState.REFUSED)
        await gw2.publish(topics.up("gateways", "gw-2"), forged)
        err = await gw2.next("error")
        assert isinstance(err, ErrorReply) and err.code == "forbidden"
        await gw2.publish(topics.up("gateways", "gw-2"), b"\xff\xfe")
        err = await gw2.next("error")
        assert isinstance(err, ErrorReply) and err.code == "invalid"
        await hub.publish(topics.down("retailers", "r1"), b"[]")
        err = await hub.next("error")
        assert isinstance(err, ErrorReply) and err.code == "invalid"
        await hub.nothing("outcome", within=0.5)
        rejected = rig.bridge.relay.rejected
        assert (rejected["gateway_foreign_client"], rejected["gateway_invalid"], rejected["hub_invalid"]) == (1, 1, 1)
