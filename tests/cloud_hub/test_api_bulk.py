"""``PUT /v1/clients``: many clients registered in one call over real HTTP, authorized, validated, all or nothing."""

from __future__ import annotations

from typing import Any

from tests.hub_fixtures import IN_FORCE_SINCE, HubHandle


def item(cid: str, rid: str = "r1", **over: Any) -> dict[str, Any]:
    return {"client_id": cid, "retailer_id": rid, "contracted_power_kw": 6.9, "feeder_id": "f1",
            "valid_from": IN_FORCE_SINCE, **over}


async def test_bulk_registration_creates_updates_switches_and_is_audited(hub: HubHandle) -> None:
    await hub.setup_registry({})
    r = await hub.http.put("/v1/clients", headers=hub.auth("dso"),
                           json={"clients": [item(f"c{i}") for i in range(300)]})
    assert r.status_code == 200, r.text
    assert r.json() == {"created": 300, "updated": 0}
    c = (await hub.http.get("/v1/clients/c7", headers=hub.auth("dso"))).json()
    assert c["retailer_id"] == "r1" and c["feeder_id"] == "f1" and c["contracted_power_kw"] == 6.9
    # Again: c0 changes its power, c1 switches to r2 from a later date, c300 is new.
    r = await hub.http.put("/v1/clients", headers=hub.auth("dso"), json={"clients": [
        item("c0", contracted_power_kw=3.45), item("c1", "r2", valid_from="2024-01-01T00:00:00+00:00"),
        item("c300", feeder_id=None)]})
    assert r.json() == {"created": 1, "updated": 2}
    c1 = (await hub.http.get("/v1/clients/c1", headers=hub.auth("dso"))).json()
    assert [s["retailer_id"] for s in c1["suppliers"]] == ["r1", "r2"]
    assert (await hub.http.get("/v1/clients/c0", headers=hub.auth("dso"))).json()["contracted_power_kw"] == 3.45
    audit = (await hub.http.get("/v1/audit", headers=hub.auth("dso"), params={
        "client_id": "c5", "from": "2000-01-01T00:00:00+00:00", "to": "2100-01-01T00:00:00+00:00"})).json()
    assert any(e["action"] == "manage_client" and e["principal"] == "dso" for e in audit["entries"])


async def test_bulk_registration_refuses_whole_bodies_and_stores_nothing(hub: HubHandle) -> None:
    await hub.setup_registry({"old": "r1"})
    body = {"clients": [item("n1"), item("n2")]}
    assert (await hub.http.put("/v1/clients", json=body)).status_code == 401
    r = await hub.http.put("/v1/clients", headers=hub.auth("r1"), json=body)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = await hub.http.put("/v1/clients", headers=hub.auth("dso"), json={"clients": [item("n1"), item("n1")]})
    assert r.status_code == 422 and "more than once" in r.text and "n1" in r.text
    r = await hub.http.put("/v1/clients", headers=hub.auth("dso"), json={"clients": [item("bad id")]})
    assert r.status_code == 422
    r = await hub.http.put("/v1/clients", headers=hub.auth("dso"), json={"clients": []})
    assert r.status_code == 422
    r = await hub.http.put("/v1/clients", headers=hub.auth("dso"), json={"clients": [item("n1"), item("n2", "r9")]})
    assert r.status_code == 404 and "r9" in r.json()["message"]
    # A supplier switch without a later valid_from: 409, and n1 of the same body is not stored either.
    r = await hub.http.put("/v1/clients", headers=hub.auth("dso"), json={"clients": [
        item("n1"), item("old", "r2", valid_from="2019-01-01T00:00:00+00:00")]})
    assert r.status_code == 409 and "old" in r.json()["message"]
    for cid in ("n1", "n2"):
        assert (await hub.http.get(f"/v1/clients/{cid}", headers=hub.auth("dso"))).status_code == 404
    assert (await hub.http.get("/v1/clients/old", headers=hub.auth("dso"))).json()["retailer_id"] == "r1"
