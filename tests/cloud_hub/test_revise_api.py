"""``POST /v1/requests/{id}/revise`` over real HTTP against a hub with its real broker (retailers played by MQTT
parties): who may revise, 404, 409 on ended requests, 422 with the field, Idempotency-Key, the revision history in
``GET``, the numbered revision on the wire, removed and added clients, and outcomes counted against the latest
revision."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from mhp_wire import topics
from mhp_wire.messages import Ack, Cancel, ClientState, Outcome, Request
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties


def soon(seconds: float = 60) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def emergency(**over: Any) -> dict[str, Any]:
    return {"client_ids": ["c1"], "start": soon(), "duration_s": 600, "power_limit_kw": 3.0, **over}


async def create(hub: HubHandle, path: str, body: dict[str, Any]) -> str:
    r = await hub.http.post(path, json=body, headers=hub.auth("dso"))
    assert r.status_code == 202, r.text
    request_id: str = r.json()["request_id"]
    return request_id


async def revise(hub: HubHandle, request_id: str, body: dict[str, Any], who: str = "dso",
                 **headers: str) -> Any:
    return await hub.http.post(f"/v1/requests/{request_id}/revise", json=body,
                               headers={**hub.auth(who), **headers})


async def get(hub: HubHandle, request_id: str) -> dict[str, Any]:
    r = await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_only_the_issuer_revises_and_an_unknown_request_is_404(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    request_id = await create(hub, "/v1/emergencies", emergency())
    for who in ("r1", "admin"):
        r = await revise(hub, request_id, {"power_limit_kw": 1.5}, who)
        assert r.status_code == 403, r.text
        assert r.json()["message"] == "only the issuer of a request may revise it"
    r = await revise(hub, "no-such-request", {"power_limit_kw": 1.5})
    assert r.status_code == 404
    assert r.json() == {"error": "not_found", "message": "request 'no-such-request' does not exist"}
    req = await get(hub, request_id)
    assert req["revision"] == 1
    assert req["request"]["power_limit_kw"] == 3.0, "a refused revision changes nothing"


async def test_bad_bodies_are_422_with_the_field(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    em = await create(hub, "/v1/emergencies", emergency())
    shift = await create(hub, "/v1/load-shifts", {"client_ids": ["c1"], "window_start": soon(600),
                                                  "window_end": soon(1200)})
    cases: list[tuple[str, dict[str, Any], str]] = [
        (em, {"power_limit_kw": -1}, "power_limit_kw"),  # the field's own bound
        (em, {"power_limit_kw": 1.0, "colour": "red"}, "colour"),  # unknown fields are refused
        (em, {}, ""),  # nothing to change
        (em, {"window_start": soon(10)}, "window_start"),  # a field an emergency does not have
        (shift, {"power_limit_kw": 1.0}, "power_limit_kw"),
        (shift, {"window_end": soon(300)}, "window_end"),  # the merged body: the window now ends before it starts
        (em, {"client_ids": ["c1"], "feeder_id": "f1"}, ""),  # merged: both targets given
    ]
    for request_id, body, field in cases:
        r = await revise(hub, request_id, body)
        assert r.status_code == 422, (body, r.text)
        answer = r.json()
        assert answer["error"] == "invalid"
        assert any(p["field"] == field for p in answer["problems"]), (body, answer)
        assert field in answer["message"]
    assert (await get(hub, em))["revision"] == 1
    assert (await get(hub, shift))["revision"] == 1


async def test_an_ended_request_is_409(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    cancelled = await create(hub, "/v1/emergencies", emergency())
    assert (await hub.http.post(f"/v1/requests/{cancelled}/cancel", headers=hub.auth("dso"))).status_code == 200
    r = await revise(hub, cancelled, {"power_limit_kw": 1.5})
    assert r.status_code == 409
    assert r.json()["message"] == f"request {cancelled} has ended (cancelled): it cannot be revised"

    short = await create(hub, "/v1/emergencies", emergency(start=soon(0.2), duration_s=1))
    end = datetime.fromisoformat((await get(hub, short))["deadline"])
    await asyncio.sleep((end - datetime.now(UTC)).total_seconds() + 0.05)  # its window passes
    r = await revise(hub, short, {"power_limit_kw": 1.5})
    assert r.status_code == 409
    assert "cannot be revised" in r.json()["message"]

    tariff = await create(hub, "/v1/tariffs", {
        "tariff_id": "tou", "valid_from": soon(0), "valid_to": soon(3600),
        "periods": [{"start": soon(0), "end": soon(3600), "price_eur_per_kwh": 0.1}]})
    r = await revise(hub, tariff, {"start": soon(10)})
    assert r.status_code == 409
    assert r.json()["message"] == "a tariff request cannot be revised"


async def test_revisions_are_numbered_delivered_and_shown_in_the_history(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r1", "c3": "r2"})
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1")),
                 Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (r1, r2):
        request_id = await create(hub, "/v1/emergencies", emergency(client_ids=["c1", "c2"]))
        first = await r1.next("request")
        assert isinstance(first, Request) and first.revision == 1
        await r1.publish(topics.up("retailers", "r1"), Ack(ack_ids=[first.msg_id]))
        for cid in ("c1", "c2"):
            await r1.publish(topics.up("retailers", "r1"), Outcome(
                request_id=request_id, client_id=cid, state=ClientState.EXECUTED, detail={"shed": ["heater"]}))
        for _ in range(100):
            if (await get(hub, request_id))["state"] == "completed":
                break
            await asyncio.sleep(0.05)
        assert (await get(hub, request_id))["state"] == "completed"

        # Revision 2: a lower limit, c1 removed, c3 (another retailer's client) added.
        r = await revise(hub, request_id, {"power_limit_kw": 1.5, "client_ids": ["c2", "c3"]})
        assert r.status_code == 202, r.text
        assert r.json() == {"request_id": request_id, "revision": 2, "state": "dispatching"}
        got: dict[str, Any] = {}
        while set(got) != {"request", "cancel"}:
            msg = await r1.next()
            if isinstance(msg, Request | Cancel):
                got[msg.type] = msg
        second, removal = got["request"], got["cancel"]
        assert isinstance(second, Request) and isinstance(removal, Cancel)
        assert second.revision == 2 and second.client_ids == ["c2"]
        assert second.params.kind == "emergency" and second.params.power_limit_kw == 1.5
        assert removal.client_ids == ["c1"] and removal.revision == 2
        to_r2 = await r2.next("request")
        assert isinstance(to_r2, Request) and to_r2.revision == 2 and to_r2.client_ids == ["c3"]

        # A late answer to revision 1 is acknowledged but not counted; revision 2's answer is.
        late = Outcome(request_id=request_id, client_id="c2", state=ClientState.EXECUTED, revision=1)
        await r1.publish(topics.up("retailers", "r1"), late)
        while True:
            ack = await r1.next("ack")
            assert isinstance(ack, Ack)
            if late.msg_id in ack.ack_ids:
                break
        req = await get(hub, request_id)
        assert req["clients"]["c2"]["state"] in ("pending", "sent"), "revision 1's outcome no longer counts"
        answer = Outcome(request_id=request_id, client_id="c2", state=ClientState.EXECUTED, revision=2,
                         detail={"shed": ["heater", "ev"]})
        await r1.publish(topics.up("retailers", "r1"), answer)
        for _ in range(100):
            req = await get(hub, request_id)
            if req["clients"]["c2"]["state"] == "executed":
                break
            await asyncio.sleep(0.05)

    assert req["revision"] == 2
    assert req["state"] == "dispatching", "c3 has not answered revision 2 yet"
    assert req["request"]["power_limit_kw"] == 1.5 and req["request"]["client_ids"] == ["c2", "c3"]
    assert [(v["revision"], v.get("changes")) for v in req["revisions"]] == [
        (1, None), (2, {"power_limit_kw": 1.5, "client_ids": ["c2", "c3"]})]
    assert req["revisions"][0]["request"]["power_limit_kw"] == 3.0
    assert req["revisions"][1]["removed"] == ["c1"] and req["revisions"][1]["added"] == ["c3"]
    c1, c2, c3 = (req["clients"][c] for c in ("c1", "c2", "c3"))
    assert c1["state"] == "cancelled" and c1["detail"]["reason"] == "removed from the request by revision 2"
    assert [(h["revision"], h["state"]) for h in c1["history"]] == [(1, "executed")]
    assert c2["state"] == "executed" and c2["revision"] == 2 and c2["detail"] == {"shed": ["heater", "ev"]}
    assert [(h["revision"], h["state"], h["detail"]) for h in c2["history"]] == [(1, "executed", {"shed": ["heater"]})]
    assert c3["revision"] == 2 and c3["retailer_id"] == "r2" and c3["history"] == []


async def test_idempotency_key_gives_one_revision(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    request_id = await create(hub, "/v1/emergencies", emergency())
    first = await revise(hub, request_id, {"power_limit_kw": 1.5}, **{"Idempotency-Key": "rev-1"})
    again = await revise(hub, request_id, {"power_limit_kw": 1.5}, **{"Idempotency-Key": "rev-1"})
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json() == {"request_id": request_id, "revision": 2, "state": "dispatching"}
    other = await revise(hub, request_id, {"power_limit_kw": 1.0}, **{"Idempotency-Key": "rev-1"})
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["message"]
    assert (await get(hub, request_id))["revision"] == 2
    third = await revise(hub, request_id, {"power_limit_kw": 1.0}, **{"Idempotency-Key": "rev-2"})
    assert third.json()["revision"] == 3


async def test_a_load_reduction_revised_in_its_availability_phase_selects_on_the_revision(
        hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        request_id = await create(hub, "/v1/load-reductions", {
            "client_ids": ["c1", "c2"], "reduction_kw": 5.0, "start": soon(30), "duration_s": 600,
            "respond_within_s": 3})
        asked = await r1.next("request")
        assert isinstance(asked, Request) and asked.kind.value == "availability"
        r = await revise(hub, request_id, {"reduction_kw": 2.0})
        assert r.status_code == 202 and r.json()["revision"] == 2
        await r1.nothing("request", 0.3)  # the availability answers stand: nothing is asked again
        for cid, kw in (("c1", 2.5), ("c2", 4.0)):
            await r1.publish(topics.up("retailers", "r1"), Outcome(
                request_id=request_id, client_id=cid, state=ClientState.AVAILABLE, detail={"available_kw": kw}))
        dispatch = await r1.next("request", timeout=10)
        assert isinstance(dispatch, Request) and dispatch.kind.value == "load_reduction"
        assert dispatch.revision == 2 and dispatch.client_ids == ["c2"], "one client covers the revised 2 kW"
        assert dispatch.params.kind == "load_reduction" and dispatch.params.target_kw == 2.0
    req = await get(hub, request_id)
    assert req["selection"]["reduction_kw"] == 2.0 and req["selection"]["chosen"] == ["c2"]
    r = await revise(hub, request_id, {"reduction_kw": 1.0})
    assert r.status_code == 422
    assert r.json()["problems"][0]["field"] == "reduction_kw"
    r = await revise(hub, request_id, {"duration_s": 300})
    assert r.status_code == 202 and r.json()["revision"] == 3
