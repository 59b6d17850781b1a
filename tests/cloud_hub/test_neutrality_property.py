"""Property: over random supplier histories and random requests, no retailer is ever addressed with, or served,
data or actions of a client it did not supply at the time the data or action refers to.

It runs the hub's real service, request book and SQLite store; what would go over MQTT is every message in the
outbox (decoded exactly as a bridge would), and what would go over HTTP is what the service returns.
"""

from __future__ import annotations

import asyncio
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cloud_hub.authz import Principal
from cloud_hub.book import RequestBook
from cloud_hub.errors import Forbidden, NotFound
from cloud_hub.metrics import HubMetrics
from cloud_hub.service import HubService
from cloud_hub.store import HubStore
from cloud_hub.timeline import supplier_at, supply_spans
from mhp_wire.messages import BillingData, Request, decode

DAY = 86_400.0
BASE = float(int(datetime.now(UTC).timestamp() // DAY + 2) * DAY)  # midnight, two days ahead: all in the future
RETAILERS = ["r1", "r2", "r3"]
DSO = Principal("dso")

histories = st.lists(
    st.lists(st.tuples(st.integers(0, 20), st.sampled_from(RETAILERS)), min_size=1, max_size=4),
    min_size=1, max_size=5)
actions = st.lists(st.one_of(
    st.tuples(st.just("emergency"), st.integers(-5, 30), st.integers(1, 5)),
    st.tuples(st.just("billing"), st.integers(-5, 30), st.integers(1, 10)),
    st.tuples(st.just("profile"), st.integers(-5, 30), st.integers(1, 10)),
), min_size=1, max_size=6)


def periods_of(history: list[tuple[int, str]]) -> list[tuple[float, str]]:
    """Supplier periods as the registry keeps them: each switch to a new retailer on a later day."""
    out: list[tuple[float, str]] = []
    for day, rid in sorted(history):
        t = BASE + day * DAY
        if not out or (rid != out[-1][1] and t > out[-1][0]):
            out.append((t, rid))
    return out


async def scenario(tmp: Path, hist: list[list[tuple[int, str]]], acts: list[tuple[str, int, int]],
                   victim: int, asker: str) -> None:
    store = HubStore.embedded(tmp / "hub.db")
    await store.open()
    book = RequestBook(store, HubMetrics())
    service = HubService.build(store, book, HubMetrics())
    try:
        for rid in RETAILERS:
            await service.registry.put_retailer(DSO, rid, rid)
        truth: dict[str, list[dict[str, float | str]]] = {}
        for i, h in enumerate(hist):
            cid = f"c{i}"
            for t, rid in periods_of(h):
                await service.registry.put_client(DSO, cid, {"retailer_id": rid, "contracted_power_kw": 5.0,
                                                    "valid_from": datetime.fromtimestamp(t, UTC)})
            truth[cid] = [{"valid_from": t, "retailer_id": r} for t, r in periods_of(h)]
            await service.data.upload_readings(DSO, [{"client_id": cid, "start": datetime.fromtimestamp(BASE, UTC),
                                                 "resolution_s": 21_600, "values_kwh": [1.0] * 4 * 40}])
        clients = sorted(truth)
        for kind, day, length in acts:
            start = BASE + day * DAY
            if kind == "emergency":
                start = max(start, BASE) + length * 3600
                targets = [c for c in clients if supplier_at(truth[c], start) is not None]
                if targets:
                    await service.flexibility.create_emergency(DSO, {
                        "client_ids": targets, "start": datetime.fromtimestamp(start, UTC), "duration_s": 600,
                        "power_limit_kw": 1.0}, None)
            elif kind == "billing":
                end = start + length * DAY
                targets = [c for c in clients if supply_spans(truth[c], start, end)]
                if targets:
                    await service.data.request_billing(DSO, {
                        "client_ids": targets, "period_start": datetime.fromtimestamp(start, UTC),
                        "period_end": datetime.fromtimestamp(end, UTC)}, None)
            else:
                cid = clients[victim % len(clients)]
                end = start + length * DAY
                spans = supply_spans(truth[cid], start, end)
                allowed = len(spans) == 1 and spans[0] == (asker, start, end)
                try:
                    got = await service.data.consumption_profile(Principal("retailer", asker), cid, start, end, 21_600)
                except (Forbidden, NotFound):  # NotFound: it supplied none of the range (neutral refusal)
                    assert not allowed, f"{asker} was refused {cid}'s profile over its own supply period"
                else:
                    assert allowed, f"{asker} got {cid}'s profile for a time it did not supply it: {spans}"
                    assert got["client_id"] == cid
        # What would go over MQTT: every message in every outbox.
        event(f"messages checked: {min(len(book.outbox), 5)}{'+' if len(book.outbox) >= 5 else ''}")
        for item in book.outbox.values():
            msg = decode(item.payload)
            if isinstance(msg, Request):
                at = msg.params.start.timestamp()
                for cid in msg.client_ids:
                    assert supplier_at(truth[cid], at) == item.retailer_id, (cid, item.retailer_id)
            elif isinstance(msg, BillingData):
                for c in msg.clients:
                    s, e = c.period_start.timestamp(), c.period_end.timestamp()
                    assert supply_spans(truth[c.client_id], s, e) == [(item.retailer_id, s, e)], c.client_id
                    for blk in c.readings:
                        first = blk.start.timestamp()
                        last = first + blk.resolution_s * (len(blk.values_kwh) - 1)
                        assert s <= first and last < e, "a reading outside the retailer's own period"
                        assert supplier_at(truth[c.client_id], first) == item.retailer_id
                        assert supplier_at(truth[c.client_id], last) == item.retailer_id
    finally:
        await store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hist=histories, acts=actions, victim=st.integers(0, 10), asker=st.sampled_from(RETAILERS))
def test_no_retailer_ever_gets_another_retailers_client(hist: list[list[tuple[int, str]]],
                                                        acts: list[tuple[str, int, int]], victim: int,
                                                        asker: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp), hist, acts, victim, asker))
