"""The embedded store's reads run on a read-only connection and thread of their own (issue 14): SQLite's WAL lets
them read the last committed state while the writer holds a transaction open or syncs its commit, instead of
queueing behind it on the one connection. On real SQLite files."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloud_hub.storage import Mutation, StoreUnavailable
from cloud_hub.storage.sqlite import SqliteKV

GUARD_S = 30.0
"""How long a read may take before the test calls it stuck behind the write (a deadlock guard, not a speed
figure: the read waits for nothing)."""


async def test_a_read_does_not_wait_for_a_write_transaction_in_flight(tmp_path: Path) -> None:
    kv = SqliteKV(tmp_path / "hub.db")
    await kv.open()
    inside, release = threading.Event(), threading.Event()

    def held_open(db: sqlite3.Connection) -> None:
        kv._write(db, [Mutation("requests", "q1", {"r:state": b"dispatching"}),
                       Mutation("requests", "q2", {"r:state": b"accepted"})])
        inside.set()
        release.wait()  # the write transaction stays open until the test has read

    try:
        await kv.batch([Mutation("requests", "q1", {"r:state": b"accepted"})])
        write = asyncio.ensure_future(kv.commits.tx(held_open))
        assert await asyncio.to_thread(inside.wait, GUARD_S), "the held write did not start"
        reads = asyncio.ensure_future(asyncio.gather(
            kv.get("requests", "q1"), kv.get_many("requests", ["q1", "q2"]),
            kv.scan("requests", prefix="q"), kv.get_many_cells("requests", ["q1", "q2"])))
        done, _ = await asyncio.wait({reads}, timeout=GUARD_S)
        assert done, "the reads waited for the write transaction"
        one, many, scanned, cells = reads.result()
        # The last committed state: the open transaction's writes are not seen.
        assert one == {"r:state": b"accepted"}
        assert many == {"q1": {"r:state": b"accepted"}}
        assert scanned == [("q1", {"r:state": b"accepted"})]
        assert cells == [("q1", "r:state", b"accepted")]
        release.set()
        await write
        assert await kv.get_many("requests", ["q1", "q2"]) == {"q1": {"r:state": b"dispatching"},
                                                               "q2": {"r:state": b"accepted"}}
    finally:
        release.set()
        await kv.close()


async def test_a_read_after_an_awaited_write_sees_it(tmp_path: Path) -> None:
    kv = SqliteKV(tmp_path / "hub.db")
    await kv.open()
    try:
        for k in range(100):
            # Group commits of several callers (the first alone at once, the others together after it), a
            # deletion, and the non-durable compare-and-set: each read issued after its write returned sees it.
            await asyncio.gather(*(kv.batch([Mutation("requests", f"q{k}-{w}", {"r:n": str(k).encode()})])
                                   for w in range(3)))
            assert await kv.get_many("requests", [f"q{k}-{w}" for w in range(3)]) == {
                f"q{k}-{w}": {"r:n": str(k).encode()} for w in range(3)}
            await kv.batch([Mutation("requests", f"q{k}-0", delete=[])])
            assert await kv.get("requests", f"q{k}-0") == {}
            assert await kv.check_and_put("idempotency", f"key{k}", "i:r", None, b"x")
            assert await kv.get("idempotency", f"key{k}") == {"i:r": b"x"}
        assert len(await kv.scan("requests", prefix="q")) == 200
    finally:
        await kv.close()


@contextlib.asynccontextmanager
async def _store_with_one_row(path: Path | str) -> AsyncIterator[SqliteKV]:
    """An open store holding request ``q``, read back once; closed at the end."""
    kv = SqliteKV(path)
    await kv.open()
    try:
        await kv.batch([Mutation("requests", "q", {"r:state": b"accepted"})])
        assert await kv.get("requests", "q") == {"r:state": b"accepted"}
        yield kv
    finally:
        await kv.close()


async def test_an_in_memory_store_reads_its_own_database() -> None:
    """A second connection to ``:memory:`` would be another, empty database: the reads stay on the one."""
    async with _store_with_one_row(":memory:") as kv:
        assert await kv.scan_ranges("requests", [("a", "z")]) == [[("q", {"r:state": b"accepted"})]]


async def test_an_error_on_the_reader_is_store_unavailable(tmp_path: Path) -> None:
    async with _store_with_one_row(tmp_path / "hub.db") as kv:
        other = sqlite3.connect(tmp_path / "hub.db", isolation_level=None)
        other.execute("DROP TABLE cells")  # what the reader's next statement finds: no such table
        other.close()
        with pytest.raises(StoreUnavailable, match="no such table"):
            await kv.get("requests", "q")
        with pytest.raises(StoreUnavailable, match="no such table"):
            await kv.scan("requests", prefix="q")


async def test_close_closes_every_connection(tmp_path: Path) -> None:
    async with _store_with_one_row(tmp_path / "hub.db"):
        pass  # opened, written to, read back and closed by the helper
    # The last connection closed checkpointed the WAL and removed it: nothing holds the file open.
    assert not (tmp_path / "hub.db-wal").exists()


async def test_a_read_that_fails_half_read_does_not_hold_its_snapshot(tmp_path: Path) -> None:
    """A read op that fails with a statement half read (its cursor in a local of the failed op): before, the error's
    traceback kept the statement, and with it the read's snapshot, past the COMMIT, so a read issued after an
    awaited write did not see it while the error lived (a caller that keeps it: ``replicas._join`` sleeps inside its
    ``except``). Found in review of the reader's merge."""
    kv = SqliteKV(tmp_path / "hub.db")
    await kv.open()
    try:
        await kv.batch([Mutation("requests", f"q{k}", {"r:state": b"accepted"}) for k in range(3)])

        def half_read() -> None:
            cur = kv._sql.db.execute("SELECT row FROM cells WHERE tbl='requests'")
            cur.fetchone()  # two rows left unread
            raise sqlite3.OperationalError("refused half way")

        with pytest.raises(StoreUnavailable) as kept:  # the error kept, with whatever it references
            await kv._read(half_read)
        await kv.batch([Mutation("requests", "z", {"r:state": b"accepted"})])
        assert await kv.get("requests", "z") == {"r:state": b"accepted"}, "an awaited write is seen"
        assert kept.value is not None
    finally:
        await kv.close()
