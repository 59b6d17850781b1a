"""The HBase Thrift gateway test double, driven by happybase over the real Thrift v1 wire protocol."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import happybase
import pytest
from thriftpy2.transport import TTransportException

from sim.hbase_double import Hbase_thrift, HBaseThriftDouble
from tests.waiting import eventually_blocking

REPO = Path(__file__).resolve().parents[2]
IOError_ = Hbase_thrift.IOError
GONE = (TTransportException, OSError)  # what a client sees when the gateway closed its connection


@pytest.fixture
def double() -> Iterator[HBaseThriftDouble]:
    """A running test double on a free port."""
    with HBaseThriftDouble(port=0) as running:
        yield running


def connect(port: int, **kwargs: object) -> happybase.Connection:
    return happybase.Connection("127.0.0.1", port, timeout=2000, autoconnect=True, **kwargs)


@pytest.fixture
def conn(double: HBaseThriftDouble) -> Iterator[happybase.Connection]:
    """A happybase connection to the double."""
    connection = connect(double.port)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def table(conn: happybase.Connection) -> happybase.Table:
    """Table ``t`` with families ``cf`` (2 versions) and ``x`` (default 3)."""
    conn.create_table("t", {"cf": {"max_versions": 2}, "x": {}})
    return conn.table("t")


def close_pool(pool: happybase.ConnectionPool) -> None:
    """happybase's pool has no close(): close its idle connections."""
    while not pool._queue.empty():
        pool._queue.get_nowait().close()


# --- tables ---------------------------------------------------------------------------------------------------


def test_tables_and_families(conn: happybase.Connection) -> None:
    conn.create_table("b", {"cf": {"max_versions": 5}, "meta": {}})
    conn.create_table("a", {"cf": None})
    assert conn.tables() == [b"a", b"b"]
    families = conn.table("b").families()
    assert sorted(families) == [b"cf", b"meta"]
    assert families[b"cf"]["max_versions"] == 5
    assert families[b"meta"]["max_versions"] == 3
    assert len(conn.table("b").regions()) == 1

    with pytest.raises(Hbase_thrift.AlreadyExists):
        conn.create_table("a", {"cf": {}})
    with pytest.raises(IOError_, match="TableNotDisabledException"):
        conn.delete_table("a")
    conn.disable_table("a")
    assert not conn.is_table_enabled("a")
    with pytest.raises(IOError_, match="TableNotEnabledException"):
        conn.table("a").row(b"r")
    conn.enable_table("a")
    conn.delete_table("a", disable=True)
    assert conn.tables() == [b"b"]
    with pytest.raises(IOError_, match="TableNotFoundException"):
        conn.table("a").put(b"r", {b"cf:q": b"v"})
    with pytest.raises(IOError_, match="TableNotFoundException"):
        conn.table("a").families()


def test_table_prefix_is_client_side(double: HBaseThriftDouble) -> None:
    prefixed = connect(double.port, table_prefix="app")
    try:
        prefixed.create_table("kv", {"cf": {}})
        prefixed.table("kv").put(b"r", {b"cf:q": b"v"})
        assert prefixed.tables() == [b"kv"]
        assert prefixed.client.getTableNames() == [b"app_kv"]
    finally:
        prefixed.close()


# --- reads and writes -----------------------------------------------------------------------------------------


def test_put_row_rows_and_columns(table: happybase.Table) -> None:
    table.put(b"r1", {b"cf:a": b"1", b"cf:b": b"2", b"x:c": b"3", b"cf:": b"empty"})
    table.put(b"r2", {b"cf:a": b"4"})
    assert table.row(b"r1") == {b"cf:a": b"1", b"cf:b": b"2", b"x:c": b"3", b"cf:": b"empty"}
    assert table.row(b"r1", columns=[b"cf:a", b"x"]) == {b"cf:a": b"1", b"x:c": b"3"}
    assert table.row(b"r1", columns=[b"x"]) == {b"x:c": b"3"}
    # As in HBase >= 0.96 (HBASE-9549): "cf:" is the column with the empty qualifier, "cf" the whole family.
    assert table.row(b"r1", columns=[b"cf:"]) == {b"cf:": b"empty"}
    assert table.row(b"missing") == {}
    value, ts = table.row(b"r2", include_timestamp=True)[b"cf:a"]
    assert value == b"4" and abs(ts - time.time() * 1000) < 60_000
    # Missing rows are left out, found ones come back in the order asked.
    assert table.rows([b"r2", b"nope", b"r1"], columns=[b"cf:a"]) == [(b"r2", {b"cf:a": b"4"}),
                                                                       (b"r1", {b"cf:a": b"1"})]


