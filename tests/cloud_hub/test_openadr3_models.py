"""The OpenADR 3.1 response models pass every answer on unchanged: the same JSON bytes as the plain object the
route builds (FastAPI serializes a route's answer as below: validated by its response model, dumped to JSON
without the fields the answer did not set)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter

from cloud_hub.openadr3 import mapping
from cloud_hub.openadr3.models import (
    AuthServerInfo,
    ClientCredentialResponse,
    Event,
    Notifiers,
    NotifierTopics,
    Program,
    Report,
    Resource,
    Subscription,
    Ven,
)
from cloud_hub.openadr3.routes import _ven_object
from tests.hub_fixtures import HubHandle, hub

__all__ = ["hub"]

NOW = datetime(2026, 12, 6, 17, 0, 0, 123456, tzinfo=UTC)
CLIENTS = {"c1": {"retailers": {"r1": "pending"}}, "c2": {"retailers": {"r2": "pending"}}}


def _request(kind: str, body: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"type": kind, "issuer": "dso", "state": "dispatching", "created_at": NOW.timestamp(), "body": body,
            "revisions": [{"at": NOW.timestamp() + 1.5}], **meta}


def _events() -> list[dict[str, Any]]:
    start = (NOW + timedelta(minutes=10)).isoformat()
    end = (NOW + timedelta(minutes=70)).isoformat()
    metas = [_request("emergency", {"start": start, "duration_s": 600, "power_limit_kw": 2}),
             _request("emergency", {"start": start, "duration_s": 600.5, "power_limit_kw": 2.5}),
             _request("load_reduction", {"start": start, "duration_s": 60, "reduction_kw": 4.0},
                      phase="availability"),
             _request("load_reduction", {"start": start, "duration_s": 60, "reduction_kw": 4},
                      phase="dispatch", selection={"chosen": ["c1"]}),
             _request("load_shift", {"window_start": start, "window_end": end, "reason": "feeder maintenance"}),
             _request("load_shift", {"window_start": start, "window_end": end})]
    events = [e for meta in metas for ven in ("r1", "r2", None)
              if (e := mapping.event_for("req1", meta, CLIENTS, ven)) is not None]
    tariff = {"tariff_id": "t/2", "version": 3, "valid_from": NOW.isoformat(),
              "valid_to": (NOW + timedelta(hours=2)).isoformat(), "periods": [
                  {"start": NOW.isoformat(), "end": (NOW + timedelta(hours=1)).isoformat(), "price_eur_per_kwh": 0.1},
                  {"start": (NOW + timedelta(hours=1)).isoformat(), "end": (NOW + timedelta(hours=2)).isoformat(),
                   "price_eur_per_kwh": 1}]}
    return [*events, mapping.tariff_event(tariff), mapping.tariff_event({**tariff, "periods": []})]


def _report() -> dict[str, Any]:
    """A report as ``POST /reports`` stores it: the body as dumped (``reportName`` null when not given), extras
    and resources as the VEN sent them, then the VTN's fields."""
    body = {"programID": "mhp-emergency", "eventID": "req1", "clientName": "r1", "reportName": None,
            "resources": [{"resourceName": "c1", "intervals": [{"id": 0, "payloads": [
                {"type": "DEMAND", "values": [1]}, {"type": "X_MHP_OUTCOME", "values": ["executed"]}]}]},
                {"resourceName": 7, "intervalPeriod": {"start": NOW.isoformat()}, "x": 1.25}],
            "payloadDescriptors": [{"payloadType": "DEMAND", "units": "KW"}], "extra": {"n": 3}}
    return {**body, "id": "rep1", "objectType": "REPORT", "createdDateTime": NOW.isoformat(),
            "modificationDateTime": NOW.isoformat(), "clientName": "r1"}


