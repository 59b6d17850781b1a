"""The OpenADR 3 facade's pure core, by tables of cases: authz's READ_VEN, requests as events (neutral per VEN),
events as requests, reports as outcomes and measurements."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cloud_hub.authz import Action, Context, Principal, decide
from cloud_hub.openadr3 import mapping
from mhp_wire.messages import ClientState

DSO, ADMIN, R1, R2 = Principal("dso"), Principal("admin"), Principal("retailer", "r1"), Principal("retailer", "r2")


@pytest.mark.parametrize(("who", "owner", "allowed", "conceal"), [
    (DSO, "retailer:r1", True, False),
    (DSO, None, True, False),
    (R1, "retailer:r1", True, False),
    (R2, "retailer:r1", False, True),
    (R1, None, False, True),
    (ADMIN, "retailer:r1", False, False),
])
def test_read_ven_decisions(who: Principal, owner: str | None, allowed: bool, conceal: bool) -> None:
    verdict = decide(who, Action.READ_VEN, Context(issuer=owner))
    assert (verdict.allowed, verdict.conceal) == (allowed, conceal)


def _request(kind: str, body: dict[str, Any], **meta: Any) -> dict[str, Any]:
    now = datetime.now(UTC).timestamp()
    return {"type": kind, "issuer": "dso", "state": "dispatching", "created_at": now, "body": body, **meta}


CLIENTS = {"c1": {"retailers": {"r1": "pending"}}, "c2": {"retailers": {"r2": "pending"}},
           "c3": {"retailers": {"r1": "pending"}}}


def test_an_event_shows_a_ven_only_its_own_clients() -> None:
    start = datetime.now(UTC) + timedelta(minutes=10)
    meta = _request("emergency", {"start": start.isoformat(), "duration_s": 600, "power_limit_kw": 2.0})
    e1 = mapping.event_for("req1", meta, CLIENTS, "r1")
    e2 = mapping.event_for("req1", meta, CLIENTS, "r2")
    dso = mapping.event_for("req1", meta, CLIENTS, None)
    assert e1 is not None and e2 is not None and dso is not None
    assert e1["targets"][0] == {"type": "RESOURCE_NAME", "values": ["c1", "c3"]}
    assert e2["targets"][0] == {"type": "RESOURCE_NAME", "values": ["c2"]}
    assert dso["targets"] == [{"type": "RESOURCE_NAME", "values": ["c1", "c2", "c3"]}]
    assert mapping.event_for("req1", meta, CLIENTS, "r9") is None
    assert e1["intervalPeriod"] == {"start": start.isoformat(), "duration": "PT600S"}
    assert e1["intervals"][0]["payloads"][0] == {"type": "IMPORT_CAPACITY_LIMIT", "values": [2.0]}
    assert e1["priority"] == 0 and e1["programID"] == "mhp-emergency"
    assert mapping.event_for("req1", _request("billing", {}), CLIENTS, "r1") is None


@pytest.mark.parametrize(("kind", "body", "payload"), [
    ("load_reduction", {"reduction_kw": 4.0, "duration_s": 60, "respond_within_s": 5},
     {"type": "DISPATCH_SETPOINT_RELATIVE", "values": [-4.0]}),
    ("load_shift", {"reason": "feeder maintenance"}, {"type": "SIMPLE", "values": [1]}),
])
def test_each_program_carries_its_request(kind: str, body: dict[str, Any], payload: dict[str, Any]) -> None:
    start = datetime.now(UTC) + timedelta(minutes=10)
    if kind == "load_shift":
        body = {**body, "window_start": start.isoformat(), "window_end": (start + timedelta(hours=1)).isoformat()}
    else:
        body = {**body, "start": start.isoformat()}
    event = mapping.event_for("req", _request(kind, body, phase="availability"), CLIENTS, "r1")
    assert event is not None and event["intervals"][0]["payloads"][0] == payload
    if kind == "load_reduction":
        assert event["reportDescriptors"][0]["payloadType"] == mapping.AVAILABLE_PAYLOAD


def _event(**over: Any) -> dict[str, Any]:
    start = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    base = {"programID": "mhp-emergency", "targets": [{"type": "RESOURCE_NAME", "values": ["c1"]}],
            "intervalPeriod": {"start": start, "duration": "PT1H30M"},
            "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [3]}]}]}
    return {**base, **over}


def test_an_event_becomes_the_request_of_its_program() -> None:
    kind, body = mapping.request_body(_event())
    assert kind == "emergency" and body["client_ids"] == ["c1"]
    assert body["duration_s"] == 5400 and body["power_limit_kw"] == 3.0


@pytest.mark.parametrize(("over", "message"), [
    ({"programID": "mhp-tariff"}, "POST /v1/tariffs"),
    ({"programID": "nope"}, "programID must be one of"),
    ({"targets": [{"type": "GROUP", "values": ["g"]}]}, "not supported"),
    ({"targets": []}, "RESOURCE_NAME target"),
    ({"intervals": []}, "one interval"),
    ({"intervals": [{"id": 0, "payloads": []}, {"id": 1, "payloads": []}]}, "exactly one"),
    ({"intervalPeriod": None}, "intervalPeriod"),
    ({"intervals": [{"id": 0, "payloads": [{"type": "SIMPLE", "values": [1]}]}]}, "IMPORT_CAPACITY_LIMIT"),
])
def test_an_event_the_hub_cannot_take_says_why(over: dict[str, Any], message: str) -> None:
    with pytest.raises(mapping.MappingError, match=message):
        mapping.request_body(_event(**over))


@pytest.mark.parametrize(("text", "seconds"), [("PT900S", 900), ("PT1H30M", 5400), ("P1DT1S", 86401),
                                               ("P1W", 604800), ("PT0.5S", 0.5)])
def test_durations(text: str, seconds: float) -> None:
    assert mapping.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "P", "PT", "1 hour", "P1Y", "PT-5S"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(mapping.MappingError):
        mapping.parse_duration(text)


def test_a_report_says_outcomes_and_demand_client_by_client() -> None:
    now = datetime.now(UTC)
    at = (now - timedelta(minutes=1)).replace(microsecond=0)
    items = mapping.report_items({"resources": [
        {"resourceName": "c1", "intervalPeriod": {"start": at.isoformat()}, "intervals": [
            {"id": 0, "payloads": [{"type": "X_MHP_OUTCOME", "values": ["executed"]},
                                   {"type": "DEMAND", "values": [1.5]}]}]},
        {"resourceName": "c3", "intervals": [{"id": 0, "payloads": [
            {"type": "DOWN_REGULATION_AVAILABLE", "values": [2]}]}]}]}, now.timestamp())
    assert items == [
        mapping.ReportItem("outcome", "c1", at.timestamp(), state=ClientState.EXECUTED),
        mapping.ReportItem("demand", "c1", at.timestamp(), value=1.5),
        mapping.ReportItem("outcome", "c3", now.timestamp(), state=ClientState.AVAILABLE, value=2.0)]


@pytest.mark.parametrize(("payload", "message"), [
    ({"type": "X_MHP_OUTCOME", "values": ["pending"]}, "the hub's to set"),
    ({"type": "X_MHP_OUTCOME", "values": ["done"]}, "must be one of"),
    ({"type": "DEMAND", "values": ["lots"]}, "number of kW"),
    ({"type": "DEMAND", "values": [True]}, "number of kW"),
    ({"type": "DEMAND", "values": [1e9]}, "out of range"),
    ({"type": "DEMAND", "values": []}, "no value"),
    ({"type": "USAGE", "values": [1]}, "not supported"),
])
def test_a_report_the_hub_cannot_take_says_why(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(mapping.MappingError, match=message):
        mapping.report_items({"resources": [{"resourceName": "c1", "intervals": [{"id": 0, "payloads": [payload]}]}]},
                             datetime.now(UTC).timestamp())


def test_the_tariff_is_a_price_event() -> None:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    tariff = {"tariff_id": "t/2", "version": 3, "valid_from": start.isoformat(),
              "valid_to": (start + timedelta(hours=2)).isoformat(), "periods": [
                  {"start": start.isoformat(), "end": (start + timedelta(hours=1)).isoformat(),
                   "price_eur_per_kwh": 0.1},
                  {"start": (start + timedelta(hours=1)).isoformat(), "end": (start + timedelta(hours=2)).isoformat(),
                   "price_eur_per_kwh": 0.2}]}
    event = mapping.tariff_event(tariff)
    assert event["id"] == "tariff-t_2-v3" and event["programID"] == "mhp-tariff"
    assert [i["payloads"][0]["values"] for i in event["intervals"]] == [[0.1], [0.2]]
    assert event["intervals"][1]["intervalPeriod"]["duration"] == "PT3600S"
