"""The DSO HTTP API over real HTTP (uvicorn on a free port): every 401/403/404/409/413/422 path, with its message."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.hub_fixtures import HubHandle


def soon(seconds: float = 60) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def emergency(**over: Any) -> dict[str, Any]:
    return {"client_ids": ["c1"], "start": soon(), "duration_s": 600, "power_limit_kw": 2.5, **over}


async def test_health_readiness_and_metrics_need_no_token(hub: HubHandle) -> None:
    assert (await hub.http.get("/healthz")).json() == {"status": "ok"}
    ready = await hub.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"storage": "ok", "mqtt": "ok"}
    metrics = await hub.http.get("/metrics")
    assert metrics.status_code == 200
    assert "mhp_requests_created_total" in metrics.text


@pytest.mark.parametrize("header", [None, "Basic abc", "Bearer nope", "Bearer"])
async def test_missing_or_bad_token_is_401(hub: HubHandle, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    r = await hub.http.post("/v1/emergencies", json=emergency(), headers=headers)
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized"
    assert "token" in r.json()["message"]
    assert r.headers["WWW-Authenticate"] == "Bearer"


async def test_only_admin_and_dso_register_retailers(hub: HubHandle) -> None:
    r = await hub.http.put("/v1/retailers/r1", json={"name": "One"}, headers=hub.auth("admin"))
    assert r.status_code == 201
    r = await hub.http.put("/v1/retailers/r1", json={"name": "One Energy"}, headers=hub.auth("dso"))
    assert r.status_code == 200
    r = await hub.http.put("/v1/retailers/r3", json={"name": "Three"}, headers=hub.auth("r1"))
    assert r.status_code == 403
    assert "only the DSO or an administrator" in r.json()["message"]
    r = await hub.http.put("/v1/retailers/bad%2Fid", json={"name": "x"}, headers=hub.auth("admin"))
    assert r.status_code in (404, 422)


async def test_supplier_switch_and_who_may_read_a_client(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    switch = {"retailer_id": "r2", "contracted_power_kw": 6.9, "valid_from": "2025-01-01T00:00:00+00:00"}
    r = await hub.http.put("/v1/clients/c1", json=switch, headers=hub.auth("dso"))
    assert r.status_code == 200
    body = r.json()
    assert body["retailer_id"] == "r2"
    assert [s["retailer_id"] for s in body["suppliers"]] == ["r1", "r2"]
    assert (await hub.http.get("/v1/clients/c1", headers=hub.auth("r2"))).status_code == 200
    r = await hub.http.get("/v1/clients/c1", headers=hub.auth("r1"))
    assert r.status_code == 404, "a former supplier is answered as for an unknown client (neutrality)"
    assert r.json() == {"error": "not_found", "message": "client 'c1' not found"}
    back = {**switch, "retailer_id": "r1", "valid_from": "2024-06-01T00:00:00+00:00"}
    r = await hub.http.put("/v1/clients/c1", json=back, headers=hub.auth("dso"))
    assert r.status_code == 409
    assert "later valid_from" in r.json()["message"]
    r = await hub.http.put("/v1/clients/c2", json={**switch, "retailer_id": "r9"}, headers=hub.auth("dso"))
    assert r.status_code == 404
    assert "r9" in r.json()["message"]
    r = await hub.http.get("/v1/clients/nobody", headers=hub.auth("dso"))
    assert r.status_code == 404
    r = await hub.http.put("/v1/clients/c3", json={**switch}, headers=hub.auth("r2"))
    assert r.status_code == 403


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (emergency(power_limit_kw=-1), "power_limit_kw"),
        (emergency(duration_s=0), "duration_s"),
        (emergency(client_ids=None), "client_ids or feeder_id"),
        (emergency(feeder_id="f1"), "not both"),
        (emergency(start="2026-11-27T12:00:00"), "timezone"),
        (emergency(start="tomorrow"), "start"),
        (emergency(client_ids=["has space"]), "client_ids"),
        (emergency(surprise=True), "surprise"),
        ({"client_ids": ["c1"]}, "start"),
    ],
)
async def test_invalid_emergency_bodies_are_422_with_the_reason(hub: HubHandle, body: dict[str, Any],
                                                                words: str) -> None:
    body = {k: v for k, v in body.items() if v is not None}
    r = await hub.http.post("/v1/emergencies", json=body, headers=hub.auth("dso"))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid"
    assert words in r.json()["message"]


async def test_malformed_json_is_422(hub: HubHandle) -> None:
    r = await hub.http.post("/v1/emergencies", content=b'{"client_ids": [', headers={
        **hub.auth("dso"), "Content-Type": "application/json"})
    assert r.status_code == 422
    assert "JSON" in r.json()["message"]


async def test_oversized_body_is_413(hub: HubHandle) -> None:
    # A route held to the ordinary 1 MiB (an emergency may now have 8 MiB, max_client_list_body_bytes: refused past
    # that in test_client_list_bodies.py and, over raw sockets, tests/security/test_http_bodies.py).
    r = await hub.http.post("/v1/tariffs", content=b"x" * (2 * 1024 * 1024), headers={
        **hub.auth("dso"), "Content-Type": "application/json"})
    assert r.status_code == 413
    assert "bytes" in r.json()["message"]


async def test_emergency_for_unknown_client_is_404_and_stores_nothing(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    r = await hub.http.post("/v1/emergencies", json=emergency(client_ids=["c1", "ghost"]), headers=hub.auth("dso"))
    assert r.status_code == 404
    assert "ghost" in r.json()["message"]
    metrics = (await hub.http.get("/metrics")).text
    assert 'mhp_requests_created_total{type="emergency"}' not in metrics


async def test_only_the_dso_triggers_emergencies(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    for who in ("r1", "admin"):
        r = await hub.http.post("/v1/emergencies", json=emergency(), headers=hub.auth(who))
        assert r.status_code == 403
        assert "only the DSO" in r.json()["message"]


async def test_idempotency_key_returns_the_first_answer_and_refuses_another_body(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    body = emergency(client_ids=["c1", "c2"])
    headers = {**hub.auth("dso"), "Idempotency-Key": "k-1"}
    first = await hub.http.post("/v1/emergencies", json=body, headers=headers)
    again = await hub.http.post("/v1/emergencies", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert first.json()["state"] == "accepted"
    other = await hub.http.post("/v1/emergencies", json={**body, "power_limit_kw": 1}, headers=headers)
    assert other.status_code == 409
    assert "Idempotency-Key" in other.json()["message"]


async def test_a_request_is_followed_only_by_its_issuer(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    posted = time.perf_counter()
    r = await hub.http.post("/v1/emergencies", json=emergency(), headers=hub.auth("dso"))
    round_trip_ms = (time.perf_counter() - posted) * 1000
    request_id = r.json()["request_id"]
    got = await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))
    assert got.status_code == 200
    req = got.json()
    assert req["type"] == "emergency"
    assert req["state"] in ("accepted", "dispatching")
    assert set(req["clients"]) == {"c1"}
    assert req["clients"]["c1"]["retailer_id"] == "r1"
    assert "hub_ms" in req["trace"]
    assert 0 < req["trace"]["storage_ms"] < round_trip_ms, "the creating write's own time, inside the POST"
    r = await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("r1"))
    assert r.status_code == 403
    assert (await hub.http.get("/v1/requests/nope", headers=hub.auth("dso"))).status_code == 404


async def test_feeder_targets_every_client_on_it(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    r = await hub.http.post("/v1/emergencies", json=emergency(client_ids=None, feeder_id="f1"),
                            headers=hub.auth("dso"))
    assert r.status_code == 202
    req = (await hub.http.get(f"/v1/requests/{r.json()['request_id']}", headers=hub.auth("dso"))).json()
    assert set(req["clients"]) == {"c1", "c2"}
    r = await hub.http.post("/v1/emergencies", json=emergency(client_ids=None, feeder_id="nowhere"),
                            headers=hub.auth("dso"))
    assert r.status_code == 404
