"""The hub's ``ack`` goes out at MQTT QoS 0 (mhp_wire.messages.ACK_QOS) and a retailer's ``ack`` at QoS 0 ends the
hub's re-sends; requests and refusals stay at QoS 1. A real hub, its real broker, the retailer played by a raw paho
party that sees each packet's QoS."""

from __future__ import annotations

import asyncio

from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, ErrorReply, Outcome, Request, encode
from tests.cloud_hub.test_relay import post_emergency, wait_state
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties


async def test_the_hubs_ack_arrives_at_qos_0_and_a_retailers_qos_0_ack_ends_the_resends(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        request_id = await post_emergency(hub, ["c1"])
        req, req_qos = await r1.next_with_qos("request")
        assert isinstance(req, Request) and req_qos == 1
        rc = await asyncio.to_thread(r1.client.publish_qos0, topics.up("retailers", "r1"),
                                     encode(Ack(ack_ids=[req.msg_id])))
        assert rc == 0
        await r1.nothing("request", within=1.5)  # the first re-send would come after 0.5 s
        out = Outcome(request_id=request_id, client_id="c1", state=ClientState.EXECUTED, trace={"gateway_ms": 4.0})
        await r1.publish(topics.up("retailers", "r1"), out)
        ack, ack_qos = await r1.next_with_qos("ack")
        assert isinstance(ack, Ack) and ack.ack_ids == [out.msg_id] and ack_qos == 0
        await wait_state(hub, request_id, "completed")
        await r1.publish(topics.up("retailers", "r1"), b"{not json")
        err, err_qos = await r1.next_with_qos("error")
        assert isinstance(err, ErrorReply) and err.code == "invalid" and err_qos == 1
        # A duplicate outcome is acknowledged again, at QoS 0, and changes nothing.
        await r1.publish(topics.up("retailers", "r1"), out)
        again, again_qos = await r1.next_with_qos("ack")
        assert again.ack_ids == [out.msg_id] and again_qos == 0  # type: ignore[union-attr]
        state = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
        assert state["state"] == "completed" and state["clients"]["c1"]["state"] == "executed"
