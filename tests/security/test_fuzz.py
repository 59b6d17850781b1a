"""Fuzzing with hypothesis: every wire message model, every HTTP body model against a live hub, and a live run in
which hostile traffic is mixed into a stream of valid emergencies.

Properties: ``decode()`` returns a message or raises ``WireError`` (never anything else) and valid messages
round-trip; the hub never answers 5xx, every 4xx carries a JSON ``message``, and valid work still completes.
"""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mhp_wire import topics
from mhp_wire.messages import (
    Ack,
    ApplianceSchedule,
    AvailabilityParams,
    BillingClient,
    BillingData,
    Cancel,
    ClientState,
    Command,
    CustomerChange,
    Customers,
    EmergencyParams,
    ErrorReply,
    LoadReductionParams,
    LoadShiftParams,
    Measurement,
    Measurements,
    Outcome,
    OutcomeReport,
    Outcomes,
    Presence,
    ReadingBlock,
    Request,
    RequestKind,
    Schedule,
    SupplyPeriod,
    Tariff,
    TariffPeriod,
    Telemetry,
    WireError,
    decode,
    encode,
)
from tests.cloud_hub.test_relay import metric, wait_state
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties

T0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=1)
"""Tomorrow's whole hour: the samples' requests must not have expired, whatever the day the suite runs."""
HOUR = timedelta(hours=1)
QUICK = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))

# -- values and mutations -------------------------------------------------------------------------------------

JSON_LEAVES = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
               | st.sampled_from(["", "2030-01-01T00:00:00+00:00", "c1", "emergency", "request", "-1", "1e309"]))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=25)
