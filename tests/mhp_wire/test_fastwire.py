"""The bridge's hot-path codec (``mhp_wire.fastwire``, issue 14 fourth round) against the models it stands in for.

Encoders: the same bytes as :func:`mhp_wire.messages.encode` for the same values. The reader: whatever it accepts,
:func:`mhp_wire.messages.decode` accepts too, with the same values (hostile inputs from the fuzz corpus's own
strategies); whatever it does not read goes to ``decode``, which refuses it with its error. Message ids: unique,
short, a new prefix per process.
"""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import AwareDatetime, TypeAdapter

from mhp_wire.fastwire import (
    AckIn,
    AckStamp,
    CommandTemplate,
    OutcomeIn,
    OutcomesIn,
    Report,
    ack_payload,
    outcome_payload,
    outcomes_payload,
    pack_reports,
    read_outcomes,
    read_report,
    reader,
    sent_at_json,
)
from mhp_wire.ids import ID_RE, MsgIds, msg_ids
from mhp_wire.messages import (
    MAX_PAYLOAD_BYTES,
    OUTCOMES_MAX,
    Ack,
    ClientState,
    Command,
    EmergencyParams,
    LoadShiftParams,
    Outcome,
    OutcomeReport,
    Outcomes,
    RequestKind,
    WireError,
    decode,
    encode,
)
from tests.security.test_fuzz import FINITE, IDS, JSON_LEAVES, JSON_VALUES, QUICK, TIMES, is_finite, mutated

DETAILS = st.dictionaries(st.text(max_size=10), JSON_LEAVES.filter(is_finite), max_size=4)
PLAIN_DETAILS = st.dictionaries(st.text(max_size=10), JSON_LEAVES.filter(
    lambda v: type(v) not in (int, float) or -2**63 < v < 2**63), max_size=4)
"""Details the readers take (a number beyond 63 bits, which orjson may have read from an integer beyond 64, is left
to the models)."""
TRACES = st.dictionaries(st.text(max_size=10), FINITE, max_size=4)
REPORTS = st.builds(Report, request_id=IDS, client_id=IDS, state=st.sampled_from(ClientState), detail=DETAILS,
                    trace=TRACES, revision=st.integers(1, 2**53))
PLAIN_REPORTS = st.builds(Report, request_id=IDS, client_id=IDS, state=st.sampled_from(ClientState),
                          detail=PLAIN_DETAILS, trace=TRACES, revision=st.integers(1, 2**53))
GATEWAY_OUTCOMES = st.builds(Outcome, request_id=IDS, client_id=IDS, state=st.sampled_from(ClientState),
                             detail=PLAIN_DETAILS, trace=TRACES, sent_at=TIMES, revision=st.integers(1, 2**53))
GATEWAY_ACKS = st.builds(Ack, ack_ids=st.lists(st.text(max_size=64), min_size=1, max_size=5), sent_at=TIMES)


# -- encoders: the models' bytes ------------------------------------------------------------------------------

@QUICK
@given(ids=st.lists(st.text(max_size=64), min_size=1, max_size=5), at=TIMES)
def test_an_ack_is_the_models_bytes(ids: list[str], at: datetime) -> None:
    assert ack_payload(ids, msg_id="m-1", at=at) == encode(Ack(ack_ids=ids, msg_id="m-1", sent_at=at))


@QUICK
@given(ids=st.lists(st.text(max_size=64), min_size=1, max_size=5), at=TIMES)
def test_a_stamps_acks_are_the_models_bytes_with_one_sent_at_and_fresh_msg_ids(ids: list[str], at: datetime) -> None:
    stamp = AckStamp(at)
    payloads = [stamp.ack(m) for m in ids]
    acks = [decode(p) for p in payloads]
    for m, p, a in zip(ids, payloads, acks, strict=True):
        assert isinstance(a, Ack) and a.ack_ids == [m] and a.sent_at == at
        assert p == encode(Ack(ack_ids=[m], msg_id=a.msg_id, sent_at=at)) == ack_payload([m], msg_id=a.msg_id, at=at)
    assert len({a.msg_id for a in acks}) == len(ids)  # each its own msg_id


