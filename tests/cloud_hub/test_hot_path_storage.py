"""The storage side of the hub's hot path (issue 14, third round), on both backends: a batch whose puts are written
together keeps the order of its deletions, an audit line is one cell and the older six-cell form still reads,
the accepting write's supplier look-up agrees with the full client rows, and the cell codec reads what the stdlib
``json`` wrote."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cloud_hub import codec
from cloud_hub.storage import KVStore, Mutation
from cloud_hub.storage.sqlite import SqliteKV
from cloud_hub.store import AUDIT_LINE, AuditEntry, HubStore
from cloud_hub.timeline import supplier_at


async def test_puts_written_together_keep_the_order_of_deletions(kv: KVStore) -> None:
    await kv.batch([Mutation("requests", "q1", {"r:a": b"1", "r:b": b"1"}),
                    Mutation("requests", "q2", {"r:a": b"1"}),
                    Mutation("requests", "q1", delete=["r:a"]),       # after the put above
                    Mutation("requests", "q2", delete=[]),            # the whole row
                    Mutation("requests", "q3", {"r:x": b"1"}, delete=["r:y"])])
    assert await kv.get("requests", "q1") == {"r:b": b"1"}
    assert await kv.get("requests", "q2") == {}
    assert await kv.get("requests", "q3") == {"r:x": b"1"}


async def test_on_sqlite_a_put_after_a_deletion_of_the_same_cell_wins(tmp_path: Path) -> None:
    # Not on HBase: there a put and a deletion of one cell in one mutateRows carry the same timestamp, and the
    # deletion masks the put whatever their order (HBase's own rule, as the Thrift double applies it).
    kv = SqliteKV(tmp_path / "kv.db")
    await kv.open()
    try:
        await kv.batch([Mutation("requests", "q1", {"r:a": b"1"}), Mutation("requests", "q1", delete=["r:a"]),
                        Mutation("requests", "q1", {"r:a": b"2"}), Mutation("requests", "q2", delete=[]),
                        Mutation("requests", "q2", {"r:c": b"3"})])
        assert await kv.get("requests", "q1") == {"r:a": b"2"}
        assert await kv.get("requests", "q2") == {"r:c": b"3"}
    finally:
        await kv.close()


async def test_an_audit_line_is_one_cell_and_the_older_form_still_reads(kv: KVStore) -> None:
    store = HubStore(kv)
    now = time.time()
    await store.audit([AuditEntry("dso", "c1", "trigger_emergency", "dso:grid-operator", ref="q1", at=now),
                       AuditEntry("retailer:r2", "c1", "read_profile", "none", False, at=now + 1,
                                  detail="3 more")])
    rows = await kv.scan("audit", prefix="c1|")
    assert [set(cells) for _, cells in rows] == [{AUDIT_LINE}, {AUDIT_LINE}]
    # A row an earlier hub wrote, one cell per field.
    await kv.batch([Mutation("audit", f"c1|{int((now + 2) * 1000):015d}|999999", {
        "a:principal": b"dso", "a:action": b"read_profile", "a:right": b"dso:grid-operator", "a:allowed": b"1",
        "a:ref": b"", "a:at": json.dumps(now + 2).encode()})])
    got = await store.get_audit("c1", now - 10, now + 10)
    assert got == [
        {"at": now, "principal": "dso", "client_id": "c1", "action": "trigger_emergency",
         "right": "dso:grid-operator", "allowed": True, "ref": "q1"},
        {"at": now + 1, "principal": "retailer:r2", "client_id": "c1", "action": "read_profile", "right": "none",
         "allowed": False, "ref": None, "detail": "3 more"},
        {"at": now + 2, "principal": "dso", "client_id": "c1", "action": "read_profile",
         "right": "dso:grid-operator", "allowed": True, "ref": None}]


async def test_the_supplier_look_up_agrees_with_the_client_rows(kv: KVStore) -> None:
    store = HubStore(kv)
    now = time.time()
    await store.put_clients([("a", "r1", 5.0, None, now - 1000), ("b", "r1", 3.0, "f1", now - 1000),
                             ("late", "r2", 2.0, None, now + 1000)])
    await store.put_clients([("b", "r2", 3.0, "f1", now - 10)])  # a supplier switch
    wanted = ["a", "b", "late", "nobody"]
    for at in (now - 2000, now - 500, now - 10, now, now + 2000):
        full = await store.get_clients(wanted)
        lean = await store.suppliers_at(wanted, at, power=True)
        assert set(lean) == set(full) == {"a", "b", "late"}
        for cid, c in full.items():
            assert lean[cid] == (supplier_at(c["suppliers"], at), c["contracted_power_kw"]), (cid, at)


@pytest.mark.parametrize("value", [
    {"retailers": {"r1": "pending"}, "state": "pending", "detail": {}, "trace": {}, "updated_at": 1.5e9 + 0.123},
    {"text": "Olá — ünïcode", "n": [1, 2.5, -3e-7, None, True], "nested": {"k": {"k": []}}},
])
def test_the_cell_codec_reads_what_json_wrote_and_json_reads_what_it_writes(value: dict[str, object]) -> None:
    old = json.dumps(value, separators=(",", ":"), default=str).encode()
    assert codec.loads(old) == value
    assert json.loads(codec.dumps(value)) == value
