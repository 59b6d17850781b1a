"""Neutrality at a supplier switch inside a reading interval (issue 13, item 2).

The market rule (docs/decisions.md, "A reading interval across a supplier switch"): the energy of a reading interval
goes to the retailer that supplied the client for the whole of that interval; an interval that straddles a supplier
switch goes to neither retailer, and is listed as ``withheld`` (with the switch) where the DSO and the asking
retailer can see it. Billing-data delivery and consumption profiles both follow it.

The property runs the hub's real service, request book and SQLite store over random supplier histories with
switches at any minute, reading blocks at odd starts and resolutions (5 min to 6 h, and 7 min 13 s), random billed
periods and profile ranges. What would go over MQTT is every message in the outbox, decoded as a bridge would. The
truth is computed here, independently of ``cloud_hub.timeline``. The last test runs one 10:30 switch through a real
hub, its Mosquitto and two MQTT retailers.
"""

from __future__ import annotations

import asyncio
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cloud_hub.authz import Action, Context, Principal, decide
from cloud_hub.book import RequestBook
from cloud_hub.errors import Forbidden, NotFound
from cloud_hub.metrics import HubMetrics
from cloud_hub.service import HubService
from cloud_hub.store import HubStore
from cloud_hub.timeline import whole_supplier, withhold_straddling
from mhp_wire import topics
from mhp_wire.messages import Ack, BillingData, decode
from tests.cloud_hub.test_relay import wait_state
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties

