"""The MQTT link hands the packets of one turn of the event loop to its socket in one write (issue 14, fifth round),
against a real Mosquitto.

Before: gmqtt wrote every packet with a transport write of its own, a ``send`` system call each while the socket's
buffer was empty: 200 publishes in one turn were 200 writes. Now they are one, in order, and nothing is lost; a
packet written just before the link closes still goes out; a reconnection gets its own coalescing on its new socket.
The writes are counted on the asyncio transport of the socket itself (the object gmqtt created), with a spy on its
``write``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from mhp_wire import topics
from mhp_wire.mqtt import CoalescedWrites, Handler, MqttEndpoint, MqttLink
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.mqtt_party import ignore_messages
from tests.waiting import eventually

N = 200


def socket_transport(link: MqttLink) -> Any:
    """The asyncio transport of the link's socket (under the coalescing, where there is one)."""
    transport = link._client._connection._transport
    return getattr(transport, "wrapped", transport)


def spy_writes(transport: Any) -> list[int]:
    """Record the size of every write reaching ``transport`` from now on."""
    sizes: list[int] = []
    write: Callable[[Any], None] = transport.write

    def counted(data: Any) -> None:
        sizes.append(len(data))
        write(data)

    transport.write = counted
    return sizes


def two_parties(mosquitto_factory: MosquittoFactory) -> tuple[BrokerHandle, MqttEndpoint, MqttEndpoint]:
    """A retailer broker, and the endpoints of its bridge and of gateway ``gw-1``."""
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    return (broker, MqttEndpoint(broker.host, broker.port, "bridge", broker.identities["bridge"].password),
            MqttEndpoint(broker.host, broker.port, "gw-1", broker.identities["gw-1"].password))


def collector(got: list[bytes]) -> Handler:
    """A link's handler that keeps every payload in ``got``, in order."""
    async def collect(topic: str, payload: bytes, retained: bool) -> None:
        got.append(payload)
    return collect


async def test_the_publishes_of_one_turn_are_one_write_and_arrive_in_order(
        mosquitto_factory: MosquittoFactory) -> None:
    _, bridge, gateway = two_parties(mosquitto_factory)
    got: list[bytes] = []
    collect = collector(got)

    async with (MqttLink(gateway, client_id="gw-1", subscriptions=[], handler=collect, clean_start=True,
                         session_expiry_s=0) as gw,
                MqttLink(bridge, client_id="bridge", subscriptions=[], handler=ignore_messages, clean_start=True,
                         session_expiry_s=0) as link):
        await gw.subscribe([topics.down("gateways", "gw-1")])  # returns with the broker's SUBACK
        sizes = spy_writes(socket_transport(link))
        for i in range(N):  # no await that suspends in between: one turn of the loop
            await link.publish(topics.down("gateways", "gw-1"), f"{i:04d}".encode())
        assert sizes == []  # nothing written yet: the turn is not over
        await eventually(lambda: len(got) >= N, timeout_s=15)
        assert [int(p) for p in got] == list(range(N))
        # The 200 PUBLISH packets left in one write (before: 200 writes, one per packet).
        assert len(sizes) == 1 and sizes[0] > N * len(topics.down("gateways", "gw-1")), sizes
        assert isinstance(link.writes, CoalescedWrites)
        assert link.writes.packets >= N and link.writes.flushes < link.writes.packets


async def test_what_is_written_just_before_the_link_closes_still_goes_out(
        mosquitto_factory: MosquittoFactory) -> None:
    _, bridge, gateway = two_parties(mosquitto_factory)
    got: list[bytes] = []
    collect = collector(got)

    async with MqttLink(gateway, client_id="gw-1", subscriptions=[], handler=collect, clean_start=True,
                        session_expiry_s=0) as gw:
        await gw.subscribe([topics.down("gateways", "gw-1")])  # returns with the broker's SUBACK
        link = MqttLink(bridge, client_id="bridge", subscriptions=[], handler=ignore_messages, clean_start=True,
                        session_expiry_s=0)
        await link.__aenter__()
        await link.publish(topics.down("gateways", "gw-1"), b"last words")
        await link.__aexit__(None, None, None)  # DISCONNECT and close in the same turn as the publish
        assert link.writes is not None and link.writes.wrapped.is_closing()  # the socket is closed ...
        await eventually(lambda: got, "the message written just before the close", timeout_s=15)
        assert got == [b"last words"]  # ... and what was kept for it went out first


async def test_a_reconnection_coalesces_on_its_new_socket(mosquitto_factory: MosquittoFactory) -> None:
    broker, bridge, gateway = two_parties(mosquitto_factory)
    got: list[bytes] = []
    collect = collector(got)

    async with (MqttLink(gateway, client_id="gw-1", subscriptions=[topics.down("gateways", "gw-1")],
                         handler=collect, reconnect_delay_s=0.2) as gw,
                MqttLink(bridge, client_id="bridge", subscriptions=[], handler=ignore_messages,
                         reconnect_delay_s=0.2) as link):
        first = link.writes
        assert first is not None
        broker.process.kill()
        await eventually(lambda: not link.connected and not gw.connected, timeout_s=15)
        broker.process.start()
        await eventually(lambda: link.connected and gw.connected and gw.stats.connects >= 2, timeout_s=15)

        async def subscribed() -> bool:  # the gateway's subscription is restored once a probe gets through
            await link.publish(topics.down("gateways", "gw-1"), b"probe")
            await asyncio.sleep(0.05)
            return b"probe" in got

        await eventually(subscribed, "the gateway's subscription restored", timeout_s=15)
        got.clear()  # probes arrive in order: none after the one seen
        assert link.writes is not None and link.writes is not first
        assert link.writes.wrapped is socket_transport(link) and not link.writes.wrapped.is_closing()
        sizes = spy_writes(socket_transport(link))
        for i in range(N):
            await link.publish(topics.down("gateways", "gw-1"), f"{i:04d}".encode())
        await eventually(lambda: len(got) >= N, timeout_s=15)
        assert [int(p) for p in got] == list(range(N)) and len(sizes) == 1, sizes