def test_versions_and_timestamps(table: happybase.Table) -> None:
    for ts in (10, 20, 30):
        table.put(b"r", {b"cf:a": b"v%d" % ts, b"x:a": b"w%d" % ts}, timestamp=ts)
    # cf keeps 2 versions, x the default 3; newest first.
    assert table.cells(b"r", b"cf:a", include_timestamp=True) == [(b"v30", 30), (b"v20", 20)]
    assert table.cells(b"r", b"x:a") == [b"w30", b"w20", b"w10"]
    assert table.cells(b"r", b"x:a", versions=1) == [b"w30"]
    # "As of" a timestamp is HBase's time range [0, timestamp): exclusive.
    assert table.cells(b"r", b"x:a", timestamp=30) == [b"w20", b"w10"]
    assert table.row(b"r", timestamp=30) == {b"cf:a": b"v20", b"x:a": b"w20"}
    assert table.rows([b"r"], timestamp=20) == [(b"r", {b"x:a": b"w10"})]
    # The same coordinates again replace the value; an older version beyond maxVersions is dropped at once.
    table.put(b"r", {b"cf:a": b"again"}, timestamp=30)
    table.put(b"r", {b"cf:a": b"ancient"}, timestamp=5)
    assert table.cells(b"r", b"cf:a", include_timestamp=True) == [(b"again", 30), (b"v20", 20)]
    # A server timestamp is "now", newer than these.
    table.put(b"r", {b"cf:a": b"now"})
    assert table.cells(b"r", b"cf:a") == [b"now", b"again"]


def test_deletes(conn: happybase.Connection, table: happybase.Table) -> None:
    table.put(b"r", {b"cf:a": b"1", b"cf:b": b"2", b"x:c": b"3"})
    table.delete(b"r", columns=[b"cf:a"])
    assert table.row(b"r") == {b"cf:b": b"2", b"x:c": b"3"}
    table.delete(b"r", columns=[b"x"])  # a whole family
    assert table.row(b"r") == {b"cf:b": b"2"}
    table.delete(b"r")
    assert table.row(b"r") == {}
    assert list(table.scan()) == []

    # A delete at a timestamp removes that version and older ones only.
    table.put(b"t", {b"x:a": b"10"}, timestamp=10)
    table.put(b"t", {b"x:a": b"20"}, timestamp=20)
    table.delete(b"t", columns=[b"x:a"], timestamp=15)
    assert table.cells(b"t", b"x:a") == [b"20"]
    # Its delete marker hides a later put at or below 15, as in HBase until a major compaction.
    table.put(b"t", {b"x:a": b"12"}, timestamp=12)
    assert table.cells(b"t", b"x:a") == [b"20"]
    conn.client.majorCompact(b"t")
    table.put(b"t", {b"x:a": b"12"}, timestamp=12)
    assert table.cells(b"t", b"x:a") == [b"20", b"12"]

    # The raw Thrift calls: deleteAll (a column or family) and deleteAllRow.
    table.put(b"u", {b"cf:a": b"1", b"x:b": b"2"})
    conn.client.deleteAll(b"t", b"u", b"cf:a", {})
    assert table.row(b"u") == {b"x:b": b"2"}
    conn.client.deleteAllRow(b"t", b"u", {})
    assert table.row(b"u") == {}

    # mutateRow (one row, which happybase does not use) applies its deletes first, then its puts.
    mutate = Hbase_thrift.Mutation
    table.put(b"m", {b"cf:a": b"old", b"cf:b": b"gone"})
    conn.client.mutateRow(b"t", b"m", [mutate(column=b"cf:a", value=b"new"), mutate(isDelete=True, column=b"cf:a"),
                                       mutate(isDelete=True, column=b"cf:b")], {})
    assert table.row(b"m") == {b"cf:a": b"new"}
    conn.client.mutateRowTs(b"t", b"m", [mutate(column=b"x:z", value=b"at7")], 7, {})
    assert table.cells(b"m", b"x:z", include_timestamp=True) == [(b"at7", 7)]


