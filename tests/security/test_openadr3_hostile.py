"""The hostile cases of the security suite at the OpenADR 3.1 door (cloud_hub/openadr3): another VEN's event ids,
subscriptions and objects of others, webhook targets on loopback or private addresses, oversized and malformed
bodies. A real hub (uvicorn, SQLite, Mosquitto from broker_config); every refusal leaves nothing stored and the
door keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cloud_hub.openadr3 import BASE_PATH
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.openadr3_parts import emergency, join, oadr_hub, receiver, token, wait_for
from tests.hub_fixtures import HubHandle, running_hub

__all__ = ["oadr_hub", "receiver"]


def _report(event_id: str, outcomes: dict[str, str]) -> dict[str, Any]:
    at = datetime.now(UTC).isoformat()
    return {"programID": "mhp-emergency", "eventID": event_id, "clientName": "ven", "resources": [
        {"resourceName": cid, "intervals": [{"id": 0, "intervalPeriod": {"start": at, "duration": "PT1M"},
                                             "payloads": [{"type": "X_MHP_OUTCOME", "values": [state]}]}]}
        for cid, state in outcomes.items()]}


async def _listed(hub: HubHandle, headers: dict[str, str], event_id: str) -> bool:
    r = await hub.http.get(f"{BASE_PATH}/events/{event_id}", headers=headers)
    return r.status_code == 200


async def test_another_vens_event_is_an_unknown_one(oadr_hub: HubHandle) -> None:
    hub = oadr_hub
    await join(hub, "r1", "r2")
    h1, h2 = await token(hub, "r1"), await token(hub, "r2")
    only_r1, _ = await emergency(hub.http, hub.auth("dso"), ["c1"])
    shared, _ = await emergency(hub.http, hub.auth("dso"), ["c1", "c2"])
    await wait_for(lambda: _listed(hub, h2, shared))
    # GET of r1's event by r2: exactly the answer of an id that does not exist.
    theirs = await hub.http.get(f"{BASE_PATH}/events/{only_r1}", headers=h2)
    unknown = await hub.http.get(f"{BASE_PATH}/events/{'0' * 32}", headers=h2)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"] == unknown.json()["error"]
    assert theirs.text.replace(only_r1, "X") == unknown.text.replace("0" * 32, "X")
    assert only_r1 not in [e["id"] for e in (await hub.http.get(f"{BASE_PATH}/events", headers=h2)).json()]
    # A report on r1's event by r2: unknown too, nothing applied.
    r = await hub.http.post(f"{BASE_PATH}/reports", headers=h2, json=_report(only_r1, {"c1": "executed"}))
    assert r.status_code == 404, r.text
    # A report on a shared event naming r1's client (beside its own): refused whole, neither applied.
    r = await hub.http.post(f"{BASE_PATH}/reports", headers=h2,
                            json=_report(shared, {"c2": "executed", "c1": "refused"}))
    assert r.status_code == 403 and "nothing of the report was stored" in r.json()["message"], r.text
    req = (await hub.http.get(f"/v1/requests/{shared}", headers=hub.auth("dso"))).json()
    assert req["clients"]["c1"]["state"] != "refused" and req["clients"]["c2"]["state"] != "executed"
    assert (await hub.http.get(f"{BASE_PATH}/reports", headers=h2)).json() == []
    # A measurement of another VEN's client (DEMAND): refused, not stored.
    report = _report(shared, {"c2": "executed"})
    report["resources"].append({"resourceName": "c1", "intervals": [{"id": 0, "payloads": [
        {"type": "DEMAND", "values": [9.0]}]}]})
    r = await hub.http.post(f"{BASE_PATH}/reports", headers=h2, json=report)
    assert r.status_code == 403, r.text
    now = datetime.now(UTC)
    series = (await hub.http.get("/v1/measurements", headers=hub.auth("dso"), params={
        "client_id": "c1", "from": (now - timedelta(hours=1)).isoformat(),
        "to": (now + timedelta(hours=1)).isoformat()})).json()["series"]
    assert series == []
    # The door keeps serving: r2's own report goes through.
    r = await hub.http.post(f"{BASE_PATH}/reports", headers=h2, json=_report(shared, {"c2": "executed"}))
    assert r.status_code == 201, r.text
    # The hub's own states are not a VEN's to report.
    r = await hub.http.post(f"{BASE_PATH}/reports", headers=h1, json=_report(shared, {"c1": "pending"}))
    assert r.status_code == 422, r.text


async def test_others_subscriptions_vens_and_topics_are_unknown(oadr_hub: HubHandle, receiver: Any) -> None:
    hub = oadr_hub
    h1, h2 = await token(hub, "r1"), await token(hub, "r2")
    assert (await hub.http.post(f"{BASE_PATH}/vens", headers=h1, json={"venName": "r1"})).status_code == 201
    sub = await hub.http.post(f"{BASE_PATH}/subscriptions", headers=h1, json={
        "clientName": "ven-r1", "objectOperations": [{"objects": ["EVENT"], "operations": ["POST"],
                                                      "callbackUrl": receiver.url}]})
    assert sub.status_code == 201, sub.text
    sid = sub.json()["id"]
    for path in (f"/subscriptions/{sid}", "/vens/r1", "/vens/r1/resources",
                 "/notifiers/mqtt/topics/vens/r1/events"):
        theirs = await hub.http.get(f"{BASE_PATH}{path}", headers=h2)
        assert theirs.status_code == 404, (path, theirs.text)
    assert (await hub.http.delete(f"{BASE_PATH}/subscriptions/{sid}", headers=h2)).status_code == 404
    assert (await hub.http.get(f"{BASE_PATH}/subscriptions", headers=h2)).json() == []
    assert [v["venName"] for v in (await hub.http.get(f"{BASE_PATH}/vens", headers=h2)).json()] == []
    # A VEN registers only itself (retailers are no secret: told why, not concealed).
    r = await hub.http.post(f"{BASE_PATH}/vens", headers=h2, json={"venName": "r1"})
    assert r.status_code == 403, r.text
    # r1's subscription still works: r2's attempts changed nothing.
    assert (await hub.http.get(f"{BASE_PATH}/subscriptions/{sid}", headers=h1)).status_code == 200


@pytest.fixture
async def strict_hub(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
                     ) -> AsyncIterator[HubHandle]:
    """A hub with the default webhook policy (no private targets) and a small body limit."""
    async for h in running_hub(request, tmp_path, mosquitto_factory, "sqlite", max_body_bytes=64 * 1024):
        await h.setup_registry({"c1": "r1", "c2": "r2"})
        yield h


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://[::1]/hook", "http://10.1.2.3/hook",
    "http://192.168.0.10/hook", "http://169.254.169.254/latest/meta-data", "http://[::ffff:127.0.0.1]/hook",
    "ftp://example.org/hook", "http://user:pw@example.org/hook",
])
async def test_webhook_targets_on_loopback_or_private_addresses_are_refused(strict_hub: HubHandle, url: str
                                                                            ) -> None:
    hub = strict_hub
    h1 = await token(hub, "r1")
    r = await hub.http.post(f"{BASE_PATH}/subscriptions", headers=h1, json={
        "clientName": "ven-r1", "objectOperations": [{"objects": ["EVENT"], "operations": ["POST"],
                                                      "callbackUrl": url}]})
    assert r.status_code == 422, r.text
    assert (await hub.http.get(f"{BASE_PATH}/subscriptions", headers=h1)).json() == []


async def test_oversized_and_malformed_bodies_are_refused_and_the_door_keeps_serving(strict_hub: HubHandle) -> None:
    hub = strict_hub
    h1 = await token(hub, "r1")
    event_id, _ = await emergency(hub.http, hub.auth("dso"), ["c1"])
    big = _report(event_id, {"c1": "executed"})
    big["reportName"] = "x" * 100
    big["padding"] = "y" * (80 * 1024)
    r = await hub.http.post(f"{BASE_PATH}/reports", headers=h1, json=big)
    assert r.status_code == 413 and r.json()["error"] == "too_large", r.text
    r = await hub.http.post(f"{BASE_PATH}/auth/token", content=b"grant_type=client_credentials&" + b"a" * 70_000,
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    for body in (b"{", b"[]", b'{"programID": 1}'):
        r = await hub.http.post(f"{BASE_PATH}/reports", headers={**h1, "Content-Type": "application/json"},
                                content=body)
        assert r.status_code == 422, (body, r.text)
    r = await hub.http.post(f"{BASE_PATH}/reports", headers=h1, json={**_report(event_id, {"c1": "executed"}),
                                                                      "resources": [{"resourceName": "c1"}]})
    assert r.status_code == 422 and "says nothing" in r.json()["message"], r.text
    r = await hub.http.post(f"{BASE_PATH}/events", headers=hub.auth("dso"), json={
        "programID": "mhp-emergency", "targets": ["c1"],  # OpenADR 3.1.0's targets: strings
        "intervals": [{"id": 0, "intervalPeriod": {"start": datetime.now(UTC).isoformat(), "duration": "1 hour"},
                       "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [3.0]}]}]})
    assert r.status_code == 422 and "ISO 8601" in r.json()["message"], r.text
    # Nothing of the refused bodies was applied; a good report still is.
    assert (await hub.http.get(f"{BASE_PATH}/reports", headers=h1)).json() == []
    r = await hub.http.post(f"{BASE_PATH}/reports", headers=h1, json=_report(event_id, {"c1": "executed"}))
    assert r.status_code == 201, r.text
