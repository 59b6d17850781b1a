"""The hub waits for every partition of a retailer's bridge to acknowledge a message (issue 14; ``Ack.partition``).

A real hub (HTTP, SQLite, its real Mosquitto) and a test retailer as a paho client that acknowledges as the
partitions of a bridge would. The acknowledgements are written as raw wire JSON, as a partitioned bridge sends them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

from mhp_wire import topics
from mhp_wire.messages import presence_payload
from tests.cloud_hub.test_relay import post_emergency, wait_state
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties

RESEND_WITHIN_S = 3.0
"""The hub's first re-send of an unacknowledged message comes within this (as in ``test_relay``)."""


def ack(msg_id: str, partition: tuple[int, int] | None) -> bytes:
    """A bridge's ``ack`` of ``msg_id`` on the wire: partition ``(index, of)``, or none (unpartitioned)."""
    body: dict[str, object] = {"v": 1, "msg_id": uuid.uuid4().hex, "sent_at": datetime.now(UTC).isoformat(),
                               "type": "ack", "ack_ids": [msg_id]}
    if partition is not None:
        body["partition"] = {"index": partition[0], "of": partition[1]}
    return json.dumps(body).encode()


async def resend_now(party: Party, retailer_id: str = "r1") -> None:
    """Make the hub re-send at once everything the retailer has not acknowledged, whatever its back-off: the
    retailer's presence goes ``offline`` then ``online`` (what a bridge's reconnection does). A message the hub
    still holds then arrives within a moment; one it no longer holds never does."""
    for state in ("offline", "online"):
        await party.publish(topics.status("retailers", retailer_id), presence_payload(state), retain=True)


async def drain(party: Party) -> None:
    """Forget what the party has received so far (re-sends already on their way)."""
    await asyncio.sleep(0.2)
    while not party.client.messages.empty():
        party.client.messages.get_nowait()


async def test_the_hub_re_sends_until_every_partition_has_acknowledged(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    up = topics.up("retailers", "r1")
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        await post_emergency(hub, ["c1"])
        first = await r1.next("request")
        # Partition 0 of 2 stored its share: the message is not acknowledged by the retailer yet.
        await r1.publish(up, ack(first.msg_id, (0, 2)))
        await drain(r1)
        again = await r1.next("request", timeout=RESEND_WITHIN_S)
        assert again.msg_id == first.msg_id, "re-sent as the same message, so partition 0 deduplicates it"
        # Partition 0 again (it deduplicated the re-send): still not every partition.
        await r1.publish(up, ack(first.msg_id, (0, 2)))
        await drain(r1)
        await resend_now(r1)
        assert (await r1.next("request", timeout=RESEND_WITHIN_S)).msg_id == first.msg_id
        # Partition 1 of 2: every partition has it, the hub stops.
        await r1.publish(up, ack(first.msg_id, (1, 2)))
        await drain(r1)
        await resend_now(r1)
        await r1.nothing("request", within=RESEND_WITHIN_S)


async def test_an_unpartitioned_ack_still_stops_the_hub_at_once(hub: HubHandle) -> None:
    """Today's bridges, which send no partition, keep working with the hub."""
    await hub.setup_registry({"c1": "r1"})
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        await post_emergency(hub, ["c1"])
        first = await r1.next("request")
        await r1.publish(topics.up("retailers", "r1"), ack(first.msg_id, None))
        await drain(r1)
        await resend_now(r1)
        await r1.nothing("request", within=RESEND_WITHIN_S)


async def test_a_tariff_is_delivered_to_a_retailer_when_all_its_partitions_have_it(hub: HubHandle) -> None:
    """A delivery's acknowledgement is written to the request row once, when every partition has acknowledged."""
    await hub.setup_registry({})
    now = datetime.now(UTC)
    r = await hub.http.post("/v1/tariffs", headers=hub.auth("dso"), json={
        "tariff_id": "tou", "valid_from": now.isoformat(), "valid_to": (now + timedelta(days=30)).isoformat(),
        "periods": [{"start": now.isoformat(), "end": (now + timedelta(hours=7)).isoformat(),
                     "price_eur_per_kwh": 0.08}]})
    assert r.status_code == 202, r.text
    request_id = r.json()["request_id"]
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1")),
                 Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (r1, r2):
        t1, t2 = await r1.next("tariff"), await r2.next("tariff")
        await r2.publish(topics.up("retailers", "r2"), ack(t2.msg_id, None))  # r2's bridge is not partitioned
        await r1.publish(topics.up("retailers", "r1"), ack(t1.msg_id, (1, 3)))
        await r1.publish(topics.up("retailers", "r1"), ack(t1.msg_id, (0, 3)))
        req = await wait_state(hub, request_id, "completed", timeout=1.0)
        assert req["retailers"]["r2"]["state"] == "acknowledged"
        assert req["state"] != "completed" and req["retailers"]["r1"]["state"] != "acknowledged", req
        await drain(r1)
        assert (await r1.next("tariff", timeout=RESEND_WITHIN_S)).msg_id == t1.msg_id
        await r1.publish(topics.up("retailers", "r1"), ack(t1.msg_id, (2, 3)))
        req = await wait_state(hub, request_id, "completed")
        assert req["state"] == "completed"
        assert {x["state"] for x in req["retailers"].values()} == {"acknowledged"}
        await drain(r1)
        await resend_now(r1)
        await r1.nothing("tariff", within=RESEND_WITHIN_S)
