"""An MQTT link with a batch handler (issue 14, sixth round): the QoS 1 messages read in one turn of the event loop
go to one call of the handler, in the order received, and each is acknowledged (PUBACK) only after that call
returns; a failing call is logged and its messages acknowledged, and the link keeps serving; messages of a batch
that never returned (the process went) are delivered again to the next session. Against a real Mosquitto.

Before: gmqtt ran every received message's handler in a task of its own (a task and a done-callback per message,
~5 % of the bridge's busy samples in a fan-out)."""

from __future__ import annotations

import asyncio
import contextlib

from mhp_wire import topics
from mhp_wire.mqtt import BatchHandler, MqttEndpoint, MqttLink
from tests.broker_fixtures import MosquittoFactory
from tests.mhp_wire.test_mqtt_write_coalescing import socket_transport, spy_writes
from tests.waiting import eventually

N = 200


async def _ignore(topic: str, payload: bytes, retained: bool) -> None:
    raise AssertionError("a QoS 1 message went to the per-message handler")


def endpoints(mosquitto_factory: MosquittoFactory) -> tuple[MqttEndpoint, MqttEndpoint]:
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    return (MqttEndpoint(broker.host, broker.port, "bridge", broker.identities["bridge"].password),
            MqttEndpoint(broker.host, broker.port, "gw-1", broker.identities["gw-1"].password))


async def publish_in_one_turn(link: MqttLink, n: int, first: int = 0) -> None:
    for i in range(first, first + n):  # no await that suspends: one turn, one socket write
        await link.publish(topics.up("gateways", "gw-1"), f"{i:04d}".encode())


async def test_a_turns_messages_are_one_batch_in_order_and_acknowledged_after_it(
        mosquitto_factory: MosquittoFactory) -> None:
    bridge, gateway = endpoints(mosquitto_factory)
    batches: list[list[int]] = []
    release = asyncio.Event()

    async def handle(messages: list[tuple[str, bytes, bool]]) -> None:
        batches.append([int(p) for _, p, _ in messages])
        await release.wait()

    async with (MqttLink(bridge, client_id="bridge", subscriptions=[topics.all_up("gateways")], handler=_ignore,
                         batch_handler=handle, clean_start=True, session_expiry_s=0) as link,
                MqttLink(gateway, client_id="gw-1", subscriptions=[], handler=_ignore, clean_start=True,
                         session_expiry_s=0) as gw):
        writes = spy_writes(socket_transport(link))
        await publish_in_one_turn(gw, N)
        await eventually(lambda: sum(map(len, batches)) >= N, "every message handed to the batch handler")
        assert [i for b in batches for i in b] == list(range(N))  # in order, each once
        assert len(batches) < N  # several messages per batch (one read of the socket is one batch)
        assert link.stats.received == N and link.stats.extra["inbound_batches"] == len(batches)
        await asyncio.sleep(0.2)
        assert writes == []  # no PUBACK while the handler has not returned
        release.set()
        # Every message acknowledged once its batch returned (a PUBACK is at least 4 bytes), in a few writes.
        await eventually(lambda: sum(writes) >= 4 * N, "the PUBACKs")
        assert len(writes) <= len(batches)


async def test_a_failing_batch_is_acknowledged_and_the_link_keeps_serving(
        mosquitto_factory: MosquittoFactory) -> None:
    bridge, gateway = endpoints(mosquitto_factory)
    got: list[int] = []

    async def handle(messages: list[tuple[str, bytes, bool]]) -> None:
        numbers = [int(p) for _, p, _ in messages]
        got.extend(numbers)
        if 0 in numbers:
            raise RuntimeError("this batch fails")

    async with (MqttLink(bridge, client_id="bridge", subscriptions=[topics.all_up("gateways")], handler=_ignore,
                         batch_handler=handle, clean_start=True, session_expiry_s=0) as link,
                MqttLink(gateway, client_id="gw-1", subscriptions=[], handler=_ignore, clean_start=True,
                         session_expiry_s=0) as gw):
        await publish_in_one_turn(gw, 5)
        await eventually(lambda: len(got) >= 5)
        assert link.stats.handler_errors == 1
        await publish_in_one_turn(gw, 5, first=5)
        await eventually(lambda: len(got) >= 10)
        assert got == list(range(10))  # nothing redelivered: the failed batch was acknowledged all the same
        await asyncio.sleep(0.3)
        assert got == list(range(10))


