"""Customer consent through the real hub (HTTP, MQTT on a real Mosquitto, both storage backends): a registered
party asks, the customer's current retailer relays the customer's decision over MQTT, the party reads only what the
permission covers, a supplier switch does not end it, only the current retailer speaks for the customer, a request
not decided in time lapses (the hub's clock moved on), and every step is in the client's access log."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloud_hub.tokens import TokenBook
from mhp_wire import topics
from mhp_wire.messages import ConsentDecision, ConsentQuery, ConsentView, ErrorReply, Measurement, Measurements
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties

H = 3600.0


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


async def answers(retailer: Party, msg_id: str) -> tuple[str, ConsentView | None]:
    """The hub's answer to one message (``ack`` or the error code) and the view that followed it, if any."""
    got: str | None = None
    while True:
        msg = await retailer.next(timeout=5)
        if msg.type == "ack" and msg_id in msg.ack_ids:  # type: ignore[union-attr]
            got = "ack"
        elif isinstance(msg, ErrorReply) and msg.ref_msg_id == msg_id:
            got = msg.code
            if msg.code == "forbidden":
                return got, None
        elif isinstance(msg, ConsentView) and got is not None:
            return got, msg


async def test_a_permission_from_request_to_revocation(hub_any: HubHandle, tmp_path: Path) -> None:
    hub = hub_any
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    book = TokenBook(tmp_path / "tokens.json")
    p1 = {"Authorization": f"Bearer {book.issue('party:p1')}"}
    p2 = {"Authorization": f"Bearer {book.issue('party:p2')}"}
    r = await hub.http.put("/v1/parties/p1", json={"name": "Energy Co"}, headers=hub.auth("r1"))
    assert r.status_code == 403
    r = await hub.http.put("/v1/parties/p1", json={"name": "Energy Co"}, headers=hub.auth("admin"))
    assert r.status_code == 201, r.text

    now = time.time()
    start = math.floor(now / 900) * 900 - 48 * H
    r = await hub.http.post("/v1/meter-readings", headers=hub.auth("dso"), json={"readings": [
        {"client_id": "c1", "start": iso(start), "resolution_s": 900, "values_kwh": [0.25] * 192}]})
    assert r.status_code == 200, r.text
    profile = {"from": iso(start), "to": iso(start + 48 * H), "resolution_s": 900}

    r = await hub.http.get("/v1/clients/c1/consumption-profile", params=profile, headers=p1)
    assert r.status_code == 404, "no permission yet: answered as an unknown client"
    unknown = await hub.http.get("/v1/clients/nobody/consumption-profile", params=profile, headers=p1)
    assert (unknown.status_code, unknown.json()["message"].replace("nobody", "c1")) == (404, r.json()["message"])

    ask = {"client_id": "c1", "purpose": "a heat-pump offer", "scopes": ["consumption_profile"],
           "resolution_s": 3600, "data_from": iso(start + 24 * H), "data_to": iso(start + 36 * H),
           "valid_until": iso(now + 10 * 24 * H)}
    r = await hub.http.post("/v1/permissions", json=ask, headers=p2)
    assert r.status_code == 403, "p2 has a token but is not registered"
    r = await hub.http.post("/v1/permissions", json={**ask, "valid_until": iso(now - H)}, headers=p1)
    assert r.status_code == 422 and "valid_until" in r.text
    r = await hub.http.post("/v1/permissions", json={**ask, "client_id": "nobody"}, headers=p1)
    assert r.status_code == 404

    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1")),
                 Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (r1, r2):
        r = await hub.http.post("/v1/permissions", json=ask, headers=p1)
        assert r.status_code == 201, r.text
        perm: dict[str, Any] = r.json()
        pid = perm["permission_id"]
        assert perm["state"] == "sent_to_pa"
        assert [h["event"] for h in perm["history"]] == ["validate", "send"]
        pushed = await r1.next("consent_view")
        assert isinstance(pushed, ConsentView)
        assert [(p.permission_id, p.party_name, p.state) for p in pushed.permissions] == [
            (pid, "Energy Co", "sent_to_pa")]
        assert (await hub.http.get(f"/v1/permissions/{pid}", headers=p2)).status_code == 404

        def decision(client: str, what: str) -> ConsentDecision:
            return ConsentDecision(client_id=client, permission_id=pid, decision=what,  # type: ignore[arg-type]
                                   decided_at=datetime.now(UTC))

        # another retailer does not speak for r1's customer, and is told no more than for an unknown client
        d = decision("c1", "accept")
        await r2.publish(topics.up("retailers", "r2"), d)
        assert await answers(r2, d.msg_id) == ("forbidden", None)
        q = ConsentQuery(client_id="c1")
        await r2.publish(topics.up("retailers", "r2"), q)
        assert await answers(r2, q.msg_id) == ("forbidden", None)

        d = decision("c1", "accept")
        await r1.publish(topics.up("retailers", "r1"), d)
        code, view = await answers(r1, d.msg_id)
        assert code == "ack" and view is not None and view.permissions[0].state == "accepted"

        r = await hub.http.get("/v1/clients/c1/consumption-profile", params=profile, headers=p1)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["from"], body["to"], body["resolution_s"]) == (
            iso(start + 24 * H), iso(start + 36 * H), 3600), "clipped to the period and the resolution permitted"
        assert [p["kwh"] for p in body["series"]] == [1.0] * 12
        assert body["permission_id"] == pid
        r = await hub.http.get("/v1/measurements", params={"client_id": "c1", "from": iso(start),
                                                           "to": iso(now)}, headers=p1)
        assert r.status_code == 404, "live measurements are not in the permitted scope"
        r = await hub.http.get("/v1/clients/c2/consumption-profile", params=profile, headers=p1)
        assert r.status_code == 404

        # the customer moves to r2: the permission they gave p1 stays; now only r2 speaks for them
        r = await hub.http.put("/v1/clients/c1", headers=hub.auth("dso"), json={
            "retailer_id": "r2", "contracted_power_kw": 6.9, "feeder_id": "f1", "valid_from": iso(time.time())})
        assert r.status_code == 200, r.text
        r = await hub.http.get("/v1/clients/c1/consumption-profile", params=profile, headers=p1)
        assert r.status_code == 200, "a supplier switch does not end the customer's permission"
        d = decision("c1", "revoke")
        await r1.publish(topics.up("retailers", "r1"), d)
        assert await answers(r1, d.msg_id) == ("forbidden", None)
        d = decision("c1", "revoke")
        await r2.publish(topics.up("retailers", "r2"), d)
        code, view = await answers(r2, d.msg_id)
        assert code == "ack" and view is not None and view.permissions[0].state == "revoked"
        # the new retailer's view names the former one only as "your supplier at that time"
        assert not any("r1" in a.principal for a in view.accesses)
        assert any(a.principal == "retailer (your supplier at that time)" for a in view.accesses)
        assert any(a.principal == "you (in your supplier's personal area)" and a.action == "permission_accept"
                   for a in view.accesses)
        assert any(a.principal.startswith("party:p1") and a.right == f"party:permission:{pid}"
                   for a in view.accesses)

        r = await hub.http.get("/v1/clients/c1/consumption-profile", params=profile, headers=p1)
        assert r.status_code == 404, "revoked: refused"

        # a request the customer does not decide within three working days lapses
        r = await hub.http.post("/v1/permissions", json=ask, headers=p1)
        late = r.json()["permission_id"]
        hub.app.state.consent.now = lambda: time.time() + 6 * 24 * H  # past 3 working days from any weekday
        d = ConsentDecision(client_id="c1", permission_id=late, decision="accept", decided_at=datetime.now(UTC))
        await r2.publish(topics.up("retailers", "r2"), d)
        code, view = await answers(r2, d.msg_id)
        assert code == "expired" and view is not None
        assert {p.permission_id: p.state for p in view.permissions} == {pid: "revoked", late: "timed_out"}
        r = await hub.http.get(f"/v1/permissions/{late}", headers=p1)
        assert r.json()["state"] == "timed_out" and r.json()["history"][-1]["by"] == "clock"

    log = (await hub.http.get("/v1/audit", headers=hub.auth("dso"), params={
        "client_id": "c1", "from": iso(now - H), "to": iso(now + 7 * 24 * H)})).json()["entries"]
    mine = [(e["principal"], e["action"], e["right"], e["allowed"]) for e in log
            if e["action"].startswith("permission_") or e["principal"] == "party:p1"]
    assert mine == [
        ("party:p1", "read_consumption", "none", False),
        ("hub", "permission_validate", "party:request-permission", True),
        ("hub", "permission_send", "party:request-permission", True),
        ("customer via retailer:r1", "permission_accept", "retailer:current-supplier", True),
        ("party:p1", "read_consumption", f"party:permission:{pid}", True),
        ("party:p1", "read_measurements", "none", False),
        ("party:p1", "read_consumption", f"party:permission:{pid}", True),
        ("customer via retailer:r2", "permission_revoke", "retailer:current-supplier", True),
        ("party:p1", "read_consumption", "none", False),
        ("hub", "permission_validate", "party:request-permission", True),
        ("hub", "permission_send", "party:request-permission", True),
        ("clock", "permission_time_out", "clock", True),
    ]