def test_counters(table: happybase.Table) -> None:
    assert table.counter_get(b"c", b"cf:n") == 0
    assert table.counter_inc(b"c", b"cf:n") == 1
    assert table.counter_inc(b"c", b"cf:n", 41) == 42
    assert table.counter_dec(b"c", b"cf:n", 2) == 40
    # The cell is the 8-byte big-endian signed long that happybase's counter_set writes too.
    assert table.row(b"c") == {b"cf:n": struct.pack(">q", 40)}
    table.counter_set(b"c", b"cf:n", -7)
    assert table.counter_inc(b"c", b"cf:n", 10) == 3
    table.put(b"c", {b"cf:text": b"abc"})
    with pytest.raises(IOError_, match="not a long"):
        table.counter_inc(b"c", b"cf:text")
    with pytest.raises(IOError_, match="NoSuchColumnFamilyException"):
        table.counter_inc(b"c", b"nope:n")


def test_check_and_put_and_append(conn: happybase.Connection, table: happybase.Table) -> None:
    put = Hbase_thrift.Mutation(column=b"cf:a", value=b"first")
    assert conn.client.checkAndPut(b"t", b"r", b"cf:a", None, put, {})  # only if absent
    assert not conn.client.checkAndPut(b"t", b"r", b"cf:a", None, put, {})
    second = Hbase_thrift.Mutation(column=b"cf:a", value=b"second")
    assert not conn.client.checkAndPut(b"t", b"r", b"cf:a", b"other", second, {})
    assert conn.client.checkAndPut(b"t", b"r", b"cf:a", b"first", second, {})
    assert table.row(b"r") == {b"cf:a": b"second"}
    cells = conn.client.append(Hbase_thrift.TAppend(table=b"t", row=b"r", columns=[b"cf:a"], values=[b"+"]))
    assert [c.value for c in cells] == [b"second+"]


# --- scans ----------------------------------------------------------------------------------------------------


@pytest.fixture
def filled(table: happybase.Table) -> happybase.Table:
    with table.batch() as batch:
        for i in range(10):
            batch.put(b"row%02d" % i, {b"cf:a": b"a%d" % i, b"cf:b": b"b%d" % i, b"x:c": b"c%d" % i})
        batch.put(b"other", {b"cf:a": b"o"})
        batch.put(b"row\xff", {b"cf:a": b"high"})
    return table


def keys(results: object) -> list[bytes]:
    return [key for key, _ in results]  # type: ignore[attr-defined]


def test_scan_ranges_prefix_limit_batch_size(filled: happybase.Table) -> None:
    all_keys = [b"other"] + [b"row%02d" % i for i in range(10)] + [b"row\xff"]
    assert keys(filled.scan()) == all_keys  # sorted by bytes
    assert keys(filled.scan(row_start=b"row03", row_stop=b"row06")) == [b"row03", b"row04", b"row05"]
    assert keys(filled.scan(row_start=b"row08")) == [b"row08", b"row09", b"row\xff"]
    assert keys(filled.scan(row_stop=b"row01")) == [b"other", b"row00"]
    assert keys(filled.scan(row_prefix=b"row0")) == [b"row%02d" % i for i in range(10)]
    assert keys(filled.scan(row_prefix=b"row", limit=3)) == [b"row00", b"row01", b"row02"]
    # batch_size is the rows fetched per scannerGetList round trip: many round trips, same result.
    assert keys(filled.scan(batch_size=2)) == all_keys
    assert keys(filled.scan(batch_size=3, limit=7)) == all_keys[:7]
    assert dict(filled.scan(row_prefix=b"row00", columns=[b"cf:b", b"x"])) == {
        b"row00": {b"cf:b": b"b0", b"x:c": b"c0"}}
    assert keys(filled.scan(columns=[b"x"])) == [b"row%02d" % i for i in range(10)]


