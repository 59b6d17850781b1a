"""The Maximum Packet Size a broker states in its CONNACK lowers the link's limit (``MqttLink.max_packet_bytes``):
a real Mosquitto from broker_config stating 2,000 bytes; the link refuses a larger publish before writing it and
stays connected. (tests/mhp_wire/test_mqtt_packet_limit.py covers a broker stating the default.)"""

from __future__ import annotations

import pytest

from mhp_wire import topics
from mhp_wire.mqtt import MqttEndpoint, MqttLink, PacketTooLarge
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import ignore_messages
from tests.waiting import throughout


async def test_a_lower_connack_maximum_packet_size_is_obeyed(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge", max_packet_size=2000)
    gateway = MqttEndpoint(broker.host, broker.port, "gw-1", broker.identities["gw-1"].password)
    async with MqttLink(gateway, client_id="gw-1", subscriptions=[], handler=ignore_messages, clean_start=True,
                        session_expiry_s=0) as gw:
        assert gw.max_packet_bytes == 2000
        with pytest.raises(PacketTooLarge):
            await gw.publish(topics.up("gateways", "gw-1"), b"x" * 2500, wait_s=5)
        with pytest.raises(PacketTooLarge):  # 1,000 characters, 3,000 bytes: measured in bytes (e3ac111: written)
            await gw.publish(topics.up("gateways", "gw-1"), "\u20ac" * 1000, wait_s=5)  # type: ignore[arg-type]
        await throughout(lambda: gw.connected and gw.stats.connects == 1, "the gateway's link stays up")
        assert gw.refused_too_large == 2
