"""The hub's per-client work made cheaper (issue 14, fifth round) reads and writes exactly what it did before.

- A request row's cells are decoded in one decoder call (:func:`cloud_hub.store.decode_cells`): the same values as
  cell by cell, and a cell that is not JSON still fails as it did.
- The audit lines of one request are encoded once per distinct line (:func:`cloud_hub.store.audit_mutations`):
  every entry still gets its own row, read back per client by ``GET /v1/audit``'s store call, on both backends.
- The request view counts each retailer's clients by state in C and formats each distinct time once: the same
  answer as counting and formatting client by client.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_hub import codec
from cloud_hub.authz import Principal
from cloud_hub.book import ReportedOutcome
from cloud_hub.storage import KVStore, Row
from cloud_hub.store import AuditEntry, HubStore, audit_line, audit_mutation, audit_mutations, decode_cells
from cloud_hub.timeline import supplier_at
from cloud_hub.usecases.shared import iso
from mhp_wire.messages import ClientState
from tests.cloud_hub.embedded_hub import embedded_hub

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@given(st.dictionaries(st.text(min_size=1, max_size=12).map(lambda q: f"c:{q}"), JSON, max_size=30))
def test_a_row_decoded_at_once_is_the_row_decoded_cell_by_cell(values: dict[str, Any]) -> None:
    row: Row = {col: codec.dumps(v) for col, v in values.items()}
    decoded = decode_cells(row)
    assert decoded == {col: codec.loads(raw) for col, raw in row.items()}
    assert list(decoded) == list(row)  # the row's order, which the readers' dicts keep


@pytest.mark.parametrize("bad", [b"\xff not json", b"", b"1,2", b"[1", b"{}x"])
def test_a_cell_that_is_not_one_json_text_fails_as_it_did_cell_by_cell(bad: bytes) -> None:
    row: Row = {"r:state": b'"dispatching"', "c:a": b'{"state":"sent"}', "c:b": bad, "c:c": b"3"}
    with pytest.raises(orjson.JSONDecodeError) as cell_by_cell:
        _ = {col: codec.loads(raw) for col, raw in row.items()}
    with pytest.raises(orjson.JSONDecodeError) as at_once:
        decode_cells(row)
    assert str(at_once.value) == str(cell_by_cell.value)  # the bad cell's own error, not the joined array's


async def test_the_audit_lines_of_one_request_are_each_their_own_row_read_back_per_client(kv: KVStore) -> None:
    store = HubStore(kv)
    now = time.time()
    entries = [AuditEntry("dso", f"c{i}", "trigger_emergency", "dso:operator", True, "q1", at=now)
               for i in range(5)]
    entries += [AuditEntry("dso", "c0", "trigger_emergency", "dso:operator", True, "q1", at=now)]  # the same line
    entries += [AuditEntry("retailer:r1", "c1", "report_outcome", "none", False, "q1", at=now + 1,
                           detail="3 refused client ids")]
    mutations = audit_mutations(entries)
    assert len(mutations) == len(entries) == len({m.row for m in mutations})  # one row each, none merged
    for m, e in zip(mutations, entries, strict=True):
        alone = audit_mutation(e)
        assert m.table == alone.table == "audit"
        assert m.row.rsplit("|", 1)[0] == alone.row.rsplit("|", 1)[0]  # client|time, then a sequence number
        assert m.put == alone.put  # the same cell, byte for byte
    await store.audit(entries)
    c0 = await store.get_audit("c0", now - 5, now + 5)
    assert c0 == 2 * [{"at": now, "principal": "dso", "client_id": "c0", "action": "trigger_emergency",
                       "right": "dso:operator", "allowed": True, "ref": "q1"}]
    c1 = await store.get_audit("c1", now - 5, now + 5)
    assert c1 == [audit_line("c1", {"a:l": audit_mutation(entries[1]).put["a:l"]}),
                  {"at": now + 1, "principal": "retailer:r1", "client_id": "c1", "action": "report_outcome",
                   "right": "none", "allowed": False, "ref": "q1", "detail": "3 refused client ids"}]
    assert [len(await store.get_audit(f"c{i}", now - 5, now + 5)) for i in range(2, 5)] == [1, 1, 1]


def _progress_client_by_client(clients: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The view's per-retailer counts and per-client times as they were built before, client by client."""
    retailers: dict[str, dict[str, Any]] = {}
    times: dict[str, str | None] = {}
    for cid, c in sorted(clients.items()):
        for rid in c["retailers"]:
            r = retailers.setdefault(rid, {"clients": 0, "states": {}})
            r["clients"] += 1
            r["states"][c["state"]] = r["states"].get(c["state"], 0) + 1
        times[cid] = iso(c["updated_at"])
    return retailers, times


