"""The embedded store stages the audit log's puts (issue 14, session 12): appended to ``staged_cells`` in the same
transaction as the rest of their batch, merged into ``cells`` in key order in one transaction, before anything reads
or deletes in the table, periodically, and at open. Reads answer exactly what they answer without staging; a
``kill -9`` between staging and merge loses no line; a failed merge leaves the staged cells as they were; and the WAL
frames written per audit line fall. Real SQLite files throughout, read back through other connections."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cloud_hub.storage import KVStore, Mutation, StoreUnavailable
from cloud_hub.storage.sqlite import SqliteKV
from cloud_hub.store import AuditEntry, HubStore
from tests.cloud_hub.test_store_group_commit import WAL_FRAME

REPO = Path(__file__).resolve().parents[2]


def _count(db_path: Path, sql: str) -> int:
    """One number, as another connection reads it from the file."""
    db = sqlite3.connect(db_path)
    try:
        return int(db.execute(sql).fetchone()[0])
    finally:
        db.close()


def _staged(db_path: Path) -> int:
    return _count(db_path, "SELECT count(*) FROM staged_cells")


def _merged_audit(db_path: Path) -> int:
    return _count(db_path, "SELECT count(*) FROM cells WHERE tbl='audit'")


@pytest.fixture
async def staging_kv(tmp_path: Path) -> AsyncIterator[SqliteKV]:
    """An open embedded store staging the audit table, merging only when asked or read."""
    kv = SqliteKV(tmp_path / "hub.db", merge_interval_s=0)
    await kv.open()
    try:
        yield kv
    finally:
        await kv.close()


# -- the same answers with staging and without ------------------------------------------------------------------


def _script(seed: int, steps: int) -> list[tuple[str, Any]]:
    """A deterministic mix of writes and reads on the audit table (and one other), with overwrites and deletions."""
    rnd = random.Random(seed)
    clients = [f"c{k}" for k in range(8)]
    rows: list[str] = []
    ops: list[tuple[str, Any]] = []
    for step in range(steps):
        kind = rnd.choices(["put", "overwrite", "delete_cols", "delete_row", "read", "merge", "together", "counter"],
                           [30, 8, 4, 3, 25, 3, 5, 2])[0]
        if kind == "put" or not rows:
            muts = []
            for _ in range(rnd.randint(1, 12)):
                row = f"{rnd.choice(clients)}|{1_000_000 + step * 10 + rnd.randint(0, 9):015d}|{len(rows):06d}"
                rows.append(row)
                muts.append(Mutation("audit", row, {"a:l": f"line {step}".encode(),
                                                    **({"a:x": b"extra"} if rnd.random() < 0.3 else {})}))
            muts.append(Mutation("health", f"h{step % 3}", {"d:at": str(step).encode()}))
            rnd.shuffle(muts)
            ops.append(("batch", muts))
        elif kind == "overwrite":
            row = rnd.choice(rows)
            ops.append(("batch", [Mutation("audit", row, {"a:l": f"again {step}".encode()}),
                                  Mutation("audit", row, {"a:l": f"last {step}".encode(), "a:y": b"y"})]))
        elif kind == "delete_cols":
            row = rnd.choice(rows)
            # a put before the deletion in the same batch, one after it: order holds across the merge
            ops.append(("batch", [Mutation("audit", row, {"a:z": b"before"}),
                                  Mutation("audit", row, {"a:w": b"w"}, delete=["a:x", "a:z"]),
                                  Mutation("audit", rnd.choice(rows), {"a:l": f"after {step}".encode()})]))
        elif kind == "delete_row":
            ops.append(("batch", [Mutation("audit", rnd.choice(rows), {"a:l": b"put then gone"}),
                                  Mutation("audit", rnd.choice(rows), delete=[])]))
        elif kind == "together":  # several batches in one group commit
            ops.append(("gather", [[Mutation("audit", f"{c}|{2_000_000 + step:015d}|{k:06d}", {"a:l": b"g"})]
                                   for k, c in enumerate(rnd.sample(clients, 4))]))
        elif kind == "counter":
            ops.append(("increment", rnd.choice(rows)))
            ops.append(("check_and_put", rnd.choice(rows)))
        elif kind == "merge":
            ops.append(("merge", None))
        else:
            c = rnd.choice(clients)
            ops.append((rnd.choice(["get", "get_many", "get_many_cells", "get_each", "scan_prefix", "scan_range",
                                    "scan_limit", "scan_ranges"]), (c, rnd.sample(rows, min(5, len(rows))))))
    return ops


async def _play(kv: SqliteKV, ops: list[tuple[str, Any]], staged_seen: list[int]) -> list[Any]:
    answers: list[Any] = []
    for op, arg in ops:
        if op == "batch":
            await kv.batch(arg)
            staged_seen.append(_staged(Path(kv.path)))
        elif op == "gather":
            await asyncio.gather(*(kv.batch(m) for m in arg))
        elif op == "merge":
            await kv.merge()
        elif op == "increment":
            answers.append(await kv.increment("audit", arg, "a:n", 3))
        elif op == "check_and_put":
            answers.append(await kv.check_and_put("audit", arg, "a:l", None, b"claimed"))
            answers.append(await kv.get("audit", arg))
        else:
            client, some = arg
            answers.append(await _reads(kv, client, some)[op]())
    answers.append(await kv.scan("audit"))
    return answers


def _reads(kv: KVStore, client: str, some: list[str]) -> dict[str, Callable[[], Awaitable[Any]]]:
    """Every read of the interface on the audit table."""
    async def cells() -> list[tuple[str, str, bytes]]:
        return sorted(await kv.get_many_cells("audit", some))

    return {
        "get": lambda: kv.get("audit", some[0]),
        "get_many": lambda: kv.get_many("audit", some, ["a:l", "a:x"]),
        "get_many_cells": cells,
        "get_each": lambda: kv.get_each("audit", {r: (None if k % 2 else ["a:"]) for k, r in enumerate(some)}),
        "scan_prefix": lambda: kv.scan("audit", prefix=f"{client}|"),
        "scan_range": lambda: kv.scan("audit", start=f"{client}|000000001000100", stop=f"{client}|000000001000400",
                                      columns=["a:l"]),
        "scan_limit": lambda: kv.scan("audit", start=client, limit=3),
        "scan_ranges": lambda: kv.scan_ranges("audit", [(f"{client}|", f"{client}|\U0010ffff"), ("c1|", "c3|")]),
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_reads_answer_the_same_with_staging_and_without(tmp_path: Path, seed: int) -> None:
    ops = _script(seed, 400)
    answers: dict[str, list[Any]] = {}
    staged_seen: list[int] = []
    for name, tables in (("direct", ()), ("staged", ("audit",))):
        kv = SqliteKV(tmp_path / f"{name}.db", staged_tables=tables, merge_interval_s=0)
        await kv.open()
        try:
            answers[name] = await _play(kv, ops, staged_seen if tables else [])
        finally:
            await kv.close()
        if tables:
            assert kv.merges > 10, "the reads and deletions found staged cells to merge"
    assert max(staged_seen) > 20, "puts waited in staged_cells between merges"
    assert len(answers["staged"]) == len(answers["direct"]) > 100
    for k, (got, want) in enumerate(zip(answers["staged"], answers["direct"], strict=True)):
        assert got == want, f"answer {k} differs"
    # closing merged what was left: the file holds the same cells either way
    assert _staged(tmp_path / "staged.db") == 0
    assert _merged_audit(tmp_path / "staged.db") == _merged_audit(tmp_path / "direct.db")


async def test_the_hub_reads_its_audit_log_as_written(staging_kv: SqliteKV) -> None:
    """Through the hub's own API (``HubStore.audit`` / ``get_audit``, what ``GET /v1/audit`` answers): a line is
    read right after its write returned, while it is still staged, and the read merges nothing (it takes no write
    lock: a read of the log never waits for, nor fails with, a writer holding the file)."""
    store, db_path = HubStore(staging_kv), Path(staging_kv.path)
    now = time.time()
    await store.audit([AuditEntry("dso", f"c{k}", "trigger_emergency", "dso:grid-operator", ref="q1", at=now)
                       for k in range(5)])
    assert _staged(db_path) == 5 and _merged_audit(db_path) == 0
    got = await store.get_audit("c3", now - 1, now + 1)
    assert [(a["action"], a["ref"]) for a in got] == [("trigger_emergency", "q1")]
    assert _staged(db_path) == 5 and _merged_audit(db_path) == 0
    other = sqlite3.connect(db_path, isolation_level=None)
    try:  # another process holds the write lock (a replica's long write, a fault): the log is still read
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO ping VALUES (1)")
        assert [a["ref"] for a in await store.get_audit("c4", now - 1, now + 1)] == ["q1"]
    finally:
        other.execute("ROLLBACK")
        other.close()


# -- merges: periodic, after N cells, all or nothing ------------------------------------------------------------


class Steps:
    """An injected sleep that returns when the test lets it."""

    def __init__(self) -> None:
        self.go: asyncio.Queue[None] = asyncio.Queue()
        self.waiting = 0

    async def sleep(self, _: float) -> None:
        self.waiting += 1
        await self.go.get()


async def _until(cond: Callable[[], bool | Awaitable[bool]], turns: int = 2000) -> None:
    for _ in range(turns):
        got = cond()
        if await got if not isinstance(got, bool) else got:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


async def test_the_periodic_merge_and_the_merge_after_n_cells(tmp_path: Path) -> None:
    db_path = tmp_path / "hub.db"
    steps = Steps()
    kv = SqliteKV(db_path, merge_interval_s=1.0, merge_rows=50, sleep=steps.sleep)
    await kv.open()
    try:
        await _until(lambda: steps.waiting == 1)
        await kv.batch([Mutation("audit", f"c{k}|1|{k:06d}", {"a:l": b"x"}) for k in range(10)])
        assert _staged(db_path) == 10, "nothing merges before the interval passes"
        steps.go.put_nowait(None)  # the interval passed
        await _until(lambda: steps.waiting == 2)
        assert _staged(db_path) == 0 and _merged_audit(db_path) == 10 and kv.merges == 1
        await kv.batch([Mutation("audit", f"d{k}|1|{k:06d}", {"a:l": b"x"}) for k in range(60)])  # > merge_rows
        await _until(lambda: _staged(db_path) == 0)
        assert _merged_audit(db_path) == 70 and kv.merges == 2
    finally:
        await kv.close()


async def test_a_failed_merge_leaves_the_staged_cells_as_they_were(staging_kv: SqliteKV) -> None:
    kv, db_path = staging_kv, Path(staging_kv.path)
    await kv.batch([Mutation("audit", f"c{k}|1|{k:06d}", {"a:l": f"{k}".encode()}) for k in range(10)])
    other = sqlite3.connect(db_path, isolation_level=None)
    # a real failure in the middle of the merge: the insert of c5's cell (c0..c4 are already inserted by then)
    other.execute("CREATE TRIGGER refuse BEFORE INSERT ON cells WHEN NEW.row LIKE 'c5|%' "
                  "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(StoreUnavailable, match="refused"):
        await kv.merge()
    expected = [(f"c{k}|1|{k:06d}", f"{k}".encode()) for k in range(10)]
    rows = await kv.scan("audit")  # a scan reads the staged cells with the merged ones: no merge needed
    assert [(r, c["a:l"]) for r, c in rows] == expected
    assert _staged(db_path) == 10 and _merged_audit(db_path) == 0
    other.execute("DROP TRIGGER refuse")
    other.close()
    assert await kv.merge() == 10
    rows = await kv.scan("audit")
    assert [(r, c["a:l"]) for r, c in rows] == expected
    assert _staged(db_path) == 0 and _merged_audit(db_path) == 10


async def test_a_file_locked_at_open_opens_and_its_staged_cells_are_merged_once_it_is_free(tmp_path: Path) -> None:
    db_path = tmp_path / "hub.db"
    kv = SqliteKV(db_path, merge_interval_s=0)
    await kv.open()
    await kv.close()
    other = sqlite3.connect(db_path, isolation_level=None)
    # what a process killed between staging and merge leaves in the file
    other.executemany("INSERT INTO staged_cells VALUES ('audit', ?, 'a:l', ?)",
                      [(f"c{k}|1|{k:06d}", f"{k}".encode()) for k in range(3)])
    other.execute("BEGIN EXCLUSIVE")  # another process holds the database (tests/cloud_hub/test_storage_faults.py)
    kv = SqliteKV(db_path, busy_timeout_ms=50, merge_interval_s=0)
    try:
        await kv.open()  # the hub starts; the merge waits for the lock
        with pytest.raises(StoreUnavailable):
            await kv.get("audit", "c1|1|000001")  # not an answer without the staged cells
        other.execute("ROLLBACK")
        assert await kv.get("audit", "c1|1|000001") == {"a:l": b"1"}
        assert _staged(db_path) == 0 and _merged_audit(db_path) == 3
    finally:
        other.close()
        await kv.close()


# -- a kill -9 between staging and merge ------------------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import asyncio, sys, time
    from cloud_hub.storage.sqlite import SqliteKV
    from cloud_hub.store import AuditEntry, HubStore

    async def main() -> None:
        store = HubStore(SqliteKV(sys.argv[1], merge_interval_s=0))  # no periodic merge: staged until killed
        await store.open()
        for k in range(20):
            await store.audit([AuditEntry("dso", f"c{c}", "read_measurements", "dso:grid-operator", ref=f"q{k}",
                                          at=float(sys.argv[2]) + k) for c in range(10)])
        print("written", flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
""")


