"""A link with a batch handler reads PUBLISH and PUBACK packets without gmqtt's per-packet work (issue 14, session 13:
:func:`mhp_wire.mqtt.fast_inbound`), and hands on exactly what gmqtt's own reading would.

The first test holds the two readers against each other over packets of every shape a broker may send (QoS 0, 1 and
2, retained, DUP, with properties, MQTT 3.1.1, an empty or non-UTF-8 topic, cut short): whatever reaches the batch
(or gmqtt's QoS 0 callback) is the same, and the packets outside the fast path's shape still go through gmqtt. The
second runs against a real Mosquitto: a fan-out's messages (no properties) reach the batch without gmqtt's properties
parser, and a message with a user property still arrives, through it; PUBACKs of the link's own QoS 1 publishes
free their packet ids and stored packets. The last is the guard on the gmqtt 0.8.0 internals the fast path uses.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import itertools
from typing import Any

import pytest
from gmqtt.mqtt.connection import MQTTConnection
from gmqtt.mqtt.constants import MQTTCommands, MQTTv50, MQTTv311
from gmqtt.mqtt.handler import MqttPackageHandler
from gmqtt.mqtt.package import CommandWithMidPacket
from gmqtt.mqtt.protocol import MQTTProtocol
from gmqtt.mqtt.utils import IdGenerator

from mhp_wire import mqtt, topics
from mhp_wire.mqtt import (
    GMQTT_CHECKED,
    MqttEndpoint,
    MqttLink,
    fast_inbound,
    publish_packet,
    remaining_length,
    topic_field,
)
from tests.broker_fixtures import MosquittoFactory
from tests.mhp_wire.test_mqtt_batches import _ignore, endpoints
from tests.mhp_wire.test_mqtt_write_coalescing import socket_transport
from tests.waiting import eventually, throughout

UP = topics.up("gateways", "gw-1")


async def _no_batch(messages: list[tuple[str, bytes, bool]]) -> None:
    return None


def _publish(topic: bytes, payload: bytes, qos: int, *, retain: bool = False, dup: bool = False, mid: int = 7,
             properties: bytes = b"\x00", mqtt5: bool = True) -> tuple[int, bytes]:
    """``(cmd, body)`` of a PUBLISH as gmqtt's reader gets it: the fixed header's first byte, and the rest after the
    remaining length."""
    body = topic + (mid.to_bytes(2, "big") if qos else b"") + (properties if mqtt5 else b"") + payload
    return 0x30 | dup << 3 | qos << 1 | retain, body


def _cases() -> list[tuple[str, int, bytes, bool]]:
    """``(name, cmd, body, fast)``: every shape, and whether the fast path takes it."""
    field = topic_field(UP)
    user_property = b"\x26" + topic_field("k") + topic_field("v")  # 0x26: a user property
    props = remaining_length(len(user_property)) + user_property
    cases = []
    for qos, retain, dup in itertools.product((0, 1), (False, True), (False, True)):
        cmd, body = _publish(field, b'{"v":1}', qos, retain=retain, dup=dup, mid=300 + qos)
        cases.append((f"plain qos{qos} retain={retain} dup={dup}", cmd, body, True))
    cases += [
        ("empty payload", *_publish(field, b"", 1), True),
        ("large payload", *_publish(field, bytes(range(256)) * 300, 1, mid=65535), True),
        ("user property qos1", *_publish(field, b"p", 1, properties=props), False),
        ("user property qos0", *_publish(field, b"p", 0, properties=props), False),
        ("topic alias", *_publish(field, b"p", 1, properties=b"\x03\x23\x00\x01"), False),
        ("qos 2", *_publish(field, b"p", 2), False),
        ("empty topic", *_publish(topic_field(""), b"p", 1), False),
        ("topic not utf-8", *_publish(b"\x00\x02\xff\xfe", b"p", 1), False),
        ("cut in the topic", 0x32, field[:5], False),
        ("cut before the properties", 0x32, field + b"\x00\x07", False),
        ("one byte", 0x30, b"\x00", False),
    ]
    # The builder's own packets, as a gateway's link sends them (the fan-out's traffic).
    for qos in (0, 1):
        packet = publish_packet(field, b'{"type":"outcome"}', qos, False, 9 if qos else None, True)
        cases.append((f"as the links build it, qos{qos}", packet[0], packet[2:], True))
    return cases


def _reader(link: MqttLink) -> tuple[MqttPackageHandler, list[tuple[str, Any]]]:
    """The link's package handler, its QoS 1 and QoS 0 deliveries recorded (not batched: no event loop runs)."""
    handler = link._client._package_handler
    got: list[tuple[str, Any]] = []
    handler._handle_qos_1_publish_packet = lambda mid, payload, topic, props: got.append(
        ("gmqtt", (mid, payload, topic, props)))
    handler.on_message = lambda topic, payload, qos, props: got.append(("gmqtt", (None, payload, topic, props)))
    return handler, got


