"""A link with a batch handler takes QoS 0 messages (acks: mhp_wire.messages.ACK_QOS) into the same turn's batch as
the QoS 1 ones, in the order read, and sends no PUBACK for them (issue 14, sixth round: acks at QoS 0). Against a
real Mosquitto; the gateway's link publishes QoS 1 and QoS 0 messages alternately in one turn."""

from __future__ import annotations

import asyncio

from mhp_wire import topics
from mhp_wire.mqtt import MqttLink
from tests.broker_fixtures import MosquittoFactory
from tests.mhp_wire.test_mqtt_batches import _ignore, endpoints
from tests.mhp_wire.test_mqtt_write_coalescing import socket_transport, spy_writes
from tests.waiting import eventually

N = 200


async def test_qos_0_messages_join_the_batch_in_order_without_a_puback(mosquitto_factory: MosquittoFactory) -> None:
    bridge, gateway = endpoints(mosquitto_factory)
    batches: list[list[int]] = []

    async def handle(messages: list[tuple[str, bytes, bool]]) -> None:
        batches.append([int(p) for _, p, _ in messages])

    async with (MqttLink(bridge, client_id="bridge", subscriptions=[topics.all_up("gateways")], handler=_ignore,
                         batch_handler=handle, clean_start=True, session_expiry_s=0) as link,
                MqttLink(gateway, client_id="gw-1", subscriptions=[], handler=_ignore, clean_start=True,
                         session_expiry_s=0) as gw):
        writes = spy_writes(socket_transport(link))
        for i in range(N):  # even numbers at QoS 1, odd ones at QoS 0; no await that suspends: one turn
            await gw.publish(topics.up("gateways", "gw-1"), f"{i:04d}".encode(), qos=1 - i % 2)
        await eventually(lambda: sum(map(len, batches)) >= N, "every message handed to the batch handler")
        assert [i for b in batches for i in b] == list(range(N))  # both QoS, in order, each once
        assert any({i % 2 for i in b} == {0, 1} for b in batches)  # QoS 0 and QoS 1 share batches
        assert link.stats.handler_errors == 0  # nothing went to the per-message handler
        await eventually(lambda: sum(writes) >= 4 * (N // 2), "the PUBACKs of the QoS 1 messages")
        await asyncio.sleep(0.2)
        puback_bytes = sum(writes)
        assert puback_bytes < 4 * N, f"{puback_bytes} bytes written: more than one PUBACK per QoS 1 message"
        assert link.connected
