"""A message to a retailer that the hub's link refuses as over the broker's packet (``PacketTooLarge``, nothing
written) is parked, not recorded as sent: its targets stay ``pending`` (no ``sent`` mark, no change-feed entry), no
``on_published`` call, no attempt counted; it is counted in ``mhp_outbox_parked`` and goes at the next connection
(docs/decisions.md, "A link refuses a packet over the broker's limit").

A real hub (uvicorn, SQLite, its real Mosquitto), the retailer played by an MQTT party. The link's limit is lowered
under the request's packet for the first send (as a broker stating a smaller Maximum Packet Size would), then
restored before the next connection's hook runs."""

from __future__ import annotations

from cloud_hub.book import OutboxItem
from mhp_wire import topics
from mhp_wire.messages import Request
from tests.cloud_hub.test_sent_settle import emergency, marked_sent, shifted, stored_events, view
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties
from tests.waiting import eventually


async def test_a_parked_request_is_neither_marked_sent_nor_published_and_goes_at_the_next_connection(
        hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    relay, _ = shifted(hub)  # marks wait to settle: what a send records stays in view
    link = relay.link
    assert link is not None
    published: list[OutboxItem] = []

    async def on_published(items: list[OutboxItem]) -> None:
        published.extend(items)

    relay.on_published = on_published
    configured = link.max_packet_bytes
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        link.max_packet_bytes = 200  # under any request's packet
        request_id = await emergency(hub, ["c1"])
        await eventually(lambda: relay.metrics.outbox_parked._value.get() >= 1, "the request parked")
        await r1.nothing("request", within=1.0)
        book = hub.app.state.service.book
        [item] = [i for i in relay.parked.values() if i.kind == "request"]  # (and any re-send due meanwhile)
        assert item.request_id == request_id and item.attempts == 0 and relay.outbox.parked == len(relay.parked)
        assert item not in published, "a parked message is not a send: no on_published"
        assert all(m.item.request_id != request_id for m in book._settling), "nor a sent mark"
        assert (await view(hub, request_id))["clients"]["c1"]["state"] == "pending"
        assert marked_sent(await stored_events(hub, request_id)) == [] and link.connected

        link.max_packet_bytes = configured
        relay.link_connected()  # what the link's on_connect calls at the next connection
        relay.kick()
        msg = await r1.next("request")
        assert isinstance(msg, Request) and msg.msg_id == item.msg_id and relay.parked == {}
        await eventually(lambda: item in published, "recorded once really sent")
        assert item.attempts == 1 and [m.item for m in book._settling if m.item.request_id == request_id] == [item]
