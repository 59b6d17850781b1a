"""Review findings on the hub's data (5, 6, 9, 11, 13, 14), each through a real hub over HTTP, its real Mosquitto
and MQTT parties; storage on both backends where storage is what the finding is about.

- 5: a correction with the same start as a stored block keeps the values it does not cover.
- 6: the ``withheld`` detail of a retailer's profile does not name the client's other supplier.
- 9: a refused request or message naming thousands of ids costs a bounded log: a line per registered client up to
  the cap, one summary line (client ``*``) counting the rest.
- 11: the ``customers`` revision does not count the client's supplier periods.
- 13: a tariff reaches a retailer whose id is 40 characters long with a valid ``msg_id``.
- 14: concurrent registrations of one new client: one wins, the others are refused, one announcement.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from mhp_wire import topics
from mhp_wire.messages import Ack, Customers, Measurement, Measurements, Tariff
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.test_relay import wait_state
from tests.hub_fixtures import HubHandle, start_hub
from tests.mqtt_party import Party, parties

DAY = 86_400.0
TODAY = float(int(time.time() // DAY) * DAY)
"""Midnight (UTC) of today: the tests' days are relative to it."""


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


async def profile(hub: HubHandle, who: str, client_id: str, start: float, end: float, res: int) -> dict[str, Any]:
    r = await hub.http.get(f"/v1/clients/{client_id}/consumption-profile", headers=hub.auth(who),
                           params={"from": iso(start), "to": iso(end), "resolution_s": res})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def audit(hub: HubHandle, client_id: str) -> list[dict[str, Any]]:
    r = await hub.http.get("/v1/audit", headers=hub.auth("dso"), params={
        "client_id": client_id, "from": iso(TODAY - 2 * DAY), "to": iso(time.time() + DAY)})
    assert r.status_code == 200, r.text
    return r.json()["entries"]  # type: ignore[no-any-return]


# -- 5 --------------------------------------------------------------------------------------------------------------

async def test_a_correction_with_the_same_start_keeps_the_rest_of_the_stored_day(hub_any: HubHandle) -> None:
    hub = hub_any
    await hub.setup_registry({"c-day": "r1", "c-two": "r1"})
    day = TODAY - 2 * DAY
    up = await hub.http.post("/v1/meter-readings", headers=hub.auth("dso"), json={"readings": [
        {"client_id": "c-day", "start": iso(day), "resolution_s": 900, "values_kwh": [0.25] * 96}]})
    assert up.status_code == 200, up.text
    fix = await hub.http.post("/v1/meter-readings", headers=hub.auth("dso"), json={"readings": [
        {"client_id": "c-day", "start": iso(day), "resolution_s": 900, "values_kwh": [0.5] * 4,
         "quality": "estimated"}]})
    assert fix.status_code == 200, fix.text
    assert fix.json()["corrections"] == 1

    series = (await profile(hub, "dso", "c-day", day, day + DAY, 900))["series"]
    assert len(series) == 96, f"the correction of 4 intervals left {len(series)} of the day's 96"
    assert [p["kwh"] for p in series[:4]] == [0.5] * 4  # the last upload wins where it covers
    assert [p["quality"] for p in series[:4]] == ["estimated"] * 4
    assert [p["kwh"] for p in series[4:]] == [0.25] * 92
    hourly = (await profile(hub, "dso", "c-day", day, day + DAY, 3600))["series"]
    assert round(sum(p["kwh"] for p in hourly), 6) == 0.5 * 4 + 0.25 * 92

    # one upload with two blocks of the same start: the later block wins where they overlap, the rest stays
    both = await hub.http.post("/v1/meter-readings", headers=hub.auth("dso"), json={"readings": [
        {"client_id": "c-two", "start": iso(day), "resolution_s": 900, "values_kwh": [1.0] * 8},
        {"client_id": "c-two", "start": iso(day), "resolution_s": 900, "values_kwh": [3.0] * 2}]})
    assert both.status_code == 200, both.text
    series = (await profile(hub, "dso", "c-two", day, day + DAY, 900))["series"]
    assert [p["kwh"] for p in series] == [3.0, 3.0] + [1.0] * 6

    # billing delivers the corrected day whole (the retailer's message carries every interval)
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        bill = await hub.http.post("/v1/billing-data", headers=hub.auth("dso"), json={
            "client_ids": ["c-day"], "period_start": iso(day), "period_end": iso(day + DAY)})
        assert bill.status_code == 202, bill.text
        msg = await r1.next("billing_data", timeout=10)
        values = [v for b in msg.clients[0].readings for v in b.values_kwh]  # type: ignore[attr-defined]
        assert values == [0.5] * 4 + [0.25] * 92


# -- 6 --------------------------------------------------------------------------------------------------------------

