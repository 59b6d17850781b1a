"""The link builds its own PUBLISH packets and keeps gmqtt's session the source of truth (issue 14, seventh round),
against a real Mosquitto.

Every publish of these tests goes through :class:`mhp_wire.mqtt.PublishBuilder`: gmqtt's ``PublishPacket.
build_package`` is watched and must never be called. What is published arrives intact at QoS 0 and 1, retained or
not; a QoS 1 message the broker never read (stopped, then killed) is sent again from gmqtt's session storage at the
reconnection, as gmqtt's own publishes were; a full in-flight window refuses a publish before anything of it is
written or stored, and a publish with ``wait_s`` waits for room, as before. The last test is the guard on gmqtt 0.8.0's
internals the builder uses: it fails if an upgrade moves them.
"""

from __future__ import annotations

import os
import random
import signal
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from gmqtt import Message
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.mqtt.package import PublishPacket
from gmqtt.mqtt.protocol import MQTTProtocol
from gmqtt.mqtt.utils import IdGenerator
from gmqtt.storage import PersistentStorage

from mhp_wire import topics
from mhp_wire.mqtt import Handler, MqttEndpoint, MqttError, MqttLink
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.mqtt_party import ignore_messages
from tests.waiting import eventually

DOWN = topics.down("gateways", "gw-1")