def test_scan_reverse_sorted_partial_timestamp_filter(filled: happybase.Table) -> None:
    assert keys(filled.scan(row_start=b"row02", row_stop=b"other", reverse=True)) == [b"row02", b"row01", b"row00"]
    assert keys(filled.scan(row_prefix=b"row0", reverse=True, limit=2)) == [b"row09", b"row08"]
    [(_, ordered)] = filled.scan(row_prefix=b"row05", sorted_columns=True)
    assert list(ordered) == [b"cf:a", b"cf:b", b"x:c"]
    # scan_batching (TScan.batchSize) cuts rows into partial rows of at most that many cells.
    partial = list(filled.scan(row_prefix=b"row05", scan_batching=2))
    assert [len(cells) for _, cells in partial] == [2, 1]
    filled.put(b"row05", {b"cf:a": b"old"}, timestamp=1)
    filled.put(b"zz", {b"cf:a": b"old"}, timestamp=1)
    assert list(filled.scan(timestamp=2, columns=[b"cf:a"])) == [(b"row05", {b"cf:a": b"old"}),
                                                                  (b"zz", {b"cf:a": b"old"})]
    assert list(filled.scan(filter=b"PrefixFilter('row01') AND KeyOnlyFilter()", columns=[b"cf"])) == [
        (b"row01", {b"cf:a": b"", b"cf:b": b""})]
    assert list(filled.scan(row_prefix=b"row02", filter=b"FirstKeyOnlyFilter()")) == [(b"row02", {b"cf:a": b"a2"})]
    with pytest.raises(IOError_, match="filter not supported by the test double"):
        list(filled.scan(filter=b"SingleColumnValueFilter('cf', 'a', =, 'binary:a1')"))


def test_scanner_is_a_snapshot_and_closed_ids_are_refused(conn: happybase.Connection,
                                                          filled: happybase.Table) -> None:
    client = conn.client
    scanner = client.scannerOpenWithScan(b"t", Hbase_thrift.TScan(startRow=b"row", stopRow=b"row02"), {})
    filled.put(b"row00a", {b"cf:a": b"late"})
    assert [r.row for r in client.scannerGetList(scanner, 10)] == [b"row00", b"row01"]
    assert client.scannerGetList(scanner, 10) == []
    client.scannerClose(scanner)
    with pytest.raises(Hbase_thrift.IllegalArgument):
        client.scannerGet(scanner)
    prefixed = client.scannerOpenWithPrefix(b"t", b"row00", [b"cf:a"], {})
    assert [(r.row, sorted(r.columns)) for r in client.scannerGetList(prefixed, 10)] == [
        (b"row00", [b"cf:a"]), (b"row00a", [b"cf:a"])]
    client.scannerClose(prefixed)


# --- batches --------------------------------------------------------------------------------------------------


def test_batches(double: HBaseThriftDouble, table: happybase.Table) -> None:
    other = connect(double.port)
    try:
        seen = other.table("t")
        # batch_size counts cells (mutations), and sends as soon as it is reached.
        with table.batch(batch_size=2) as batch:
            batch.put(b"b1", {b"cf:a": b"1"})
            batch.put(b"b2", {b"cf:a": b"2"})
            assert keys(seen.scan()) == [b"b1", b"b2"]
            batch.put(b"b3", {b"cf:a": b"3"})
            assert keys(seen.scan()) == [b"b1", b"b2"]
        assert keys(seen.scan()) == [b"b1", b"b2", b"b3"]

        # transaction=True: an exception in the block sends nothing; without it, the batch is sent anyway.
        with pytest.raises(RuntimeError), table.batch(transaction=True) as batch:
            batch.put(b"tx", {b"cf:a": b"1"})
            raise RuntimeError("abandon")
        assert seen.row(b"tx") == {}
        with pytest.raises(RuntimeError), table.batch() as batch:
            batch.put(b"no-tx", {b"cf:a": b"1"})
            raise RuntimeError("still sent")
        assert seen.row(b"no-tx") == {b"cf:a": b"1"}

        # One mutateRows applies all puts, then all deletes: a delete wins over a put of the same batch.
        table.put(b"pd", {b"cf:a": b"old", b"cf:b": b"keep"})
        with table.batch() as batch:
            batch.delete(b"pd", columns=[b"cf:a"])
            batch.put(b"pd", {b"cf:a": b"new"})
        assert seen.row(b"pd") == {b"cf:b": b"keep"}
        with table.batch(timestamp=100) as batch:
            batch.put(b"ts", {b"x:a": b"at100"})
        assert seen.cells(b"ts", b"x:a", include_timestamp=True) == [(b"at100", 100)]
    finally:
        other.close()