async def test_the_withheld_detail_does_not_tell_a_retailer_who_its_competitor_is(hub: HubHandle) -> None:
    await hub.setup_registry({"c-sw": "r1"})
    day = TODAY - 2 * DAY
    switch = day + 10.5 * 3600  # inside the hourly reading 10:00-11:00
    r = await hub.http.put("/v1/clients/c-sw", headers=hub.auth("dso"), json={
        "retailer_id": "r2", "contracted_power_kw": 6.9, "valid_from": iso(switch)})
    assert r.status_code in (200, 201), r.text
    up = await hub.http.post("/v1/meter-readings", headers=hub.auth("dso"), json={"readings": [
        {"client_id": "c-sw", "start": iso(day), "resolution_s": 3600, "values_kwh": [1.0] * 24}]})
    assert up.status_code == 200, up.text

    answer = await profile(hub, "r1", "c-sw", day, switch, 3600)
    assert [w["start"] for w in answer["withheld"]] == [iso(day + 10 * 3600)]  # the straddling hour
    assert answer["withheld"][0]["retailers"] == ["r1"], answer["withheld"]
    assert "r2" not in str(answer), "the old supplier learnt who won its customer"


# -- 13 -------------------------------------------------------------------------------------------------------------

LONG_RETAILER = "retailer-with-a-forty-character-long-id0"


