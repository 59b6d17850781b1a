"""The embedded store's group commit (issue 14, fourth round): batches handed in together are one transaction with
one WAL sync, each batch still atomic on its own and durable when its call returns; one that fails is rolled back
alone; a locked database fails every batch of the group and nothing of them is stored. On real SQLite files, read
back through a second connection (what another process, or the hub after ``kill -9``, would see)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from cloud_hub.storage import KVStore, Mutation, StoreUnavailable
from cloud_hub.storage.sqlite import SqliteKV

WAL_FRAME = 4096 + 24
"""A WAL frame: one page (SQLite's default 4 KiB) and its header."""


def _stored(db_path: Path, table: str) -> dict[str, dict[str, bytes]]:
    """Every row of ``table`` as another connection reads it from the file."""
    db = sqlite3.connect(db_path)
    try:
        out: dict[str, dict[str, bytes]] = {}
        for row, col, val in db.execute("SELECT row, col, val FROM cells WHERE tbl=?", (table,)):
            out.setdefault(row, {})[col] = bytes(val)
        return out
    finally:
        db.close()


def _wal_frames(db_path: Path) -> int:
    wal = db_path.with_name(db_path.name + "-wal")
    return max(0, wal.stat().st_size - 32) // WAL_FRAME if wal.exists() else 0


async def test_concurrent_batches_share_one_transaction_and_one_wal_sync(tmp_path: Path) -> None:
    db_path = tmp_path / "hub.db"
    kv = SqliteKV(db_path)
    await kv.open()
    try:
        before = _wal_frames(db_path)
        # Fifty writers at once (fifty requests' acks, say), each a batch of two rows of the same pages.
        await asyncio.gather(*(kv.batch([Mutation("requests", f"q{k:03d}", {"r:state": b"dispatching"}),
                                         Mutation("open_requests", f"q{k:03d}", {"d:deadline": b"1"})])
                               for k in range(50)))
        frames = _wal_frames(db_path) - before
        stored = _stored(db_path, "requests")
        assert len(stored) == 50 and len(_stored(db_path, "open_requests")) == 50
    finally:
        await kv.close()
    # One commit writes each changed page once: separate commits would append the same leaf page fifty times. The
    # first batch found nothing in flight and was committed at once; the 49 that came meanwhile, together after it.
    assert frames < 10, f"{frames} WAL frames for 50 small batches: they were not committed together"
    assert kv.commits.commits == 2 and kv.commits.writes == 50


async def test_a_failing_batch_is_rolled_back_alone(tmp_path: Path) -> None:
    db_path = tmp_path / "hub.db"
    kv = SqliteKV(db_path)
    await kv.open()
    try:
        good = [kv.batch([Mutation("requests", f"ok{k}", {"r:state": b"accepted"})]) for k in range(3)]
        bad = kv.batch([Mutation("requests", "half", {"r:state": b"accepted"}),  # written first, then undone
                        Mutation("no_such_table", "x", {"d:x": b"1"})])
        results = await asyncio.gather(good[0], bad, good[1], good[2], return_exceptions=True)
        assert results[0] is None and results[2] is None and results[3] is None
        assert isinstance(results[1], KeyError)
        assert kv.commits.commits == 2  # the first alone, at once; the failing one with the two others after it
        assert sorted(_stored(db_path, "requests")) == ["ok0", "ok1", "ok2"]
        # The store goes on: a later batch commits.
        await kv.batch([Mutation("requests", "later", {"r:state": b"accepted"})])
        assert "later" in _stored(db_path, "requests")
    finally:
        await kv.close()


async def test_a_locked_database_fails_every_batch_of_the_group_and_stores_none(tmp_path: Path) -> None:
    db_path = tmp_path / "hub.db"
    kv = SqliteKV(db_path, busy_timeout_ms=50)
    await kv.open()
    lock = sqlite3.connect(db_path, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # another process holds the database (tests/cloud_hub/test_storage_faults.py)
        results = await asyncio.gather(*(kv.batch([Mutation("requests", f"q{k}", {"r:state": b"accepted"})])
                                         for k in range(5)), return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        lock.execute("ROLLBACK")
        assert _stored(db_path, "requests") == {}
        await asyncio.gather(*(kv.batch([Mutation("requests", f"q{k}", {"r:state": b"accepted"})])
                               for k in range(5)))
        assert sorted(_stored(db_path, "requests")) == [f"q{k}" for k in range(5)]
    finally:
        lock.close()
        await kv.close()


@pytest.mark.parametrize("writers", [1, 20])
async def test_concurrent_batches_keep_each_batch_whole_and_in_order(kv: KVStore, writers: int) -> None:
    """On both backends: each batch's own order holds (a put, then the deletion of the same cell), whatever was
    committed with it."""
    await asyncio.gather(*(kv.batch([Mutation("requests", f"w{k}", {"r:a": b"1", "r:b": b"2"}),
                                     Mutation("requests", f"w{k}", delete=["r:a"])]) for k in range(writers)))
    for k in range(writers):
        assert await kv.get("requests", f"w{k}") == {"r:b": b"2"}


async def test_a_lone_batch_is_committed_at_once_and_what_comes_meanwhile_after_it(tmp_path: Path) -> None:
    db_path = tmp_path / "hub.db"
    kv = SqliteKV(db_path)
    await kv.open()
    try:
        await kv.batch([Mutation("requests", "alone", {"r:state": b"accepted"})])
        assert "alone" in _stored(db_path, "requests") and kv.commits.commits == 1
        first = asyncio.ensure_future(kv.batch([Mutation("requests", "first", {"r:state": b"accepted"})]))
        await asyncio.sleep(0)  # the first is committing now, from its caller
        rest = [kv.batch([Mutation("requests", f"then{k}", {"r:state": b"accepted"})]) for k in range(3)]
        await asyncio.gather(first, *rest)
        assert kv.commits.commits == 3 and kv.commits.writes == 5
        assert sorted(_stored(db_path, "requests")) == ["alone", "first", "then0", "then1", "then2"]
    finally:
        await kv.close()
