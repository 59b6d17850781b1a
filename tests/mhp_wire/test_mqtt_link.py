"""The MQTT adapter against a real Mosquitto: a full in-flight window is an MqttError the outboxes retry on,
never an exception that would stop a service loop."""

from __future__ import annotations

import asyncio

from mhp_wire import topics
from mhp_wire.mqtt import MqttEndpoint, MqttError, MqttLink
from tests.broker_fixtures import MosquittoFactory


async def _ignore(topic: str, payload: bytes, retained: bool) -> None:
    return None


async def test_a_full_in_flight_window_is_an_mqtt_error(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge", max_inflight_messages=5)
    endpoint = MqttEndpoint(broker.host, broker.port, "bridge", broker.identities["bridge"].password)
    async with MqttLink(endpoint, client_id="bridge", subscriptions=[], handler=_ignore, clean_start=True,
                        session_expiry_s=0) as link:
        deferred = 0
        for _ in range(200):  # no await in between: the broker's PUBACKs cannot free the window meanwhile
            try:
                await link.publish(topics.down("gateways", "gw-1"), b"x" * 10)
            except MqttError as exc:
                assert "in-flight window is full" in str(exc)
                deferred += 1
        assert deferred > 0 and link.stats.extra["inflight_full"] == deferred
        await asyncio.sleep(0.5)
        await link.publish(topics.down("gateways", "gw-1"), b"later")  # the window frees as PUBACKs arrive