@QUICK
@given(at=st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999_999),
                       timezones=st.sampled_from([UTC, timezone(timedelta(hours=-3, minutes=-30))])),
       whole=st.booleans())
def test_sent_at_is_pydantics_bytes_in_utc_and_any_offset(at: datetime, whole: bool) -> None:
    at = at.replace(microsecond=0) if whole else at  # pydantic writes no fraction then
    assert sent_at_json(at) == TypeAdapter(AwareDatetime).dump_json(at)


def test_sent_at_of_a_datetime_subclass_is_pydantics_bytes_too() -> None:
    class Stamp(datetime):
        """A subclass, as a library's own time type may be."""

    at = Stamp(2024, 5, 1, 12, 0, 0, 5, tzinfo=UTC)  # a fixed instant to encode, not compared with now: never expires
    assert sent_at_json(at) == TypeAdapter(AwareDatetime).dump_json(at) == b'"2024-05-01T12:00:00.000005Z"'


def test_sent_at_by_default_is_now_in_utc() -> None:
    before = datetime.now(UTC)
    written = datetime.fromisoformat(json.loads(sent_at_json()))
    assert written.utcoffset() == timedelta(0) and before <= written <= datetime.now(UTC)


def test_an_ack_names_one_to_ten_thousand_messages() -> None:
    with pytest.raises(ValueError, match="1 to 10,000"):
        ack_payload([])
    with pytest.raises(ValueError, match="1 to 10,000"):
        ack_payload(["m"] * 10_001)
    back = decode(ack_payload(["m1", "m2"]))
    assert isinstance(back, Ack) and back.ack_ids == ["m1", "m2"] and back.partition is None


@QUICK
@given(r=REPORTS, at=TIMES)
def test_an_outcome_is_the_models_bytes(r: Report, at: datetime) -> None:
    mid, payload = outcome_payload(r._replace(msg_id="m-2"), at=at)
    assert mid == "m-2"
    assert payload == encode(Outcome(msg_id="m-2", sent_at=at, request_id=r.request_id, client_id=r.client_id,
                                     state=r.state, detail=r.detail, trace=r.trace, revision=r.revision))


@QUICK
@given(request_id=IDS, reports=st.lists(REPORTS, min_size=1, max_size=4), at=TIMES)
def test_outcomes_are_the_models_bytes(request_id: str, reports: list[Report], at: datetime) -> None:
    mid, payload = outcomes_payload(request_id, reports, msg_id="m-3", at=at)
    assert mid == "m-3"
    assert payload == encode(Outcomes(msg_id="m-3", sent_at=at, request_id=request_id, reports=[
        OutcomeReport(client_id=r.client_id, state=r.state, detail=r.detail, trace=r.trace, revision=r.revision)
        for r in reports]))


def test_what_orjson_cannot_write_falls_back_to_the_model_and_non_finite_is_null() -> None:
    at = datetime.now(UTC)
    huge = Report("q", "c1", ClientState.EXECUTED, {"n": 2**70, "x": math.inf}, {"gateway_ms": 1.0}, 1, "m-4")
    _, one = outcome_payload(huge, at=at)
    assert one == encode(Outcome(msg_id="m-4", sent_at=at, request_id="q", client_id="c1",
                                 state=ClientState.EXECUTED, detail={"n": 2**70, "x": math.inf},
                                 trace={"gateway_ms": 1.0}))
    back = decode(one)
    assert isinstance(back, Outcome) and back.detail == {"n": 2**70, "x": None}
    _, many = outcomes_payload("q", [huge, huge._replace(client_id="c2")], at=at)
    back_many = decode(many)
    assert isinstance(back_many, Outcomes) and [r.detail for r in back_many.reports] == [{"n": 2**70, "x": None}] * 2
    plain = Report("q", "c1", ClientState.EXECUTED, {"x": math.nan}, {}, 1)
    assert json.loads(outcome_payload(plain)[1])["detail"] == {"x": None}


