"""The OpenADR 3.1 facade driven by a client nobody here wrote (``toadr3`` from PyPI) against a real hub: a VEN
gets a token by OAuth2 client credentials, registers, reads its programs, subscribes a webhook, receives an
emergency by webhook and by MQTT (its own topic, scoped by the broker's ACL), posts a report that becomes the
request's outcome and a measurement, and never sees another VEN's clients."""

from __future__ import annotations

import asyncio
import json
import queue
from datetime import UTC, datetime, timedelta

import pytest
import toadr3
from toadr3.models import (
    Event,
    Interval,
    IntervalPeriod,
    ObjectOperation,
    ObjectType,
    OperationType,
    Report,
    ReportData,
    Subscription,
    ValuesMap,
)

from cloud_hub.openadr3 import BASE_PATH_30
from tests.broker_config.paho_client import TestClient
from tests.cloud_hub.openadr3_parts import Receiver, emergency, join, oadr_hub, receiver, token, ven, wait_for
from tests.hub_fixtures import HubHandle

__all__ = ["oadr_hub", "receiver"]


def _resources(event: Event | dict) -> list[str]:
    targets = event.targets if isinstance(event, Event) else [toadr3.models.ValuesMap.model_validate(t)
                                                               for t in event["targets"]]
    return sorted(str(v) for t in targets or [] if t.type == "RESOURCE_NAME" for v in t.values)


async def test_a_ven_joins_gets_an_emergency_by_webhook_and_mqtt_and_reports(oadr_hub: HubHandle,
                                                                            receiver: Receiver) -> None:
    hub = oadr_hub
    async with ven(hub, "r1") as v1, ven(hub, "r2") as v2:
        # Joining: a token (client credentials), the VEN registered under its retailer id, the programs read.
        h1 = await token(hub, "r1")
        r = await hub.http.post(f"{BASE_PATH_30}/vens", headers=h1, json={"venName": "r1"})
        assert r.status_code == 201, r.text
        assert r.json()["venName"] == "r1" and r.json()["objectType"] == "VEN"
        await join(hub, "r2")
        programs = {p.id: p for p in await v1.get_programs()}
        assert {"mhp-tariff", "mhp-emergency", "mhp-load-shift", "mhp-load-reduction"} <= set(programs)
        assert programs["mhp-tariff"].program_type == "PRICE"
        resources = (await hub.http.get(f"{BASE_PATH_30}/vens/r1/resources", headers=h1)).json()
        assert [x["resourceName"] for x in resources] == ["c1"], "its clients only"

        # A webhook subscription (toadr3 names operations by HTTP verb, as OpenADR 3.0 did).
        sub = await v1.post_subscription(Subscription(
            client_name="ven-r1", program_id="mhp-emergency", object_operations=[ObjectOperation(
                objects=[ObjectType.EVENT], operations=[OperationType.POST, OperationType.PUT, OperationType.DELETE],
                callback_url=receiver.url, bearer_token="the-ven-checks-this")]))
        assert sub.id and [s.id for s in await v1.get_subscriptions()] == [sub.id]

        # The MQTT notifier: the hub broker, the VEN's own topics, its hub-broker identity.
        notifiers = (await hub.http.get(f"{BASE_PATH_30}/notifiers", headers=h1)).json()
        assert notifiers["WEBHOOK"] is True and notifiers["MQTT"]["URIS"] == [
            f"mqtt://{hub.broker.host}:{hub.broker.port}"]
        topics_r1 = (await hub.http.get(f"{BASE_PATH_30}/notifiers/mqtt/topics/vens/r1/events", headers=h1)).json()
        mqtt_r1 = TestClient(hub.broker.host, hub.broker.port, "r1", hub.broker.identities["r1"].password)
        mqtt_r2 = TestClient(hub.broker.host, hub.broker.port, "r2", hub.broker.identities["r2"].password)
        try:
            assert not mqtt_r1.connect().is_failure and not mqtt_r2.connect().is_failure
            assert not mqtt_r1.subscribe(topics_r1["topics"]["ALL"]).is_failure
            # Mosquitto grants the subscription but its ACL delivers nothing of r1's subtree to r2 (checked below).
            mqtt_r2.subscribe(topics_r1["topics"]["ALL"])

            request_id, start = await emergency(hub.http, hub.auth("dso"), ["c1", "c2"])

            # By webhook: the event as r1 sees it (c1 only), the bearer token it gave, parsed by toadr3's model.
            note = (await receiver.events(1))[0]
            headers = receiver.delivered[0][0]
            assert headers["authorization"] == "Bearer the-ven-checks-this"
            assert note["objectType"] == "EVENT" and note["operation"] == "CREATE"
            hooked = Event.model_validate(note["object"])
            assert hooked.id == request_id and hooked.program_id == "mhp-emergency"
            assert _resources(hooked) == ["c1"] and '"c2"' not in json.dumps(note)  # as a JSON string (ids are hex)
            assert hooked.intervals[0].payloads[0].type == "IMPORT_CAPACITY_LIMIT"
            assert hooked.intervals[0].payloads[0].values == [2.5]
            assert hooked.interval_period is not None and hooked.interval_period.duration == timedelta(seconds=900)

            # By MQTT, the same; r2's client got nothing on r1's topic.
            got = await asyncio.to_thread(mqtt_r1.next_message, 10)
            assert got.topic == topics_r1["topics"]["CREATE"]
            pushed = json.loads(got.payload)
            assert pushed["object"]["id"] == request_id and _resources(pushed["object"]) == ["c1"]
            with pytest.raises(queue.Empty):  # r2's login receives nothing of r1's subtree
                mqtt_r2.next_message(0.3)
        finally:
            mqtt_r1.close()
            mqtt_r2.close()

        # Polling: each VEN lists the event with its own clients only.
        events_1 = [e for e in await v1.get_events() if e.id == request_id]
        events_2 = [e for e in await v2.get_events(program_id="mhp-emergency")]
        assert [_resources(e) for e in events_1] == [["c1"]]
        assert [(e.id, _resources(e)) for e in events_2] == [(request_id, ["c2"])]

        # A report: c1 executed and its measured demand; the hub's request and measurements show them.
        at = datetime.now(UTC).replace(microsecond=0)
        report = Report(program_id="mhp-emergency", event_id=request_id, client_name="ven-r1", resources=[
            ReportData(resource_name="c1", interval_period=IntervalPeriod(start=at, duration="PT1M"),
                       intervals=[Interval(id=0, payloads=[ValuesMap(type="X_MHP_OUTCOME", values=["executed"]),
                                                           ValuesMap(type="DEMAND", values=[2.25])])])])
        stored = await v1.post_report(report)
        assert stored.id and stored.event_id == request_id
        assert [x.id for x in await v1.get_reports(event_id=request_id)] == [stored.id]
        assert await v2.get_reports() == []

        async def executed() -> bool:
            r = await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))
            return bool(r.json()["clients"]["c1"]["state"] == "executed")

        await wait_for(executed)
        frm, to = (at - timedelta(minutes=1)).isoformat(), (at + timedelta(minutes=1)).isoformat()
        series = (await hub.http.get("/v1/measurements", headers=hub.auth("dso"), params={
            "client_id": "c1", "from": frm, "to": to})).json()["series"]
        assert [(s["active_power_kw"], s["retailer_id"]) for s in series] == [(2.25, "r1")]

        # The DSO cancels: the VEN is told DELETE and no longer lists the event.
        r = await hub.http.post(f"/v1/requests/{request_id}/cancel", headers=hub.auth("dso"))
        assert r.status_code in (200, 202), r.text
        notes = await receiver.events(2)
        assert notes[1]["operation"] == "DELETE" and notes[1]["object"]["id"] == request_id
        assert [e.id for e in await v1.get_events(program_id="mhp-emergency")] == []
        assert start > datetime.now(UTC), "all of it happened before the emergency began"


