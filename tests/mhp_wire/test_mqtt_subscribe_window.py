"""Thousands of topic filters through a small in-flight window, against a real Mosquitto (issue 14, fifth round).

A SUBSCRIBE or UNSUBSCRIBE packet takes a packet id from the pool that the broker's receive maximum bounds
(Mosquitto's ``max_inflight_messages``, 20 in a stock Mosquitto), shared with QoS 1 publishes in flight. A bridge
partition sends its gateways' filters 500 a packet: 5,000 filters are ten packets. Before, the eleventh packet id
past a window of 5 raised gmqtt's bare ``OverflowError`` out of ``MqttLink.subscribe``, out of entering the link
(the bridge could not start), and out of the reconnection callback (no subscriptions and no ``online`` presence
after a broker restart). Now each packet waits for a free id, as a publish waits for room.
"""

from __future__ import annotations

from mhp_wire import topics
from mhp_wire.mqtt import FILTERS_PER_PACKET
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.mhp_wire.test_mqtt_subscription_changes import bridge_link, send_each
from tests.waiting import eventually

WINDOW = 5
GATEWAYS = [f"gw-{i:04d}" for i in range(10 * FILTERS_PER_PACKET)]


def small_window_broker(mosquitto_factory: MosquittoFactory) -> BrokerHandle:
    return mosquitto_factory("retailer", ["gw-0007", "gw-4999"], "bridge", max_inflight_messages=WINDOW)


def filters() -> list[str]:
    return [topics.party_up("gateways", g) for g in GATEWAYS]


async def test_subscribing_to_thousands_of_filters_waits_for_packet_ids(mosquitto_factory: MosquittoFactory) -> None:
    broker = small_window_broker(mosquitto_factory)
    got: list[str] = []
    async with bridge_link(broker, got) as link:
        await link.subscribe(filters())  # ten SUBSCRIBE packets through a window of five: each waits its turn
        assert link.subscriptions == filters() and link.stats.extra.get("subscribe_waits", 0) > 0
        assert len(link._client.subscriptions) == len(GATEWAYS)  # gmqtt's own list: each filter once
        await send_each(broker, ["gw-0007", "gw-4999"])
        await eventually(lambda: len(got) == 2, "the messages of gw-0007 and gw-4999")
        await link.unsubscribe(filters()[:-1])  # and ten UNSUBSCRIBE packets
        assert link.subscriptions == [topics.party_up("gateways", "gw-4999")]
        got.clear()
        await send_each(broker, ["gw-0007", "gw-4999"])
        await eventually(lambda: got, "the message of gw-4999")
        assert got == ["gw-4999"]


async def test_a_link_entered_with_thousands_of_filters_and_reconnected_restores_them_once(
        mosquitto_factory: MosquittoFactory) -> None:
    broker = small_window_broker(mosquitto_factory)
    got: list[str] = []
    async with bridge_link(broker, got, *filters()) as link:  # entered: ten packets through the window
        await send_each(broker, ["gw-4999"])
        await eventually(lambda: got == ["gw-4999"], "the message of gw-4999")
        broker.process.kill()  # no snapshot: the broker loses our session and its filters
        await eventually(lambda: not link.connected, "the link noticed")
        broker.process.start()
        await eventually(lambda: link.connected, "the link is back")
        # All filters again, in waves, then nothing twice in gmqtt's list.
        await eventually(lambda: link._restoring is not None and link._restoring.done(), "restored")
        assert len(link._client.subscriptions) == len(GATEWAYS)
        got.clear()
        await send_each(broker, ["gw-0007"])
        await eventually(lambda: got == ["gw-0007"], "the message of gw-0007 after the restart")