DEEP = "\x00deep\x00"


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a dict entry or list item inside ``value``."""
    found: list[tuple[Any, ...]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found.append((*prefix, key))
        found.extend(paths(child, (*prefix, key)))
    return found


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any]) -> bytes:
    """A valid JSON document with one hostile change: a field dropped, a wrong type, an extra field, a huge string,
    deep nesting; serialised (deep nesting is spliced into the text, as json.dumps would refuse it)."""
    doc = json.loads(json.dumps(valid))
    where = draw(st.sampled_from(paths(doc)))
    parent, key = _parent(doc, where), where[-1]
    how = draw(st.sampled_from(["drop", "wrong_type", "extra", "huge", "deep"]))
    if how == "drop":
        del parent[key]
    elif how == "wrong_type":
        parent[key] = draw(JSON_VALUES)
    elif how == "extra":
        target = parent if isinstance(parent, dict) else doc
        target[draw(st.text(min_size=1, max_size=10))] = draw(JSON_VALUES)
    elif how == "huge":
        parent[key] = "x" * draw(st.sampled_from([1_000, 70_000, 300_000]))
    else:
        parent[key] = DEEP
    text = json.dumps(doc)
    depth = draw(st.sampled_from([50, 1_000, 100_000]))
    return text.replace(json.dumps(DEEP), "[" * depth + "]" * depth).encode()


def collect(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """``n`` examples of ``strategy``, drawn by hypothesis (for live runs that cannot shrink anyway)."""
    out: list[Any] = []

    @settings(QUICK, max_examples=n, phases=[Phase.generate])
    @given(strategy)
    def draw(x: Any) -> None:
        out.append(x)

    draw()
    return out


# -- (a) wire messages --------------------------------------------------------------------------------------

def _samples() -> list[Any]:
    emergency = EmergencyParams(start=T0, end=T0 + HOUR, power_limit_kw=1.0)
    return [
        Request(request_id="q1", kind=RequestKind.EMERGENCY, client_ids=["c1", "c2"], params=emergency,
                expires_at=T0 + HOUR),
        Request(request_id="q2", kind=RequestKind.AVAILABILITY, client_ids=["c1"], expires_at=T0 + HOUR,
                params=AvailabilityParams(start=T0, end=T0 + HOUR, reduction_kw=3.0)),
        Command(request_id="q1", client_id="c1", kind=RequestKind.LOAD_SHIFT, expires_at=T0 + HOUR,
                params=LoadShiftParams(start=T0, end=T0 + HOUR, reason="peak")),
        Command(request_id="q3", client_id="c1", kind=RequestKind.LOAD_REDUCTION, expires_at=T0 + HOUR,
                params=LoadReductionParams(start=T0, end=T0 + HOUR, target_kw=2.0)),
        Cancel(request_id="q1", client_ids=["c1"]),
        Ack(ack_ids=["m1", "m2"]),
        Outcome(request_id="q1", client_id="c1", state=ClientState.EXECUTED, detail={"shed": ["heater"]},
                trace={"gateway_ms": 3.5}),
        Outcomes(request_id="q1", reports=[
            OutcomeReport(client_id="c1", state=ClientState.EXECUTED, detail={"shed": ["heater"]},
                          trace={"gateway_ms": 3.5}),
            OutcomeReport(client_id="c2", state=ClientState.UNREACHABLE, detail={"reason": "silent"}, revision=2)]),
        ErrorReply(ref_msg_id="m1", code="invalid", message="no"),
        Telemetry(gateway_id="gw-1", client_id="c1", seq=3, at=T0, devices={"meter": {"p": 1.5, "on": True}},
                  active_power_kw=1.5, sheddable_kw=0.5),
        Presence(state="online"),
        BillingData(request_id="b1", period_start=T0, period_end=T0 + HOUR, clients=[BillingClient(
            client_id="c1", period_start=T0, period_end=T0 + HOUR,
            readings=[ReadingBlock(start=T0, resolution_s=900, values_kwh=[0.1, 0.2])])]),
        Tariff(tariff_id="t1", version=2, valid_from=T0, valid_to=T0 + HOUR,
               periods=[TariffPeriod(start=T0, end=T0 + HOUR, price_eur_per_kwh=0.2)]),
        Measurements(items=[Measurement(client_id="c1", at=T0, active_power_kw=2.0)]),
        Schedule(client_id="c1", version=1, appliances=[ApplianceSchedule(
            device="boiler", allowed=[("01:00", "05:00")], run_s=3600, priority=1)]),
        Customers(items=[CustomerChange(client_id="c1", revision=2, periods=[
            SupplyPeriod(valid_from=T0 - HOUR, valid_until=T0), SupplyPeriod(valid_from=T0 + HOUR)])]),
        *_consent_samples(),
    ]


def _consent_samples() -> list[Any]:
    """The consent messages (issue 18, docs/consent.md)."""
    from mhp_wire.messages import AccessItem, ConsentDecision, ConsentItem, ConsentQuery, ConsentView

    return [ConsentQuery(client_id="c1"),
            ConsentDecision(client_id="c1", permission_id="perm-1", decision="accept", decided_at=T0),
            ConsentView(client_id="c1", permissions=[ConsentItem(
                permission_id="perm-1", party_id="p1", party_name="Energy Co", purpose="an offer",
                scopes=["consumption_profile"], resolution_s=900, data_from=T0 - HOUR, data_to=T0,
                valid_until=T0 + HOUR, decide_by=T0 + HOUR, state="sent_to_pa")],
                accesses=[AccessItem(at=T0, principal="party:p1", action="read_consumption",
                                     right="party:permission:perm-1", allowed=True)])]


SAMPLES = _samples()
MESSAGE_TYPES = sorted({m.type for m in SAMPLES})


def test_every_message_type_has_a_sample() -> None:
    from mhp_wire.messages import _ADAPTER

    schema = _ADAPTER.json_schema()
    assert set(schema["discriminator"]["mapping"]) == set(MESSAGE_TYPES)


def check_decodes_or_wire_error(payload: bytes) -> None:
    try:
        decode(payload)
    except WireError as exc:
        assert len(str(exc)) <= 1900, "the reason fits in an error answer (2000 characters)"
        ErrorReply(code="invalid", message=str(exc))


@QUICK
@given(st.binary(max_size=2_000))
def test_decode_of_arbitrary_bytes(payload: bytes) -> None:
    check_decodes_or_wire_error(payload)


@QUICK
@given(JSON_VALUES | st.fixed_dictionaries({"type": st.sampled_from(MESSAGE_TYPES)}, optional={
    "v": JSON_VALUES, "msg_id": JSON_VALUES, "sent_at": JSON_VALUES, "request_id": JSON_VALUES,
    "client_ids": JSON_VALUES, "params": JSON_VALUES, "kind": JSON_VALUES, "state": JSON_VALUES}))
def test_decode_of_arbitrary_json_values(value: Any) -> None:
    check_decodes_or_wire_error(json.dumps(value).encode())


@QUICK
@given(st.sampled_from(SAMPLES).flatmap(lambda m: mutated(json.loads(encode(m)))))
def test_decode_of_mutated_valid_messages(payload: bytes) -> None:
    check_decodes_or_wire_error(payload)


IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", fullmatch=True)
TIMES = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                     timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]))
FINITE = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)


def is_finite(value: Any) -> bool:
    """JSON has no Infinity or NaN: a valid message carries finite numbers (the wire writes others as null,
    ``test_non_finite_numbers_travel_as_null``)."""
    return not isinstance(value, float) or math.isfinite(value)

VALID = st.one_of(
    st.sampled_from(SAMPLES),
    st.builds(Outcome, request_id=IDS, client_id=IDS, state=st.sampled_from(ClientState),
              detail=st.dictionaries(st.text(max_size=10), JSON_LEAVES.filter(is_finite), max_size=4),
              trace=st.dictionaries(st.text(max_size=10), FINITE, max_size=4), sent_at=TIMES),
    st.builds(Outcomes, request_id=IDS, sent_at=TIMES, reports=st.lists(st.builds(
        OutcomeReport, client_id=IDS, state=st.sampled_from(ClientState),
        detail=st.dictionaries(st.text(max_size=10), JSON_LEAVES.filter(is_finite), max_size=4),
        trace=st.dictionaries(st.text(max_size=10), FINITE, max_size=4)), min_size=1, max_size=4)),
    st.builds(Telemetry, gateway_id=IDS, client_id=IDS, seq=st.integers(0, 2**53), at=TIMES,
              devices=st.dictionaries(st.text(max_size=10), st.dictionaries(
                  st.text(max_size=10), st.none() | st.booleans() | FINITE, max_size=3), max_size=3),
              active_power_kw=st.none() | FINITE),
    st.builds(Ack, ack_ids=st.lists(st.text(max_size=64), min_size=1, max_size=5)),
    st.builds(Measurements, items=st.lists(st.builds(Measurement, client_id=IDS, at=TIMES,
                                                     active_power_kw=st.floats(-10_000, 10_000)),
                                           min_size=1, max_size=5)),
)


@QUICK
@given(VALID)
def test_valid_messages_round_trip(msg: Any) -> None:
    assert decode(encode(msg)) == msg


def test_non_finite_numbers_travel_as_null() -> None:
    out = Outcome(request_id="r", client_id="c", state=ClientState.EXECUTED, detail={"x": math.inf, "y": 1.5})
    assert decode(encode(out)).detail == {"x": None, "y": 1.5}  # type: ignore[union-attr]
    tele = Telemetry(gateway_id="g", client_id="c", seq=1, at=datetime.now(UTC),
                     devices={"meter": {"active_power_kw": math.nan, "on": True}}, active_power_kw=math.nan)
    back = decode(encode(tele))
    assert isinstance(back, Telemetry)
    assert back.devices == {"meter": {"active_power_kw": None, "on": True}} and back.active_power_kw is None
    with pytest.raises(ValueError):
        Measurement(client_id="c", at=datetime.now(UTC), active_power_kw=math.inf)  # bounded: refused at the sender


# -- (b) HTTP bodies against the live hub ---------------------------------------------------------------------

def _iso(dt: datetime) -> str:
    return dt.isoformat()


def http_cases() -> list[tuple[str, str, str, dict[str, Any]]]:
    """(method, path, principal, a valid body) for every HTTP body model."""
    start = datetime.now(UTC) + timedelta(minutes=10)
    return [
        ("POST", "/v1/emergencies", "dso", {"client_ids": ["c1"], "start": _iso(start), "duration_s": 300,
                                            "power_limit_kw": 1.0}),
        ("POST", "/v1/load-shifts", "dso", {"client_ids": ["c1"], "window_start": _iso(start),
                                            "window_end": _iso(start + HOUR), "reason": "peak"}),
        ("POST", "/v1/load-reductions", "dso", {"feeder_id": "f1", "reduction_kw": 2.0, "start": _iso(start),
                                                "duration_s": 300, "respond_within_s": 5}),
        ("POST", "/v1/billing-data", "dso", {"client_ids": ["c1"], "period_start": "2024-01-01T00:00:00+00:00",
                                             "period_end": "2024-02-01T00:00:00+00:00"}),
        ("POST", "/v1/tariffs", "dso", {"tariff_id": "t1", "valid_from": _iso(start), "valid_to": _iso(start + HOUR),
                                        "periods": [{"start": _iso(start), "end": _iso(start + HOUR),
                                                     "price_eur_per_kwh": 0.2}]}),
        ("POST", "/v1/meter-readings", "dso", {"readings": [{"client_id": "c1", "start": "2024-01-01T00:00:00Z",
                                                             "resolution_s": 900, "values_kwh": [0.1, 0.2]}]}),
        ("PUT", "/v1/clients/c9", "dso", {"retailer_id": "r1", "contracted_power_kw": 6.9, "feeder_id": "f1",
                                          "valid_from": "2021-01-01T00:00:00+00:00"}),
        ("PUT", "/v1/retailers/r3", "admin", {"name": "R3"}),
    ]


def body_strategy(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Hostile bodies: raw bytes, arbitrary JSON, and mutations of a valid body."""
    return st.one_of(st.binary(max_size=300), JSON_VALUES.map(lambda v: json.dumps(v).encode()), mutated(valid))


