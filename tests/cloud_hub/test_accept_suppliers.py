"""Accepting a request reads each named client's supplier cells as flat triples and answers the common one-period
client by comparing cell names (issue 14, sixth round, ``HubStore.suppliers_at``): the same answers as the
supplier periods' rule (:func:`cloud_hub.timeline.supplier_at`) on both storage backends, and through the real
HTTP API the same accepted clients, refusals, stored request and data access log, also across a supplier change
between two requests (nothing is cached: every request reads storage).

Storage: the embedded SQLite store and HBase through happybase against the Thrift test double; the API tests run a
real hub (uvicorn, a real Mosquitto) on each backend.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from cloud_hub.storage import KVStore, Mutation
from cloud_hub.store import HubStore, supplier_cell_upto
from cloud_hub.timeline import supplier_at
from tests.hub_fixtures import HubHandle
from tests.waiting import eventually


def _begun(ms: int, at: float) -> bool:
    """The rule the accepting path had before: a period starting at ``ms`` has begun at ``at``."""
    return ms / 1000 <= at


def _cell(ms: int) -> str:
    return f"s:{max(0, ms):015d}"


@pytest.mark.parametrize("at", [
    0.0, -0.0, -1.0, 0.0005, 0.001, 0.0015, 0.1, 0.3, 1.0, 2.5, 1e9 + 0.123, 1e12 + 0.999, 1e15 - 1, 1e16, 1e300,
    -1e300, math.inf, -math.inf, math.nan, 999_999_999_999.999,
])
def test_the_cell_name_bound_agrees_with_the_period_rule_at_the_edges(at: float) -> None:
    # Cells just below, at and above the bound, and the extremes of the 15-digit field.
    guess = 0 if not math.isfinite(at) else int(max(-10, min(at * 1000, 10**15 + 10)))
    for ms in {0, 1, 10**15 - 1, *range(max(0, guess - 3), guess + 4)}:
        if ms > 10**15 - 1:
            continue
        assert (_cell(ms) <= supplier_cell_upto(at)) == _begun(ms, at), (ms, at, supplier_cell_upto(at))


def test_the_cell_name_bound_agrees_with_the_period_rule_around_now() -> None:
    rng = random.Random(14)  # a fixed seed: the same cases every run, around the current time
    now_ms = round(time.time() * 1000)
    for _ in range(20_000):
        ms = now_ms + rng.randint(-86_400_000, 86_400_000)
        # ``at`` as the hub gets it: a parsed time in seconds, exactly on a millisecond, a hair off it, or anywhere.
        at = rng.choice([ms / 1000, (ms + rng.choice([-1, 0, 1])) / 1000, ms / 1000 + rng.uniform(-0.002, 0.002),
                         (ms + rng.randint(-5000, 5000)) / 1000 + rng.random() / 1000])
        assert (_cell(ms) <= supplier_cell_upto(at)) == _begun(ms, at), (ms, at)


async def test_get_many_cells_are_get_many_flattened(kv: KVStore) -> None:
    await kv.batch([Mutation("clients", "c1", {"d:n": b"1", "s:000000000000001": b"r1"}),
                    Mutation("clients", "c2", {"d:n": b"2", "s:000000000000001": b"r1", "s:000000000000009": b"r2"}),
                    Mutation("clients", "c3", {"d:n": b"3"})])
    for columns in (["s:"], ["d:n"], None, ["s:", "d:n"]):
        many = await kv.get_many("clients", ["c1", "c2", "c3", "zz", "c1"], columns)
        cells = await kv.get_many_cells("clients", ["c1", "c2", "c3", "zz", "c1"], columns)
        flat = [(r, c, v) for r, row in many.items() for c, v in row.items()]
        assert sorted(cells) == sorted(flat), columns  # c1 named twice, answered once
        assert all(isinstance(t, tuple) and len(t) == 3 for t in cells)
    assert await kv.get_many_cells("clients", ["zz"], ["s:"]) == []
    far_apart = ["c1", *(f"x{i}" for i in range(600)), "c1"]  # in two of SQLite's 500-id statements
    assert sorted(await kv.get_many_cells("clients", far_apart, ["s:"])) == [("c1", "s:000000000000001", b"r1")]


def _reference(client: dict[str, Any] | None, at: float, power: bool) -> tuple[str | None, float | None] | None:
    """What the client's stored record says: its retailer at ``at`` by the supplier periods' rule."""
    if client is None:
        return None
    return supplier_at(client["suppliers"], at), client["contracted_power_kw"] if power else None


async def test_suppliers_at_answers_what_the_client_records_say(kv: KVStore) -> None:
    store = HubStore(kv)
    now = time.time()
    switch = round(now + 3600, 3)
    clients = [(f"old{i:03d}", "r1" if i % 3 else "r2", 5.0 + i, None, now - 86_400) for i in range(40)]
    clients += [("future", "r1", 3.0, None, now + 7200), ("switched", "r1", 4.0, None, now - 86_400)]
    await store.put_clients(clients)
    await store.put_clients([("switched", "r2", 4.0, None, switch)])  # a supplier switch in an hour
    ids = [c[0] for c in clients] + ["unknown", "old001"]
    records = await store.get_clients(ids)
    for at in (now - 2 * 86_400, now, switch - 0.001, switch - 0.0004, switch, switch + 0.0004, now + 7200,
               now + 7200.0001, now + 86_400):
        for power in (False, True):
            got = await store.suppliers_at(ids, at, power=power)
            want = {cid: _reference(records.get(cid), at, power) for cid in dict.fromkeys(ids)}
            assert got == {cid: w for cid, w in want.items() if w is not None}, (at, power)
    assert (await store.suppliers_at(["switched"], switch))["switched"] == ("r2", None)
    assert (await store.suppliers_at(["switched"], switch - 0.001))["switched"] == ("r1", None)
    assert (await store.suppliers_at(["future"], now))["future"] == (None, None)


# -- through the HTTP API, on both backends ----------------------------------------------------------------------

N = 1_050
"""Above the hub's ``expand_after_accept_min_clients`` (1,000): accepted compactly, expanded right after."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


