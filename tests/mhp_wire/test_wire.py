"""The wire contract: topic builders, id rules, message validation with readable errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from mhp_wire import topics
from mhp_wire.messages import (
    BRIDGE_OUTCOME_BYTES,
    FORWARD_HEADROOM_BYTES,
    GATEWAY_OUTCOME_BYTES,
    MAX_PACKET_BYTES,
    MAX_PAYLOAD_BYTES,
    OVERSIZE_KEY,
    REPLICA_HEADROOM_BYTES,
    SEND_PAYLOAD_BYTES,
    Ack,
    ClientState,
    Command,
    EmergencyParams,
    Outcome,
    Request,
    RequestKind,
    Telemetry,
    WireError,
    decode,
    encode,
    oversize_detail,
    replica_outcome_header,
)
from mhp_wire.topics import TopicError

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
PARAMS = EmergencyParams(start=NOW, end=NOW + timedelta(minutes=5), power_limit_kw=1.5)


@pytest.mark.parametrize(
    ("value", "ok"),
    [("gw-1", True), ("client_0001", True), ("r1.eu", True), ("a" * 64, True), ("", False), ("a" * 65, False),
     ("-lead", False), ("has/slash", False), ("plus+", False), ("hash#", False), ("sp ace", False), ("é", False)],
)
def test_ids_that_can_be_topic_levels_and_usernames(value: str, ok: bool) -> None:
    if ok:
        assert topics.check_id(value) == value
    else:
        with pytest.raises(topics.TopicError, match="invalid id"):
            topics.check_id(value)


def test_topic_tree_is_versioned_and_parses_back() -> None:
    assert topics.down("retailers", "r1") == "mhp/v1/retailers/r1/down/msg"
    assert topics.up("gateways", "gw-7") == "mhp/v1/gateways/gw-7/up/msg"
    assert topics.telemetry("gw-7") == "mhp/v1/gateways/gw-7/up/telemetry"
    assert topics.status("retailers", "r2") == "mhp/v1/retailers/r2/up/status"
    parsed = topics.parse_up("mhp/v1/gateways/gw-7/up/telemetry")
    assert (parsed.kind, parsed.party_id, parsed.channel) == ("gateways", "gw-7", "telemetry")
    for bad in ("mhp/v1/gateways/gw-7/down/msg", "mhp/v2/gateways/gw-7/up/msg", "mhp/v1/gateways/+/up/msg"):
        with pytest.raises(topics.TopicError):
            topics.parse_up(bad)


def test_acl_patterns_give_a_party_only_its_own_subtrees() -> None:
    assert topics.acl_patterns("gateways") == [
        ("read", "mhp/v1/gateways/%u/down/#"),
        ("write", "mhp/v1/gateways/%u/up/#"),
        ("read", "mhp/v1/public/#"),
    ]


def test_every_message_round_trips() -> None:
    msgs = [
        Request(request_id="q1", kind=RequestKind.EMERGENCY, client_ids=["c1", "c2"], params=PARAMS,
                expires_at=PARAMS.end),
        Command(request_id="q1", client_id="c1", kind=RequestKind.EMERGENCY, params=PARAMS, expires_at=PARAMS.end),
        Outcome(request_id="q1", client_id="c1", state=ClientState.EXECUTED, detail={"shed": ["boiler"]},
                trace={"gateway_ms": 3.2}),
        Ack(ack_ids=["m1", "m2"]),
    ]
    for msg in msgs:
        assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    ("payload", "expect"),
    [
        (b"not json", "invalid v1 message"),
        (b"{}", "type"),
        (b'{"type": "nonsense"}', "type"),
        (b'{"type": "ack", "ack_ids": []}', "ack_ids"),
        (b'{"type": "ack", "ack_ids": ["x"], "v": 2}', "v"),
        (b'{"type": "ack", "ack_ids": ["x"], "surprise": 1}', "surprise"),
        (b'{"type": "outcome", "request_id": "q", "client_id": "a/b", "state": "executed"}', "client_id"),
        (b'{"type": "outcome", "request_id": "q", "client_id": "c", "state": "done"}', "state"),
    ],
)
def test_invalid_payloads_get_a_readable_reason(payload: bytes, expect: str) -> None:
    with pytest.raises(WireError, match=expect):
        decode(payload)


def test_oversized_payload_is_refused_before_parsing() -> None:
    with pytest.raises(WireError, match="exceeds"):
        decode(b" " * (MAX_PAYLOAD_BYTES + 1))


def test_what_a_party_sends_fits_the_brokers_packet_on_any_up_topic_and_is_read() -> None:
    longest = max(len(t(k, "x" * 64)) for t in (topics.up, topics.status) for k in ("retailers", "gateways"))
    assert topics.MAX_UP_TOPIC_BYTES == max(longest, len(topics.telemetry("x" * 64)))
    assert SEND_PAYLOAD_BYTES + 1 + 4 + 2 + topics.MAX_UP_TOPIC_BYTES + 2 + 1 == MAX_PACKET_BYTES
    assert SEND_PAYLOAD_BYTES < MAX_PAYLOAD_BYTES
    assert GATEWAY_OUTCOME_BYTES == BRIDGE_OUTCOME_BYTES - FORWARD_HEADROOM_BYTES


def test_a_bridges_outcome_fits_the_packet_once_a_hub_replica_forwards_it() -> None:
    """The replica's header with the longest ids is the whole of its growth (its inbox topic is shorter than the
    longest ``up`` topic), and what a bridge sends leaves room for it."""
    longest = "x" * 64
    assert len(topics.replica_in(longest)) <= topics.MAX_UP_TOPIC_BYTES
    header = replica_outcome_header(longest, longest)
    assert header.endswith(b"\n") and header.count(b"\n") == 1
    assert json.loads(header) == {"type": "outcome", "sender": longest, "retailer_id": longest}
    assert REPLICA_HEADROOM_BYTES == len(header) == 176
    assert BRIDGE_OUTCOME_BYTES + REPLICA_HEADROOM_BYTES == SEND_PAYLOAD_BYTES
    with pytest.raises(TopicError):
        replica_outcome_header('a"b', "r1")


@pytest.mark.parametrize(("detail", "kept", "dropped"), [
    ({"limit_kw": 1.0, "ok": True, "none": None, "reason": "r" * 500, "shed": ["a"] * 10, "log": "x" * 501,
      "nested": {"a": 1}}, {"limit_kw": 1.0, "ok": True, "none": None, "reason": "r" * 500},
     ["shed", "log", "nested"]),
    ({f"f{i:03d}": i for i in range(40)}, {f"f{i:03d}": i for i in range(32)}, [f"f{i:03d}" for i in range(32, 40)]),
    ({"k" * 65: 1, OVERSIZE_KEY: {"by": "gateway"}}, {}, ["k" * 64, OVERSIZE_KEY]),
    ({f"big{i}": ["x"] for i in range(30)}, {}, [f"big{i}" for i in range(20)]),
], ids=["scalars-kept", "at-most-32-fields", "long-names-and-an-older-marker", "at-most-20-names-dropped"])
def test_an_oversize_detail_keeps_its_small_fields_and_says_what_it_dropped(
        detail: dict[str, object], kept: dict[str, object], dropped: list[str]) -> None:
    cut = oversize_detail(detail, 300_000, GATEWAY_OUTCOME_BYTES, "gateway")
    marker = cut.pop(OVERSIZE_KEY)
    assert cut == kept
    assert marker == {"bytes": 300_000, "limit": GATEWAY_OUTCOME_BYTES, "by": "gateway", "dropped": dropped}


def test_emergency_params_need_an_ordered_window_and_a_non_negative_limit() -> None:
    with pytest.raises(ValueError, match="end must be after start"):
        EmergencyParams(start=NOW, end=NOW, power_limit_kw=1)
    with pytest.raises(ValueError, match="greater than or equal"):
        EmergencyParams(start=NOW, end=NOW + timedelta(1), power_limit_kw=-1)
    with pytest.raises(ValueError, match="timezone"):
        EmergencyParams.model_validate_json(json.dumps(
            {"start": "2026-11-27T12:00:00", "end": "2026-11-27T13:00:00", "power_limit_kw": 1}))


def test_client_states_know_which_are_terminal() -> None:
    assert {s for s in ClientState if not s.terminal} == {ClientState.PENDING, ClientState.SENT,
                                                          ClientState.DELIVERED}


def test_none_values_inside_details_and_readings_survive_the_wire() -> None:
    out = Outcome(request_id="q1", client_id="c1", state=ClientState.EXECUTED, detail={"expected_kw": None})
    assert decode(encode(out)) == out
    tel = Telemetry(gateway_id="gw-1", client_id="c1", seq=1, at=NOW, devices={"meter": {"active_power_kw": None}})
    assert decode(encode(tel)) == tel
