"""Every other endpoint of the DSO API over real HTTP: readings, profiles, billing, tariffs, load shifts and
reductions, cancel, measurements and the access log, with their 401/403/404/409/422 paths and messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.hub_fixtures import HubHandle

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SWITCH = datetime(2026, 1, 2, tzinfo=UTC)


def iso(dt: datetime) -> str:
    return dt.isoformat()


def soon(seconds: float = 60) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def registry_with_switch(hub: HubHandle) -> None:
    """c1: r1 from 2020, r2 from SWITCH; c2: r2."""
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    r = await hub.http.put("/v1/clients/c1", headers=hub.auth("dso"), json={
        "retailer_id": "r2", "contracted_power_kw": 6.9, "feeder_id": "f1", "valid_from": iso(SWITCH)})
    assert r.status_code == 200


async def upload(hub: HubHandle, client: str, start: datetime, values: list[float], **extra: Any) -> Any:
    return await hub.http.post("/v1/meter-readings", headers=hub.auth("dso"), json={"readings": [
        {"client_id": client, "start": iso(start), "resolution_s": 3600, "values_kwh": values, **extra}]})


async def test_readings_upload_and_correction(hub: HubHandle) -> None:
    await registry_with_switch(hub)
    r = await upload(hub, "c1", T0, [1.0] * 48)
    assert r.status_code == 200 and r.json() == {"stored": 1, "corrections": 0}
    r = await upload(hub, "c1", T0, [2.0] * 48, quality="estimated")
    assert r.json() == {"stored": 1, "corrections": 1}
    assert (await upload(hub, "ghost", T0, [1.0])).status_code == 404
    r = await upload(hub, "c1", T0, [-1.0])
    assert r.status_code == 422 and "values_kwh" in r.json()["message"]
    r = await upload(hub, "c1", T0, [1.0], quality="guessed")
    assert r.status_code == 422
    r = await hub.http.post("/v1/meter-readings", headers=hub.auth("r1"), json={"readings": [
        {"client_id": "c1", "start": iso(T0), "resolution_s": 3600, "values_kwh": [1]}]})
    assert r.status_code == 403


async def test_consumption_profile_only_for_the_supplier_of_that_period(hub: HubHandle) -> None:
    await registry_with_switch(hub)
    await upload(hub, "c1", T0, [0.5] * 48)
    day1 = {"from": iso(T0), "to": iso(SWITCH), "resolution_s": 21600}
    r = await hub.http.get("/v1/clients/c1/consumption-profile", params=day1, headers=hub.auth("r1"))
    assert r.status_code == 200, r.text
    series = r.json()["series"]
    assert [p["kwh"] for p in series] == [3.0, 3.0, 3.0, 3.0]
    assert all(p["complete"] and p["quality"] == "measured" for p in series)
    r = await hub.http.get("/v1/clients/c1/consumption-profile", params=day1, headers=hub.auth("r2"))
    assert r.status_code == 404, "r2 supplied none of the range: answered as for an unknown client (neutrality)"
    both = {"from": iso(T0), "to": iso(SWITCH + timedelta(days=1)), "resolution_s": 86400}
    r = await hub.http.get("/v1/clients/c1/consumption-profile", params=both, headers=hub.auth("r1"))
    assert r.status_code == 403, "a range across the switch is not r1's alone"
    r = await hub.http.get("/v1/clients/c1/consumption-profile", params=both, headers=hub.auth("dso"))
    assert [p["kwh"] for p in r.json()["series"]] == [12.0, 12.0]
    r = await hub.http.get("/v1/clients/c1/consumption-profile", headers=hub.auth("dso"),
                           params={"from": iso(SWITCH), "to": iso(T0)})
    assert r.status_code == 422 and "after" in r.json()["message"]
    r = await hub.http.get("/v1/clients/nobody/consumption-profile", params=day1, headers=hub.auth("dso"))
    assert r.status_code == 404
    r = await hub.http.get("/v1/clients/c1/consumption-profile", params={"from": "yesterday", "to": iso(T0)},
                           headers=hub.auth("dso"))
    assert r.status_code == 422


async def test_billing_request_paths(hub: HubHandle) -> None:
    await registry_with_switch(hub)
    body = {"client_ids": ["c1", "c2"], "period_start": iso(T0), "period_end": iso(T0 + timedelta(days=3))}
    r = await hub.http.post("/v1/billing-data", json=body, headers=hub.auth("dso"))
    assert r.status_code == 202
    req = (await hub.http.get(f"/v1/requests/{r.json()['request_id']}", headers=hub.auth("dso"))).json()
    assert req["type"] == "billing"
    assert req["clients"]["c1"]["retailers"].keys() == {"r1", "r2"}, "c1's period is split at the switch"
    assert req["clients"]["c2"]["retailers"].keys() == {"r2"}
    early = {**body, "period_start": "2010-01-01T00:00:00+00:00", "period_end": "2011-01-01T00:00:00+00:00"}
    r = await hub.http.post("/v1/billing-data", json=early, headers=hub.auth("dso"))
    assert r.status_code == 409 and "no retailer supplied" in r.json()["message"]
    r = await hub.http.post("/v1/billing-data", json={**body, "client_ids": ["zz"]}, headers=hub.auth("dso"))
    assert r.status_code == 404
    r = await hub.http.post("/v1/billing-data", json={**body, "period_end": iso(T0)}, headers=hub.auth("dso"))
    assert r.status_code == 422 and "period_end" in r.json()["message"]
    assert (await hub.http.post("/v1/billing-data", json=body, headers=hub.auth("r2"))).status_code == 403


async def test_tariff_publication_paths(hub: HubHandle) -> None:
    await hub.setup_registry({})
    body = {"tariff_id": "tou-2026", "valid_from": iso(T0), "valid_to": iso(T0 + timedelta(days=365)),
            "periods": [{"start": iso(T0), "end": iso(T0 + timedelta(hours=8)), "price_eur_per_kwh": 0.1}]}
    first = await hub.http.post("/v1/tariffs", json=body, headers=hub.auth("dso"))
    second = await hub.http.post("/v1/tariffs", json=body, headers=hub.auth("dso"))
    assert first.status_code == second.status_code == 202
    assert (first.json()["version"], second.json()["version"]) == (1, 2)
    req = (await hub.http.get(f"/v1/requests/{first.json()['request_id']}", headers=hub.auth("dso"))).json()
    assert req["type"] == "tariff" and set(req["retailers"]) == {"r1", "r2"}
    bad = {**body, "valid_to": iso(T0 - timedelta(days=1))}
    r = await hub.http.post("/v1/tariffs", json=bad, headers=hub.auth("dso"))
    assert r.status_code == 422 and "valid_to" in r.json()["message"]
    r = await hub.http.post("/v1/tariffs", json={**body, "periods": []}, headers=hub.auth("dso"))
    assert r.status_code == 422
    assert (await hub.http.post("/v1/tariffs", json=body, headers=hub.auth("r1"))).status_code == 403


async def test_load_shift_and_load_reduction_paths(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    shift = {"client_ids": ["c1"], "window_start": soon(60), "window_end": soon(3600), "reason": "feeder peak"}
    r = await hub.http.post("/v1/load-shifts", json=shift, headers=hub.auth("dso"))
    assert r.status_code == 202
    r = await hub.http.post("/v1/load-shifts", json={**shift, "window_end": soon(30)}, headers=hub.auth("dso"))
    assert r.status_code == 422 and "window_end" in r.json()["message"]
    red = {"feeder_id": "f1", "reduction_kw": 3.0, "start": soon(60), "duration_s": 900, "respond_within_s": 5}
    r = await hub.http.post("/v1/load-reductions", json=red, headers=hub.auth("dso"))
    assert r.status_code == 202
    req = (await hub.http.get(f"/v1/requests/{r.json()['request_id']}", headers=hub.auth("dso"))).json()
    assert req["type"] == "load_reduction" and set(req["clients"]) == {"c1", "c2"}
    for bad, word in (({**red, "respond_within_s": 0}, "respond_within_s"), ({**red, "reduction_kw": -2},
                                                                             "reduction_kw")):
        r = await hub.http.post("/v1/load-reductions", json=bad, headers=hub.auth("dso"))
        assert r.status_code == 422 and word in r.json()["message"]
    assert (await hub.http.post("/v1/load-reductions", json=red, headers=hub.auth("r1"))).status_code == 403
    assert (await hub.http.post("/v1/load-shifts", json=shift, headers=hub.auth("admin"))).status_code == 403


async def test_cancel_paths(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json={
        "client_ids": ["c1"], "start": soon(600), "duration_s": 60, "power_limit_kw": 1})
    rid = r.json()["request_id"]
    assert (await hub.http.post(f"/v1/requests/{rid}/cancel", headers=hub.auth("r1"))).status_code == 403
    r = await hub.http.post(f"/v1/requests/{rid}/cancel", headers=hub.auth("dso"))
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    req = (await hub.http.get(f"/v1/requests/{rid}", headers=hub.auth("dso"))).json()
    assert req["state"] == "cancelled" and req["clients"]["c1"]["state"] == "cancelled"
    assert "cancel" in req
    r = await hub.http.post(f"/v1/requests/{rid}/cancel", headers=hub.auth("dso"))
    assert r.status_code == 409 and "already ended" in r.json()["message"]
    assert (await hub.http.post("/v1/requests/nope/cancel", headers=hub.auth("dso"))).status_code == 404


async def test_measurements_and_audit_are_for_the_dso(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    window = {"client_id": "c1", "from": iso(T0), "to": soon(60)}
    r = await hub.http.get("/v1/measurements", params=window, headers=hub.auth("dso"))
    assert r.status_code == 200 and r.json()["series"] == []
    assert (await hub.http.get("/v1/measurements", params=window, headers=hub.auth("r1"))).status_code == 403
    assert (await hub.http.get("/v1/measurements", params={**window, "client_id": "zz"},
                               headers=hub.auth("dso"))).status_code == 404
    await hub.http.get("/v1/clients/c1", headers=hub.auth("r1"))
    await hub.http.get("/v1/clients/c1", headers=hub.auth("r2"))
    r = await hub.http.get("/v1/audit", params=window, headers=hub.auth("dso"))
    assert r.status_code == 200
    log = r.json()["entries"]
    actions = [(e["principal"], e["action"], e["allowed"]) for e in log]
    assert ("dso", "manage_client", True) in actions
    assert ("retailer:r1", "read_client", True) in actions
    assert ("retailer:r2", "read_client", False) in actions, "a refused read is logged too"
    assert ("dso", "read_measurements", True) in actions
    assert all(e["right"] for e in log)
    assert (await hub.http.get("/v1/audit", params=window, headers=hub.auth("r1"))).status_code == 403


@pytest.mark.parametrize("path", ["/v1/meter-readings", "/v1/billing-data", "/v1/tariffs", "/v1/load-shifts",
                                  "/v1/load-reductions", "/v1/requests/x/cancel"])
async def test_every_post_needs_a_token(hub: HubHandle, path: str) -> None:
    r = await hub.http.post(path, json={})
    assert r.status_code == 401