def check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        body = r.json()
        assert isinstance(body.get("message"), str) and body["message"], r.text[:300]


def run_body_fuzz(http: httpx.Client, method: str, path: str, auth: dict[str, str],
                  bodies: st.SearchStrategy[bytes], n: int) -> int:
    """Hypothesis over the bodies of one endpoint; returns how many requests it sent."""
    sent = 0

    @settings(QUICK, max_examples=n)
    @given(bodies)
    def check(body: bytes) -> None:
        nonlocal sent
        sent += 1
        check_answer(http.request(method, path, content=body, headers={**auth, "Content-Type": "application/json"}))

    check()
    return sent


def fuzz_http(url: str, headers: dict[str, dict[str, str]], n: int) -> int:
    """Run hypothesis over every HTTP body model against the hub at ``url`` (blocking: call it in a thread)."""
    sent = 0
    with httpx.Client(base_url=url, timeout=20) as http:
        for method, path, who, valid in http_cases():
            assert http.request(method, path, json=valid, headers=headers[who]).status_code < 300, path

            sent += run_body_fuzz(http, method, path, headers[who], body_strategy(valid), n)
    return sent


async def test_hostile_http_bodies_never_get_a_5xx(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    headers = {p: hub.auth(p) for p in ("dso", "admin")}
    for method, path, who, _ in http_cases():  # the worst cases, every time, not only when hypothesis draws them
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"\xff\xfe",
                     b'{"client_ids": ["c1"], "start": "' + b"9" * 500_000 + b'"}', b"NaN", b"1e999999"):
            check_answer(await hub.http.request(method, path, content=body,
                                                headers={**headers[who], "Content-Type": "application/json"}))
    sent = await asyncio.to_thread(fuzz_http, hub.url, headers, 25)
    assert sent >= 8 * 25
    assert (await hub.http.get("/readyz")).status_code == 200
    text = (await hub.http.get("/metrics")).text
    assert metric(text, "mhp_http_rejected_total", status="422") > 0
    assert "mhp_http_rejected_total{status=\"500\"}" not in text


