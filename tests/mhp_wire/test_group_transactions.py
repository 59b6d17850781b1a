"""``mhp_wire.sqlite.GroupTransactions``, the one group transaction of the hub's store and the bridge's (issue 14,
fifth round: the bridge's same-shape copy is gone). The two ways a lone write is committed, on a real SQLite file:
at once from its caller (the hub's store), or after one turn of the event loop so that the writes of that turn share
its commit (the bridge's store); either way each write is durable when its call returns and a failing one is rolled
back alone."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from mhp_wire.sqlite import GroupTransactions, SqliteThread, StorageError
from retailer_bridge.store import BridgeStore

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT NOT NULL);"


def _insert(k: int) -> Callable[[sqlite3.Connection], int]:
    def op(db: sqlite3.Connection) -> int:
        db.execute("INSERT INTO t (k, v) VALUES (?, ?)", (k, f"v{k}"))
        return k
    return op


def _rows(path: Path) -> list[int]:
    db = sqlite3.connect(path)
    try:
        return [k for (k,) in db.execute("SELECT k FROM t ORDER BY k")]
    finally:
        db.close()


@pytest.mark.parametrize(("at_once", "commits"), [(True, 2), (False, 1)])
async def test_writes_of_one_turn_share_a_commit_unless_the_first_goes_at_once(
        tmp_path: Path, at_once: bool, commits: int) -> None:
    path = tmp_path / "g.db"
    sql = SqliteThread(path, SCHEMA, name="test-sql")
    await sql.open()
    group = GroupTransactions(sql, name="test-group", lone_write_at_once=at_once)
    try:
        # Ten writers started in the same turn of the loop, as ten messages read from one socket read would be.
        results = await asyncio.gather(*(group.tx(_insert(k)) for k in range(10)))
        assert results == list(range(10))
        assert _rows(path) == list(range(10))  # durable when the calls returned: another connection reads them
        # At once: the first write found nothing in flight and was committed alone, the nine others after it.
        # Waiting a turn: all ten in one transaction.
        assert (group.commits, group.writes) == (commits, 10)
    finally:
        await group.drain()
        await sql.close()


@pytest.mark.parametrize("at_once", [True, False])
async def test_a_failing_write_is_rolled_back_alone_either_way(tmp_path: Path, at_once: bool) -> None:
    path = tmp_path / "g.db"
    sql = SqliteThread(path, SCHEMA, name="test-sql")
    await sql.open()
    group = GroupTransactions(sql, name="test-group", lone_write_at_once=at_once)
    try:
        await group.tx(_insert(1))
        outcomes = await asyncio.gather(group.tx(_insert(2)), group.tx(_insert(1)), group.tx(_insert(3)),
                                        return_exceptions=True)
        assert outcomes[0] == 2 and outcomes[2] == 3
        assert isinstance(outcomes[1], StorageError) and "UNIQUE" in str(outcomes[1])
        assert _rows(path) == [1, 2, 3]
    finally:
        await group.drain()
        await sql.close()


async def test_the_bridge_store_uses_it_and_waits_a_turn(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path / "bridge.db")
    await store.open()
    try:
        assert isinstance(store.group, GroupTransactions)
        assert store.group.lone_write_at_once is False
    finally:
        await store.close()