async def test_kill_9_between_staging_and_merge_loses_no_audit_line(tmp_path: Path) -> None:
    db_path = tmp_path / "hub.db"
    since = time.time()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _WRITER, str(db_path), str(since),
                                                stdout=asyncio.subprocess.PIPE,
                                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"written\n"
        assert _staged(db_path) == 200 and _merged_audit(db_path) == 0, "the lines wait staged when it dies"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    store = HubStore(SqliteKV(db_path, merge_interval_s=0))
    await store.open()  # merges what the killed process staged
    try:
        assert _staged(db_path) == 0 and _merged_audit(db_path) == 200
        for c in range(10):
            lines = await store.get_audit(f"c{c}", since - 1, since + 30)
            assert [a["ref"] for a in lines] == [f"q{k}" for k in range(20)]
    finally:
        await store.close()


# -- fewer WAL frames per audit line ----------------------------------------------------------------------------


async def test_wal_frames_per_audit_line_fall(tmp_path: Path) -> None:
    """A request's lines fall in 15 of 50 clients' key ranges. Written straight into ``cells``, each commit rewrites
    one leaf per client, and the splits of full leaves rewrite their siblings and the interior pages above them:
    ~2.2 frames per line here. Staged, a commit appends to one or two leaves (~4 frames per commit), and the merge
    writes each client's leaves once for all its lines: ~0.8 per line in all. Both measured here, the same way:
    frames are counted from the WAL's size while a reader holds an old snapshot (so no checkpoint restarts it); no
    periodic merge (one explicit merge at the end is counted); no timing."""
    unstaged = await _frames_per_line(tmp_path / "unstaged.db", ())
    staged = await _frames_per_line(tmp_path / "staged.db", ("audit",))
    assert staged < 0.5 * unstaged, f"{staged:.2f} WAL frames per audit line staged, {unstaged:.2f} unstaged"


