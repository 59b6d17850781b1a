"""The bridge's ``ack``s go out at MQTT QoS 0 (to the hub and to its gateways; mhp_wire.messages.ACK_QOS) and it
applies a gateway's ``ack`` that arrives at QoS 0; its outcomes and refusals stay at QoS 1. A real bridge between two
real brokers; the hub and the gateway played by raw paho parties that see each packet's QoS."""

from __future__ import annotations

import asyncio

from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Command, ErrorReply, Outcome, encode
from tests.mqtt_party import Party, parties
from tests.retailer_bridge.test_bridge import Rig, request, rig

__all__ = ["rig"]  # the bridge rig of test_bridge.py, used here as a fixture


async def test_the_bridges_acks_arrive_at_qos_0_and_a_gateways_qos_0_ack_is_applied(rig: Rig) -> None:
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers")),
                 Party(rig.local, "gw-1", topics.down("gateways", "gw-1"))) as (hub, gw1):
        req = request(["c1"], "qa1")
        await hub.publish(topics.down("retailers", "r1"), req)
        ack, ack_qos = await hub.next_with_qos("ack")
        assert isinstance(ack, Ack) and ack.ack_ids == [req.msg_id] and ack_qos == 0
        cmd, cmd_qos = await gw1.next_with_qos("command")
        assert isinstance(cmd, Command) and cmd.client_id == "c1" and cmd_qos == 1
        # The gateway acknowledges at QoS 0, as the real one now does: the bridge applies it (``delivered``).
        rc = await asyncio.to_thread(gw1.client.publish_qos0, topics.up("gateways", "gw-1"),
                                     encode(Ack(ack_ids=[cmd.msg_id])))
        assert rc == 0
        delivered, delivered_qos = await hub.next_with_qos("outcome")
        assert isinstance(delivered, Outcome) and delivered.state is ClientState.DELIVERED and delivered_qos == 1
        out = Outcome(request_id="qa1", client_id="c1", state=ClientState.EXECUTED, trace={"gateway_ms": 3.0})
        await gw1.publish(topics.up("gateways", "gw-1"), out)
        gw_ack, gw_ack_qos = await gw1.next_with_qos("ack")
        assert gw_ack.ack_ids == [out.msg_id] and gw_ack_qos == 0  # type: ignore[union-attr]
        fwd, fwd_qos = await hub.next_with_qos("outcome")
        assert isinstance(fwd, Outcome) and fwd.state is ClientState.EXECUTED and fwd_qos == 1
        # A refusal stays at QoS 1, to the gateway and to the hub.
        await gw1.publish(topics.up("gateways", "gw-1"), b"{not json")
        err, err_qos = await gw1.next_with_qos("error")
        assert isinstance(err, ErrorReply) and err.code == "invalid" and err_qos == 1
        await hub.publish(topics.down("retailers", "r1"), b"{not json")
        hub_err, hub_err_qos = await hub.next_with_qos("error")
        assert isinstance(hub_err, ErrorReply) and hub_err.code == "invalid" and hub_err_qos == 1
        # The same request again: acknowledged again at QoS 0, no second command.
        await hub.publish(topics.down("retailers", "r1"), req)
        again, again_qos = await hub.next_with_qos("ack")
        assert again.ack_ids == [req.msg_id] and again_qos == 0  # type: ignore[union-attr]
        await gw1.nothing("command", within=0.8)
