"""The requests router's endpoints read the hub's use cases from the ``Request`` instead of resolving a
``Depends(get_service)`` per HTTP request (docs/decisions.md, "The requests router takes the service from the
Request"). What could break, checked here: the documented parameters of every operation (the bearer token and the
``Idempotency-Key`` header stay, no ``request`` parameter appears), and the order of the answers through a real
hub: the token is checked before any use case runs (401 stores nothing), a keyed POST repeated answers the same
request, and its GET reads it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cloud_hub.api import requests
from cloud_hub.app import create_app
from cloud_hub.settings import HubSettings
from tests.hub_fixtures import HubHandle

KEYED = {"post_emergency", "post_load_shift", "post_load_reduction", "post_billing", "post_tariff",
         "revise_request"}
WITH_ID = {"get_request", "cancel_request", "revise_request"}


def test_every_operation_of_the_requests_router_documents_the_same_parameters(tmp_path: Path) -> None:
    app = create_app(HubSettings(db_path=tmp_path / "hub.db", tokens_file=tmp_path / "tokens.json",
                                 expose_docs=True))
    spec = app.openapi()
    names = {r.endpoint.__name__: (r.path, sorted(r.methods)) for r in requests.router.routes}  # type: ignore[attr-defined]
    assert set(names) == {"post_emergency", "post_load_shift", "post_load_reduction", "post_billing",
                          "post_tariff", "get_request", "cancel_request", "revise_request"}
    for name, (path, methods) in names.items():
        operation = spec["paths"][path][methods[0].lower()]
        params = {(p["name"], p["in"]) for p in operation.get("parameters", [])}
        expected = {("authorization", "header")}
        if name in KEYED:
            expected.add(("Idempotency-Key", "header"))
        if name in WITH_ID:
            expected.add(("request_id", "path"))
        assert params == expected, name


async def test_the_token_is_checked_before_the_use_case_and_a_keyed_post_is_answered_once(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    start = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    body = {"client_ids": ["c1", "c2"], "start": start, "duration_s": 600, "power_limit_kw": 2.0}
    keyed = {**hub.auth("dso"), "Idempotency-Key": "k-1"}

    refused = await hub.http.post("/v1/emergencies", json=body, headers={"Idempotency-Key": "k-1"})
    assert refused.status_code == 401
    assert refused.json()["error"] == "unauthorized"
    wrong = await hub.http.post("/v1/emergencies", json=body,
                                headers={"Authorization": "Bearer nope", "Idempotency-Key": "k-1"})
    assert wrong.status_code == 401

    first = await hub.http.post("/v1/emergencies", json=body, headers=keyed)
    assert first.status_code == 202, first.text
    again = await hub.http.post("/v1/emergencies", json=body, headers=keyed)
    assert again.status_code == 202
    assert again.json()["request_id"] == first.json()["request_id"]  # the 401s claimed nothing, stored nothing
    other = await hub.http.post("/v1/emergencies", json={**body, "power_limit_kw": 3.0}, headers=keyed)
    assert other.status_code == 409

    rid = first.json()["request_id"]
    view = await hub.http.get(f"/v1/requests/{rid}", headers=hub.auth("dso"))
    assert view.status_code == 200
    assert view.json()["request_id"] == rid
    assert set(view.json()["clients"]) == {"c1", "c2"}
    assert (await hub.http.get(f"/v1/requests/{rid}")).status_code == 401
    assert (await hub.http.get(f"/v1/requests/{rid}", headers=hub.auth("r1"))).status_code in (403, 404)
    listed = await hub.http.get("/v1/requests", headers=hub.auth("dso"))
    assert [r["request_id"] for r in listed.json()["requests"]].count(rid) == 1
