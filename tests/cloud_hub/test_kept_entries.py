"""The expanded rows' client entries held in memory (issue 14, fourteenth round; ``cloud_hub.store.KeptEntries``).

An outcome commit or a round of ``sent`` marks of a large request reads its clients' entries from the hub's own
memory instead of storage; what it holds must be what storage holds after every write, a failed write must not
leave it ahead of storage, and a hub that shares its store with other replicas holds nothing.

In process: the hub's own use case, request book and change feed on a real SQLite file in ``tmp_path`` (no MQTT:
the retailer's outcomes are handed to the book as the relay hands them; ``embedded_hub`` with the change feed); a
storage failure is the file locked by another connection, as ``test_storage_faults`` makes it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cloud_hub.authz import Principal
from cloud_hub.book import ReportedOutcome, RequestBook
from cloud_hub.service import HubService
from cloud_hub.settings import HubSettings
from cloud_hub.storage import StoreUnavailable
from cloud_hub.store import HubStore, decode_cells
from mhp_wire.messages import ClientState
from tests.cloud_hub.embedded_hub import embedded_hub

N = 1_200
"""Clients of the request: at least ``expand_after_accept_min_clients`` (1,000), so it is accepted with a plan and
expanded, as a fan-out's is."""
CLIENTS = [f"c{i:05d}" for i in range(N)]


@dataclass
class Hub:
    store: HubStore
    book: RequestBook
    service: HubService
    path: Path
    reads: list[str]
    """Every column the request book asked storage for (``get_each`` of the ``requests`` table)."""


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    path = tmp_path / "hub.db"
    async with embedded_hub(path, feed=True, keep_entries=True) as h:
        store = h.store
        await store.put_retailer("r1", "R1")
        await store.import_clients([(c, "r1", 5.0, None, time.time() - 86_400) for c in CLIENTS])
        reads: list[str] = []
        get_each = store.kv.get_each

        async def recorded(table: str, wanted: dict[str, list[str] | None]) -> dict[str, Any]:
            if table == "requests":
                reads.extend(c for cols in wanted.values() for c in cols or ["<whole row>"])
            return await get_each(table, wanted)

        store.kv.get_each = recorded  # type: ignore[method-assign]
        yield Hub(store, h.book, h.service, path, reads)


async def accepted(hub: Hub) -> str:
    """A new emergency for every client, expanded (its messages queued)."""
    start = datetime.now(UTC) + timedelta(minutes=5)
    body = {"client_ids": CLIENTS, "start": start.isoformat(), "duration_s": 600, "power_limit_kw": 2.0}
    request = await hub.service.flexibility.create_emergency(Principal.parse("dso"), body, None)
    await hub.book.expanded(request.request_id)
    return request.request_id


def executed(request_id: str, clients: list[str]) -> list[ReportedOutcome]:
    return [ReportedOutcome("r1", request_id, c, ClientState.EXECUTED, {"shed": ["heater"]},
                            {"gateway_ms": 0.5, "retailer_ms": 12.0}) for c in clients]