async def test_a_batch_that_never_returned_is_delivered_again_to_the_next_session(
        mosquitto_factory: MosquittoFactory) -> None:
    bridge, gateway = endpoints(mosquitto_factory)
    first: list[int] = []
    never = asyncio.Event()

    async def stuck(messages: list[tuple[str, bytes, bool]]) -> None:
        first.extend(int(p) for _, p, _ in messages)
        await never.wait()  # the process dies in the middle of the batch

    async with MqttLink(gateway, client_id="gw-1", subscriptions=[], handler=_ignore, clean_start=True,
                        session_expiry_s=0) as gw:
        link = MqttLink(bridge, client_id="bridge", subscriptions=[topics.all_up("gateways")], handler=_ignore,
                        batch_handler=stuck, clean_start=False, session_expiry_s=300)
        await link.__aenter__()
        await publish_in_one_turn(gw, 20)
        await eventually(lambda: len(first) >= 20)
        # As a kill -9: the socket goes without a DISCONNECT and without the PUBACKs; the stuck batches go too.
        link._client._connection._transport.abort()
        for task in list(link._batches):
            task.cancel()
        with contextlib.suppress(Exception):
            await link.__aexit__(None, None, None)

        again: list[int] = []

        async def collect(messages: list[tuple[str, bytes, bool]]) -> None:
            again.extend(int(p) for _, p, _ in messages)

        handle: BatchHandler = collect
        async with MqttLink(bridge, client_id="bridge", subscriptions=[topics.all_up("gateways")], handler=_ignore,
                            batch_handler=handle, clean_start=False, session_expiry_s=300):
            await eventually(lambda: len(again) >= 20, "the unacknowledged messages delivered again")
            assert sorted(set(again)) == list(range(20))


async def test_a_batch_cut_by_a_reconnection_acknowledges_nothing_on_the_new_connection(
        mosquitto_factory: MosquittoFactory) -> None:
    """A packet id names a message within one connection. The broker sends the messages of a batch still being
    handled again on the next connection (the session is kept), and that copy is acknowledged when its own batch
    returns; the first batch's PUBACKs would name ids of the old connection (after a lost session, possibly new
    messages not handled yet), so they are not sent. Before the fix they were written on the new socket."""
    bridge, gateway = endpoints(mosquitto_factory)
    held: list[int] = []
    again: list[int] = []
    release = asyncio.Event()
    reconnected = False

    async def handle(messages: list[tuple[str, bytes, bool]]) -> None:
        if reconnected:
            again.extend(int(p) for _, p, _ in messages)
            return
        held.extend(int(p) for _, p, _ in messages)
        await release.wait()  # still committing when the connection goes

    async with (MqttLink(bridge, client_id="bridge", subscriptions=[topics.all_up("gateways")], handler=_ignore,
                         batch_handler=handle, clean_start=False, session_expiry_s=300,
                         reconnect_delay_s=0.1) as link,
                MqttLink(gateway, client_id="gw-1", subscriptions=[], handler=_ignore, clean_start=True,
                         session_expiry_s=0) as gw):
        await publish_in_one_turn(gw, 5)
        await eventually(lambda: len(held) == 5, "the messages handed over, their batches held")
        held_batches = link.stats.extra["inbound_batches"]
        old = link._client._connection
        reconnected = True
        old._transport.abort()  # the connection drops while the batches are being handled
        await eventually(lambda: link.connected and link._client._connection is not old, "a new connection")
        await eventually(lambda: sorted(again) == list(range(5)),
                         "the held messages delivered again on the new connection (and acknowledged there)")
        await asyncio.sleep(0)  # the copies' PUBACKs leave in the turn their batch returned
        writes = spy_writes(socket_transport(link))
        release.set()
        await eventually(lambda: not link._batches, "the held batches returned")
        await asyncio.sleep(0)  # what they wrote has left
        assert writes == []  # nothing written for the old connection's ids
        assert link.stats.extra["pubacks_not_sent_stale"] == 5
        assert held_batches >= 1
