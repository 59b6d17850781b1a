"""One contract, two backends: the embedded SQLite store and HBase (happybase against the Thrift test double)
must behave identically, for the raw HBase-shaped interface and for the hub's data on top of it."""

from __future__ import annotations

import asyncio

import pytest

from cloud_hub.storage import KVStore, Mutation
from cloud_hub.store import Conflict, HubStore


async def test_put_get_and_column_selection(kv: KVStore) -> None:
    await kv.batch([Mutation("clients", "c1", {"d:a": b"1", "d:b": b"2", "s:000000000000001": b"r1"})])
    assert await kv.get("clients", "c1") == {"d:a": b"1", "d:b": b"2", "s:000000000000001": b"r1"}
    assert await kv.get("clients", "c1", ["d:a"]) == {"d:a": b"1"}
    assert await kv.get("clients", "c1", ["s:"]) == {"s:000000000000001": b"r1"}
    assert await kv.get("clients", "c1", ["d:b", "s:"]) == {"d:b": b"2", "s:000000000000001": b"r1"}
    assert await kv.get("clients", "nobody") == {}


async def test_overwrite_and_delete_cells_and_rows(kv: KVStore) -> None:
    await kv.batch([Mutation("clients", "c1", {"d:a": b"1", "d:b": b"2"})])
    await kv.batch([Mutation("clients", "c1", {"d:a": b"one"}, delete=["d:b"])])
    assert await kv.get("clients", "c1") == {"d:a": b"one"}
    await kv.batch([Mutation("clients", "c1", delete=[])])
    assert await kv.get("clients", "c1") == {}


async def test_get_many_skips_missing_rows(kv: KVStore) -> None:
    await kv.batch([Mutation("clients", f"c{i}", {"d:n": str(i).encode()}) for i in range(5)])
    got = await kv.get_many("clients", ["c1", "c3", "zz"], ["d:n"])
    assert got == {"c1": {"d:n": b"1"}, "c3": {"d:n": b"3"}}
    await kv.batch([Mutation("clients", "c1", {"d:m": b"m", "s:x": b"x"})])
    each = await kv.get_each("clients", {"c1": ["d:m", "s:"], "c2": None, "c3": ["d:zz"], "zz": None})
    assert each == {"c1": {"d:m": b"m", "s:x": b"x"}, "c2": {"d:n": b"2"}}


async def test_scans_are_sorted_and_bounded(kv: KVStore) -> None:
    keys = ["a|1", "a|2", "a|3", "ab|1", "b|1", "a~"]
    await kv.batch([Mutation("readings", k, {"r:v": k.encode(), "r:w": b"x"}) for k in reversed(keys)])
    assert [k for k, _ in await kv.scan("readings")] == sorted(keys)
    assert [k for k, _ in await kv.scan("readings", prefix="a|")] == ["a|1", "a|2", "a|3"]
    assert [k for k, _ in await kv.scan("readings", start="a|2", stop="b|1")] == ["a|2", "a|3", "a~"]
    assert [k for k, _ in await kv.scan("readings", start="ab", stop="a|2")] == ["ab|1", "a|1"]
    assert [k for k, _ in await kv.scan("readings", prefix="a", limit=2)] == ["ab|1", "a|1"]
    rows = await kv.scan("readings", prefix="b|", columns=["r:v"])
    assert rows == [("b|1", {"r:v": b"b|1"})]
    with pytest.raises(ValueError, match="prefix"):
        await kv.scan("readings", prefix="a", start="a")
    ranges = await kv.scan_ranges("readings", [("a|2", "b|1"), ("zz", "zzz"), ("b|", "b|~")])
    assert [[k for k, _ in rows] for rows in ranges] == [["a|2", "a|3", "a~"], [], ["b|1"]]
    assert ranges[2] == [("b|1", {"r:v": b"b|1", "r:w": b"x"})]


async def test_batch_across_tables_applies_in_order(kv: KVStore) -> None:
    await kv.batch([Mutation("open_requests", "q1", {"d:deadline": b"1"}),
                    Mutation("requests", "q1", {"r:state": b"accepted", "c:c1": b"{}"}),
                    Mutation("requests", "q1", {"r:state": b"dispatching"}),
                    Mutation("open_requests", "q1", delete=[])])
    assert await kv.get("requests", "q1") == {"r:state": b"dispatching", "c:c1": b"{}"}
    assert await kv.scan("open_requests") == []


async def test_counters(kv: KVStore) -> None:
    assert await kv.increment("tariffs", "t1", "t:version") == 1
    assert await kv.increment("tariffs", "t1", "t:version", 5) == 6
    assert await kv.increment("tariffs", "t2", "t:version") == 1


