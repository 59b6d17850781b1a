"""The embedded store opens a file that another connection holds locked for longer than its busy timeout (a replica
sharing the file that starts at the same moment, or commits a large write on a loaded machine): it tries again
until the lock goes, instead of failing the hub's start-up with ``database is locked`` (seen once in a full suite,
`test_partition_acks_replicas`, a replica's start failing). Real SQLite files, a real lock held by another
connection on another thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from cloud_hub.storage import Mutation
from cloud_hub.storage.sqlite import SqliteKV


async def test_a_store_opens_once_another_connection_lets_go_of_its_lock(tmp_path: Path) -> None:
    db_path = tmp_path / "hub.db"
    holder = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # a fresh file in rollback mode: no other connection may even read it
    released = threading.Event()

    def let_go() -> None:
        holder.execute("COMMIT")
        holder.close()
        released.set()

    kv = SqliteKV(db_path, busy_timeout_ms=50)  # the lock outlasts the busy timeout many times over
    timer = asyncio.get_running_loop().call_later(0.6, let_go)
    try:
        await kv.open()
        assert released.is_set(), "opened while the file was still locked"
        await kv.batch([Mutation("requests", "q1", {"r:state": b"accepted"})])
        assert (await kv.get("requests", "q1"))["r:state"] == b"accepted"
    finally:
        timer.cancel()
        if not released.is_set():
            let_go()
        await kv.close()
