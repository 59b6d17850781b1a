"""The wire contract: topic builders, id rules, message validation with readable errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from mhp_wire import topics
from mhp_wire.messages import (
    MAX_PAYLOAD_BYTES,
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
)

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
