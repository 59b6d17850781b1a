"""``MqttLink.publish`` refuses a packet over the broker's limit itself (:class:`mhp_wire.mqtt.PacketTooLarge`),
before anything is written, against a real Mosquitto from broker_config. Before, the link wrote it: Mosquitto cut
the connection, every message queued behind it waited for the reconnection, and the session sent the QoS 1 packet
again at each reconnection, which cut it again, for good. Each publisher had to check the size itself."""

from __future__ import annotations

import pytest

from mhp_wire import topics
from mhp_wire.messages import MAX_PACKET_BYTES
from mhp_wire.mqtt import MqttEndpoint, MqttError, MqttLink, PacketTooLarge, publish_size, topic_field
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import ignore_messages
from tests.waiting import eventually, throughout


async def test_an_oversize_publish_raises_the_link_stays_up_and_the_next_message_arrives(
        mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    got: list[bytes] = []

    async def receive(topic: str, payload: bytes, retained: bool) -> None:
        got.append(payload)

    bridge = MqttEndpoint(broker.host, broker.port, "bridge", broker.identities["bridge"].password)
    gateway = MqttEndpoint(broker.host, broker.port, "gw-1", broker.identities["gw-1"].password)
    up = topics.up("gateways", "gw-1")
    async with (MqttLink(bridge, client_id="bridge", subscriptions=[topics.all_up("gateways")], handler=receive,
                         clean_start=True, session_expiry_s=0),
                MqttLink(gateway, client_id="gw-1", subscriptions=[], handler=ignore_messages, clean_start=True,
                         session_expiry_s=0) as gw):
        assert gw.max_packet_bytes == MAX_PACKET_BYTES
        # The largest payload that fits: its packet is exactly the broker's limit, and the broker takes it.
        fits = MAX_PACKET_BYTES - publish_size(len(topic_field(up)), 0, 1)
        while publish_size(len(topic_field(up)), fits, 1) > MAX_PACKET_BYTES:  # a longer remaining length
            fits -= 1
        assert publish_size(len(topic_field(up)), fits, 1) == MAX_PACKET_BYTES
        await gw.publish(up, b"a" * fits, wait_s=5)
        await eventually(lambda: len(got) == 1, "the largest packet the broker takes")
        for qos in (1, 0):
            over = fits + 1 + (2 if qos == 0 else 0)  # a QoS 0 packet has no packet id: two bytes more payload
            with pytest.raises(PacketTooLarge) as refused:
                await gw.publish(up, b"b" * over, qos=qos, wait_s=5)
            assert isinstance(refused.value, MqttError) and refused.value.size == MAX_PACKET_BYTES + 1
        assert gw.refused_too_large == 2 and gw._client._persistent_storage.is_empty  # nothing was written
        await gw.publish(up, b"next", wait_s=5)
        await eventually(lambda: got[-1:] == [b"next"], "the next message")
        await throughout(lambda: gw.connected and gw.stats.connects == 1, "the broker never cuts the gateway's link")
        assert [len(p) for p in got] == [fits, 4]