async def test_the_view_counts_and_times_are_those_of_a_count_client_by_client(tmp_path: Path) -> None:
    async with embedded_hub(tmp_path / "hub.db") as hub:
        store, book, service = hub.store, hub.book, hub.service
        for rid in ("r1", "r2"):
            await store.put_retailer(rid, rid.upper())
        # Two retailers' clients interleaved in id order, so that each retailer's states appear in a mixed order.
        ids = [f"c{i:03d}" for i in range(40)]
        await store.import_clients([(c, "r1" if i % 3 else "r2", 5.0, None, time.time() - 86_400)
                                    for i, c in enumerate(ids)])
        dso = Principal.parse("dso")
        start = datetime.now(UTC) + timedelta(minutes=5)
        accepted = await service.flexibility.create_emergency(dso, {
            "client_ids": ids, "start": start.isoformat(), "duration_s": 600, "power_limit_kw": 2.0}, None)
        await book.expanded(accepted.request_id)
        items = [i for i in book.due(time.time()) if i.request_id == accepted.request_id]
        await book.mark_sent(items, time.time())
        await book.settle_due(time.time() + book.sent_settle_s)  # the marks settled: written as ``sent``
        rid_of = {c: "r1" if i % 3 else "r2" for i, c in enumerate(ids)}
        # Three outcome commits (three distinct times), each a different mix of states.
        for part, state in ((ids[::2], ClientState.DELIVERED), (ids[5::7], ClientState.EXECUTED),
                            (ids[3::4], ClientState.REFUSED)):
            verdicts = await book.apply_outcomes([ReportedOutcome(rid_of[c], accepted.request_id, c, state,
                                                                  trace={"retailer_ms": 3.0}) for c in part])
            assert all(v.known for v in verdicts)
        stored = await store.get_request(accepted.request_id)
        assert stored is not None
        retailers, times = _progress_client_by_client(stored["clients"])
        view = await service.requests.get_request(dso, accepted.request_id)
        assert view["retailers"] == retailers
        assert list(view["retailers"]) == list(retailers)
        assert all(list(view["retailers"][r]["states"]) == list(retailers[r]["states"]) for r in retailers)
        assert {cid: c["updated_at"] for cid, c in view["clients"].items()} == times
        assert len(set(times.values())) > 2  # several commits' times, each formatted for its own clients
        assert {c["state"] for c in view["clients"].values()} >= {"sent", "delivered", "executed", "refused"}


async def test_the_supplier_read_before_the_202_answers_as_the_whole_client_rows_do(kv: KVStore) -> None:
    """:meth:`HubStore.suppliers_at` (what accepting a request reads per named client) reads a one-supplier row
    without building its period list: the same answer as the client rows read whole and the timeline's rule."""
    store = HubStore(kv)
    now = time.time()
    await store.import_clients([("old", "r1", 5.0, None, now - 86_400), ("later", "r2", 7.5, None, now + 3_600)])
    await store.put_clients([("moved", "r1", 4.0, None, now - 86_400)])
    await store.put_clients([("moved", "r2", 4.0, None, now - 3_600)])  # a supplier switch an hour ago
    ids = ["old", "later", "moved", "unknown"]
    whole = await store.get_clients(ids)
    for at in (now - 7_200, now, now + 7_200):
        expected = {cid: (supplier_at(c["suppliers"], at), c["contracted_power_kw"]) for cid, c in whole.items()}
        assert await store.suppliers_at(ids, at, power=True) == expected
        assert await store.suppliers_at(ids, at) == {cid: (rid, None) for cid, (rid, _) in expected.items()}
    assert (await store.suppliers_at(ids, now))["later"] == (None, None)  # not supplied yet: no retailer
    assert (await store.suppliers_at(ids, now))["moved"] == ("r2", None)
