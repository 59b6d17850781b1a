"""Each use case through the hub's MQTT side, with paho test retailers on a real hub broker, on both storage
backends (the embedded store, and HBase through happybase against the Thrift test double)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from mhp_wire import topics
from mhp_wire.messages import (
    Ack,
    BillingData,
    Cancel,
    ClientState,
    ErrorReply,
    Measurement,
    Measurements,
    Outcome,
    Request,
    RequestKind,
    Tariff,
    presence_payload,
)
from tests.cloud_hub.test_api_usecases import SWITCH, T0, iso, registry_with_switch, soon, upload
from tests.cloud_hub.test_relay import metric, wait_state
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties


def retailer(hub: HubHandle, rid: str) -> Party:
    return Party(hub.broker, rid, topics.down("retailers", rid))


async def test_billing_is_split_at_a_supplier_switch_and_says_when_corrected(hub_any: HubHandle) -> None:
    hub = hub_any
    await registry_with_switch(hub)
    await upload(hub, "c1", T0, [1.0] * 72)
    await upload(hub, "c1", T0 + timedelta(hours=30), [5.0, 5.0])  # a correction of two hours on day 2
    with parties(retailer(hub, "r1"), retailer(hub, "r2")) as (r1, r2):
        r = await hub.http.post("/v1/billing-data", headers=hub.auth("dso"), json={
            "client_ids": ["c1"], "period_start": iso(T0), "period_end": iso(T0 + timedelta(days=3))})
        request_id = r.json()["request_id"]
        b1, b2 = await r1.next("billing_data"), await r2.next("billing_data")
        assert isinstance(b1, BillingData) and isinstance(b2, BillingData)
        (c1_r1,), (c1_r2,) = b1.clients, b2.clients
        assert (c1_r1.period_start, c1_r1.period_end) == (T0, SWITCH)
        assert (c1_r2.period_start, c1_r2.period_end) == (SWITCH, T0 + timedelta(days=3))
        assert sum(sum(b.values_kwh) for b in c1_r1.readings) == 24.0, "r1 gets only its own day"
        assert all(b.start >= SWITCH for b in c1_r2.readings)
        assert any(b.corrected for b in c1_r2.readings) and not any(b.corrected for b in c1_r1.readings)
        for party, msg, rid in ((r1, b1, "r1"), (r2, b2, "r2")):
            await party.publish(topics.up("retailers", rid), Ack(ack_ids=[msg.msg_id]))
        req = await wait_state(hub, request_id, "completed")
        assert req["clients"]["c1"]["state"] == "acknowledged"
        assert req["clients"]["c1"]["detail"]["corrected"] is True


async def test_tariff_reaches_every_retailer_and_a_late_joiner_gets_the_current_one(hub_any: HubHandle) -> None:
    hub = hub_any
    await hub.setup_registry({})
    with parties(retailer(hub, "r1"), retailer(hub, "r2")) as (r1, r2):
        body = {"tariff_id": "tou", "valid_from": iso(T0), "valid_to": iso(T0 + timedelta(days=30)),
                "periods": [{"start": iso(T0), "end": iso(T0 + timedelta(hours=7)), "price_eur_per_kwh": 0.08}]}
        r = await hub.http.post("/v1/tariffs", json=body, headers=hub.auth("dso"))
        request_id = r.json()["request_id"]
        t1, t2 = await r1.next("tariff"), await r2.next("tariff")
        assert isinstance(t1, Tariff) and t1.version == 1 and t1.periods[0].price_eur_per_kwh == 0.08
        await r1.publish(topics.up("retailers", "r1"), Ack(ack_ids=[t1.msg_id]))
        await r2.publish(topics.up("retailers", "r2"), Ack(ack_ids=[t2.msg_id]))
        req = await wait_state(hub, request_id, "completed")
        assert {r["state"] for r in req["retailers"].values()} == {"acknowledged"}
    with parties(Party(hub.broker, "r2", topics.TARIFF)) as (late,):
        got = await late.raw()
        assert got.retain, "the current tariff is retained for whoever subscribes later"
        assert Tariff.model_validate_json(got.payload).tariff_id == "tou"


async def test_load_reduction_asks_availability_then_disconnects_enough_clients(hub_any: HubHandle) -> None:
    hub = hub_any
    await hub.setup_registry({"c1": "r1", "c2": "r2", "c3": "r1"})
    with parties(retailer(hub, "r1"), retailer(hub, "r2")) as (r1, r2):
        r = await hub.http.post("/v1/load-reductions", headers=hub.auth("dso"), json={
            "client_ids": ["c1", "c2", "c3"], "reduction_kw": 4.0, "start": soon(30), "duration_s": 600,
            "respond_within_s": 3})
        request_id = r.json()["request_id"]
        q1, q2 = await r1.next("request"), await r2.next("request")
        assert isinstance(q2, Request) and q2.client_ids == ["c2"]
        assert isinstance(q1, Request) and q1.kind is RequestKind.AVAILABILITY and q1.params.reduction_kw == 4.0
        answers = [(r1, "r1", "c1", ClientState.AVAILABLE, 3.0), (r1, "r1", "c3", ClientState.UNAVAILABLE, 0.0),
                   (r2, "r2", "c2", ClientState.AVAILABLE, 2.0)]
        for party, rid, cid, state, kw in answers:
            await party.publish(topics.up("retailers", rid), Outcome(
                request_id=request_id, client_id=cid, state=state, detail={"available_kw": kw}))
        d1, d2 = await r1.next("request"), await r2.next("request")
        assert isinstance(d1, Request) and d1.kind is RequestKind.LOAD_REDUCTION and d1.client_ids == ["c1"]
        assert isinstance(d2, Request) and d2.client_ids == ["c2"]
        for party, rid, cid in ((r1, "r1", "c1"), (r2, "r2", "c2")):
            await party.publish(topics.up("retailers", rid), Outcome(
                request_id=request_id, client_id=cid, state=ClientState.EXECUTED, detail={"shed": ["heater"]}))
        req = await wait_state(hub, request_id, "completed")
        assert req["state"] == "completed"
        assert {c: v["state"] for c, v in req["clients"].items()} == {
            "c1": "executed", "c2": "executed", "c3": "unavailable"}
        assert req["selection"] == {"chosen": ["c1", "c2"], "selected_kw": 5.0, "reduction_kw": 4.0,
                                    "covered": True}


async def test_cancel_reaches_the_retailers_and_is_recorded(hub_any: HubHandle) -> None:
    hub = hub_any
    await hub.setup_registry({"c1": "r1"})
    with parties(retailer(hub, "r1")) as (r1,):
        r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json={
            "client_ids": ["c1"], "start": soon(600), "duration_s": 60, "power_limit_kw": 1})
        request_id = r.json()["request_id"]
        req_msg = await r1.next("request")
        await r1.publish(topics.up("retailers", "r1"), Ack(ack_ids=[req_msg.msg_id]))
        await asyncio.sleep(0.2)
        r = await hub.http.post(f"/v1/requests/{request_id}/cancel", headers=hub.auth("dso"))
        assert r.json()["cancel_sent_to"] == ["r1"]
        cancel = await r1.next("cancel")
        assert isinstance(cancel, Cancel) and cancel.request_id == request_id and cancel.client_ids == ["c1"]
        await r1.publish(topics.up("retailers", "r1"), Ack(ack_ids=[cancel.msg_id]))
        for _ in range(50):
            req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
            if req["cancel"]["acknowledged_by"]:
                break
            await asyncio.sleep(0.05)
        assert list(req["cancel"]["acknowledged_by"]) == ["r1"]


async def test_measurements_only_for_own_clients_and_queryable_by_the_dso(hub_any: HubHandle) -> None:
    hub = hub_any
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    now = datetime.now(UTC)
    with parties(retailer(hub, "r1")) as (r1,):
        batch = Measurements(items=[Measurement(client_id="c1", at=now, active_power_kw=2.5),
                                    Measurement(client_id="c2", at=now, active_power_kw=9.9)])
        await r1.publish(topics.up("retailers", "r1"), batch)
        err = await r1.next("error")
        assert isinstance(err, ErrorReply) and err.code == "forbidden" and "c2" in err.message
        assert (await r1.next("ack")).ack_ids == [batch.msg_id]  # type: ignore[union-attr]
    window = {"from": iso(now - timedelta(minutes=1)), "to": iso(now + timedelta(minutes=1))}
    got = (await hub.http.get("/v1/measurements", params={**window, "client_id": "c1"},
                              headers=hub.auth("dso"))).json()
    assert [(p["active_power_kw"], p["retailer_id"]) for p in got["series"]] == [(2.5, "r1")]
    got = (await hub.http.get("/v1/measurements", params={**window, "client_id": "c2"},
                              headers=hub.auth("dso"))).json()
    assert got["series"] == [], "nothing stored for another retailer's client"
    assert metric((await hub.http.get("/metrics")).text, "mhp_mqtt_rejected_total", reason="forbidden") == 1


async def test_a_retailer_coming_back_online_is_resynced_at_once(hub_any: HubHandle) -> None:
    hub = hub_any
    await hub.setup_registry({"c1": "r1"})
    with parties(retailer(hub, "r1")) as (r1,):
        await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json={
            "client_ids": ["c1"], "start": soon(600), "duration_s": 60, "power_limit_kw": 1})
        first = await r1.next("request")
        await asyncio.sleep(0.6)  # the next retry is now seconds away
        while not r1.client.messages.empty():
            r1.client.messages.get_nowait()
        await r1.publish(topics.status("retailers", "r1"), presence_payload("offline"), retain=True)
        await r1.publish(topics.status("retailers", "r1"), presence_payload("online"), retain=True)
        again = await r1.next("request", timeout=0.9)
        assert again.msg_id == first.msg_id


async def test_an_availability_answer_with_a_nonsensical_power_counts_as_zero_and_breaks_nothing(
        hub_any: HubHandle) -> None:
    # ``detail`` is free-form: a retailer's "abc" (or a negative, or an infinite power) must neither poison the group
    # commit it shares with the other answers nor be selected as available power.
    hub = hub_any
    await hub.setup_registry({"c1": "r1", "c2": "r1", "c3": "r1"})
    with parties(retailer(hub, "r1")) as (r1,):
        r = await hub.http.post("/v1/load-reductions", headers=hub.auth("dso"), json={
            "client_ids": ["c1", "c2", "c3"], "reduction_kw": 2.0, "start": soon(30), "duration_s": 600,
            "respond_within_s": 3})
        request_id = r.json()["request_id"]
        await r1.next("request")
        for cid, kw in (("c1", "abc"), ("c2", 3.0), ("c3", float("inf"))):
            await r1.publish(topics.up("retailers", "r1"), Outcome(
                request_id=request_id, client_id=cid, state=ClientState.AVAILABLE, detail={"available_kw": kw}))
        disconnect = await r1.next("request")
        assert isinstance(disconnect, Request) and disconnect.client_ids == ["c2"]
        req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
        assert req["selection"]["chosen"] == ["c2"] and req["selection"]["selected_kw"] == 3.0
        assert {c: v["state"] for c, v in req["clients"].items() if c != "c2"} == {"c1": "available",
                                                                                  "c3": "available"}