@pytest.mark.parametrize("version", [MQTTv50, MQTTv311])
def test_the_fast_reader_hands_on_what_gmqtts_reader_does(version: int) -> None:
    link = MqttLink(endpoints_offline(), client_id="bridge", subscriptions=[], handler=_ignore,
                    batch_handler=_no_batch)
    handler, got = _reader(link)
    handler._connection_state.protocol_version = version
    fast = fast_inbound(handler, lambda mid, payload, topic, props: got.append(("fast", (mid, payload, topic, props))))
    for name, cmd, body, takes in _cases():
        if version < MQTTv50:  # no properties' length in a 3.1.1 PUBLISH: gmqtt's reader every time
            takes = False
        got.clear()
        expected_error = _error_of(MqttPackageHandler._handle_packet, handler, cmd, body)  # gmqtt's own
        expected = [("fast" if takes else "gmqtt", value) for _, value in got]
        got.clear()
        # gmqtt's caller (``__call__``) logs an error its reader raises: the fast one raises the same, from gmqtt.
        assert _error_of(fast, cmd, body) == expected_error, name
        assert got == expected, name
        if takes:
            assert got and expected_error is None, name


def _error_of(call: Any, *args: Any) -> type[BaseException] | None:
    try:
        call(*args)
    except Exception as exc:
        return type(exc)
    return None


def test_a_puback_frees_its_id_and_its_stored_packet_as_gmqtt_does() -> None:
    """The fast reader's PUBACK against gmqtt's own reader on a second package handler, packet by packet: the same
    packet ids in use, the same stored packets dropped, the same time of the last packet read."""

    def handler_with_ids() -> tuple[MqttPackageHandler, list[int]]:
        link = MqttLink(endpoints_offline(), client_id="bridge", subscriptions=[], handler=_ignore,
                        batch_handler=_no_batch)
        handler = link._client._package_handler
        removed: list[int] = []
        handler._remove_message_callback = removed.append
        handler.id_generator._used_ids.update({5, 300, 301})
        handler._last_msg_in = 0.0
        return handler, removed

    ours, ours_removed = handler_with_ids()
    gmqtts, gmqtts_removed = handler_with_ids()
    fast = fast_inbound(ours, lambda *a: None)
    packets = [b"\x01\x2c",  # PUBACK 300
               b"\x00\x05\x00\x00",  # PUBACK 5, with a reason code and an empty property length
               b"\x00\x09",  # an id not in use: nothing to free, the callback still told
               b"\x01\x2d\x10"]  # PUBACK 301 with a reason code (0x10: no matching subscribers)
    for body in packets:
        fast(0x40, body)
        MqttPackageHandler._handle_packet(gmqtts, 0x40, body)
        assert ours.id_generator._used_ids == gmqtts.id_generator._used_ids, body
        assert ours_removed == gmqtts_removed, body
        assert ours._last_msg_in > 0 and gmqtts._last_msg_in > 0, body
        ours._last_msg_in = gmqtts._last_msg_in = 0.0
    assert ours_removed == [300, 5, 9, 301]  # every PUBACK was read, not skipped by both


def endpoints_offline() -> MqttEndpoint:
    """An endpoint nobody connects to (the readers are fed packets directly)."""
    return MqttEndpoint("127.0.0.1", 9, "bridge", "unused")


