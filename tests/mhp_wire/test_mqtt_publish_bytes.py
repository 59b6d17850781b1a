"""The link's PUBLISH packets are byte for byte gmqtt's own (issue 14, seventh round).

:func:`mhp_wire.mqtt.publish_packet` against gmqtt 0.8.0's ``PublishPacket.build_package`` on the same ``Message``
and the same packet id: random unicode topics, payloads from empty to past 2 MiB (the remaining length's byte
boundaries 127/128, 16,383/16,384, 2,097,151/2,097,152 hit exactly), QoS 0 and 1, retained or not, MQTT 3.1.1 and 5.
gmqtt's build reads two things of its protocol, the version and the packet-id generator: :class:`_Protocol` holds
gmqtt's own ``ConnectionState`` and ``IdGenerator`` for them.
"""

from __future__ import annotations

import struct

import pytest
from gmqtt import Message
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from gmqtt.mqtt.package import PublishPacket
from gmqtt.mqtt.utils import ConnectionState, IdGenerator, pack_variable_byte_integer
from hypothesis import assume, given
from hypothesis import strategies as st

from mhp_wire.mqtt import PublishBuilder, publish_packet, remaining_length, topic_field

EDGES = (127, 128, 16_383, 16_384, 2_097_151, 2_097_152)
"""Remaining lengths where the variable byte integer grows a byte."""


class _Protocol:
    """What ``PublishPacket.build_package`` reads of gmqtt's ``MQTTProtocol``: ``proto_ver`` and ``id_generator``."""

    def __init__(self, version: int, last_id: int) -> None:
        self._connection_state = ConnectionState(protocol_version=version)
        self.id_generator = IdGenerator()
        self.id_generator._last_used_id = last_id  # the next id follows it: ids of one and two significant bytes

    @property
    def proto_ver(self) -> int:
        return self._connection_state.protocol_version


def gmqtt_packet(topic: str, payload: bytes, qos: int, retain: bool, version: int,
                 last_id: int) -> tuple[int | None, bytes]:
    mid, packet = PublishPacket.build_package(Message(topic, payload, qos=qos, retain=retain),
                                              _Protocol(version, last_id))
    return mid, bytes(packet)


def fill(size: int, seed: bytes) -> bytes:
    """``size`` bytes repeating ``seed`` (a payload of megabytes without drawing each byte)."""
    return (seed * (size // len(seed) + 1))[:size]


versions = st.sampled_from([MQTTv311, MQTTv50])
ids = st.integers(min_value=0, max_value=65_534)


@given(topic=st.text(min_size=1, max_size=120), payload=st.binary(max_size=300), qos=st.sampled_from([0, 1]),
       retain=st.booleans(), version=versions, last_id=ids)
def test_small_messages_are_gmqtts_bytes(topic: str, payload: bytes, qos: int, retain: bool, version: int,
                                         last_id: int) -> None:
    mid, theirs = gmqtt_packet(topic, payload, qos, retain, version, last_id)
    assert publish_packet(topic_field(topic), payload, qos, retain, mid, version >= MQTTv50) == theirs


@given(edge=st.sampled_from(EDGES), off=st.sampled_from([0, -1, 1]), topic=st.text(min_size=1, max_size=40),
       seed=st.binary(min_size=1, max_size=16), qos=st.sampled_from([0, 1]), retain=st.booleans(), version=versions,
       last_id=ids)
def test_remaining_length_boundaries_are_gmqtts_bytes(edge: int, off: int, topic: str, seed: bytes, qos: int,
                                                      retain: bool, version: int, last_id: int) -> None:
    overhead = len(topic_field(topic)) + (2 if qos else 0) + (1 if version >= MQTTv50 else 0)
    size = edge + off - overhead  # the payload that makes the remaining length exactly edge + off
    assume(size >= 0)
    payload = fill(size, seed)
    mid, theirs = gmqtt_packet(topic, payload, qos, retain, version, last_id)
    ours = publish_packet(topic_field(topic), payload, qos, retain, mid, version >= MQTTv50)
    assert len(ours) == len(theirs) and ours == theirs


@given(size=st.integers(min_value=0, max_value=3 * 1024 * 1024), seed=st.binary(min_size=1, max_size=16),
       qos=st.sampled_from([0, 1]), retain=st.booleans(), version=versions, last_id=ids)
def test_payloads_up_to_megabytes_are_gmqtts_bytes(size: int, seed: bytes, qos: int, retain: bool, version: int,
                                                   last_id: int) -> None:
    topic = "mhp/v1/gateways/gw-0001/down/msg"
    payload = fill(size, seed)
    mid, theirs = gmqtt_packet(topic, payload, qos, retain, version, last_id)
    assert publish_packet(topic_field(topic), payload, qos, retain, mid, version >= MQTTv50) == theirs


@given(value=st.one_of(st.sampled_from([0, *EDGES, 268_435_455, 268_435_456]),
                       st.integers(min_value=0, max_value=2**32)))
def test_the_remaining_length_is_gmqtts_variable_byte_integer(value: int) -> None:
    assert remaining_length(value) == bytes(pack_variable_byte_integer(value))


def test_a_topic_gmqtt_cannot_encode_strictly_is_encoded_as_gmqtt_does() -> None:
    lone = "mhp/v1/gateways/\ud800/down/msg"  # a lone surrogate: gmqtt's Message encodes it as "?"
    mid, theirs = gmqtt_packet(lone, b"x", 1, False, MQTTv50, 0)
    assert publish_packet(PublishBuilder().topic(lone), b"x", 1, False, mid, True) == theirs


def test_a_topic_over_65535_bytes_is_refused_as_gmqtt_refuses_it() -> None:
    with pytest.raises(struct.error):
        gmqtt_packet("t" * 65_536, b"x", 0, False, MQTTv50, 0)
    with pytest.raises(struct.error):
        PublishBuilder().topic("t" * 65_536)
    assert topic_field("t" * 65_535)[:2] == b"\xff\xff"


def test_the_topic_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mhp_wire.mqtt.TOPIC_CACHE", 3)
    builder = PublishBuilder()
    for i in range(10):
        assert builder.topic(f"t/{i}") == topic_field(f"t/{i}")
        assert len(builder._topics) <= 3


def test_a_full_topic_cache_drops_its_older_half_and_keeps_the_newer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mhp_wire.mqtt.TOPIC_CACHE", 4)
    builder = PublishBuilder()
    for i in range(4):
        builder.topic(f"t/{i}")
    assert builder.topic("t/4") == topic_field("t/4")
    assert list(builder._topics) == ["t/2", "t/3", "t/4"]  # on main: ["t/4"], every other topic built again