@pytest.fixture
def gmqtt_builds(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Every packet gmqtt's own ``PublishPacket.build_package`` builds from now on (it still builds them)."""
    built: list[bytes] = []
    original = PublishPacket.build_package.__func__

    def watched(cls: type[PublishPacket], message: Message, protocol: object) -> tuple[int | None, bytearray]:
        mid, packet = original(cls, message, protocol)
        built.append(bytes(packet))
        return mid, packet

    monkeypatch.setattr(PublishPacket, "build_package", classmethod(watched))
    yield built


def parties(mosquitto_factory: MosquittoFactory, **tuning: Any) -> tuple[BrokerHandle, MqttEndpoint, MqttEndpoint]:
    """A retailer broker, and the endpoints of its bridge and of gateway ``gw-1``."""
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge", **tuning)
    return (broker, MqttEndpoint(broker.host, broker.port, "bridge", broker.identities["bridge"].password),
            MqttEndpoint(broker.host, broker.port, "gw-1", broker.identities["gw-1"].password))


def collector(got: list[tuple[bytes, bool]]) -> Handler:
    async def collect(topic: str, payload: bytes, retained: bool) -> None:
        got.append((payload, retained))
    return collect


async def test_what_the_link_publishes_arrives_intact_at_qos_0_and_1_and_retained(
        mosquitto_factory: MosquittoFactory, gmqtt_builds: list[bytes]) -> None:
    _, bridge, gateway = parties(mosquitto_factory)
    rnd = random.Random(14)
    payloads = [b"", b"x", bytes(range(256)), rnd.randbytes(127), rnd.randbytes(16_380), rnd.randbytes(200_000)]
    got: list[tuple[bytes, bool]] = []
    async with (MqttLink(gateway, client_id="gw-1", subscriptions=[DOWN], handler=collector(got), clean_start=True,
                         session_expiry_s=0) as gw,
                MqttLink(bridge, client_id="bridge", subscriptions=[], handler=ignore_messages, clean_start=True,
                         session_expiry_s=0) as link):
        assert gw.connected
        for qos in (0, 1):
            for p in payloads:
                await link.publish(DOWN, p, qos=qos, wait_s=10.0)
        await eventually(lambda: len(got) >= 2 * len(payloads), "every message at the gateway", timeout_s=15)
        assert Counter(got) == Counter((p, False) for p in payloads * 2)
        assert link.stats.published == 2 * len(payloads)
    # A retained message, read by a later subscriber as retained.
    retained = rnd.randbytes(1000)
    later: list[tuple[bytes, bool]] = []
    async with MqttLink(bridge, client_id="bridge", subscriptions=[], handler=ignore_messages, clean_start=True,
                        session_expiry_s=0) as link:
        await link.publish(DOWN, retained, retain=True)
        await eventually(lambda: link._client._persistent_storage.is_empty, "the retained message's PUBACK")
        async with MqttLink(gateway, client_id="gw-1", subscriptions=[], handler=collector(later), clean_start=True,
                            session_expiry_s=0) as gw:
            await gw.subscribe([DOWN])
            await eventually(lambda: later, "the retained message", timeout_s=15)
            assert later == [(retained, True)]
    assert gmqtt_builds == []  # not one packet built by gmqtt


async def test_a_qos1_message_the_broker_never_read_is_sent_again_from_gmqtts_session_at_the_reconnection(
        mosquitto_factory: MosquittoFactory, gmqtt_builds: list[bytes]) -> None:
    broker, bridge, gateway = parties(mosquitto_factory)
    got: list[tuple[bytes, bool]] = []
    async with (MqttLink(gateway, client_id="gw-1", subscriptions=[DOWN], handler=collector(got),
                         reconnect_delay_s=0.2) as gw,
                MqttLink(bridge, client_id="bridge", subscriptions=[], handler=ignore_messages,
                         reconnect_delay_s=0.2) as link):
        # Both persistent sessions (the gateway's subscription with them) in the broker's snapshot: SIGTERM writes it.
        await broker.process.stop_async()
        await eventually(lambda: not link.connected and not gw.connected, timeout_s=15)
        await broker.process.start_async()
        await eventually(lambda: link.connected and gw.connected, "both links back", timeout_s=15)
        pid = broker.process.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # the connection stays up; the broker reads nothing more
        try:
            await link.publish(DOWN, b"kept by the session")
            storage = link._client._persistent_storage
            [(mid, packet)] = storage.get_all()  # stored under its packet id until its PUBACK ...
            assert link.writes is not None
            link.writes.flush()  # ... and written to the socket, which the stopped broker never reads
        finally:
            broker.process.kill()  # SIGKILL (of a stopped process too): the message dies unread with the broker
        await eventually(lambda: not link.connected, timeout_s=15)
        assert got == [] and storage.get_all() == [(mid, packet)]
        await broker.process.start_async()  # from the snapshot: the sessions are there, the message is not
        await eventually(lambda: got, "the message sent again by gmqtt's session", timeout_s=20)
        await eventually(lambda: storage.is_empty, "its PUBACK")
        assert got == [(b"kept by the session", False)] and link.stats.connects >= 3
    assert gmqtt_builds == []


async def test_a_full_window_refuses_before_writing_or_storing_and_wait_s_waits_for_room(
        mosquitto_factory: MosquittoFactory, gmqtt_builds: list[bytes]) -> None:
    _, bridge, gateway = parties(mosquitto_factory, max_inflight_messages=5)
    got: list[tuple[bytes, bool]] = []
    async with (MqttLink(gateway, client_id="gw-1", subscriptions=[DOWN], handler=collector(got), clean_start=True,
                         session_expiry_s=0),
                MqttLink(bridge, client_id="bridge", subscriptions=[], handler=ignore_messages, clean_start=True,
                         session_expiry_s=0) as link):
        assert link.writes is not None
        storage = link._client._persistent_storage
        ids = link._client._connection._protocol.id_generator
        packets0 = link.writes.packets
        room = ids._max - 1  # gmqtt 0.8.0's pool hands out one id fewer than the receive maximum
        assert room == 4
        for i in range(room):  # one turn: no PUBACK can free the window meanwhile
            await link.publish(DOWN, b"%d" % i)
        with pytest.raises(MqttError, match="in-flight window is full"):
            await link.publish(DOWN, b"refused")
        assert link.writes.packets - packets0 == room and len(storage.get_all()) == room
        assert len(ids._used_ids) == room and link.stats.extra["inflight_full"] == 1 and link.stats.published == room
        await link.publish(DOWN, b"q0", qos=0)  # QoS 0 takes no packet id: it goes
        assert link.writes.packets - packets0 == room + 1
        await link.publish(DOWN, b"waited", wait_s=10.0)  # waits for a PUBACK, then goes
        assert link.stats.extra["inflight_waits"] >= 1 and link.stats.published == room + 2
        await eventually(lambda: len(got) >= room + 2, "every message sent", timeout_s=15)
        assert Counter(p for p, _ in got) == Counter([b"0", b"1", b"2", b"3", b"q0", b"waited"])
        await eventually(lambda: storage.is_empty and not ids._used_ids, "every packet id free again")
    assert gmqtt_builds == []


async def test_gmqtts_internals_the_builder_uses_are_where_it_expects_them(
        mosquitto_factory: MosquittoFactory, gmqtt_builds: list[bytes]) -> None:
    """gmqtt 0.8.0: the connection's protocol (``Client._connection._protocol``) with ``proto_ver``, the client's one
    ``id_generator`` (the one the CONNACK's receive maximum bounds) and ``write_data``; the client's
    ``_persistent_storage`` with ``push_message``. If an upgrade moves one of them, this fails."""
    _, bridge, _ = parties(mosquitto_factory, max_inflight_messages=7)
    async with MqttLink(bridge, client_id="bridge", subscriptions=[], handler=ignore_messages, clean_start=True,
                        session_expiry_s=0) as link:
        client = link._client
        protocol = client._connection._protocol
        assert isinstance(protocol, MQTTProtocol) and protocol.proto_ver == MQTTv50
        assert isinstance(protocol.id_generator, IdGenerator)
        assert protocol.id_generator is client._package_handler.id_generator  # one pool for the client ...
        assert protocol.id_generator._max == 7  # ... bounded by the broker's receive maximum
        assert isinstance(client._persistent_storage, PersistentStorage)
        assert link.writes is not None and protocol._transport is link.writes  # write_data goes through the turn
        client._connection._last_data_out = 0.0
        packets0 = link.writes.packets
        await link.publish(DOWN, b"payload", retain=True)
        [(mid, packet)] = client._persistent_storage.get_all()
        assert mid in protocol.id_generator._used_ids and link.writes.packets - packets0 == 1
        assert client._connection._last_data_out > 0  # the keep-alive sees the write
        # The stored packet is what gmqtt would have built for the same id.
        gmqtt_mid, gmqtt_packet = PublishPacket.build_package(Message(DOWN, b"payload", qos=1, retain=True),
                                                              _Fixed(mid))
        assert (gmqtt_mid, bytes(gmqtt_packet)) == (mid, packet)
        gmqtt_builds.clear()  # that one was built here, for the comparison
        await eventually(lambda: client._persistent_storage.is_empty and not protocol.id_generator._used_ids,
                         "the PUBACK frees the id and the stored packet")
    assert gmqtt_builds == []


class _Fixed:
    """The protocol argument of gmqtt's build for a comparison: MQTT 5 and a packet-id generator that gives ``mid``."""

    proto_ver = MQTTv50

    def __init__(self, mid: int) -> None:
        self.id_generator = IdGenerator()
        self.id_generator._last_used_id = mid - 1
