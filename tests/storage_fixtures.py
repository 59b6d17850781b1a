"""Both storage backends behind one fixture: the embedded SQLite store, and HBase through happybase against the
HBase Thrift gateway *test double* (``sim/hbase_double.py``; HBase itself cannot run on these machines)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cloud_hub.storage import KVStore
from cloud_hub.storage.hbase import HBaseKV
from cloud_hub.storage.sqlite import SqliteKV
from sim.hbase_double import HBaseThriftDouble

__all__ = ["hbase_double", "kv"]


@pytest.fixture
def hbase_double() -> Iterator[HBaseThriftDouble]:
    """A running HBase Thrift gateway test double on a free port."""
    double = HBaseThriftDouble(port=0)
    double.start()
    try:
        yield double
    finally:
        double.stop()


@pytest.fixture(params=["sqlite", "hbase"])
async def kv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KVStore]:
    """An open store of each backend."""
    store: KVStore
    if request.param == "sqlite":
        store = SqliteKV(tmp_path / "kv.db")
    else:
        double = request.getfixturevalue("hbase_double")
        store = HBaseKV([f"127.0.0.1:{double.port}"], table_prefix="t", timeout_ms=2000)
    await store.open()
    try:
        yield store
    finally:
        await store.close()
