"""The ``billing_data`` scope served (docs/consent.md), through the real hub on both storage backends: a party
reads a client's meter readings as used for its bills only under an accepted permission with that scope, clipped to
the permission's data period and coarsened to its resolution; without one (no permission, another scope, revoked)
it is answered as for an unknown client and the refusal is logged. The DSO reads them whole; a retailer may not."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloud_hub.tokens import TokenBook
from mhp_wire import topics
from mhp_wire.messages import ConsentDecision
from tests.cloud_hub.test_consent_end_to_end import answers, iso
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties

H = 3600.0


async def test_billing_data_only_under_a_permission_with_that_scope(hub_any: HubHandle, tmp_path: Path) -> None:
    hub = hub_any
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    p1 = {"Authorization": f"Bearer {TokenBook(tmp_path / 'tokens.json').issue('party:p1')}"}
    assert (await hub.http.put("/v1/parties/p1", json={"name": "Energy Co"},
                               headers=hub.auth("admin"))).status_code == 201
    now = time.time()
    start = math.floor(now / 900) * 900 - 48 * H
    r = await hub.http.post("/v1/meter-readings", headers=hub.auth("dso"), json={"readings": [
        {"client_id": "c1", "start": iso(start), "resolution_s": 900, "values_kwh": [0.25] * 192}]})
    assert r.status_code == 200, r.text
    window = {"from": iso(start), "to": iso(start + 48 * H)}

    r = await hub.http.get("/v1/clients/c1/billing-data", params=window, headers=p1)
    assert r.status_code == 404, "no permission: answered as an unknown client"
    unknown = await hub.http.get("/v1/clients/nobody/billing-data", params=window, headers=p1)
    assert (unknown.status_code, unknown.json()["message"].replace("nobody", "c1")) == (404, r.json()["message"])

    ask: dict[str, Any] = {"client_id": "c1", "purpose": "a tariff comparison", "resolution_s": 3600,
                           "data_from": iso(start + 24 * H), "data_to": iso(start + 30.5 * H),
                           "valid_until": iso(now + 10 * 24 * H)}
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):

        async def decide(pid: str, what: str) -> None:
            d = ConsentDecision(client_id="c1", permission_id=pid, decision=what,  # type: ignore[arg-type]
                                decided_at=datetime.now(UTC))
            await r1.publish(topics.up("retailers", "r1"), d)
            assert (await answers(r1, d.msg_id))[0] == "ack"

        r = await hub.http.post("/v1/permissions", json={**ask, "scopes": ["consumption_profile"]}, headers=p1)
        assert r.status_code == 201, r.text
        await decide(r.json()["permission_id"], "accept")
        r = await hub.http.get("/v1/clients/c1/billing-data", params=window, headers=p1)
        assert r.status_code == 404, "a permission for the consumption profile does not cover billing data"

        r = await hub.http.post("/v1/permissions", json={**ask, "scopes": ["billing_data"]}, headers=p1)
        pid = r.json()["permission_id"]
        await decide(pid, "accept")
        r = await hub.http.get("/v1/clients/c1/billing-data", params=window, headers=p1)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["from"], body["to"], body["resolution_s"], body["permission_id"]) == (
            iso(start + 24 * H), iso(start + 30.5 * H), 3600, pid), "clipped to the permitted period"
        assert body["readings"] == [{"start": iso(start + 24 * H), "resolution_s": 3600, "values_kwh": [1.0] * 6,
                                     "quality": "measured", "corrected": False}], "quarter-hours summed to hours"
        assert [(w["start"], w["end"]) for w in body["withheld"]] == [(iso(start + 30 * H), iso(start + 30.5 * H))]
        assert "3600" in body["withheld"][0]["reason"], "half an hour is not served as an hour"
        r = await hub.http.get("/v1/clients/c2/billing-data", params=window, headers=p1)
        assert r.status_code == 404, "the permission is the customer's of c1 only"

        await decide(pid, "revoke")
        r = await hub.http.get("/v1/clients/c1/billing-data", params=window, headers=p1)
        assert r.status_code == 404, "revoked: refused"

    r = await hub.http.get("/v1/clients/c1/billing-data", params=window, headers=hub.auth("r1"))
    assert r.status_code == 403, "a retailer gets its clients' readings through billing requests, not this read"
    r = await hub.http.get("/v1/clients/c1/billing-data", params=window, headers=hub.auth("dso"))
    assert r.status_code == 200, r.text
    assert [(b["start"], b["resolution_s"], len(b["values_kwh"])) for b in r.json()["readings"]] == [
        (iso(start), 900, 192)], "the DSO reads the readings whole"
    r = await hub.http.get("/v1/clients/nobody/billing-data", params=window, headers=hub.auth("dso"))
    assert r.status_code == 404
    r = await hub.http.get("/v1/clients/c1/billing-data", params={"from": window["to"], "to": window["from"]},
                           headers=p1)
    assert r.status_code == 422, "an empty range is a clear error"

    log = (await hub.http.get("/v1/audit", headers=hub.auth("dso"), params={
        "client_id": "c1", "from": iso(now - H), "to": iso(time.time() + H)})).json()["entries"]
    reads = [(e["principal"], e["right"], e["allowed"]) for e in log if e["action"] == "read_billing_data"]
    assert reads == [("party:p1", "none", False), ("party:p1", "none", False),
                     ("party:p1", f"party:permission:{pid}", True), ("party:p1", "none", False),
                     ("retailer:r1", "none", False), ("dso", "dso:read_billing_data", True)]