def test_unknown_family_is_refused(conn: happybase.Connection, table: happybase.Table) -> None:
    with pytest.raises(IOError_, match="NoSuchColumnFamilyException: Column family nope does not exist"):
        table.put(b"r", {b"nope:a": b"1"})
    with pytest.raises(IOError_, match="NoSuchColumnFamilyException"):
        table.row(b"r", columns=[b"nope"])
    with pytest.raises(IOError_, match="NoSuchColumnFamilyException"):
        list(table.scan(columns=[b"nope:a"]))
    with pytest.raises(IOError_, match="NoSuchColumnFamilyException"):
        table.delete(b"r", columns=[b"nope:a"])
    with pytest.raises(Hbase_thrift.IllegalArgument, match="family:qualifier"):
        table.put(b"r", {b"cf": b"no qualifier"})
    # A batch over several rows fails per row, like HBase: the good rows are stored.
    with pytest.raises(IOError_, match=r"RetriesExhaustedWithDetailsException.*NoSuchColumnFamily"), \
            table.batch() as batch:
        batch.put(b"good", {b"cf:a": b"1"})
        batch.put(b"bad", {b"nope:a": b"1"})
    assert table.row(b"good") == {b"cf:a": b"1"}
    assert table.row(b"bad") == {}
    # Errors are answers: the connection is still fine.
    assert conn.tables() == [b"t"]


def test_unimplemented_calls_answer_an_error(conn: happybase.Connection, table: happybase.Table) -> None:
    with pytest.raises(IOError_, match="not implemented by the test double: getRegionInfo"):
        conn.client.getRegionInfo(b"t,,1")
    with pytest.raises(IOError_, match="not implemented by the test double: getRowOrBefore"):
        conn.client.getRowOrBefore(b"t", b"r", b"cf")
    table.put(b"r", {b"cf:a": b"1"})
    assert table.row(b"r") == {b"cf:a": b"1"}


# --- concurrency, restarts, faults ---------------------------------------------------------------------------


def test_connection_pool_from_threads(double: HBaseThriftDouble, table: happybase.Table) -> None:
    pool = happybase.ConnectionPool(3, host="127.0.0.1", port=double.port, timeout=2000)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                with pool.connection(timeout=2) as c:
                    t = c.table("t")
                    t.counter_inc(b"counter", b"cf:n")
                    t.put(b"w%d-%02d" % (n, i), {b"x:v": b"%d" % i})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,), name=f"pool-user-{n}") for n in range(6)]
    try:
        for thread in threads:
            thread.start()
    finally:
        for thread in threads:
            thread.join()
        close_pool(pool)
    assert errors == []
    assert table.counter_get(b"counter", b"cf:n") == 120
    assert len(list(table.scan(columns=[b"x"]))) == 120


def test_restart_keeps_data_and_clients_reconnect(double: HBaseThriftDouble, conn: happybase.Connection,
                                                  table: happybase.Table) -> None:
    table.put(b"r", {b"cf:a": b"kept"})
    pool = happybase.ConnectionPool(1, host="127.0.0.1", port=double.port, timeout=2000)
    try:
        port = double.port
        double.stop()
        assert not double.running and double.connection_count == 0
        with pytest.raises(GONE):
            table.row(b"r")
        double.start()
        assert double.port == port
        conn.close()  # happybase never reconnects by itself
        conn.open()
        assert table.row(b"r") == {b"cf:a": b"kept"}
        # The pool replaces the broken connection but re-raises: the caller must retry. (happybase drops the old
        # transport without closing its socket; close it here.)
        stale = pool._queue.queue[0].transport
        with pytest.raises(GONE), pool.connection() as c:
            c.table("t").row(b"r")
        stale.close()
        with pool.connection() as c:
            assert c.table("t").row(b"r") == {b"cf:a": b"kept"}
    finally:
        close_pool(pool)