async def _register(hub: HubHandle, clients: dict[str, str], valid_from: float) -> None:
    for rid in ("r1", "r2"):
        r = await hub.http.put(f"/v1/retailers/{rid}", json={"name": rid.upper()}, headers=hub.auth("admin"))
        assert r.status_code in (200, 201), r.text
    r = await hub.http.put("/v1/clients", headers=hub.auth("dso"), json={"clients": [
        {"client_id": cid, "retailer_id": rid, "contracted_power_kw": 6.9, "valid_from": _iso(valid_from)}
        for cid, rid in clients.items()]})
    assert r.status_code == 200, r.text


def _emergency(ids: list[str], start: float) -> dict[str, Any]:
    return {"client_ids": ids, "start": _iso(start), "duration_s": 600, "power_limit_kw": 1.5}


async def _view_when_expanded(hub: HubHandle, request_id: str, n: int) -> dict[str, Any]:
    for _ in range(500):
        r = await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))
        assert r.status_code == 200, r.text
        view: dict[str, Any] = r.json()
        if len(view["clients"]) == n:
            return view
        await asyncio.sleep(0.02)
    raise AssertionError(f"request {request_id} did not show its {n} clients")


async def _audit(hub: HubHandle, client_id: str, since: float) -> list[dict[str, Any]]:
    r = await hub.http.get("/v1/audit", headers=hub.auth("dso"), params={
        "client_id": client_id, "from": _iso(since - 1), "to": _iso(time.time() + 60)})
    assert r.status_code == 200, r.text
    lines: list[dict[str, Any]] = r.json()["entries"]
    return lines