HOUR = 3600.0
BASE = float(int(datetime.now(UTC).timestamp() // 86_400 + 2) * 86_400)  # a midnight two days ahead
RETAILERS = ["r1", "r2", "r3"]
DSO = Principal("dso")
RESOLUTIONS = [300, 900, 1800, 3600, 5400, 433, 21_600]
"""5, 15, 30, 60 and 90 minutes, 7 min 13 s (on no grid at all) and 6 hours."""

switch_histories = st.lists(  # (minute after BASE, retailer): switches at any minute, not on a settlement grid
    st.lists(st.tuples(st.integers(0, 12 * 60), st.sampled_from(RETAILERS)), min_size=1, max_size=5),
    min_size=1, max_size=3)
reading_blocks = st.lists(  # (start minute, second offset, resolution, values)
    st.tuples(st.integers(-120, 12 * 60), st.sampled_from([0, 0, 17]), st.sampled_from(RESOLUTIONS),
              st.lists(st.integers(0, 9), min_size=1, max_size=40)),
    min_size=1, max_size=3)
windows = st.lists(  # (kind, start minute, length in minutes, profile resolution)
    st.tuples(st.sampled_from(["billing", "profile"]), st.integers(-60, 12 * 60), st.integers(1, 15 * 60),
              st.sampled_from([900, 3600, 7200])),
    min_size=1, max_size=5)


def periods_of(history: list[tuple[int, str]]) -> list[tuple[float, str]]:
    """Supplier periods as the registry keeps them: each switch to another retailer later than the last one."""
    out: list[tuple[float, str]] = []
    for minute, rid in sorted(history):
        t = BASE + minute * 60
        if not out or (rid != out[-1][1] and t > out[-1][0]):
            out.append((t, rid))
    return out


def supplier_of_whole(periods: list[tuple[float, str]], t0: float, t1: float) -> str | None:
    """The retailer that supplied the client at every instant of ``[t0, t1)``, or None (the truth of this test)."""
    at_start = None
    for t, rid in periods:
        if t <= t0:
            at_start = rid
    if at_start is None:
        return None
    if any(t0 < t < t1 and rid != at_start for t, rid in periods):
        return None
    return at_start


def laid_out(blocks: list[tuple[int, int, int, list[int]]]) -> list[tuple[float, int, list[float]]]:
    """The blocks as ``(start, resolution_s, values)``, each moved after the previous one so none overlap (an
    overlapping upload is a correction, another rule)."""
    out: list[tuple[float, int, list[float]]] = []
    for minute, second, res, values in sorted(blocks):
        start = BASE + minute * 60 + second
        if out:
            prev_start, prev_res, prev_values = out[-1]
            start = max(start, prev_start + prev_res * len(prev_values))
        out.append((start, res, [float(v) for v in values]))
    return out


def intervals_of(blocks: list[tuple[float, int, list[float]]], start: float, end: float
                 ) -> dict[float, tuple[float, float]]:
    """Every reading interval starting in ``[start, end)``: its start -> (its end, its energy)."""
    return {b0 + i * res: (b0 + (i + 1) * res, kwh) for b0, res, values in blocks for i, kwh in enumerate(values)
            if start <= b0 + i * res < end}


SWITCHED = [{"valid_from": 0.0, "retailer_id": "r1"}, {"valid_from": 5400.0, "retailer_id": "r2"}]  # r2 at 01:30


@pytest.mark.parametrize(("start", "end", "owner"), [
    (0.0, 3600.0, "r1"), (3600.0, 7200.0, None), (5400.0, 7200.0, "r2"), (7200.0, 9000.0, "r2"),
    (-60.0, 60.0, None),  # before the first supply
])
def test_whole_supplier(start: float, end: float, owner: str | None) -> None:
    assert whole_supplier(SWITCHED, start, end) == owner


@pytest.mark.parametrize(("who", "owner", "allowed"), [
    ("r1", "r1", True), ("r2", "r1", False), ("r1", None, False), ("dso", "r1", False)])
def test_deliver_billing_goes_only_to_the_supplier_of_the_whole_interval(who: str, owner: str | None,
                                                                          allowed: bool) -> None:
    principal = Principal.parse("dso" if who == "dso" else f"retailer:{who}")
    verdict = decide(principal, Action.DELIVER_BILLING, Context(covered_by_supplier=owner))
    assert verdict.allowed is allowed
    assert verdict.right == ("retailer:supplier-of-period" if allowed else "none")


def test_withhold_straddling_cuts_only_the_interval_across_the_end() -> None:
    """r1's span ends at the 01:30 switch: of hourly values at 00:00 and 01:00, the second is withheld; a span
    ending at a period end that r1 keeps supplying past keeps it."""
    block = {"start": 0.0, "resolution_s": 3600, "values_kwh": [1.0, 2.0], "quality": "measured", "version": 1,
             "corrected": False}

    def r1_may_have(t0: float, t1: float) -> bool:
        return whole_supplier(SWITCHED, t0, t1) == "r1"

    kept, withheld = withhold_straddling([block], 5400.0, r1_may_have)
    assert [b["values_kwh"] for b in kept] == [[1.0]]
    assert withheld == [{"start": 3600.0, "end": 7200.0, "resolution_s": 3600}]
    kept, withheld = withhold_straddling([{**block, "values_kwh": [1.0]}], 1800.0, r1_may_have)
    assert [b["values_kwh"] for b in kept] == [[1.0]] and withheld == []
    kept, withheld = withhold_straddling([{**block, "start": 3600.0, "values_kwh": [2.0]}], 5400.0, r1_may_have)
    assert kept == [] and [w["start"] for w in withheld] == [3600.0]


async def scenario(tmp: Path, hist: list[list[tuple[int, str]]], raw_blocks: list[tuple[int, int, int, list[int]]],
                   acts: list[tuple[str, int, int, int]], asker: str) -> None:
    store = HubStore.embedded(tmp / "hub.db")
    await store.open()
    book = RequestBook(store, HubMetrics())
    service = HubService.build(store, book, HubMetrics())
    try:
        for rid in RETAILERS:
            await service.registry.put_retailer(DSO, rid, rid)
        truth: dict[str, list[tuple[float, str]]] = {}
        blocks = laid_out(raw_blocks)
        for i, h in enumerate(hist):
            cid = f"c{i}"
            truth[cid] = periods_of(h)
            for t, rid in truth[cid]:
                await service.registry.put_client(DSO, cid, {"retailer_id": rid, "contracted_power_kw": 5.0,
                                                    "valid_from": datetime.fromtimestamp(t, UTC)})
            await service.data.upload_readings(DSO, [
                {"client_id": cid, "start": datetime.fromtimestamp(b0, UTC), "resolution_s": res, "values_kwh": v}
                for b0, res, v in blocks])
        clients = sorted(truth)
        straddling_seen = 0
        for n, (kind, minute, length, resolution) in enumerate(acts):
            start, end = BASE + minute * 60, BASE + (minute + length) * 60
            cid = clients[n % len(clients)]
            periods = truth[cid]
            inside = intervals_of(blocks, start, end)
            straddling = {t for t, (t1, _) in inside.items()  # reaching some supplier's time, but no one's whole
                          if supplier_of_whole(periods, t, t1) is None and periods[0][0] < t1}
            straddling_seen += len(straddling)
            if kind == "billing":
                if periods[0][0] >= end:
                    continue  # nobody supplied any of the period: refused (409), another test's subject
                before = set(book.outbox)
                answer = await service.data.request_billing(DSO, {
                    "client_ids": [cid], "period_start": datetime.fromtimestamp(start, UTC),
                    "period_end": datetime.fromtimestamp(end, UTC)}, None)
                delivered: dict[float, str] = {}
                for mid in set(book.outbox) - before:
                    item = book.outbox[mid]
                    msg = decode(item.payload)
                    assert isinstance(msg, BillingData)
                    for c in msg.clients:
                        for blk in c.readings:
                            for i, kwh in enumerate(blk.values_kwh):
                                t0 = blk.start.timestamp() + i * blk.resolution_s
                                t1 = t0 + blk.resolution_s
                                owner = supplier_of_whole(periods, t0, t1)
                                assert owner == item.retailer_id, (
                                    f"{item.retailer_id} got {cid}'s energy of [{t0 - BASE:.0f}, {t1 - BASE:.0f}) "
                                    f"s after BASE, supplied whole by {owner}; switches {periods}")
                                assert t0 not in delivered, "one interval delivered twice"
                                delivered[t0] = item.retailer_id
                                assert kwh == inside[t0][1]
                req = await service.requests.get_request(DSO, answer.request_id)
                withheld = {datetime.fromisoformat(w["start"]).timestamp()
                            for w in req["clients"][cid]["detail"].get("withheld", [])}
                assert withheld == straddling, "every interval across a switch is withheld, and flagged"
                supplied = {t for t, (t1, _) in inside.items() if supplier_of_whole(periods, t, t1) is not None}
                assert set(delivered) == supplied, "every other interval reaches the retailer that supplied it"
            else:
                allowed = supplier_of_whole(periods, start, end) == asker
                try:
                    got = await service.data.consumption_profile(Principal("retailer", asker), cid, start, end,
                                                                 resolution)
                except (Forbidden, NotFound):
                    assert not allowed, f"{asker} was refused {cid}'s profile over its own supply period"
                    continue
                assert allowed, f"{asker} got {cid}'s profile for a time it did not supply whole"
                mine = {t: kwh for t, (t1, kwh) in inside.items() if supplier_of_whole(periods, t, t1) == asker}
                assert sum(p["kwh"] for p in got["series"]) == sum(mine.values()), (
                    f"{asker} got energy of an interval it did not supply whole: switches {periods}")
                assert {datetime.fromisoformat(w["start"]).timestamp() for w in got["withheld"]} == straddling
        event(f"intervals across a switch: {'some' if straddling_seen else 'none'}")
    finally:
        await store.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hist=switch_histories, raw_blocks=reading_blocks, acts=windows, asker=st.sampled_from(RETAILERS))
def test_no_retailer_gets_energy_of_an_interval_it_did_not_supply_whole(
        hist: list[list[tuple[int, str]]], raw_blocks: list[tuple[int, int, int, list[int]]],
        acts: list[tuple[str, int, int, int]], asker: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp), hist, raw_blocks, acts, asker))