CASES: list[tuple[type[BaseModel], dict[str, Any]]] = [
    *[(Program, p) for p in mapping.programs(NOW.timestamp())],
    *[(Event, e) for e in _events()],
    (Ven, _ven_object("r1", {"createdDateTime": NOW.isoformat()})),
    (Ven, _ven_object("r1", {"createdDateTime": NOW.isoformat(), "attributes": [
        {"type": "LOCATION", "values": [45.1, 7]}, {"type": "X", "values": []}]})),
    (Resource, {"id": "c1", "objectType": "RESOURCE", "resourceName": "c1", "venID": "r1",
                "attributes": [{"type": "MAX_POWER_CONSUMPTION", "values": [6]}]}),
    (Resource, {"id": "c2", "objectType": "RESOURCE", "resourceName": "c2", "venID": "r1",
                "attributes": [{"type": "MAX_POWER_CONSUMPTION", "values": [6.9]}]}),
    (Report, _report()),
    (Subscription, {"id": "s1", "objectType": "SUBSCRIPTION", "createdDateTime": NOW.isoformat(),
                    "modificationDateTime": NOW.isoformat(), "clientName": "r1", "objectOperations": [
                        {"callbackUrl": "https://ven.example/cb", "objects": ["EVENT"], "operations": ["POST"]},
                        {"callbackUrl": "https://ven.example/cb2", "objects": ["EVENT", "PROGRAM"],
                         "operations": ["PUT", "DELETE"], "bearerToken": "tok"}]}),
    (Subscription, {"id": "s2", "objectType": "SUBSCRIPTION", "createdDateTime": NOW.isoformat(),
                    "modificationDateTime": NOW.isoformat(), "clientName": "r1", "objectOperations": [
                        {"callbackUrl": "https://ven.example/cb", "objects": ["EVENT"], "operations": ["POST"]}],
                    "programID": "mhp-emergency", "targets": [{"type": "RESOURCE_NAME", "values": ["c1", 2]}]}),
    (Notifiers, {"WEBHOOK": True, "MQTT": {"URIS": ["mqtts://hub.example:8883"], "serialization": "JSON",
                                           "authentication": {"method": "X_MHP_BROKER_IDENTITY"}}}),
    (NotifierTopics, {"topics": {"CREATE": "a/create", "UPDATE": "a/update", "DELETE": "a/delete", "ALL": "a/+"}}),
    (AuthServerInfo, {"tokenURL": "http://hub.example/openadr3/3.1.0/auth/token"}),
    (ClientCredentialResponse, {"access_token": "secret", "token_type": "Bearer", "expires_in": 3600,
                                "scope": "read_all write_events"}),
]


@pytest.mark.parametrize(("model", "answer"), CASES, ids=[f"{m.__name__}-{i}" for i, (m, _) in enumerate(CASES)])
def test_each_answer_passes_through_its_model_byte_for_byte(model: type[BaseModel], answer: dict[str, Any]) -> None:
    before = TypeAdapter(dict[str, Any]).dump_json(answer)  # what the route answered without a response model
    adapter = TypeAdapter(model)
    assert adapter.dump_json(adapter.validate_python(answer), exclude_unset=True, by_alias=True) == before


def test_a_list_answer_passes_through_byte_for_byte() -> None:
    events = _events()
    adapter = TypeAdapter(list[Event])
    assert (adapter.dump_json(adapter.validate_python(events), exclude_unset=True)
            == TypeAdapter(list[dict[str, Any]]).dump_json(events))


async def test_the_running_hub_answers_the_same_bytes(hub: HubHandle) -> None:
    """Through the routes: the programs answered are the plain objects' JSON, byte for byte."""
    programs = mapping.programs(hub.app.state.openadr3_started)
    r = await hub.http.get(f"{mapping.BASE_PATH}/programs", headers=hub.auth("dso"))
    assert r.status_code == 200, r.text
    assert r.content == TypeAdapter(list[dict[str, Any]]).dump_json(programs)
    one = await hub.http.get(f"{mapping.BASE_PATH}/programs/{mapping.TARIFF_PROGRAM}", headers=hub.auth("dso"))
    assert one.content == TypeAdapter(dict[str, Any]).dump_json(programs[0])
