"""A link's MQTT 5 Receive Maximum (issue 14, seventh round): the broker sends a link at most that many QoS 1 messages
it has not had acknowledged. Without one, Mosquitto allows its ``max_inflight_messages`` (1,000 as broker_config
renders it), and a link whose PUBACKs wait for its batch handler (the bridge's, which waits for a commit) is held
back at 1,000 while the handler runs; the bridge asks the widest window. Against a real Mosquitto.

Before: the bridge asked nothing; with "an outcome stands for its ack" a gateway's QoS 1 outcome, not its QoS 0 ack
(which no window holds), is what stops the bridge's re-sends, and one 10,000-gateway fan-out under load re-sent
1,655 commands whose outcomes waited at the broker (docs/performance.md)."""

from __future__ import annotations

import asyncio

import pytest

from mhp_wire import topics
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from retailer_bridge.service import LOCAL_RECEIVE_MAXIMUM
from tests.broker_fixtures import MosquittoFactory
from tests.retailer_bridge.test_bridge import Rig, rig  # noqa: F401  (the rig fixture)
from tests.waiting import eventually

BROKER_WINDOW = 1000
"""``max_inflight_messages`` as broker_config renders it (``broker_config.render``)."""
N = 1500


async def _ignore(topic: str, payload: bytes, retained: bool) -> None:
    raise AssertionError("a QoS 1 message went to the per-message handler")


async def read_while_blocked(mosquitto_factory: MosquittoFactory, receive_maximum: int | None) -> tuple[int, int]:
    """Publish N QoS 1 messages to a link whose batch handler does not return (so it sends no PUBACK); how many it
    read while blocked, and how many in all once released."""
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    bridge = MqttEndpoint(broker.host, broker.port, "bridge", broker.identities["bridge"].password)
    gateway = MqttEndpoint(broker.host, broker.port, "gw-1", broker.identities["gw-1"].password)
    release = asyncio.Event()
    got: list[int] = []

    async def handle(messages: list[tuple[str, bytes, bool]]) -> None:
        got.extend(int(p) for _, p, _ in messages)
        await release.wait()

    async with (MqttLink(bridge, client_id="bridge", subscriptions=[topics.all_up("gateways")], handler=_ignore,
                         batch_handler=handle, clean_start=True, session_expiry_s=0,
                         receive_maximum=receive_maximum) as link,
                MqttLink(gateway, client_id="gw-1", subscriptions=[], handler=_ignore, clean_start=True,
                         session_expiry_s=0) as gw):
        for i in range(N):
            await gw.publish(topics.up("gateways", "gw-1"), f"{i:05d}".encode(), wait_s=10)
        # Every message is with the broker once the publisher's window is empty (the broker acknowledged them all).
        await eventually(lambda: gw._client._persistent_storage.is_empty, "the broker has every message")
        await eventually(lambda: len(got) >= min(N, receive_maximum or BROKER_WINDOW), "the first window read")
        await asyncio.sleep(0.3)  # nothing more comes while nothing is acknowledged
        blocked = len(got)
        release.set()
        await eventually(lambda: len(got) >= N, "every message, once the handler returns")
        assert sorted(got) == list(range(N)) and link.stats.received == N
        return blocked, len(got)


async def test_without_a_receive_maximum_the_broker_holds_a_blocked_link_at_its_window(
        mosquitto_factory: MosquittoFactory) -> None:
    assert await read_while_blocked(mosquitto_factory, None) == (BROKER_WINDOW, N)


async def test_a_wide_receive_maximum_lets_the_broker_send_past_its_window(
        mosquitto_factory: MosquittoFactory) -> None:
    assert await read_while_blocked(mosquitto_factory, LOCAL_RECEIVE_MAXIMUM) == (N, N)


def test_a_receive_maximum_out_of_mqtts_range_is_refused() -> None:
    endpoint = MqttEndpoint("127.0.0.1", 1, "x", "y")
    for bad in (0, 65_536):
        with pytest.raises(ValueError, match="receive_maximum"):
            MqttLink(endpoint, client_id="x", subscriptions=[], handler=_ignore, receive_maximum=bad)


async def test_the_bridge_asks_its_gateways_broker_for_the_widest_window(rig: Rig) -> None:  # noqa: F811
    assert rig.bridge._local_link is not None
    assert rig.bridge._local_link.receive_maximum == LOCAL_RECEIVE_MAXIMUM == 65_535