async def _frames_per_line(db_path: Path, staged_tables: tuple[str, ...]) -> float:
    kv = SqliteKV(db_path, staged_tables=staged_tables, merge_interval_s=0)
    await kv.open()
    clients = [f"client-{k:04d}" for k in range(50)]
    try:
        # A log that already spans many leaves: 200 lines per client.
        await kv.batch([Mutation("audit", f"{c}|{1_000_000 + t:015d}|{t:06d}", {"a:l": b"x" * 140})
                        for t in range(200) for c in clients])
        await kv.merge()
        reader = sqlite3.connect(db_path, isolation_level=None)
        reader.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        await kv.batch([Mutation("health", "h", {"d:at": b"1"})])  # a frame not yet checkpointed: the snapshot's
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM cells").fetchone()
        wal = db_path.with_name(db_path.name + "-wal")
        before = wal.stat().st_size
        rnd = random.Random(7)
        lines = 0
        for q in range(30):  # 30 requests, one commit each, 15 lines each
            muts = [Mutation("audit", f"{c}|{2_000_000 + q:015d}|{q:06d}", {"a:l": b"y" * 140})
                    for c in sorted(rnd.sample(clients, 15))]
            await kv.batch(muts)
            lines += len(muts)
        merged = await kv.merge()  # what staging defers is counted: the merge's frames too
        assert merged == (lines if staged_tables else 0)
        frames = (wal.stat().st_size - before) // WAL_FRAME
        reader.execute("ROLLBACK")
        reader.close()
    finally:
        await kv.close()
    return frames / lines