def test_reports_are_packed_per_request_within_the_wire_limit() -> None:
    big = {"note": "x" * 2_000}
    reports = [Report("q1", f"c{i}", ClientState.EXECUTED, big, {}, 1) for i in range(300)]
    reports += [Report("q2", "c1", ClientState.DELIVERED, {}, {"retailer_ms": 1.0}, 1, "dlv-fixed")]
    packed = pack_reports(reports, 250)
    alone = [p for mid, p in packed if mid == "dlv-fixed"]
    assert len(alone) == 1 and isinstance(decode(alone[0]), Outcome)  # one report of its request: an outcome
    many = [decode(p) for mid, p in packed if mid != "dlv-fixed"]
    assert all(isinstance(m, Outcomes) and m.request_id == "q1" for m in many)
    assert all(len(p) <= MAX_PAYLOAD_BYTES for _, p in packed) and len(many) > 2  # 250 did not fit: split
    assert [r.client_id for m in many for r in m.reports] == [f"c{i}" for i in range(300)]  # type: ignore[union-attr]


def _command(params: Any = None) -> Command:
    start = datetime.now(UTC) + timedelta(minutes=1)
    params = params or EmergencyParams(start=start, end=start + timedelta(minutes=5), power_limit_kw=1.5)
    kind = RequestKind.EMERGENCY if isinstance(params, EmergencyParams) else RequestKind.LOAD_SHIFT
    return Command(request_id="q-1", client_id="c0", kind=kind, params=params, expires_at=params.end, revision=3)


@QUICK
@given(client_id=IDS)
def test_a_spliced_command_is_the_copys_bytes(client_id: str) -> None:
    template = _command()
    mid = msg_ids()
    spliced = CommandTemplate(template).payload(mid, client_id)
    assert spliced == encode(template.model_copy(update={"client_id": client_id, "msg_id": mid}))
    back = decode(spliced)
    assert isinstance(back, Command) and (back.client_id, back.msg_id, back.revision) == (client_id, mid, 3)


def test_a_command_whose_own_text_holds_a_marker_is_encoded_as_a_copy() -> None:
    start = datetime.now(UTC) + timedelta(minutes=1)
    template = _command(LoadShiftParams(start=start, end=start + timedelta(hours=1),
                                        reason="peak \x01mhp-client-id\x01 here"))
    spliced = CommandTemplate(template).payload("m-5", "c7")
    assert spliced == encode(template.model_copy(update={"client_id": "c7", "msg_id": "m-5"}))
    back = decode(spliced)
    assert isinstance(back, Command) and back.client_id == "c7"
    assert back.params.reason == "peak \x01mhp-client-id\x01 here"  # type: ignore[union-attr]


# -- the reader: a subset of decode, with the same values -----------------------------------------------------

SENT_AT = "2026-01-01T00:00:00Z"
"""A ``sent_at`` the readers and the models read for its form only (neither compares it with now): it cannot
expire, whatever the day the suite runs."""


def assert_same_refusal(read: Any, payload: bytes) -> None:
    """``read`` (a reader with the models' decoding behind it) refuses ``payload`` with ``decode``'s own error."""
    with pytest.raises(WireError) as fast_error:
        read(payload)
    with pytest.raises(WireError) as model_error:
        decode(payload)
    assert str(fast_error.value) == str(model_error.value)


def compact(payload: bytes) -> bytes | None:
    """``payload`` written again as orjson writes it (the only form the readers read: what bridges, gateways and
    the models send), or None when it is not JSON orjson can write; so that a strategy's ``json.dumps`` text or a
    mutated document also reaches the readers in their form."""
    try:
        return orjson.dumps(json.loads(payload))
    except (ValueError, RecursionError, TypeError, orjson.JSONEncodeError):
        return None