async def test_live_measurements_under_a_permission_until_the_party_ends_it(hub: HubHandle, tmp_path: Path) -> None:
    """A party with the live_measurements scope reads the measurements a retailer sent, only those of its data
    period, without the senders' names; once it terminates the permission, its reads are refused."""
    await hub.setup_registry({"c1": "r1"})
    p1 = {"Authorization": f"Bearer {TokenBook(tmp_path / 'tokens.json').issue('party:p1')}"}
    assert (await hub.http.put("/v1/parties/p1", json={"name": "Aggregator"},
                               headers=hub.auth("dso"))).status_code == 201
    now = time.time()
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        sent = Measurements(items=[Measurement(client_id="c1", at=datetime.fromtimestamp(now - m * 60, UTC),
                                               active_power_kw=float(m)) for m in range(1, 11)])
        await r1.publish(topics.up("retailers", "r1"), sent)
        while True:
            msg = await r1.next(timeout=5)
            if msg.type == "ack" and sent.msg_id in msg.ack_ids:  # type: ignore[union-attr]
                break
        r = await hub.http.post("/v1/permissions", headers=p1, json={
            "client_id": "c1", "purpose": "flexibility forecasts", "scopes": ["live_measurements"],
            "data_from": iso(now - 5.5 * 60), "data_to": iso(now + H), "valid_until": iso(now + 24 * H)})
        assert r.status_code == 201, r.text
        pid = r.json()["permission_id"]
        accept = ConsentDecision(client_id="c1", permission_id=pid, decision="accept", decided_at=datetime.now(UTC))
        await r1.publish(topics.up("retailers", "r1"), accept)
        assert (await answers(r1, accept.msg_id))[0] == "ack"

    window = {"client_id": "c1", "from": iso(now - H), "to": iso(now + 60)}
    r = await hub.http.get("/v1/measurements", params=window, headers=p1)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [s["active_power_kw"] for s in body["series"]] == [5.0, 4.0, 3.0, 2.0, 1.0], "only its data period"
    assert all(set(s) == {"at", "active_power_kw"} for s in body["series"]), "the senders are not named"
    r = await hub.http.get("/v1/clients/c1/consumption-profile", params={"from": iso(now - H), "to": iso(now)},
                           headers=p1)
    assert r.status_code == 404, "the consumption profile is not in its scope"
    r = await hub.http.get("/v1/audit", params=window, headers=p1)
    assert r.status_code == 403, "a party never reads the access log"

    r = await hub.http.post(f"/v1/permissions/{pid}/terminate", headers=hub.auth("dso"))
    assert r.status_code == 404, "only the party that asked ends it"
    r = await hub.http.post(f"/v1/permissions/{pid}/terminate", headers=p1)
    assert r.status_code == 200 and r.json()["state"] == "terminated"
    r = await hub.http.post(f"/v1/permissions/{pid}/terminate", headers=p1)
    assert r.status_code == 409 and "terminated cannot be terminated" in r.json()["message"]
    assert (await hub.http.get("/v1/measurements", params=window, headers=p1)).status_code == 404
