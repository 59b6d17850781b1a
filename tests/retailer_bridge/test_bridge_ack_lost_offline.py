"""A gateway's ``ack`` of a command is QoS 0 (issue 14, sixth round: acks at QoS 0), so one sent while the bridge is
offline is not queued for it by the broker. The bridge then finds the command unanswered past its ack timeout when
it comes back: it must send it once more and wait a whole timeout from its reconnection before calling the gateway
``unreachable``. Before the fix, the first round after the restart reported ``unreachable`` at once, although the
gateway had acknowledged the command and acknowledged it again when asked. Two real brokers, the bridge stopped
and started again on its store, the hub and the gateway played by paho clients."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Command, EmergencyParams, Outcome, Request, RequestKind, encode
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import Party, parties

ACK_TIMEOUT_S = 1.5


@contextlib.asynccontextmanager
async def bridge_running(settings: BridgeSettings, hub: Party) -> AsyncIterator[Bridge]:
    """The bridge, running once ``hub`` (subscribed to the retailers' topics) has seen it online."""
    bridge = Bridge(settings)
    task = asyncio.create_task(bridge.run())
    try:
        presence = await hub.next("presence", timeout=10)
        while presence.state != "online":  # type: ignore[union-attr]  # a retained "offline" of the last run first
            presence = await hub.next("presence", timeout=10)
        yield bridge
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_command_acked_while_the_bridge_was_away_is_sent_again_not_called_unreachable(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    hub_broker = mosquitto_factory("hub", ["r1"], "hub")
    local = mosquitto_factory("retailer", ["gw-1"], "bridge")
    settings = BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub_broker.host, hub_mqtt_port=hub_broker.port,
        hub_mqtt_password=hub_broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", customers={"c1": "gw-1"}, gateway_ack_timeout_s=ACK_TIMEOUT_S)
    start = datetime.now(UTC)  # at once: the ack timeout counts from the first send
    params = EmergencyParams(start=start, end=start + timedelta(minutes=5), power_limit_kw=1.0)
    req = Request(request_id="q1", kind=RequestKind.EMERGENCY, client_ids=["c1"], params=params,
                  expires_at=params.end)
    with parties(Party(hub_broker, "hub", topics.all_up("retailers")),
                 Party(local, "gw-1", topics.down("gateways", "gw-1"))) as (hub, gw):
        async with bridge_running(settings, hub):
            await hub.publish(topics.down("retailers", "r1"), req)
            await hub.next("ack")
            cmd = await gw.next("command")
            assert isinstance(cmd, Command)
        # The bridge is away; the gateway's ack (QoS 0, as the real gateway sends it) reaches no one, and the
        # bridge stays away longer than its ack timeout.
        await asyncio.to_thread(gw.client.publish, topics.up("gateways", "gw-1"), encode(Ack(ack_ids=[cmd.msg_id])),
                                0)
        await asyncio.sleep(ACK_TIMEOUT_S + 0.5)
        async with bridge_running(settings, hub):
            again = await gw.next("command", timeout=10)
            assert isinstance(again, Command) and again.msg_id == cmd.msg_id  # sent once more, not given up
            await asyncio.to_thread(gw.client.publish, topics.up("gateways", "gw-1"),
                                    encode(Ack(ack_ids=[cmd.msg_id])), 0)
            out = await hub.next("outcome", timeout=10)
            assert isinstance(out, Outcome) and out.client_id == "c1"
            assert out.state is ClientState.DELIVERED, out
