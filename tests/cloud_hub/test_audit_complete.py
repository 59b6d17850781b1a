"""The data access log is complete (issue 13, item 4): every read, action and delivery of a client's data, allowed or
refused, with the principal, the right it rests on and what it belongs to (docs/security.md, "What is logged").

Each case is driven over real HTTP against a running hub, and over MQTT through its real Mosquitto with a paho
test retailer; the log is then read as the DSO reads it, ``GET /v1/audit``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from mhp_wire import topics
from mhp_wire.messages import Ack, BillingData, ErrorReply, Measurement, Measurements
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties
from tests.waiting import eventually


async def audit_of(hub: HubHandle, client_id: str, since: datetime) -> list[dict[str, Any]]:
    until = datetime.now(UTC) + timedelta(minutes=1)
    r = await hub.http.get("/v1/audit", headers=hub.auth("dso"), params={
        "client_id": client_id, "from": since.isoformat(), "to": until.isoformat()})
    assert r.status_code == 200, r.text
    entries: list[dict[str, Any]] = r.json()["entries"]
    return entries


def lines(entries: list[dict[str, Any]]) -> set[tuple[str, str, bool, str]]:
    """``(principal, action, allowed, right)`` of each entry."""
    return {(e["principal"], e["action"], e["allowed"], e["right"]) for e in entries}


async def test_refused_triggers_uploads_and_reads_by_a_retailer_are_logged(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    since = datetime.now(UTC) - timedelta(seconds=1)
    soon = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    later = (datetime.now(UTC) + timedelta(minutes=65)).isoformat()
    refused_posts = {
        "/v1/emergencies": ("trigger_emergency", {"client_ids": ["c1", "c2", "ghost"], "start": soon,
                                                  "duration_s": 600, "power_limit_kw": 1.0}),
        "/v1/load-shifts": ("trigger_load_shift", {"feeder_id": "f1", "window_start": soon, "window_end": later}),
        "/v1/load-reductions": ("trigger_load_reduction", {"client_ids": ["c1", "c2"], "reduction_kw": 1.0,
                                                           "start": soon, "duration_s": 600,
                                                           "respond_within_s": 5}),
        "/v1/billing-data": ("request_billing", {"client_ids": ["c1", "c2"], "period_start": soon,
                                                 "period_end": later}),
        "/v1/meter-readings": ("upload_readings", {"readings": [
            {"client_id": "c2", "start": soon, "resolution_s": 3600, "values_kwh": [1.0]}]}),
    }
    for path, (_, body) in refused_posts.items():
        r = await hub.http.post(path, json=body, headers=hub.auth("r1"))
        assert r.status_code == 403, (path, r.text)
    r = await hub.http.get("/v1/measurements", headers=hub.auth("r1"), params={
        "client_id": "c2", "from": since.isoformat(), "to": soon})
    assert r.status_code == 403
    r = await hub.http.put("/v1/clients/c2", headers=hub.auth("r1"), json={
        "retailer_id": "r1", "contracted_power_kw": 6.9, "valid_from": soon})
    assert r.status_code == 403

    c2 = lines(await audit_of(hub, "c2", since))
    for path, (action, _) in refused_posts.items():
        assert ("retailer:r1", action, False, "none") in c2, f"a refused POST {path} for c2 is not in its log"
    assert ("retailer:r1", "read_measurements", False, "none") in c2
    assert ("retailer:r1", "manage_client", False, "none") in c2
    c1 = lines(await audit_of(hub, "c1", since))
    assert {a for _, a, allowed, _ in c1 if not allowed} == {
        "trigger_emergency", "trigger_load_shift", "trigger_load_reduction", "request_billing"}
    assert await audit_of(hub, "ghost", since) == [], "an id that names no client is no one's data"


async def test_measurements_accepted_and_refused_are_logged_once_per_client_and_message(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    since = datetime.now(UTC) - timedelta(seconds=1)
    now = datetime.now(UTC)
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        batch = Measurements(items=[Measurement(client_id="c1", at=now - timedelta(seconds=i), active_power_kw=2.0)
                                    for i in range(5)] + [Measurement(client_id="c2", at=now, active_power_kw=9.9)])
        await r1.publish(topics.up("retailers", "r1"), batch)
        err = await r1.next("error")
        assert isinstance(err, ErrorReply) and "c2" in err.message
        ack = await r1.next("ack")
        assert isinstance(ack, Ack) and ack.ack_ids == [batch.msg_id]
    c1 = [e for e in await audit_of(hub, "c1", since) if e["action"] == "send_measurement"]
    assert [(e["principal"], e["allowed"], e["right"], e["ref"]) for e in c1] == [
        ("retailer:r1", True, "retailer:supplier-at-time", batch.msg_id)], "one line for five measurements"
    c2 = [e for e in await audit_of(hub, "c2", since) if e["action"] == "send_measurement"]
    assert [(e["principal"], e["allowed"], e["ref"]) for e in c2] == [("retailer:r1", False, batch.msg_id)]


async def test_billing_delivery_names_the_retailer_that_received_each_clients_data(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    since = datetime.now(UTC) - timedelta(seconds=1)
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=4)
    r = await hub.http.post("/v1/meter-readings", headers=hub.auth("dso"), json={"readings": [
        {"client_id": cid, "start": start.isoformat(), "resolution_s": 3600, "values_kwh": [1.0, 1.0]}
        for cid in ("c1", "c2")]})
    assert r.status_code == 200, r.text
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1")),
                 Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (r1, r2):
        r = await hub.http.post("/v1/billing-data", headers=hub.auth("dso"), json={
            "client_ids": ["c1", "c2"], "period_start": start.isoformat(),
            "period_end": (start + timedelta(hours=2)).isoformat()})
        assert r.status_code == 202, r.text
        request_id = r.json()["request_id"]
        got1, got2 = await r1.next("billing_data"), await r2.next("billing_data")
        assert isinstance(got1, BillingData) and isinstance(got2, BillingData)
        assert [c.client_id for c in got1.clients] == ["c1"] and [c.client_id for c in got2.clients] == ["c2"]
    for cid, rid in (("c1", "r1"), ("c2", "r2")):
        # The delivery's line is written once the hub's publish returned, which can be after the retailer read the
        # message: wait for the line, then check it is the only one.
        async def logged(cid: str = cid) -> list[dict[str, Any]] | None:
            entries = await audit_of(hub, cid, since)
            return entries if any(e["action"] == "deliver_billing" for e in entries) else None

        entries = await eventually(logged, f"the deliver_billing line of {cid}")
        delivered = [(e["principal"], e["right"], e["ref"]) for e in entries if e["action"] == "deliver_billing"]
        assert delivered == [(f"retailer:{rid}", "retailer:supplier-of-period", request_id)], entries
        assert ("dso", "request_billing", True, "dso:request_billing") in lines(entries)


async def test_profile_and_client_reads_allowed_and_refused_are_logged(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    since = datetime.now(UTC) - timedelta(seconds=1)
    window = {"from": (since - timedelta(hours=2)).isoformat(), "to": since.isoformat(), "resolution_s": 3600}
    for principal, status in (("r1", 200), ("r2", 404), ("dso", 200)):
        r = await hub.http.get("/v1/clients/c1/consumption-profile", params=window, headers=hub.auth(principal))
        assert r.status_code == status, (principal, r.text)
        r = await hub.http.get("/v1/clients/c1", headers=hub.auth(principal))
        assert r.status_code == status, (principal, r.text)
    got = lines(await audit_of(hub, "c1", since))
    assert {("retailer:r1", "read_consumption", True, "retailer:supplier-of-period"),
            ("retailer:r2", "read_consumption", False, "none"),
            ("dso", "read_consumption", True, "dso:consumption"),
            ("retailer:r1", "read_client", True, "retailer:current-supplier"),
            ("retailer:r2", "read_client", False, "none"),
            ("dso", "read_client", True, "dso:registry")} <= got
