"""The HBase backend's own duties, against the HBase Thrift gateway test double: failover between gateway
addresses, reconnecting after the gateway drops its connections, and ``cloud-hub storage init``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import happybase
import pytest

from cloud_hub.storage import Mutation, StoreUnavailable
from cloud_hub.storage.hbase import HBaseKV, hbase_columns, parse_hosts
from sim.hbase_double import HBaseThriftDouble
from tests.broker_fixtures import free_port


def test_addresses_and_column_selectors() -> None:
    assert parse_hosts("h1:9091, h2") == [("h1", 9091), ("h2", 9090)]
    with pytest.raises(ValueError, match="at least one"):
        parse_hosts([])
    assert hbase_columns(["s:", "d:name"]) == ["s", "d:name"]


async def test_fails_over_to_the_next_thrift_gateway(hbase_double: HBaseThriftDouble) -> None:
    dead = free_port()
    kv = HBaseKV([f"127.0.0.1:{dead}", f"127.0.0.1:{hbase_double.port}"], timeout_ms=1000)
    await kv.open()
    try:
        await kv.batch([Mutation("retailers", "r1", {"d:name": b"One"})])
        assert await kv.get("retailers", "r1") == {"d:name": b"One"}
        assert kv.failovers >= 1
    finally:
        await kv.close()


async def test_hubs_starting_together_both_open_the_store(hbase_double: HBaseThriftDouble,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hubs (replicas) starting at once both see no tables and both create them: the one that comes second
    gets AlreadyExists for each, and opens all the same."""
    first = HBaseKV([f"127.0.0.1:{hbase_double.port}"], table_prefix="together")
    await first.open()
    await first.close()
    monkeypatch.setattr(happybase.Connection, "tables", lambda self: [])  # listed before the other created them
    second = HBaseKV([f"127.0.0.1:{hbase_double.port}"], table_prefix="together")
    await second.open()
    try:
        await second.batch([Mutation("retailers", "r1", {"d:name": b"One"})])
        assert await second.get("retailers", "r1") == {"d:name": b"One"}
    finally:
        await second.close()


async def test_reconnects_when_the_gateway_drops_connections(hbase_double: HBaseThriftDouble) -> None:
    kv = HBaseKV([f"127.0.0.1:{hbase_double.port}"], timeout_ms=1000, pool_size=1)
    await kv.open()
    try:
        await kv.batch([Mutation("retailers", "r1", {"d:name": b"One"})])
        assert hbase_double.drop_connections() >= 1  # as the real gateway does to connections idle for 60 s
        assert await kv.get("retailers", "r1") == {"d:name": b"One"}, "reconnected and retried transparently"
    finally:
        await kv.close()


async def test_unreachable_hbase_is_store_unavailable_quickly_then_recovers(hbase_double: HBaseThriftDouble
                                                                           ) -> None:
    kv = HBaseKV([f"127.0.0.1:{hbase_double.port}"], timeout_ms=500, retries=2, down_for_s=0.2)
    await kv.open()
    try:
        hbase_double.stop()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await kv.get("retailers", "r1")
        with pytest.raises(StoreUnavailable):  # while "down", without waiting for a timeout
            await kv.get("retailers", "r1")
        hbase_double.start()
        await asyncio.sleep(0.25)
        assert await kv.get("retailers", "r1") == {}
    finally:
        await kv.close()


def test_storage_init_creates_the_tables_idempotently(hbase_double: HBaseThriftDouble, tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(f'[hub]\nstorage = "hbase"\nhbase_hosts = ["127.0.0.1:{hbase_double.port}"]\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[hub]\nstorage = "hbase"\n')
    # The refused configuration touches no store: it runs alongside the two inits (one Python start-up less to
    # wait for in turn); the two inits run one after the other, the second finding the tables there.
    refused = subprocess.Popen([sys.executable, "-m", "cloud_hub.cli", "storage", "init", "--config", str(bad)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2):
            out = subprocess.run([sys.executable, "-m", "cloud_hub.cli", "storage", "init", "--config", str(config)],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert "hbase storage ready" in out.stdout
        tables = {t.decode() for t in hbase_double.store.tables}
        assert {"mhp_requests", "mhp_clients", "mhp_audit", "mhp_readings"} <= tables
        _, stderr = refused.communicate(timeout=60)
    finally:
        if refused.poll() is None:
            refused.kill()
            refused.communicate()
    assert refused.returncode == 2 and "hbase_hosts" in stderr