async def test_a_switch_at_half_past_withholds_the_hourly_reading_across_it(hub: HubHandle) -> None:
    """c1 switches from r1 to r2 at 10:30 and its meter reads hourly from 09:00: r1 is billed 09:00-10:00, r2
    11:00-13:00, the 10:00-11:00 reading goes to neither, and the DSO's request and r1's profile say so."""
    day = datetime.fromtimestamp(BASE, UTC) + timedelta(days=1)
    nine, switch = day + timedelta(hours=9), day + timedelta(hours=10, minutes=30)
    await hub.setup_registry({"c1": "r1"})
    r = await hub.http.put("/v1/clients/c1", headers=hub.auth("dso"), json={
        "retailer_id": "r2", "contracted_power_kw": 6.9, "feeder_id": "f1", "valid_from": switch.isoformat()})
    assert r.status_code == 200, r.text
    r = await hub.http.post("/v1/meter-readings", headers=hub.auth("dso"), json={"readings": [
        {"client_id": "c1", "start": nine.isoformat(), "resolution_s": 3600, "values_kwh": [1.0, 2.0, 4.0, 8.0]}]})
    assert r.status_code == 200, r.text
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1")),
                 Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (r1, r2):
        r = await hub.http.post("/v1/billing-data", headers=hub.auth("dso"), json={
            "client_ids": ["c1"], "period_start": nine.isoformat(),
            "period_end": (nine + timedelta(hours=4)).isoformat()})
        assert r.status_code == 202, r.text
        request_id = r.json()["request_id"]
        b1, b2 = await r1.next("billing_data"), await r2.next("billing_data")
        assert isinstance(b1, BillingData) and isinstance(b2, BillingData)
        got1 = [(b.start, b.values_kwh) for b in b1.clients[0].readings]
        got2 = [(b.start, b.values_kwh) for b in b2.clients[0].readings]
        assert got1 == [(nine, [1.0])], f"r1 supplied 10:00-10:30 only, not the whole hour: {got1}"
        assert got2 == [(nine + timedelta(hours=2), [4.0, 8.0])], f"r2 supplied 10:30-11:00 only: {got2}"
        for party, msg, rid in ((r1, b1, "r1"), (r2, b2, "r2")):
            await party.publish(topics.up("retailers", rid), Ack(ack_ids=[msg.msg_id]))
        req = await wait_state(hub, request_id, "completed")
    (held,) = req["clients"]["c1"]["detail"]["withheld"]
    assert datetime.fromisoformat(held["start"]) == nine + timedelta(hours=1)
    assert datetime.fromisoformat(held["end"]) == nine + timedelta(hours=2)
    assert held["retailers"] == ["r1", "r2"] and switch.isoformat() in held["reason"]
    r = await hub.http.get("/v1/clients/c1/consumption-profile", headers=hub.auth("r1"), params={
        "from": nine.isoformat(), "to": switch.isoformat(), "resolution_s": 1800})
    assert r.status_code == 200, r.text
    assert sum(p["kwh"] for p in r.json()["series"]) == 1.0, "r1's profile holds no energy of 10:00-11:00"
    assert [w["start"] for w in r.json()["withheld"]] == [(nine + timedelta(hours=1)).isoformat()]
    r = await hub.http.get("/v1/clients/c1/consumption-profile", headers=hub.auth("dso"), params={
        "from": nine.isoformat(), "to": (nine + timedelta(hours=4)).isoformat(), "resolution_s": 3600})
    assert [p["kwh"] for p in r.json()["series"]] == [1.0, 2.0, 4.0, 8.0], "the DSO sees every reading"
    assert r.json()["withheld"] == []