def same_json(a: Any, b: Any) -> bool:
    """Equal values of the same types all the way down (``==`` holds ``True == 1 == 1.0`` and ``-0.0 == 0.0``)."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(same_json(v, b[k]) for k, v in a.items())
    if type(a) is list:
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is float:
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


def disagreement(payload: bytes, read: Any = read_report) -> str | None:
    """None when ``read`` (:func:`read_report`, or the hub's :func:`read_outcomes`) reads ``payload`` and its
    :func:`compact` form as :func:`decode` does, with values of the same types, or leaves them to ``decode``
    (None); otherwise what differs."""
    again = compact(payload)
    return _disagreement(payload, read) or (_disagreement(again, read) if again not in (None, payload) else None)


def _disagreement(payload: bytes, read: Any) -> str | None:
    fast = read(payload)
    if fast is None:
        return None
    try:
        model = decode(payload)
    except WireError as exc:
        return f"the reader took what decode refuses: {exc}"
    if isinstance(fast, AckIn):
        same = isinstance(model, Ack) and model.partition is None and \
            (fast.msg_id, fast.ack_ids) == (model.msg_id, model.ack_ids)
    elif isinstance(fast, OutcomeIn):
        same = isinstance(model, Outcome) and same_json(fast.trace, model.trace) \
            and same_json(fast.detail, model.detail) and \
            fast == OutcomeIn(model.msg_id, model.request_id, model.client_id, model.state, model.detail,
                              model.trace, model.revision)
    else:
        same = isinstance(model, Outcomes) and all(isinstance(r, OutcomeReport) for r in model.reports) \
            and all(type(state) is ClientState and same_json(trace, r.trace)  # type: ignore[union-attr]
                    and same_json(detail, r.detail)  # type: ignore[union-attr]
                    for (_, state, detail, trace, _), r in zip(fast.reports, model.reports, strict=False)) \
            and fast == OutcomesIn(model.msg_id, model.request_id, [
                (r.client_id, r.state, r.detail, r.trace, r.revision)  # type: ignore[union-attr]
                for r in model.reports]) and reader(decode, read)(payload) == fast
    return None if same else f"read as {fast}, decoded as {model!r}"


@QUICK
@given(msg=GATEWAY_OUTCOMES | GATEWAY_ACKS)
def test_what_gateways_send_is_read_on_the_fast_path(msg: Outcome | Ack) -> None:
    payload = encode(msg)
    assert read_report(payload) is not None
    assert disagreement(payload) is None


@QUICK
@given(st.sampled_from([
    Outcome(request_id="q1", client_id="c1", state=ClientState.EXECUTED, detail={"shed": ["heater"], "kw": 1},
            trace={"gateway_ms": 3.5}),
    Ack(ack_ids=["m1", "m2"])]).flatmap(lambda m: mutated(json.loads(encode(m)))))
def test_mutated_reports_are_read_as_decode_reads_them_or_left_to_it(payload: bytes) -> None:
    assert disagreement(payload) is None


@QUICK
@given(st.fixed_dictionaries({"type": st.sampled_from(["ack", "outcome"])}, optional={
    # Spellings of a timestamp, checked for their form only (valid or not as text): no date here can expire.
    "v": JSON_VALUES, "msg_id": JSON_VALUES, "sent_at": JSON_VALUES | st.sampled_from(
        ["2026-02-30T00:00:00Z", "2026-01-01T00:00:00+24:00", "2026-01-01T24:00:00Z", "2026-01-01T00:00:00",
         "2026-01-01T00:00:00.1234567Z", "2026-01-01 00:00:00Z", "2026-01-01T00:00:60Z", "0000-01-01T00:00:00Z",
         "2026-01-01T00:00:00+00:60", "2026-01-01T00:00:00+05:99", "2026-01-01T00:00:00+23:59",
         "2026-01-01T00:00:00-00:00", "0001-01-01T00:00:00Z", "2026-01-01T00:00:00.1z"]),
    "request_id": JSON_VALUES, "client_id": JSON_VALUES | IDS, "state": JSON_VALUES | st.sampled_from(ClientState),
    "detail": JSON_VALUES, "trace": JSON_VALUES, "revision": JSON_VALUES, "ack_ids": JSON_VALUES}))
def test_arbitrary_fields_are_read_as_decode_reads_them_or_left_to_it(value: dict[str, Any]) -> None:
    assert disagreement(json.dumps(value).encode()) is None


@QUICK
@given(st.binary(max_size=500))
def test_arbitrary_bytes_are_left_to_decode(payload: bytes) -> None:
    assert disagreement(payload) is None


def test_an_invalid_report_is_refused_by_decode_with_its_own_error() -> None:
    at = SENT_AT
    hostile = [
        b'{"v":1,"msg_id":"m","sent_at":"%s","type":"outcome","request_id":"q","client_id":"c1","state":"bogus"}',
        b'{"v":1,"msg_id":"m","sent_at":"%s","type":"outcome","request_id":"q","client_id":"c 1","state":"executed"}',
        b'{"v":1,"msg_id":"m","sent_at":"%s","type":"outcome","request_id":"q","client_id":"c1","state":"executed",'
        b'"detail":{"available_kw":1e999}}',
        b'{"v":1,"msg_id":"m","sent_at":"%s","type":"outcome","request_id":"q","client_id":"c1","state":"executed",'
        b'"revision":0}',
        b'{"v":1,"msg_id":"m","sent_at":"%s","type":"ack","ack_ids":[]}',
        b'{"v":1,"msg_id":"m","sent_at":"%s","type":"ack","ack_ids":["m1"],"extra":1}',
    ]
    read = reader(decode)
    for raw in hostile:
        payload = raw.replace(b"%s", at.encode())
        assert read_report(payload) is None
        assert_same_refusal(read, payload)


def test_an_integer_beyond_64_bits_in_a_detail_is_left_to_decode() -> None:
    """orjson reads ``18446744073709551617`` as the float 1.8446744073709552e19; the models keep the exact int.
    Before the ninth round the reader took that float for a plain number and handed the bridge another value."""
    at = SENT_AT
    for number in (b"18446744073709551617", b"-9223372036854775809", b"1e19"):
        payload = (b'{"v":1,"msg_id":"m","sent_at":"%s","type":"outcome","request_id":"q","client_id":"c1",'
                   b'"state":"executed","detail":{"n":[%s]}}') % (at.encode(), number)
        assert read_report(payload) is None, number
        assert disagreement(payload) is None
        model = decode(payload)
        assert isinstance(model, Outcome) and model.detail["n"][0] == json.loads(number)
    exact = decode(b'{"v":1,"msg_id":"m","sent_at":"%s","type":"outcome","request_id":"q","client_id":"c1",'
                   b'"state":"executed","detail":{"n":18446744073709551617}}' % at.encode())
    assert isinstance(exact, Outcome) and exact.detail == {"n": 2**64 + 1}


# -- the hub's reader of a retailer's ``outcomes``: a subset of decode, with the same values -------------------

def outcomes_disagreement(payload: bytes) -> str | None:
    """:func:`disagreement` of the hub's reader (left to ``decode``: the hub's reader gives what ``decode`` gives,
    or raises its error)."""
    return disagreement(payload, read_outcomes)


BRIDGE_OUTCOMES = st.builds(lambda request_id, reports, at: outcomes_payload(request_id, reports, at=at)[1],
                            IDS, st.lists(PLAIN_REPORTS, min_size=1, max_size=5), TIMES)
MODEL_OUTCOMES = st.builds(
    lambda request_id, reports, at: encode(Outcomes(request_id=request_id, sent_at=at, reports=reports)), IDS,
    st.lists(st.builds(OutcomeReport, client_id=IDS, state=st.sampled_from(ClientState), detail=PLAIN_DETAILS,
                       trace=TRACES, revision=st.integers(1, 2**53)), min_size=1, max_size=5), TIMES)


@QUICK
@given(payload=BRIDGE_OUTCOMES | MODEL_OUTCOMES)
def test_what_bridges_send_the_hub_is_read_on_the_fast_path(payload: bytes) -> None:
    assert read_outcomes(payload) is not None
    assert outcomes_disagreement(payload) is None


VALID_OUTCOMES = json.loads(encode(Outcomes(request_id="q1", reports=[
    OutcomeReport(client_id="c1", state=ClientState.EXECUTED, detail={"shed": ["heater"], "kw": 1, "x": {"y": None}},
                  trace={"gateway_ms": 3.5, "retailer_ms": 1}, revision=2),
    OutcomeReport(client_id="c2", state=ClientState.DELIVERED)])))


@QUICK
@given(mutated(VALID_OUTCOMES))
def test_mutated_outcomes_are_read_as_decode_reads_them_or_left_to_it(payload: bytes) -> None:
    """Any one change anywhere (inside an entry too): a field dropped, a wrong type, an extra field, a huge
    string (to past the 256 KiB limit), deep nesting."""
    assert outcomes_disagreement(payload) is None


_ENTRY_FIELDS = {
    "client_id": IDS | st.sampled_from(["c 1", "x" * 65, "", "c/1", "c+1", "c#1"]) | JSON_VALUES,
    "state": st.sampled_from([s.value for s in ClientState]) | st.sampled_from(["bogus", "EXECUTED"]) | JSON_VALUES,
    "detail": PLAIN_DETAILS | JSON_VALUES | st.sampled_from(
        [{"n": 2**64 + 1}, {"n": -2**63}, {"available_kw": 1e300}, {"d": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}]),
    "trace": TRACES | st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3),
    "revision": st.integers(1, 2**53) | st.sampled_from([0, -1, 2**63 - 1, 2**63, 2**64 + 1, 1.0, True, "2"])
    | JSON_VALUES,
}
ENTRIES = (st.fixed_dictionaries({k: _ENTRY_FIELDS[k] for k in ("client_id", "state")},
                                 optional={k: _ENTRY_FIELDS[k] for k in ("detail", "trace", "revision")})
           | st.fixed_dictionaries({}, optional={**_ENTRY_FIELDS, "extra": JSON_VALUES}) | JSON_VALUES)
"""An entry of an ``outcomes`` message: often valid, or with one or more fields missing, of a wrong type or value,
or extra; or not an object."""


@QUICK
@given(st.fixed_dictionaries({"type": st.just("outcomes")}, optional={
    # Spellings of a timestamp, checked for their form only (valid or not as text): no date here can expire.
    "v": JSON_VALUES | st.just(1), "msg_id": JSON_VALUES | st.sampled_from(["m", "x" * 64, "x" * 65]),
    "sent_at": JSON_VALUES | st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:00+24:00",
                                              "2026-01-01T00:00:00", "2026-01-01T00:00:00+00:60"]),
    "request_id": JSON_VALUES | st.sampled_from(["q", "x" * 64, "x" * 65]),
    "reports": st.lists(ENTRIES, max_size=4) | JSON_VALUES, "partition": JSON_VALUES}))
def test_arbitrary_outcomes_fields_are_read_as_decode_reads_them_or_left_to_it(value: dict[str, Any]) -> None:
    assert outcomes_disagreement(json.dumps(value).encode()) is None


@QUICK
@given(st.lists(ENTRIES, min_size=1, max_size=4))
def test_arbitrary_entries_of_a_valid_envelope_are_read_as_decode_reads_them_or_left_to_it(
        entries: list[Any]) -> None:
    payload = json.dumps({"v": 1, "msg_id": "m", "sent_at": SENT_AT, "type": "outcomes",
                          "request_id": "q", "reports": entries}).encode()
    assert outcomes_disagreement(payload) is None


def _outcomes(*entries: str, head: str = "") -> bytes:
    """An ``outcomes`` message with these JSON entries (a fixed ``sent_at``: only its form is read, never compared
    with now)."""
    return ('{"v":1,"msg_id":"m","sent_at":"' + SENT_AT + '","type":"outcomes","request_id":"q",'
            + head + '"reports":[' + ",".join(entries) + "]}").encode()


GOOD = '{"client_id":"c1","state":"executed"}'


def test_what_the_reader_leaves_to_decode_is_handled_by_decode_alone() -> None:
    """Each: not read here; through the hub's reader exactly what ``decode`` makes of it (a message with a bad
    entry is still an ``outcomes`` message, whose entry the hub refuses alone; a whole message refused with
    decode's error; a lenient spelling the models accept, accepted with the models' values)."""
    cases = [
        _outcomes(GOOD, '{"client_id":"c 1","state":"executed"}'),                 # a bad id
        _outcomes(GOOD, '{"client_id":"c2","state":"bogus"}'),                     # a bad state
        _outcomes(GOOD, '{"client_id":"c2","state":"executed","revision":0}'),     # a bad revision
        _outcomes(GOOD, '{"client_id":"c2","state":"executed","revision":1.0}'),   # a lenient one
        _outcomes(GOOD, '{"client_id":"c2","state":"executed","trace":{"x":"2.5"}}'),
        _outcomes(GOOD, '{"client_id":"c2","state":"executed","detail":{"available_kw":1e999}}'),
        _outcomes(GOOD, '{"client_id":"c2","state":"executed","detail":{"n":18446744073709551617}}'),
        _outcomes(GOOD, '{"client_id":"c2","state":"executed","detail":%s}' % ("[" * 17 + "]" * 17)),
        _outcomes(GOOD, '{"client_id":"c2","state":"executed","extra":1}'),
        _outcomes(GOOD, '{"client_id":"c2"}'),
        _outcomes(GOOD, '"c2"'),
        _outcomes(),                                                                # no entry
        _outcomes(*[GOOD] * (OUTCOMES_MAX + 1)),                                   # too many
        _outcomes(GOOD, head='"request_id":"%s",' % ("x" * 65)),                  # too long (a duplicate key)
        _outcomes(GOOD, head='"partition":{"index":0,"of":1},'),
        _outcomes(GOOD).replace(SENT_AT.encode(), b"2026-01-01T00:00:00+00:60"),  # a bad offset: its form only
        _outcomes(GOOD).replace(b'"v":1', b'"v":true'),
        _outcomes(GOOD, '{"client_id":"c2","state":"executed","detail":{"x":"%s"}}' % ("y" * MAX_PAYLOAD_BYTES)),
    ]
    hub = reader(decode, read_outcomes)
    for payload in cases:
        assert read_outcomes(payload) is None, payload[:300]
        try:
            model = decode(payload)
        except WireError as exc:
            with pytest.raises(WireError) as fast_error:
                hub(payload)
            assert str(fast_error.value) == str(exc)
        else:
            assert hub(payload) == model
    bad_entry = decode(cases[1])
    assert isinstance(bad_entry, Outcomes) and bad_entry.reports[1] == {"client_id": "c2", "state": "bogus"}
    lenient = decode(cases[3])
    assert isinstance(lenient, Outcomes) and lenient.reports[1].revision == 1  # type: ignore[union-attr]


def test_a_plain_outcomes_message_is_read_by_hand_and_the_rest_by_the_models() -> None:
    plain = _outcomes(GOOD, '{"client_id":"c2","state":"delivered","trace":{"retailer_ms":2},"revision":3}')
    read = read_outcomes(plain)
    assert read == OutcomesIn("m", "q", [("c1", ClientState.EXECUTED, {}, {}, 1),
                                         ("c2", ClientState.DELIVERED, {}, {"retailer_ms": 2.0}, 3)])
    assert read is not None and read.type == "outcomes" and type(read.reports[1][3]["retailer_ms"]) is float
    assert outcomes_disagreement(plain) is None
    hub = reader(decode, read_outcomes)
    spaced = plain.replace(b'"type":"outcomes"', b'"type" : "outcomes"')  # not the compact form: the models'
    assert read_outcomes(spaced) is None and isinstance(hub(spaced), Outcomes) and hub(spaced).reports[1].trace \
        == {"retailer_ms": 2.0}
    one = encode(Outcome(request_id="q", client_id="c1", state=ClientState.EXECUTED))
    assert read_outcomes(one) is None and isinstance(hub(one), Outcome)  # a single outcome: the models'
    assert read_outcomes(ack_payload(["m1"])) is None and isinstance(hub(ack_payload(["m1"])), Ack)
    late = json.dumps({"v": 1, "msg_id": "x" * 300, "sent_at": SENT_AT, "type": "outcomes",
                       "request_id": "q", "reports": [{"client_id": "c1", "state": "executed"}]}).encode()
    assert read_outcomes(late) is None  # "outcomes" past the first 256 bytes: not looked for further
    assert_same_refusal(hub, late)


def test_a_repeated_key_is_left_to_decode() -> None:
    """orjson keeps a repeated key's last value; the models check every value of a ``trace`` (a first ``null``
    is refused) and their parser refuses nesting past its limit even under a key repeated later. Before the ninth
    round's review both readers took such messages, which ``decode`` refuses (the entry alone, or the message)."""
    deep = "[" * 300 + "]" * 300
    head = '{"v":1,"msg_id":"m","sent_at":"' + SENT_AT + '",'
    reports = [
        head + '"type":"outcome","request_id":"q","client_id":"c1","state":"executed","trace":{"a":null,"a":1}}',
        head + '"type":"outcome","request_id":"q","client_id":"c1","state":"executed","detail":{"a":DEEP,"a":1}}',
        head + '"type":"outcome","request_id":"q","client_id":"c1","state":"executed","revision":DEEP,"revision":1}',
        head + '"type":"ack","ack_ids":DEEP,"ack_ids":["m1"]}',
    ]
    read = reader(decode)
    for text in reports:
        payload = text.replace("DEEP", deep).encode()
        assert read_report(payload) is None, text[:120]
        assert_same_refusal(read, payload)
    hub = reader(decode, read_outcomes)
    repeated_trace = _outcomes(GOOD, '{"client_id":"c2","state":"executed","trace":{"a":null,"a":1}}')
    assert read_outcomes(repeated_trace) is None
    kept = hub(repeated_trace)
    assert isinstance(kept, Outcomes) and kept == decode(repeated_trace)
    assert not isinstance(kept.reports[1], OutcomeReport)  # the entry the hub refuses alone, as decode leaves it
    hidden = _outcomes('{"client_id":"c1","state":"executed","detail":{"a":DEEP,"a":1}}'.replace("DEEP", deep))
    assert read_outcomes(hidden) is None
    assert_same_refusal(hub, hidden)


# -- message ids ----------------------------------------------------------------------------------------------

def test_message_ids_are_unique_short_and_new_per_process() -> None:
    a, b = MsgIds(), MsgIds()
    ids = [a() for _ in range(100_000)] + [b() for _ in range(1_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) <= 42 and ID_RE.fullmatch(i) for i in ids)
    assert ids[0].split("-")[0] != ids[-1].split("-")[0]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new prefix, not the parent's counter
        os.write(write, msg_ids().encode())
        os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 100).decode()
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(read)
    assert status == 0 and child.split("-")[0] != msg_ids().split("-")[0]