# -- (c) a live fuzz run --------------------------------------------------------------------------------------

async def answer_requests(party: Party, rid: str, stop: asyncio.Event) -> None:
    """A well-behaved retailer: acknowledge each request and report every client executed."""
    seen: set[str] = set()
    while not stop.is_set():
        try:
            msg = await party.next("request", timeout=0.3)
        except TimeoutError:
            continue
        assert isinstance(msg, Request)
        await party.publish(topics.up("retailers", rid), Ack(ack_ids=[msg.msg_id]))
        if msg.request_id in seen:
            continue
        seen.add(msg.request_id)
        for cid in msg.client_ids:
            await party.publish(topics.up("retailers", rid), Outcome(
                request_id=msg.request_id, client_id=cid, state=ClientState.EXECUTED))


async def test_live_fuzz_run(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r1", "c3": "r1", "c4": "r2"})
    cases = http_cases()
    hostile_http = [(m, p, w, b) for m, p, w, valid in cases for b in collect(body_strategy(valid), 12)]
    valid_outcome = json.loads(encode(Outcome(request_id="x", client_id="c4", state=ClientState.EXECUTED)))
    valid_outcomes = json.loads(encode(Outcomes(request_id="x", reports=[
        OutcomeReport(client_id="c4", state=ClientState.EXECUTED), OutcomeReport(client_id="c5", state="refused")])))
    hostile_mqtt: list[bytes] = (collect(st.binary(max_size=200), 20)
                                 + [json.dumps(v).encode() for v in collect(JSON_VALUES, 20)]
                                 + collect(mutated(valid_outcome), 20) + collect(mutated(valid_outcomes), 20))
    # Packets over the broker's max_packet_size never reach the hub: Mosquitto drops the sender (broker_config).
    hostile_mqtt = [p for p in hostile_mqtt if len(p) < 200_000]
    statuses: list[tuple[str, int]] = []
    request_ids: list[str] = []
    stop = asyncio.Event()

    async def valid_stream() -> None:
        for _ in range(15):
            start = datetime.now(UTC) + timedelta(seconds=30)
            r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json={
                "client_ids": ["c1", "c2", "c3"], "start": start.isoformat(), "duration_s": 300,
                "power_limit_kw": 1.0})
            assert r.status_code == 202, r.text
            request_ids.append(r.json()["request_id"])
            await asyncio.sleep(0.05)

    async def hostile_stream(r2: Party) -> None:
        for i, (method, path, who, body) in enumerate(hostile_http):
            r = await hub.http.request(method, path, content=body,
                                       headers={**hub.auth(who), "Content-Type": "application/json"})
            statuses.append((path, r.status_code))
            check_answer(r)
            if i < len(hostile_mqtt):
                await r2.publish(topics.up("retailers", "r2"), hostile_mqtt[i])
        for payload in hostile_mqtt[len(hostile_http):]:
            await r2.publish(topics.up("retailers", "r2"), payload)
        # Well-formed but hostile: r2 reports for r1's clients.
        for rid in request_ids[:3]:
            await r2.publish(topics.up("retailers", "r2"),
                             Outcome(request_id=rid, client_id="c1", state=ClientState.REFUSED))
            await r2.publish(topics.up("retailers", "r2"), Outcomes(request_id=rid, reports=[
                OutcomeReport(client_id=c, state=ClientState.REFUSED) for c in ("c2", "c3")]))

    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1")),
                 Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (r1, r2):
        responder = asyncio.create_task(answer_requests(r1, "r1", stop), name="fuzz-responder")
        try:
            await asyncio.gather(valid_stream(), hostile_stream(r2))
            for rid in request_ids:
                req = await wait_state(hub, rid, "completed", timeout=15)
                assert req["state"] == "completed", req
                assert {c["state"] for c in req["clients"].values()} == {"executed"}
        finally:
            stop.set()
            await responder
    assert len(request_ids) == 15
    assert not [s for s in statuses if s[1] >= 500]
    text = (await hub.http.get("/metrics")).text
    refused = sum(metric(text, "mhp_mqtt_rejected_total", reason=r)
                  for r in ("invalid", "forbidden", "unknown_client", "unexpected", "rate_limited"))
    invalid_sent = sum(1 for p in hostile_mqtt if _invalid(p))
    assert metric(text, "mhp_mqtt_rejected_total", reason="invalid") >= invalid_sent
    assert metric(text, "mhp_mqtt_rejected_total", reason="forbidden") >= 3
    assert refused >= invalid_sent + 3
    assert "mhp_http_rejected_total{status=\"500\"}" not in text


def _invalid(payload: bytes) -> bool:
    try:
        decode(payload)
    except WireError:
        return True
    return False

