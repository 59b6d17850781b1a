"""The MQTT adapter against a real Mosquitto: a full in-flight window is an MqttError the outboxes retry on,
never an exception that would stop a service loop."""

from __future__ import annotations

import asyncio

from mhp_wire import topics
from mhp_wire.mqtt import MqttEndpoint, MqttError, MqttLink
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import ignore_messages


async def test_a_full_in_flight_window_is_an_mqtt_error(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge", max_inflight_messages=5)
    endpoint = MqttEndpoint(broker.host, broker.port, "bridge", broker.identities["bridge"].password)
    async with MqttLink(endpoint, client_id="bridge", subscriptions=[], handler=ignore_messages, clean_start=True,
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



async def test_publish_with_wait_s_waits_for_room_and_delivers_everything_in_order(
        mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge", max_inflight_messages=5)
    bridge = MqttEndpoint(broker.host, broker.port, "bridge", broker.identities["bridge"].password)
    gateway = MqttEndpoint(broker.host, broker.port, "gw-1", broker.identities["gw-1"].password)
    got: list[bytes] = []

    async def collect(topic: str, payload: bytes, retained: bool) -> None:
        got.append(payload)

    async with (MqttLink(gateway, client_id="gw-1", subscriptions=[topics.down("gateways", "gw-1")],
                         handler=collect, clean_start=True, session_expiry_s=0),
                MqttLink(bridge, client_id="bridge", subscriptions=[], handler=ignore_messages, clean_start=True,
                         session_expiry_s=0) as link):
        await asyncio.sleep(0.2)  # the gateway's subscription is in place
        # 300 publishes at once from concurrent tasks through a window of 5: each waits its turn, none fails.
        await asyncio.gather(*(link.publish(topics.down("gateways", "gw-1"), str(i).encode(), wait_s=10.0)
                               for i in range(300)))
        assert link.stats.extra.get("inflight_full", 0) == 0 and link.stats.extra["inflight_waits"] > 0
        for _ in range(200):
            if len(got) >= 300:
                break
            await asyncio.sleep(0.05)
        assert [int(p) for p in got] == list(range(300))  # waiters publish in their order
