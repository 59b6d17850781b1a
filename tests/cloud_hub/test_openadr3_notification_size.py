"""An OpenADR 3 event naming more of a VEN's clients than one MQTT packet carries is not pushed on the VEN's MQTT
topic (its webhooks and its GET still have it), and the hub's link stays up (issue 14, "loses nothing";
docs/decisions.md, "The hub's own messages fit the packet").

Before, the notifier published the event, whose ``targets`` list every client of that VEN in the request (10,000
ids of 60 characters are ~640 KB), on the hub's own link: the hub broker cut the link for the oversize PUBLISH, and
the session sent it again at each reconnection, so no retailer heard from the hub again. Through real parts: the hub
with its OpenADR 3.1 facade (uvicorn, real SQLite) and its Mosquitto, r1's VEN joined through the facade, its MQTT
topic read by a paho client with r1's identity."""

from __future__ import annotations

import asyncio
import json

from cloud_hub.openadr3 import BASE_PATH_30
from mhp_wire.messages import SEND_PAYLOAD_BYTES
from tests.broker_config.paho_client import TestClient
from tests.cloud_hub.openadr3_parts import emergency, join, oadr_hub, token
from tests.hub_fixtures import IN_FORCE_SINCE, HubHandle
from tests.waiting import eventually

__all__ = ["oadr_hub"]

MANY = 10_000


async def test_an_event_too_big_for_a_packet_is_not_pushed_by_mqtt_and_the_hub_link_stays_up(oadr_hub: HubHandle
                                                                                              ) -> None:
    hub = oadr_hub
    await join(hub, "r1")
    ids = [f"client-{'x' * 45}-{k:06d}" for k in range(MANY)]  # 59 characters each
    for k in range(0, MANY, 4_000):  # a few bulk registrations (the API's body limit)
        r = await hub.http.put("/v1/clients", headers=hub.auth("dso"), json={"clients": [
            {"client_id": cid, "retailer_id": "r1", "contracted_power_kw": 6.9, "feeder_id": "f1",
             "valid_from": IN_FORCE_SINCE} for cid in ids[k:k + 4_000]]})
        assert r.status_code == 200, r.text
    h1 = await token(hub, "r1")
    names = (await hub.http.get(f"{BASE_PATH_30}/notifiers/mqtt/topics/vens/r1/events", headers=h1)).json()
    mqtt_r1 = TestClient(hub.broker.host, hub.broker.port, "r1", hub.broker.identities["r1"].password)
    try:
        assert not mqtt_r1.connect().is_failure and not mqtt_r1.subscribe(names["topics"]["ALL"]).is_failure
        notifier = hub.app.state.openadr3
        big, _ = await emergency(hub.http, hub.auth("dso"), ids)
        await eventually(lambda: notifier.sent["mqtt"] + notifier.sent.get("mqtt_too_big", 0) == 1,
                         "the big event's notification was sent or held back", timeout_s=20)
        # A small one after it: pushed as usual, so the link was not cut (before: never, the link cut again and
        # again at each reconnection by the big one's re-sent packet).
        small, _ = await emergency(hub.http, hub.auth("dso"), ["c1"])
        got = await asyncio.to_thread(mqtt_r1.next_message, 15)
        assert json.loads(got.payload)["object"]["id"] == small
        assert notifier.sent["mqtt_too_big"] == 1
    finally:
        mqtt_r1.close()
    event = (await hub.http.get(f"{BASE_PATH_30}/events/{big}", headers=h1)).json()
    assert len(event["targets"][0]["values"]) == MANY, "its GET shows the whole event"
    assert len(json.dumps(event)) > SEND_PAYLOAD_BYTES
    assert "oversize packet" not in hub.broker.process.log_tail()
    assert hub.app.state.relay.link.stats.connects == 1