def test_idle_connections_are_closed_and_can_be_dropped() -> None:
    with HBaseThriftDouble(idle_timeout=0.2) as double:
        c = connect(double.port)
        try:
            c.create_table("t", {"cf": {}})
            eventually_blocking(lambda: double.connection_count == 0)
            with pytest.raises(TTransportException, match="read 0 bytes"):
                c.tables()
            c.close()
            c.open()
            assert c.tables() == [b"t"]
            assert double.drop_connections() == 1
            with pytest.raises(GONE):
                c.tables()
        finally:
            c.close()


def test_garbage_and_abrupt_clients_do_not_kill_the_server(double: HBaseThriftDouble,
                                                           conn: happybase.Connection) -> None:
    def send(data: bytes, *, reset: bool = False) -> None:
        with socket.create_connection(("127.0.0.1", double.port), timeout=2) as raw:
            raw.sendall(data)
            if reset:  # close with a TCP RST, mid-message
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            raw.shutdown(socket.SHUT_WR)
            while raw.recv(4096):  # the server answers nothing sensible and hangs up
                pass

    send(b"GET / HTTP/1.1\r\nHost: hbase\r\n\r\n")
    send(bytes(range(256)) * 4)
    send(b"\x80\x01\x00\x01\x00\x00\x00\x0cgetTableNa")  # a call cut short
    send(b"\x80\x01\x00\x01\x00\x00\x00\x0bnoSuchThing\x00\x00\x00\x01\x00")  # unknown method: an answer
    send(b"\x80\x01\x00\x01\x7f\xff\xff\xff", reset=True)
    send(b"\x80\x01\x00\x01\x00\x00\x00\x0dgetTableNames\x00\x00\x00\x01", reset=True)
    eventually_blocking(lambda: double.connection_count == 1)
    conn.create_table("t", {"cf": {}})
    assert conn.tables() == [b"t"]


@pytest.mark.parametrize(("protocol", "transport"), [("compact", "buffered"), ("binary", "framed"),
                                                     ("compact", "framed")])
def test_other_protocols_and_transports(protocol: str, transport: str) -> None:
    with HBaseThriftDouble(protocol=protocol, transport=transport) as double:
        c = connect(double.port, protocol=protocol, transport=transport)
        try:
            c.create_table("t", {"cf": {}})
            c.table("t").put(b"r", {b"cf:a": b"1"})
            assert list(c.table("t").scan()) == [(b"r", {b"cf:a": b"1"})]
        finally:
            c.close()


def test_runs_as_a_process(tmp_path: Path) -> None:
    ready = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "sim.hbase_double", "--port", "0", "--ready-file", str(ready)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        eventually_blocking(ready.exists, timeout_s=10)
        c = connect(int(ready.read_text()))
        try:
            c.create_table("t", {"cf": {}})
            c.table("t").put(b"r", {b"cf:a": b"1"})
            assert c.table("t").row(b"r") == {b"cf:a": b"1"}
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=5) == -signal.SIGKILL
            with pytest.raises(GONE):
                c.table("t").row(b"r")
        finally:
            c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_process_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "sim.hbase_double", "--port", "0", "--ready-file", str(ready)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        eventually_blocking(ready.exists, timeout_s=10)
        c = connect(int(ready.read_text()))
        c.close()
        proc.terminate()
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_bug_in_the_double_answers_an_error(monkeypatch: pytest.MonkeyPatch, conn: happybase.Connection) -> None:
    from sim.hbase_double import HBaseHandler

    def broken(self: HBaseHandler) -> list[bytes]:
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(HBaseHandler, "getTableNames", broken)
    with pytest.raises(IOError_, match="test double internal error in getTableNames"):
        conn.tables()
    monkeypatch.undo()
    assert conn.tables() == []