async def test_check_and_put_compares_then_sets_one_cell(kv: KVStore) -> None:
    assert await kv.check_and_put("idempotency", "p|k", "d:claim", None, b"first") is True
    assert await kv.check_and_put("idempotency", "p|k", "d:claim", None, b"second") is False, "the cell exists"
    assert await kv.check_and_put("idempotency", "p|k", "d:claim", b"other", b"second") is False
    assert await kv.get("idempotency", "p|k") == {"d:claim": b"first"}
    assert await kv.check_and_put("idempotency", "p|k", "d:claim", b"first", b"second") is True
    await kv.batch([Mutation("idempotency", "p|k", {"d:answer": b"a"})])
    assert await kv.get("idempotency", "p|k") == {"d:claim": b"second", "d:answer": b"a"}, "other cells untouched"
    await kv.batch([Mutation("idempotency", "p|k", delete=["d:claim"])])
    assert await kv.check_and_put("idempotency", "p|k", "d:claim", None, b"third") is True, "deleted: absent again"
    with pytest.raises(KeyError):
        await kv.check_and_put("nope", "r", "d:c", None, b"x")


async def test_check_and_put_lets_one_of_many_concurrent_claims_win(kv: KVStore) -> None:
    won = await asyncio.gather(*(kv.check_and_put("idempotency", "p|race", "d:claim", None, str(i).encode())
                                 for i in range(20)))
    assert won.count(True) == 1
    assert (await kv.get("idempotency", "p|race"))["d:claim"] == str(won.index(True)).encode()


async def test_ping_writes_and_leaves_the_data_alone(kv: KVStore) -> None:
    await kv.batch([Mutation("retailers", "r1", {"d:name": b"One"})])
    assert await kv.ping() is None
    assert await kv.get("retailers", "r1") == {"d:name": b"One"}


async def test_hub_data_on_both_backends(kv: KVStore) -> None:
    store = HubStore(kv)
    assert await store.put_retailer("r1", "One") is True
    assert await store.put_retailer("r1", "One Energy") is False
    await store.put_retailer("r2", "Two")
    assert await store.retailer_ids() == ["r1", "r2"]
    assert await store.put_client("c1", "r1", 6.9, "f1", 100.0) is True
    assert await store.put_client("c1", "r2", 6.9, "f2", 200.0) is False
    with pytest.raises(Conflict, match="later valid_from"):
        await store.put_client("c1", "r1", 6.9, "f2", 150.0)
    client = await store.get_client("c1")
    assert client is not None
    assert [(p["valid_from"], p["retailer_id"]) for p in client["suppliers"]] == [(100.0, "r1"), (200.0, "r2")]
    assert await store.clients_on_feeder("f2") == ["c1"]
    assert await store.clients_on_feeder("f1") == [], "a client that moved feeder leaves the old index"
    stored, corrections = await store.put_readings([
        {"client_id": "c1", "start": 0.0, "resolution_s": 900, "values_kwh": [1.0, 2.0], "quality": "measured"}])
    assert (stored, corrections) == (1, 0)
    assert (await store.put_readings([{"client_id": "c1", "start": 900.0, "resolution_s": 900,
                                       "values_kwh": [5.0], "quality": "estimated"}]))[1] == 1
    blocks = await store.readings("c1", 0.0, 1800.0, lookback_s=0)
    assert [(b["start"], b["values_kwh"], b["corrected"]) for b in blocks] == [(0.0, [1.0, 2.0], False),
                                                                                (900.0, [5.0], True)]
    await store.put_measurements([("c1", 10.0, 2.5, "r1"), ("c1", 20.0, 3.5, "r1")])
    assert [m["active_power_kw"] for m in await store.measurements("c1", 0.0, 15.0)] == [2.5]
    assert await store.put_tariff({"tariff_id": "t", "periods": []}) == 1
    assert await store.put_tariff({"tariff_id": "t", "periods": []}) == 2
    assert (await store.current_tariff() or {})["version"] == 2
    await store.create_request("q1", {"type": "emergency", "state": "accepted", "deadline": 9e9},
                               {"c1": {"state": "pending"}}, {"m1": {"retailer_id": "r2"}}, {}, [], None)
    assert await store.open_request_ids() == ["q1"]
    req = await store.get_request("q1")
    assert req is not None and req["clients"] == {"c1": {"state": "pending"}} and "m1" in req["outbox"]
    await store.update_request("q1", {"c:c1": {"state": "executed"}}, delete=["o:m1"], close=True)
    req = await store.get_request("q1")
    assert req is not None and req["clients"]["c1"]["state"] == "executed" and req["outbox"] == {}
    assert await store.open_request_ids() == []


async def test_a_row_with_thousands_of_cells_and_a_selection_of_thousands(kv: KVStore) -> None:
    """A request of 5,000 clients is one row of 5,000 cells; reading 3,000 of them by name works on both."""
    cells = {f"c:client-{i:05d}": str(i).encode() for i in range(5000)}
    await kv.batch([Mutation("requests", "big", {**cells, "r:state": b"accepted"})])
    wanted = [f"c:client-{i:05d}" for i in range(0, 6000, 2)]
    got = await kv.get("requests", "big", [*wanted, "r:state"])
    assert len(got) == 2501 and got["c:client-04998"] == b"4998" and got["r:state"] == b"accepted"