@pytest.fixture
async def hub_long(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[HubHandle]:
    """A running hub whose hub broker also has a retailer with a 40-character id."""
    assert len(LONG_RETAILER) == 40
    broker = mosquitto_factory("hub", ["r1", "r2", LONG_RETAILER], "hub")
    server, task, tokens, url = await start_hub(tmp_path, broker)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for _ in range(300):
                if (await http.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
            yield HubHandle(url, tokens, broker, http, server.config.app)
    finally:
        server.should_exit = True
        await task


async def test_a_tariff_reaches_a_retailer_with_a_forty_character_id_valid_and_acknowledged(
        hub_long: HubHandle) -> None:
    hub = hub_long
    r = await hub.http.put(f"/v1/retailers/{LONG_RETAILER}", json={"name": "Long"}, headers=hub.auth("admin"))
    assert r.status_code in (200, 201), r.text
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    with parties(Party(hub.broker, LONG_RETAILER, topics.down("retailers", LONG_RETAILER))) as (party,):
        posted = await hub.http.post("/v1/tariffs", headers=hub.auth("dso"), json={
            "tariff_id": "t-long", "valid_from": start.isoformat(), "valid_to": (start + timedelta(days=1)).isoformat(),
            "periods": [{"start": start.isoformat(), "end": (start + timedelta(days=1)).isoformat(),
                         "price_eur_per_kwh": 0.1}]})
        assert posted.status_code == 202, posted.text
        msg = await party.next("tariff", timeout=10)  # decoded as a bridge decodes it: an invalid one raises
        assert isinstance(msg, Tariff) and msg.tariff_id == "t-long"
        assert len(msg.msg_id) <= 64
        await party.publish(topics.up("retailers", LONG_RETAILER), Ack(ack_ids=[msg.msg_id]))
        req = await wait_state(hub, posted.json()["request_id"], "completed", timeout=10)
        assert req["state"] == "completed", req


# -- 11 -------------------------------------------------------------------------------------------------------------

async def test_the_customers_revision_does_not_count_the_clients_supplier_periods(hub: HubHandle) -> None:
    await hub.setup_registry({})
    now = time.time()
    seen: list[int] = []
    with parties(Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (r2,):
        for days, rid in ((-10, "r1"), (-5, "r2"), (-2, "r1"), (1, "r2")):
            if days == -10:  # the client's first period, with r1: nothing to tell r2
                r = await hub.http.put("/v1/clients/c-hist", headers=hub.auth("dso"), json={
                    "retailer_id": rid, "contracted_power_kw": 6.9, "valid_from": iso(now + days * DAY)})
                assert r.status_code in (200, 201), r.text
                continue
            before_ms = round(time.time() * 1000)
            r = await hub.http.put("/v1/clients/c-hist", headers=hub.auth("dso"), json={
                "retailer_id": rid, "contracted_power_kw": 6.9, "valid_from": iso(now + days * DAY)})
            assert r.status_code in (200, 201), r.text
            msg = await r2.next("customers", timeout=10)
            assert isinstance(msg, Customers)
            await r2.publish(topics.up("retailers", "r2"), Ack(ack_ids=[msg.msg_id]))
            (item,) = msg.items
            # the hub's write time: r2 learns when the change was made (it is being told now), not how many
            # periods the client had (a revision of 4 when it gains the client told it of 3 earlier ones)
            assert item.revision >= before_ms, f"revision {item.revision} after {len(seen)} change(s) seen"
            seen.append(item.revision)
    assert seen == sorted(set(seen)), "the revision must grow with every change"


# -- 9 --------------------------------------------------------------------------------------------------------------

async def test_a_refusal_naming_thousands_of_ids_logs_the_first_registered_ones_and_counts_the_rest(
        hub: HubHandle) -> None:
    await hub.setup_registry({})
    known = [f"c-{i:03d}" for i in range(150)]
    r = await hub.http.put("/v1/clients", headers=hub.auth("dso"), json={"clients": [
        {"client_id": cid, "retailer_id": "r1", "contracted_power_kw": 6.9, "valid_from": iso(TODAY - DAY)}
        for cid in known]})
    assert r.status_code == 200, r.text
    random_ids = [f"x-{i}" for i in range(5_000)]
    refused = await hub.http.post("/v1/emergencies", headers=hub.auth("r1"), json={
        "client_ids": known + random_ids, "start": iso(time.time() + 3600), "duration_s": 600,
        "power_limit_kw": 3.0})
    assert refused.status_code == 403, refused.text

    for cid in known[:100]:  # the log stays true for every registered client of the first 100 named
        lines = [e for e in await audit(hub, cid) if e["action"] == "trigger_emergency"]
        assert [(e["principal"], e["allowed"], e["right"]) for e in lines] == [("retailer:r1", False, "none")]
    assert [e for e in await audit(hub, known[120]) if e["action"] == "trigger_emergency"] == []
    summary = [e for e in await audit(hub, "*") if e["action"] == "trigger_emergency"]
    assert len(summary) == 1, summary
    assert summary[0]["principal"] == "retailer:r1" and summary[0]["allowed"] is False
    assert "5050 more client id(s)" in summary[0]["detail"]
    assert await audit(hub, "x-0") == []


async def test_measurements_for_random_ids_are_counted_in_one_line_not_one_each(hub: HubHandle) -> None:
    await hub.setup_registry({"c-own": "r1", "c-other": "r2"})
    at = datetime.now(UTC)
    items = [Measurement(client_id="c-own", at=at, active_power_kw=1.5),
             Measurement(client_id="c-other", at=at, active_power_kw=2.0)]
    items += [Measurement(client_id=f"rnd-{i}", at=at, active_power_kw=1.0) for i in range(500)]
    msg = Measurements(items=items)
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        await r1.publish(topics.up("retailers", "r1"), msg)
        while True:  # the hub acknowledges the message once it is stored and logged
            got = await r1.next("ack", timeout=10)
            if msg.msg_id in got.ack_ids:  # type: ignore[attr-defined]
                break

    async def sent(cid: str) -> list[tuple[str, bool, str]]:
        return [(e["principal"], e["allowed"], e["ref"]) for e in await audit(hub, cid)
                if e["action"] == "send_measurement"]

    assert await sent("c-own") == [("retailer:r1", True, msg.msg_id)]
    assert await sent("c-other") == [("retailer:r1", False, msg.msg_id)]  # a registered client: its own line
    assert await audit(hub, "rnd-7") == []
    summary = [e for e in await audit(hub, "*") if e["action"] == "send_measurement"]
    assert len(summary) == 1, summary
    assert summary[0]["ref"] == msg.msg_id
    assert summary[0]["detail"].startswith("500 id(s) that name no registered client")


# -- 14 -------------------------------------------------------------------------------------------------------------

async def test_concurrent_registrations_of_one_new_client_one_wins_the_others_conflict(hub_any: HubHandle) -> None:
    """Each of 24 new clients is registered 8 times at once, each time with another retailer and the same
    ``valid_from``: exactly one registration per client may succeed (the others are a switch without a later
    ``valid_from``: 409), and only its retailer is told. Before, two that planned from the same empty row both
    succeeded and told two retailers that each supplied the client from the same instant, with revision 1."""
    hub = hub_any
    retailers = [f"rc{i}" for i in range(8)]
    for rid in retailers:
        r = await hub.http.put(f"/v1/retailers/{rid}", json={"name": rid}, headers=hub.auth("admin"))
        assert r.status_code in (200, 201), r.text
    valid_from = iso(TODAY - DAY)
    clients = [f"c-race-{n}" for n in range(24)]
    answers = await asyncio.gather(*(hub.http.put(f"/v1/clients/{cid}", headers=hub.auth("dso"), json={
        "retailer_id": rid, "contracted_power_kw": 6.9, "valid_from": valid_from})
        for cid in clients for rid in retailers))
    for n, cid in enumerate(clients):
        mine = answers[n * len(retailers):(n + 1) * len(retailers)]
        won = [a.json() for a in mine if a.status_code < 300]
        assert len(won) == 1 and [a.status_code for a in mine].count(409) == len(retailers) - 1, (
            cid, [a.status_code for a in mine])
        client = (await hub.http.get(f"/v1/clients/{cid}", headers=hub.auth("dso"))).json()
        assert len(client["suppliers"]) == 1
        announced = (await hub.http.get(f"/v1/requests/{won[0]['customer_change_request_id']}",
                                        headers=hub.auth("dso"))).json()
        assert list(announced["retailers"]) == [client["suppliers"][0]["retailer_id"]]