async def test_a_large_emergency_is_accepted_and_refused_as_the_records_say(hub_any: HubHandle) -> None:
    hub = hub_any
    now = time.time()
    clients = {f"c{i:05d}": ("r1" if i % 4 else "r2") for i in range(N)}
    await _register(hub, clients, now - 86_400)
    ids = list(clients)
    start = now + 600

    # Accepted: every client at the retailer its record names, one audit line each, once expanded.
    r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json=_emergency(ids, start))
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "accepted"
    view = await _view_when_expanded(hub, r.json()["request_id"], N)
    assert {cid: c["retailer_id"] for cid, c in view["clients"].items()} == clients
    assert {c["state"] for c in view["clients"].values()} <= {"pending", "sent"}
    request_id = r.json()["request_id"]

    async def audit_lines() -> list[dict[str, Any]]:
        return [a for a in await _audit(hub, "c00001", now) if a.get("ref") == request_id]

    # The expansion writes its audit lines in chunks beside the clients' entries: the view may be whole first.
    lines = await eventually(audit_lines, "c00001's audit line of the request")
    assert len(lines) == 1 and lines[0]["allowed"] is True and lines[0]["principal"] == "dso"

    # An id that names no client: 404 naming it, nothing stored for the request.
    r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json=_emergency([*ids, "nobody"], start))
    assert r.status_code == 404, r.text
    assert r.json()["error"] == "not_found" and "nobody" in r.json()["message"]

    # A client not supplied at the start (its first supplier begins later): 409 naming it.
    r = await hub.http.put("/v1/clients/late", headers=hub.auth("dso"), json={
        "retailer_id": "r1", "contracted_power_kw": 6.9, "valid_from": _iso(start + 3600)})
    assert r.status_code in (200, 201), r.text
    r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json=_emergency([*ids, "late"], start))
    assert r.status_code == 409, r.text
    assert "late" in r.json()["message"]
    r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"),
                            json=_emergency([*ids, "late"], start + 7200))
    assert r.status_code == 202, r.text  # supplied from then on

    # A retailer may not trigger an emergency, even for its own clients: 403, logged for the clients it named.
    r = await hub.http.post("/v1/emergencies", headers=hub.auth("r1"), json=_emergency(ids[1:4], start))
    assert r.status_code == 403, r.text
    refused = [a for a in await _audit(hub, "c00001", now) if a["allowed"] is False]
    assert refused and refused[-1]["principal"] == "retailer:r1"


async def test_a_supplier_change_between_two_requests_is_seen_by_the_second(hub_any: HubHandle) -> None:
    hub = hub_any
    now = time.time()
    clients = {f"c{i:05d}": "r1" for i in range(N)}
    await _register(hub, clients, now - 86_400)
    ids = list(clients)
    start = now + 600

    r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json=_emergency(ids, start))
    assert r.status_code == 202, r.text
    first = await _view_when_expanded(hub, r.json()["request_id"], N)
    assert {c["retailer_id"] for c in first["clients"].values()} == {"r1"}

    # c00007 switches to r2 from a minute from now (before the start); c00008 from after the request's start.
    for cid, since in (("c00007", now + 60), ("c00008", start + 60)):
        r = await hub.http.put(f"/v1/clients/{cid}", headers=hub.auth("dso"), json={
            "retailer_id": "r2", "contracted_power_kw": 6.9, "valid_from": _iso(since)})
        assert r.status_code in (200, 201), r.text

    r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json=_emergency(ids, start))
    assert r.status_code == 202, r.text
    second = await _view_when_expanded(hub, r.json()["request_id"], N)
    assert second["clients"]["c00007"]["retailer_id"] == "r2"
    assert second["clients"]["c00008"]["retailer_id"] == "r1"  # its switch comes after this request's start
    assert {cid for cid, c in second["clients"].items() if c["retailer_id"] == "r2"} == {"c00007"}
    # The first request keeps the retailers it was accepted with.
    r = await hub.http.get(f"/v1/requests/{first['request_id']}", headers=hub.auth("dso"))
    assert r.json()["clients"]["c00007"]["retailer_id"] == "r1"

    # Later than c00008's switch: both at r2.
    r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json=_emergency(ids, start + 120))
    assert r.status_code == 202, r.text
    third = await _view_when_expanded(hub, r.json()["request_id"], N)
    assert {cid for cid, c in third["clients"].items() if c["retailer_id"] == "r2"} == {"c00007", "c00008"}