def stored_entries(path: Path, request_id: str) -> dict[str, Any]:
    """Every client entry of the row, read from the file by another connection."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        rows = con.execute("SELECT col, val FROM cells WHERE tbl='requests' AND row=? AND col >= 'c:' AND col < 'c;'",
                           (request_id,)).fetchall()
    return decode_cells(dict(rows))


def held_entries(store: HubStore, request_id: str) -> dict[str, Any]:
    """What the store holds of the row's client entries (every client's column asked)."""
    assert store.kept is not None
    part = store.kept.split(request_id, [f"c:{c}" for c in CLIENTS])
    assert part is not None, "the row is not held"
    return dict(part[0])


async def test_an_outcome_commit_of_an_expanded_request_reads_no_client_entry_from_storage(hub: Hub) -> None:
    rid = await accepted(hub)
    hub.reads.clear()
    verdicts = await hub.book.apply(executed(rid, CLIENTS[:300]))
    assert all(v.changed for v in verdicts)
    assert hub.reads, "the commit read the request's own cells"
    assert not [c for c in hub.reads if c.startswith("c:")], "client entries were read from storage"
    # ... and what it wrote is what a read of the file finds, which is what the store holds
    on_file = stored_entries(hub.path, rid)
    assert {c: on_file[f"c:{c}"]["state"] for c in CLIENTS[:301]} == {
        **{c: "executed" for c in CLIENTS[:300]}, CLIENTS[300]: "pending"}
    assert held_entries(hub.store, rid) == on_file


async def test_the_marks_of_an_expanded_request_read_no_client_entry_and_agree_with_storage(hub: Hub) -> None:
    rid = await accepted(hub)
    await hub.book.apply(executed(rid, CLIENTS[:100]))
    items = [i for i in hub.book.due(time.time()) if i.request_id == rid]
    await hub.book.mark_sent(items, time.time())
    hub.reads.clear()
    assert await hub.book.settle_all() == len(items)
    assert not [c for c in hub.reads if c.startswith("c:")], "client entries were read from storage"
    on_file = stored_entries(hub.path, rid)
    assert sum(e["state"] == "sent" for e in on_file.values()) == N - 100
    assert held_entries(hub.store, rid) == on_file
    # a repeated outcome changes nothing, here as in storage; the rest move on from sent
    await hub.book.apply([*executed(rid, CLIENTS[:50]), *executed(rid, CLIENTS[100:400])])
    on_file = stored_entries(hub.path, rid)
    assert sum(e["state"] == "executed" for e in on_file.values()) == 400
    assert held_entries(hub.store, rid) == on_file


async def test_a_write_that_fails_drops_the_row_and_the_next_commit_reads_storage(hub: Hub) -> None:
    rid = await accepted(hub)
    assert hub.store.kept is not None and rid in hub.store.kept
    locker = sqlite3.connect(hub.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # storage unavailable: the commit below fails
    try:
        with pytest.raises(StoreUnavailable):
            await hub.book.apply(executed(rid, CLIENTS[:10]))
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert rid not in hub.store.kept, "a row whose write failed is still held"
    hub.reads.clear()
    verdicts = await hub.book.apply(executed(rid, CLIENTS[:10]))
    assert all(v.changed for v in verdicts), "the failed outcomes were applied in memory before"
    assert [c for c in hub.reads if c.startswith("c:")] == [f"c:{c}" for c in CLIENTS[:10]]


async def test_a_request_closed_by_its_last_outcome_is_held_no_longer(hub: Hub) -> None:
    rid = await accepted(hub)
    items = [i for i in hub.book.due(time.time()) if i.request_id == rid]
    await hub.book.mark_sent(items, time.time())
    await hub.book.on_acks([("r1", [i.msg_id for i in items])])
    assert hub.store.kept is not None and len(hub.store.kept) == N
    await hub.book.apply(executed(rid, CLIENTS))
    assert rid not in hub.store.kept and len(hub.store.kept) == 0
    # a late repeat after the close is answered from storage, as before
    hub.reads.clear()
    verdicts = await hub.book.apply(executed(rid, CLIENTS[:1]))
    assert verdicts[0].known and not verdicts[0].changed
    assert f"c:{CLIENTS[0]}" in hub.reads


def test_only_the_store_of_a_hub_without_replicas_holds_entries(tmp_path: Path) -> None:
    assert HubStore.from_settings(HubSettings(db_path=tmp_path / "a.db")).kept is not None
    assert HubStore.from_settings(HubSettings(db_path=tmp_path / "b.db", replica_id="h1")).kept is None
    assert HubStore.embedded(tmp_path / "c.db").kept is None


def test_the_oldest_rows_make_room_and_a_row_larger_than_the_room_is_not_held() -> None:
    from cloud_hub.store import KeptEntries

    kept = KeptEntries(limit=5)
    kept.keep("a", {"c:1": {"state": "pending"}, "c:2": {"state": "pending"}})
    kept.keep("b", {"c:1": {"state": "pending"}, "c:2": {"state": "pending"}})
    kept.keep("c", {"c:1": {"state": "pending"}, "c:2": {"state": "pending"}})
    assert "a" not in kept and "b" in kept and "c" in kept and len(kept) == 4
    kept.keep("d", {f"c:{i}": {"state": "pending"} for i in range(6)})
    assert "d" not in kept and len(kept) == 4
    kept.written("b", {"c:3": {"state": "sent"}, "r:state": "dispatching"}, ["c:1"], close=False)
    assert kept.split("b", ["c:1", "c:2", "c:3", "r:state"]) == (
        [("c:2", {"state": "pending"}), ("c:3", {"state": "sent"})], ["r:state"])
    assert len(kept) == 4


async def test_a_refused_backwards_report_leaves_the_held_entry_as_stored(hub: Hub) -> None:
    """A non-terminal backwards report (delivered, then sent) sets the retailer's state on the working entry before
    the move is refused and nothing is written: the held entry must not be that working entry (readers get copies)."""
    rid = await accepted(hub)
    client = CLIENTS[0]
    await hub.book.apply([ReportedOutcome("r1", rid, client, ClientState.DELIVERED, {}, {})])
    verdicts = await hub.book.apply([ReportedOutcome("r1", rid, client, ClientState.SENT, {}, {})])
    assert verdicts[0].known and not verdicts[0].changed
    on_file = stored_entries(hub.path, rid)
    assert on_file[f"c:{client}"]["state"] == "delivered"
    assert on_file[f"c:{client}"]["retailers"] == {"r1": "delivered"}
    assert held_entries(hub.store, rid) == on_file


def test_a_write_that_adds_clients_to_a_held_row_keeps_the_limit() -> None:
    from cloud_hub.store import KeptEntries

    kept = KeptEntries(limit=5)
    kept.keep("a", {"c:1": {"state": "pending"}, "c:2": {"state": "pending"}})
    kept.keep("b", {"c:1": {"state": "pending"}, "c:2": {"state": "pending"}})
    # a revision adds two clients to b: 6 > 5, the oldest other row (a) makes room
    kept.written("b", {"c:3": {"state": "pending"}, "c:4": {"state": "pending"}}, None, close=False)
    assert "a" not in kept and "b" in kept and len(kept) == 4
    # b alone grows past the limit: it is held no longer
    kept.written("b", {f"c:{i}": {"state": "pending"} for i in range(5, 7)}, None, close=False)
    assert "b" not in kept and len(kept) == 0


async def test_a_write_that_deletes_and_puts_one_client_holds_the_put_as_storage_does(tmp_path: Path) -> None:
    """Storage applies a mutation's delete before its put (``SqliteKV``): a column in both is there afterwards."""
    from cloud_hub.storage import Mutation
    from cloud_hub.storage.sqlite import SqliteKV
    from cloud_hub.store import KeptEntries

    kv = SqliteKV(tmp_path / "kv.db")
    await kv.open()
    try:
        await kv.batch([Mutation("requests", "a", {"c:1": b"pending", "c:2": b"pending"})])
        await kv.batch([Mutation("requests", "a", {"c:1": b"sent"}, delete=["c:1", "c:2"])])
        assert await kv.get("requests", "a") == {"c:1": b"sent"}
    finally:
        await kv.close()
    kept = KeptEntries(limit=5)
    kept.keep("a", {"c:1": {"state": "pending"}, "c:2": {"state": "pending"}})
    kept.written("a", {"c:1": {"state": "sent"}}, ["c:1", "c:2"], close=False)
    assert kept.split("a", ["c:1", "c:2"]) == ([("c:1", {"state": "sent"})], [])
    assert len(kept) == 1