async def test_the_dso_creates_an_event_that_reaches_bridges_and_vens_alike(oadr_hub: HubHandle) -> None:
    """One request, two doors: an event POSTed by the DSO is the same hub request a bridge receives over MQTT."""
    hub = oadr_hub
    await join(hub, "r2")
    start = datetime.now(UTC) + timedelta(minutes=5)
    r = await hub.http.post(f"{BASE_PATH_30}/events", headers=hub.auth("dso"), json={
        "programID": "mhp-emergency", "targets": [{"type": "RESOURCE_NAME", "values": ["c1", "c2"]}],
        "intervalPeriod": {"start": start.isoformat(), "duration": "PT15M"},
        "intervals": [{"id": 0, "payloads": [{"type": "IMPORT_CAPACITY_LIMIT", "values": [3.0]}]}]})
    assert r.status_code == 201, r.text
    event = r.json()
    assert _resources(event) == ["c1", "c2"]
    # The same Idempotency-Key twice: one request.
    body = {k: event[k] for k in ("programID", "targets", "intervalPeriod", "intervals")}
    keyed = [await hub.http.post(f"{BASE_PATH_30}/events", headers={**hub.auth("dso"), "Idempotency-Key": "ev-1"},
                                 json=body) for _ in range(2)]
    assert [k.status_code for k in keyed] == [201, 201] and keyed[0].json()["id"] == keyed[1].json()["id"]
    assert keyed[0].json()["id"] != event["id"]
    req = (await hub.http.get(f"/v1/requests/{event['id']}", headers=hub.auth("dso"))).json()
    assert req["type"] == "emergency" and req["request"]["power_limit_kw"] == 3.0
    assert req["request"]["duration_s"] == 900 and set(req["clients"]) == {"c1", "c2"}
    async with ven(hub, "r2") as v2:
        async def listed() -> list[Event]:
            return [e for e in await v2.get_events() if e.id == event["id"]]

        got = await wait_for(listed)
        assert _resources(got[0]) == ["c2"]
    # A VEN may not create events.
    h1 = await token(hub, "r1")
    r = await hub.http.post(f"{BASE_PATH_30}/events", headers=h1, json={**{k: event[k] for k in (
        "programID", "targets", "intervalPeriod", "intervals")}})
    assert r.status_code == 403, r.text


