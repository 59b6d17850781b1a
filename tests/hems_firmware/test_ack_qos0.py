"""The gateway's ``ack`` goes out at MQTT QoS 0 (mhp_wire.messages.ACK_QOS); its outcomes and refusals stay at QoS 1.
A real gateway daemon, a real retailer broker, the bridge played by a raw paho party that sees each packet's QoS."""

from __future__ import annotations

from mhp_wire import topics
from mhp_wire.messages import ACK_QOS, Ack, ClientState, ErrorReply, Outcome
from tests.hems_firmware.test_gateway import Rig, command, rig
from tests.mqtt_party import Party, parties

__all__ = ["rig"]  # the gateway rig of test_gateway.py, used here as a fixture


async def test_the_gateways_ack_arrives_at_qos_0_and_its_outcome_and_error_at_qos_1(rig: Rig) -> None:
    assert ACK_QOS == 0
    with parties(Party(rig.broker, "bridge", topics.up("gateways", "gw-1"))) as (bridge,):
        cmd = command(lead_s=0.3, duration_s=5)
        await bridge.publish(topics.down("gateways", "gw-1"), cmd)
        ack, ack_qos = await bridge.next_with_qos("ack")
        assert isinstance(ack, Ack) and ack.ack_ids == [cmd.msg_id]
        assert ack_qos == 0
        out, out_qos = await bridge.next_with_qos("outcome")
        assert isinstance(out, Outcome) and out.state is ClientState.EXECUTED and out_qos == 1
        await bridge.publish(topics.down("gateways", "gw-1"), Ack(ack_ids=[out.msg_id]))
        await bridge.publish(topics.down("gateways", "gw-1"), b"{not json")
        err, err_qos = await bridge.next_with_qos("error")
        assert isinstance(err, ErrorReply) and err.code == "invalid" and err_qos == 1
        # A duplicate of the command is acknowledged again, at QoS 0, and not executed twice.
        await bridge.publish(topics.down("gateways", "gw-1"), cmd)
        again, again_qos = await bridge.next_with_qos("ack")
        assert again.ack_ids == [cmd.msg_id] and again_qos == 0  # type: ignore[union-attr]
        assert [a.request_id for a in rig.gateway.actuations] == ["q1", "q1"]