async def test_a_closed_store_holds_nothing(tmp_path: Path) -> None:
    store = HubStore.embedded(tmp_path / "hub.db", keep_entries=True)
    await store.open()
    assert store.kept is not None
    store.kept.keep("rq1", {"c:1": {"state": "pending"}, "c:2": {"state": "pending"}})
    await store.close()
    assert "rq1" not in store.kept and len(store.kept) == 0


async def test_a_revision_of_a_held_row_holds_what_storage_holds(hub: Hub) -> None:
    from cloud_hub.api.requests import validate_body

    rid = await accepted(hub)
    await hub.book.apply(executed(rid, CLIENTS[:10]))
    await hub.service.revisions.revise(Principal.parse("dso"), rid, {"client_ids": CLIENTS[5:1100]}, None,
                                       validate_body)
    assert held_entries(hub.store, rid) == stored_entries(hub.path, rid)
    await hub.book.apply(executed(rid, CLIENTS[5:20]))
    on_file = stored_entries(hub.path, rid)
    # the revision's clients start again (their earlier outcome in their history), the ones it left are cancelled
    assert {c: on_file[f"c:{c}"]["state"] for c in (CLIENTS[6], CLIENTS[1100])} == {
        CLIENTS[6]: "pending", CLIENTS[1100]: "cancelled"}
    assert on_file[f"c:{CLIENTS[6]}"]["history"][0]["state"] == "executed"
    assert held_entries(hub.store, rid) == on_file


async def test_a_cancel_of_a_held_row_holds_what_storage_holds(hub: Hub) -> None:
    rid = await accepted(hub)
    await hub.book.apply(executed(rid, CLIENTS[:10]))
    await hub.service.flexibility.cancel(Principal.parse("dso"), rid)
    assert held_entries(hub.store, rid) == stored_entries(hub.path, rid)
    await hub.book.apply(executed(rid, CLIENTS[10:20]))
    assert held_entries(hub.store, rid) == stored_entries(hub.path, rid)


async def test_an_expired_row_is_held_no_longer(hub: Hub) -> None:
    rid = await accepted(hub)
    await hub.book.apply(executed(rid, CLIENTS[:10]))
    assert await hub.book.expire_due(time.time() + 10_000) == [rid]
    assert hub.store.kept is not None and rid not in hub.store.kept and len(hub.store.kept) == 0


async def test_a_cancelled_write_drops_the_row(hub: Hub) -> None:
    """A write cancelled while in flight may still commit: the row is held no longer, the next commit reads storage."""
    import asyncio

    rid = await accepted(hub)
    batch = hub.store.kv.batch
    committed = asyncio.Event()

    async def commit_then_hang(muts: Any) -> None:
        await batch(muts)
        committed.set()
        await asyncio.Event().wait()

    hub.store.kv.batch = commit_then_hang  # type: ignore[method-assign]
    task = asyncio.create_task(hub.book.apply(executed(rid, CLIENTS[:10])))
    await committed.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    hub.store.kv.batch = batch  # type: ignore[method-assign]
    assert hub.store.kept is not None and rid not in hub.store.kept
    hub.reads.clear()
    await hub.book.apply(executed(rid, CLIENTS[10:20]))
    assert [c for c in hub.reads if c.startswith("c:")] == [f"c:{c}" for c in CLIENTS[10:20]]