async def test_a_fan_outs_messages_skip_gmqtts_parser_and_one_with_properties_still_arrives(
        mosquitto_factory: MosquittoFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    watching: list[MqttPackageHandler] = []
    original = MqttPackageHandler._parse_properties

    def watched(self: MqttPackageHandler, packet: bytes) -> Any:
        if self in watching:
            parsed.append(bytes(packet))
        return original(self, packet)

    monkeypatch.setattr(MqttPackageHandler, "_parse_properties", watched)
    bridge, gateway = endpoints(mosquitto_factory)
    got: list[tuple[str, bytes, bool]] = []

    async def handle(messages: list[tuple[str, bytes, bool]]) -> None:
        got.extend(messages)

    async with (MqttLink(bridge, client_id="bridge", subscriptions=[topics.all_up("gateways")], handler=_ignore,
                         batch_handler=handle, clean_start=True, session_expiry_s=0) as link,
                MqttLink(gateway, client_id="gw-1", subscriptions=[topics.down("gateways", "gw-1")],
                         handler=_ignore, clean_start=True, session_expiry_s=0) as gw):
        watching.append(link._client._package_handler)  # the bridge's link, from now on
        for i in range(100):  # QoS 1 and QoS 0 alternately, as a fan-out's outcomes and acks
            await gw.publish(UP, f"{i:03d}".encode(), qos=1 - i % 2)
        await eventually(lambda: len(got) >= 100, "every message in a batch")
        assert [p for _, p, _ in got] == [f"{i:03d}".encode() for i in range(100)]
        assert {(t, r) for t, _, r in got} == {(UP, False)}
        assert parsed == [], "the bridge's link parsed the properties of messages that have none"

        # One with a user property: gmqtt's reader, and still batched.
        gw._client.publish(UP, b"with a property", qos=1, user_property=[("k", "v")])
        await eventually(lambda: len(got) >= 101, "the message with a property")
        assert got[-1] == (UP, b"with a property", False)
        assert parsed != []  # through gmqtt's reader

        # The link's own QoS 1 publishes: each PUBACK frees its id and its stored packet.
        for _ in range(50):
            await link.publish(topics.down("gateways", "gw-1"), b"command", qos=1)
        await eventually(lambda: link._client._persistent_storage.is_empty
                         and not link._client._package_handler.id_generator._used_ids, "the PUBACKs read")
        assert link.stats.handler_errors == 0


def test_gmqtts_internals_the_fast_reader_uses_are_where_it_expects_them() -> None:
    """gmqtt 0.8.0: the package handler's ``_handle_packet`` (the one entry ``__call__`` uses, looked up on the
    instance), ``_connection_state.protocol_version``, ``id_generator.free_id``, ``_remove_message_from_queue`` and
    ``_last_msg_in``; and for the batched PUBACKs the connection's ``_protocol`` (what its ``send_command_with_mid``
    writes through), the protocol's ``proto_ver`` and ``write_data``. If an upgrade moves one of them, this fails
    (and the link uses none of them on a release other than :data:`GMQTT_CHECKED`)."""
    link = MqttLink(endpoints_offline(), client_id="bridge", subscriptions=[], handler=_ignore,
                    batch_handler=_no_batch)
    handler = link._client._package_handler
    assert isinstance(handler, MqttPackageHandler)
    assert "_handle_packet" in vars(handler)  # the link's reader, on the instance
    assert MqttPackageHandler.__call__.__code__.co_names.count("_handle_packet") == 1
    assert isinstance(handler._connection_state.protocol_version, int)
    assert isinstance(handler.id_generator, IdGenerator) and hasattr(handler.id_generator, "_used_ids")
    assert callable(handler._remove_message_from_queue)
    assert "_last_msg_in" in MqttPackageHandler._handle_packet.__code__.co_names
    assert "_protocol" in MQTTConnection.__init__.__code__.co_names
    assert "_protocol" in MQTTConnection.send_command_with_mid.__code__.co_names
    assert isinstance(inspect.getattr_static(MQTTProtocol, "proto_ver"), property)
    assert "proto_ver" in MQTTProtocol.send_command_with_mid.__code__.co_names
    assert "write_data" in MQTTProtocol.send_command_with_mid.__code__.co_names and callable(MQTTProtocol.write_data)
    # A link without a batch handler keeps gmqtt's reader.
    plain = MqttLink(endpoints_offline(), client_id="gw", subscriptions=[], handler=_ignore)
    assert "_handle_packet" not in vars(plain._client._package_handler)


def test_on_a_gmqtt_release_not_checked_a_link_keeps_gmqtts_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of s13-bridge: the fast reader relies on gmqtt's internals; a link uses it only on the release it was
    checked against (:data:`GMQTT_CHECKED`, read once from the installed metadata)."""
    assert mqtt.GMQTT_VERSION == importlib.metadata.version("gmqtt")
    monkeypatch.setattr(mqtt, "GMQTT_VERSION", "0.8.1")
    link = MqttLink(endpoints_offline(), client_id="bridge", subscriptions=[], handler=_ignore,
                    batch_handler=_no_batch)
    handler = link._client._package_handler
    assert "_handle_packet" not in vars(handler)
    assert vars(handler)["_handle_qos_1_publish_packet"] == link._keep_for_batch  # still batched


@pytest.mark.parametrize(("gmqtt_version", "one_write_per_batch"), [(GMQTT_CHECKED, True), ("0.8.1", False)])
async def test_a_batchs_pubacks_are_gmqtts_bytes(mosquitto_factory: MosquittoFactory, monkeypatch: pytest.MonkeyPatch,
                                                 gmqtt_version: str, one_write_per_batch: bool) -> None:
    """The PUBACKs of a batch's QoS 1 messages are handed to gmqtt's protocol in one write (issue 14, session 13;
    through gmqtt, one by one, on a gmqtt release not checked), the bytes gmqtt's ``CommandWithMidPacket`` builds, in
    order, none for the QoS 0 ones, and the broker takes them: nothing is delivered again."""
    monkeypatch.setattr(mqtt, "GMQTT_VERSION", gmqtt_version)
    bridge, gateway = endpoints(mosquitto_factory)
    got: list[bytes] = []
    release = asyncio.Event()

    qos1_per_batch: list[int] = []

    async def handle(messages: list[tuple[str, bytes, bool]]) -> None:
        got.extend(p for _, p, _ in messages)
        qos1_per_batch.append(sum(1 for _, p, _ in messages if int(p) % 2 == 0))  # the even ones go at QoS 1
        await release.wait()

    async with (MqttLink(bridge, client_id="bridge", subscriptions=[topics.all_up("gateways")], handler=_ignore,
                         batch_handler=handle, clean_start=True, session_expiry_s=0) as link,
                MqttLink(gateway, client_id="gw-1", subscriptions=[], handler=_ignore, clean_start=True,
                         session_expiry_s=0) as gw):
        written: list[bytes] = []
        transport = socket_transport(link)
        write = transport.write
        transport.write = lambda data: (written.append(bytes(data)), write(data))
        mids: list[int] = []
        keep = link._client._package_handler._handle_packet

        def noted(cmd: int, packet: bytes) -> None:  # the packet ids the broker gave the QoS 1 messages
            if cmd & 0xF6 == 0x32:
                mids.append(int.from_bytes(packet[2 + int.from_bytes(packet[:2], "big"):][:2], "big"))
            keep(cmd, packet)

        link._client._package_handler._handle_packet = noted
        protocol = link._client._connection._protocol
        assert protocol.proto_ver == MQTTv50
        handed: list[bytes] = []
        write_data = protocol.write_data
        protocol.write_data = lambda data: (handed.append(bytes(data)), write_data(data))
        for i in range(40):
            await gw.publish(UP, f"{i:03d}".encode(), qos=1 - i % 2)
        await eventually(lambda: len(got) >= 40, "every message in a batch")
        assert written == [] and len(mids) == 20
        release.set()
        await eventually(lambda: len(b"".join(written)) >= 6 * 20, "the PUBACKs")
        expected = b"".join(CommandWithMidPacket.build_package(MQTTCommands.PUBACK, m, False, proto_ver=MQTTv50)
                            for m in mids)
        assert b"".join(written) == expected
        assert b"".join(handed) == expected
        pubacks_per_write = [len(data) // 6 for data in handed]
        assert pubacks_per_write == ([n for n in qos1_per_batch if n] if one_write_per_batch else [1] * 20)
        await throughout(lambda: len(got) == 40, "the broker took every PUBACK: nothing comes again")
