"""The embedded store's checkpoints off the write path (issue 14): a PASSIVE checkpoint on a connection and thread of
its own about every ``checkpoint_pages`` pages, the writer's own checkpoint at ``wal_autocheckpoint`` pages as the
bound. The WAL stays bounded under a long write load, and a ``kill -9`` in the middle of the writes loses no write
that was acknowledged. On real SQLite files; pages are counted from the WAL file, nothing is timed."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from broker_config.launcher import die_with_parent
from cloud_hub.storage import Mutation
from cloud_hub.storage.sqlite import SqliteKV

WAL_FRAME = 4096 + 24
"""A WAL frame: one page (SQLite's default 4 KiB) and its header."""

REPO = Path(__file__).resolve().parents[2]


def _wal_frames(db_path: Path) -> int:
    """The WAL's size in frames: the most it has held since it was created (SQLite reuses the file from its start
    after a checkpoint, it does not shrink it)."""
    wal = db_path.with_name(db_path.name + "-wal")
    return max(0, wal.stat().st_size - 32) // WAL_FRAME if wal.exists() else 0


def _audit_batch(k: int) -> list[Mutation]:
    """Four audit lines of ~1 KB under new keys: a page or two of new leaves per commit, as the hub's audit was
    written before it was staged (the WAL-bound tests write them straight into ``cells``, ``staged_tables=()``: a
    merge is one larger transaction, which the WAL holds whole whatever the bound)."""
    return [Mutation("audit", f"c{k % 7}|{k:07d}|{i}", {"a:line": bytes([65 + i]) * 1000}) for i in range(4)]


async def test_the_wal_stays_bounded_under_a_long_write_load(tmp_path: Path) -> None:
    db_path = tmp_path / "hub.db"
    bound = 400
    kv = SqliteKV(db_path, wal_autocheckpoint=bound, checkpoint_pages=100, staged_tables=())  # lines in cells
    await kv.open()
    try:
        high = 0
        for k in range(0, 3000, 3):  # three batches at a time: group commits, as under load
            await asyncio.gather(*(kv.batch(_audit_batch(k + j)) for j in range(3)))
            high = max(high, _wal_frames(db_path))
        assert kv.checkpoints > 0, "no checkpoint ran off the write path"
        assert len(await kv.scan("audit", prefix="c3|")) == 4 * len(range(3, 3000, 7))
    finally:
        await kv.close()
    written = db_path.stat().st_size // 4096
    assert written > 5 * bound, f"only {written} pages written: the load did not test the bound"
    # Whichever checkpoint ran (the background one paced at ~100 pages, or the writer's at 400), the WAL was
    # started over each time: it never held more than the bound and what commits added while a checkpoint ran.
    assert high <= 2 * bound, f"the WAL grew to {high} frames (bound {bound}) with {written} pages written"


async def test_without_the_background_checkpoint_the_writer_bounds_the_wal(tmp_path: Path) -> None:
    db_path = tmp_path / "hub.db"
    kv = SqliteKV(db_path, wal_autocheckpoint=200, checkpoint_pages=None, staged_tables=())  # lines in cells
    await kv.open()
    try:
        high = 0
        for k in range(1500):
            await kv.batch(_audit_batch(k))
            high = max(high, _wal_frames(db_path))
        assert kv.checkpoints == 0
    finally:
        await kv.close()
    # The commit that crosses the bound checkpoints; the next starts the WAL over. Past the bound: that one commit's
    # pages (four new lines, page splits, their parents: a dozen).
    assert high <= 200 + 30, f"the WAL grew to {high} frames past the writer's bound of 200"


CHILD = """
import asyncio, sys
from cloud_hub.storage import Mutation
from cloud_hub.storage.sqlite import SqliteKV

async def main() -> None:
    kv = SqliteKV(sys.argv[1], wal_autocheckpoint=400, checkpoint_pages=50)
    await kv.open()
    k = 0
    while True:
        audit = [Mutation("audit", f"c{k % 7}|{k:07d}|{i}", {"a:line": b"x" * 1000}) for i in range(4)]
        await asyncio.gather(kv.batch(audit), kv.batch([Mutation("requests", f"q{k:07d}", {"r:state": b"accepted"})]))
        print(k, flush=True)  # acknowledged: both batches are committed
        k += 1

asyncio.run(main())
"""


def test_kill_9_mid_writes_loses_no_acknowledged_write(tmp_path: Path) -> None:
    db_path = tmp_path / "hub.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(db_path)], stdout=subprocess.PIPE, env=env,
                            preexec_fn=die_with_parent())
    assert proc.stdout is not None
    acked: list[int] = []
    try:
        while len(acked) < 1500:  # ~6,000 pages written: the background checkpoint and the writer's have run
            line = proc.stdout.readline()
            assert line, f"the writer died after {len(acked)} writes"
            acked.append(int(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of the next writes
        rest = proc.stdout.read()
        proc.wait()
    acked += [int(line) for line in rest.decode().splitlines()]  # every line printed was acknowledged
    db = sqlite3.connect(db_path)  # recovers from the WAL the killed writer left
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        requests = {row for (row,) in db.execute("SELECT row FROM cells WHERE tbl='requests'")}
        audit = {row for (row,) in db.execute(  # merged, or still staged (sqlite.STAGED_TABLES): both are stored
            "SELECT row FROM cells WHERE tbl='audit' UNION SELECT row FROM staged_cells WHERE tbl='audit'")}
    finally:
        db.close()
    lost = [k for k in acked if f"q{k:07d}" not in requests
            or any(f"c{k % 7}|{k:07d}|{i}" not in audit for i in range(4))]
    assert not lost, f"{len(lost)} acknowledged writes lost, first {lost[:5]}"
    assert acked == list(range(len(acked)))