async def test_client_credentials_refuse_a_wrong_secret_and_name_the_scopes(oadr_hub: HubHandle) -> None:
    hub = oadr_hub
    ok = await hub.http.post(f"{BASE_PATH_30}/auth/token", data={
        "grant_type": "client_credentials", "client_id": "r1", "client_secret": hub.tokens["r1"]})
    assert ok.status_code == 200 and ok.json()["token_type"] == "Bearer"
    assert set(ok.json()["scope"].split()) >= {"read_targets", "write_reports", "write_subscriptions"}
    for data in ({"grant_type": "client_credentials", "client_id": "r2", "client_secret": hub.tokens["r1"]},
                 {"grant_type": "client_credentials", "client_id": "r1", "client_secret": "not-a-token"}):
        r = await hub.http.post(f"{BASE_PATH_30}/auth/token", data=data)
        assert r.status_code == 401 and r.json()["error"] == "invalid_client", r.text
    r = await hub.http.post(f"{BASE_PATH_30}/auth/token", data={"grant_type": "password", "client_id": "r1"})
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"
    r = await hub.http.get(f"{BASE_PATH_30}/events")
    assert r.status_code == 401
    server = (await hub.http.get(f"{BASE_PATH_30}/auth/server")).json()
    assert server["tokenURL"].endswith(f"{BASE_PATH_30}/auth/token")


async def test_a_revision_reaches_the_ven_as_an_update_with_the_new_values(oadr_hub: HubHandle,
                                                                          receiver: Receiver) -> None:
    hub = oadr_hub
    await join(hub, "r1")
    async with ven(hub, "r1") as v1:
        await v1.post_subscription(Subscription(
            client_name="ven-r1", object_operations=[ObjectOperation(
                objects=[ObjectType.EVENT], operations=[OperationType.POST, OperationType.PUT],
                callback_url=receiver.url)], program_id="mhp-emergency"))
        request_id, _ = await emergency(hub.http, hub.auth("dso"), ["c1"])
        await receiver.events(1)
        r = await hub.http.post(f"/v1/requests/{request_id}/revise", headers=hub.auth("dso"),
                                json={"power_limit_kw": 1.5})
        assert r.status_code == 202, r.text
        notes = await receiver.events(2)
        assert [n["operation"] for n in notes] == ["CREATE", "UPDATE"]
        updated = Event.model_validate(notes[1]["object"])
        assert updated.id == request_id and updated.intervals[0].payloads[0].values == [1.5]
        assert updated.modification_date_time is not None and updated.created_date_time is not None
        assert updated.modification_date_time > updated.created_date_time
        polled = [e for e in await v1.get_events() if e.id == request_id]
        assert polled[0].intervals[0].payloads[0].values == [1.5]


async def test_a_retailer_that_has_not_joined_as_a_ven_gets_no_events_and_costs_nothing(oadr_hub: HubHandle) -> None:
    """Only registered VENs are indexed and notified: a retailer running only its bridge pays nothing for the door
    (and a VEN sees events from its registration on)."""
    hub = oadr_hub
    await join(hub, "r1")
    request_id, _ = await emergency(hub.http, hub.auth("dso"), ["c1", "c2"])
    h1, h2 = await token(hub, "r1"), await token(hub, "r2")

    async def listed_for_r1() -> bool:
        return (await hub.http.get(f"{BASE_PATH_30}/events/{request_id}", headers=h1)).status_code == 200

    await wait_for(listed_for_r1)

    async def indexed() -> list[str]:  # the notifier's index rows, written in one batch after the request's
        return [r for r, _ in await hub.app.state.store.kv.scan("openadr3", prefix="evt|")]

    assert await wait_for(indexed) == [f"evt|r1|{request_id}"], "no index row for r2, which has not joined"
    r2_events = (await hub.http.get(f"{BASE_PATH_30}/events", headers=h2)).json()
    assert [e["id"] for e in r2_events if not e["id"].startswith("tariff-")] == []
    # Joining later: the events from then on.
    await join(hub, "r2")
    later, _ = await emergency(hub.http, hub.auth("dso"), ["c2"])

    async def listed_for_r2() -> list[str]:
        got = (await hub.http.get(f"{BASE_PATH_30}/events", headers=h2)).json()
        return [e["id"] for e in got if not e["id"].startswith("tariff-")]

    assert await wait_for(listed_for_r2) == [later]
