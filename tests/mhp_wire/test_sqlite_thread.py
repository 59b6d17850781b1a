"""The SQLite worker's transactions: committed when the function returns, rolled back when it or the commit
fails, and a non-durable one (``durable=False``) leaves the connection at ``synchronous=FULL`` for the next."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mhp_wire.sqlite import SqliteThread, StorageError


async def test_transactions_commit_roll_back_and_restore_durability(tmp_path: Path) -> None:
    db = SqliteThread(tmp_path / "t.db", """CREATE TABLE IF NOT EXISTS t (x);
        CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY);
        CREATE TABLE IF NOT EXISTS child (p REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);""", name="t")
    await db.open()
    try:
        await db.tx(lambda c: c.execute("INSERT INTO t VALUES (1)"))
        await db.tx(lambda c: c.execute("INSERT INTO t VALUES (2)"), durable=False)
        assert await db.read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2, "FULL again"

        def fails(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO t VALUES (3)")
            raise sqlite3.OperationalError("disk I/O error")

        with pytest.raises(StorageError, match="disk I/O"):
            await db.tx(fails, durable=False)
        assert await db.read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2
        assert await db.read(lambda c: [r[0] for r in c.execute("SELECT x FROM t ORDER BY x")]) == [1, 2]
        # A failing COMMIT (a deferred constraint) leaves SQLite's transaction open: it is rolled back, and the
        # connection serves the next transaction.
        await db.read(lambda c: c.execute("PRAGMA foreign_keys=ON"))
        with pytest.raises(StorageError, match="FOREIGN KEY"):
            await db.tx(lambda c: c.execute("INSERT INTO child VALUES (42)"), durable=False)
        assert await db.read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2
        await db.tx(lambda c: c.execute("INSERT INTO t VALUES (4)"))
        assert await db.read(lambda c: c.execute("SELECT count(*) FROM child").fetchone()[0]) == 0
    finally:
        await db.close()
    again = sqlite3.connect(tmp_path / "t.db")
    assert [r[0] for r in again.execute("SELECT x FROM t ORDER BY x")] == [1, 2, 4]
    again.close()
