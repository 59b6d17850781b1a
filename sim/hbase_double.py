"""A TEST DOUBLE of an HBase Thrift (v1) gateway, for testing our HBase storage backend where HBase cannot run.

It is not HBase. It speaks HBase's real Thrift v1 wire protocol: it serves the ``Hbase.thrift`` that happybase itself
ships, through thriftpy2 (binary or compact protocol, buffered or framed transport), so happybase and any other
Thrift v1 client talk to it exactly as they would to ``hbase thrift start``. Behind the wire it keeps tables in
memory with HBase's data semantics:

* tables with fixed column families; a write, delete or read naming an unknown family fails with the Thrift
  ``IOError`` carrying ``NoSuchColumnFamilyException``, as HBase does; unknown and disabled tables fail likewise;
* rows sorted by row key in bytes order; cells ``family:qualifier``; versions newest first, at most the family's
  ``maxVersions`` (ColumnDescriptor default 3); server-assigned or explicit timestamps; reads "as of" a timestamp
  use HBase's time range ``[0, timestamp)``;
* deletes leave delete markers, as HBase does before a major compaction: a later put with a timestamp at or below
  the marker stays invisible (``majorCompact`` clears the markers);
* a batch (``mutateRows``) applies all its puts, then all its deletes, row by row: a row naming an unknown family
  fails while the other rows are applied (HBase's partial batch failure); ``mutateRow`` deletes first, then puts;
* column specs as HBase >= 0.96 parses them (HBASE-9549): ``family`` means the whole family,
  ``family:qualifier`` one column, and ``family:`` the column with the *empty* qualifier (not the family);
* 8-byte big-endian signed counters (``atomicIncrement``, ``increment``), ``append``, ``checkAndPut``;
* scanners held by the gateway (like the real one): start/stop rows, columns, time range, ``reversed``,
  ``sortColumns``, ``batchSize`` (partial rows), and the filters ``PrefixFilter``, ``KeyOnlyFilter``,
  ``FirstKeyOnlyFilter`` joined with ``AND``. A scanner sees the rows as they were when it was opened.

What it does not do: regions (one fake region per table), region servers, ZooKeeper, a write-ahead log or any
durability (data lives in this process's memory only; ``stop()`` then ``start()`` keeps it, a killed process loses
it), TTL, compression, bloom filters, namespaces, security, scanner leases, other filters, ``getRowOrBefore`` and
``getRegionInfo`` (those answer ``IOError("not implemented by the test double: <name>")``). Server-assigned
timestamps are strictly increasing, so a put right after a delete in the same millisecond stays visible here where
real HBase could mask it. Single process, one lock around all data.

Run it in a test with ``HBaseThriftDouble(port=0)`` (a context manager; ``port`` gives the real port), or as a process
with ``python -m sim.hbase_double --host 127.0.0.1 --port 0 --ready-file F`` (the port is written to ``F``).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import logging
import os
import re
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import happybase
import thriftpy2
from happybase.util import bytes_increment
from thriftpy2.protocol import TBinaryProtocolFactory, TCompactProtocolFactory
from thriftpy2.thrift import TApplicationException, TProcessor
from thriftpy2.transport import TBufferedTransportFactory, TFramedTransportFactory, TSocket, TTransportException

__all__ = ["HBaseHandler", "HBaseStore", "HBaseThriftDouble", "Hbase_thrift", "main"]

logger = logging.getLogger(__name__)

# The very module happybase uses (thriftpy2 caches it by name), so struct and exception types are the same classes.
Hbase_thrift: ModuleType = thriftpy2.load(str(Path(happybase.__file__).parent / "Hbase.thrift"),
                                          module_name="Hbase_thrift")

PROTOCOLS: dict[str, Any] = {"binary": TBinaryProtocolFactory, "compact": TCompactProtocolFactory}
TRANSPORTS: dict[str, Any] = {"buffered": TBufferedTransportFactory, "framed": TFramedTransportFactory}

_LATEST = 2**63 - 1  # HConstants.LATEST_TIMESTAMP: "now" when the client names no timestamp
_COUNTER = struct.Struct(">q")
_TABLE_NAME = re.compile(rb"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_FILTER = re.compile(rb"\s*(\w+)\s*\(\s*('(?:[^']|'')*')?\s*\)\s*")
_AND = re.compile(rb"AND\b", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------------
# Errors, worded like the Java exceptions the real gateway forwards


def _io_error(java_class: str, message: str) -> Exception:
    """The Thrift ``IOError`` the real gateway sends for a Java IOException (class name first, like its text)."""
    return Hbase_thrift.IOError(message=f"{java_class}: {message}")


def _illegal(message: str) -> Exception:
    """The Thrift ``IllegalArgument`` exception."""
    return Hbase_thrift.IllegalArgument(message=f"java.lang.IllegalArgumentException: {message}")


def _no_such_family(table: bytes, family: bytes) -> Exception:
    return _io_error("org.apache.hadoop.hbase.regionserver.NoSuchColumnFamilyException",
                     f"Column family {family.decode(errors='replace')} does not exist in region "
                     f"{table.decode(errors='replace')},,1.double. in table '{table.decode(errors='replace')}'")


def _text(value: bytes) -> str:
    return value.decode(errors="replace")


# ---------------------------------------------------------------------------------------------------------------
# The data: tables, rows, cells, versions, delete markers


Selection = dict[bytes, set[bytes] | None]  # family -> qualifiers, None = the whole family
Cell = tuple[bytes, bytes, int, bytes]  # family, qualifier, timestamp, value
PutCell = tuple[bytes, bytes, bytes]  # family, qualifier, value
DeleteTarget = tuple[bytes, bytes | None]  # family, qualifier (None: the whole family)
Filter = Callable[[bytes, list[Cell]], list[Cell]]


def parse_column(column: bytes) -> tuple[bytes, bytes | None]:
    """``family`` -> (family, None); ``family:qualifier`` -> (family, qualifier); ``family:`` -> (family, b"")."""
    family, colon, qualifier = column.partition(b":")
    return (family, qualifier) if colon else (family, None)


def selection(columns: Iterable[bytes] | None) -> Selection | None:
    """HBase's Get/Scan ``addFamily``/``addColumn`` for a column list (None or empty: every column)."""
    if not columns:
        return None
    chosen: Selection = {}
    for column in columns:
        family, qualifier = parse_column(column)
        if qualifier is None:
            chosen[family] = None
        else:
            quals = chosen.get(family)
            if quals is None:  # like HBase, a column after its whole family narrows the family to columns
                quals = chosen[family] = set()
            quals.add(qualifier)
    return chosen


@dataclass
class _Row:
    cells: dict[tuple[bytes, bytes], list[tuple[int, bytes]]] = field(default_factory=dict)  # newest first
    row_marker: int = -1
    family_markers: dict[bytes, int] = field(default_factory=dict)
    column_markers: dict[tuple[bytes, bytes], int] = field(default_factory=dict)

    def masked(self, family: bytes, qualifier: bytes, ts: int) -> bool:
        """Whether a delete marker hides a cell of this timestamp (as it does in HBase until a major compaction)."""
        return ts <= max(self.row_marker, self.family_markers.get(family, -1),
                         self.column_markers.get((family, qualifier), -1))

    def empty(self) -> bool:
        return not (self.cells or self.family_markers or self.column_markers) and self.row_marker < 0


@dataclass
class _Table:
    name: bytes
    families: dict[bytes, Any]  # family (no colon) -> ColumnDescriptor (name with colon)
    created_ms: int
    enabled: bool = True
    rows: dict[bytes, _Row] = field(default_factory=dict)
    keys: list[bytes] = field(default_factory=list)  # sorted row keys

    def max_versions(self, family: bytes) -> int:
        return int(self.families[family].maxVersions)

    def check_families(self, families: Iterable[bytes]) -> None:
        for family in families:
            if family not in self.families:
                raise _no_such_family(self.name, family)

    def row(self, key: bytes) -> _Row:
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = _Row()
            bisect.insort(self.keys, key)
        return row

    def forget_if_empty(self, key: bytes) -> None:
        row = self.rows.get(key)
        if row is not None and row.empty():
            del self.rows[key]
            del self.keys[bisect.bisect_left(self.keys, key)]


class HBaseStore:
    """The in-memory tables of the test double; every method expects the caller to hold ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.tables: dict[bytes, _Table] = {}
        self._last_ms = 0

    def now(self) -> int:
        """A server timestamp in ms, strictly increasing (a simplification: HBase may repeat a millisecond)."""
        self._last_ms = max(int(time.time() * 1000), self._last_ms + 1)
        return self._last_ms

    def table(self, name: bytes, *, enabled: bool = True) -> _Table:
        """The named table; IOError if it does not exist or (when ``enabled``) is disabled."""
        table = self.tables.get(name)
        if table is None:
            raise _io_error("org.apache.hadoop.hbase.TableNotFoundException", _text(name))
        if enabled and not table.enabled:
            raise _io_error("org.apache.hadoop.hbase.TableNotEnabledException", f"{_text(name)} is disabled.")
        return table

    # --- writes --------------------------------------------------------------------------------------------

    def put(self, table: _Table, key: bytes, cells: Iterable[PutCell], ts: int) -> None:
        """Store cells (family, qualifier, value) at one timestamp; families must have been checked."""
        row = table.row(key)
        for family, qualifier, value in cells:
            if row.masked(family, qualifier, ts):
                continue
            versions = row.cells.setdefault((family, qualifier), [])
            stamps = [-t for t, _ in versions]  # ascending for bisect
            at = bisect.bisect_left(stamps, -ts)
            if at < len(versions) and versions[at][0] == ts:
                versions[at] = (ts, value)  # same coordinates: the newer write wins
            else:
                versions.insert(at, (ts, value))
            del versions[table.max_versions(family):]
        table.forget_if_empty(key)

    def delete(self, table: _Table, key: bytes, targets: Iterable[DeleteTarget], ts: int) -> None:
        """Delete every version at or before ``ts`` of columns / whole families (qualifier None); leaves markers."""
        row = table.row(key)
        for family, qualifier in targets:
            if qualifier is None:
                row.family_markers[family] = max(row.family_markers.get(family, -1), ts)
                doomed = [c for c in row.cells if c[0] == family]
            else:
                row.column_markers[(family, qualifier)] = max(row.column_markers.get((family, qualifier), -1), ts)
                doomed = [(family, qualifier)] if (family, qualifier) in row.cells else []
            for coords in doomed:
                kept = [(t, v) for t, v in row.cells[coords] if t > ts]
                if kept:
                    row.cells[coords] = kept
                else:
                    del row.cells[coords]
        table.forget_if_empty(key)

    def delete_row(self, table: _Table, key: bytes, ts: int) -> None:
        """Delete every cell of a row at or before ``ts``."""
        row = table.row(key)
        row.row_marker = max(row.row_marker, ts)
        for coords in list(row.cells):
            kept = [(t, v) for t, v in row.cells[coords] if t > ts]
            if kept:
                row.cells[coords] = kept
            else:
                del row.cells[coords]
        table.forget_if_empty(key)

    def compact(self, table: _Table) -> None:
        """A major compaction: delete markers go (data already deleted stays deleted)."""
        for key in list(table.keys):
            row = table.rows[key]
            row.row_marker = -1
            row.family_markers.clear()
            row.column_markers.clear()
            table.forget_if_empty(key)

    # --- reads ---------------------------------------------------------------------------------------------

    def read(self, table: _Table, key: bytes, chosen: Selection | None, before: int | None,
             versions: int) -> list[Cell]:
        """Cells of one row in (family, qualifier) order, newest first, time range ``[0, before)``."""
        row = table.rows.get(key)
        if row is None:
            return []
        out: list[Cell] = []
        for family, qualifier in sorted(row.cells):
            if chosen is not None:
                if family not in chosen:
                    continue
                quals = chosen[family]
                if quals is not None and qualifier not in quals:
                    continue
            taken = 0
            for ts, value in row.cells[(family, qualifier)]:
                if before is not None and ts >= before:
                    continue
                out.append((family, qualifier, ts, value))
                taken += 1
                if taken >= versions:
                    break
        return out

    def keys_between(self, table: _Table, start: bytes, stop: bytes, reverse: bool) -> list[bytes]:
        """Row keys of a scan range: forward ``[start, stop)``, reversed ``(stop, start]``; empty = unbounded."""
        keys = table.keys
        if not reverse:
            lo = bisect.bisect_left(keys, start)
            hi = bisect.bisect_left(keys, stop) if stop else len(keys)
            return keys[lo:max(lo, hi)]
        hi = bisect.bisect_right(keys, start) if start else len(keys)
        lo = bisect.bisect_right(keys, stop) if stop else 0
        return keys[lo:max(lo, hi)][::-1]


# ---------------------------------------------------------------------------------------------------------------
# Scan filters (the filter language subset we support)


def _prefix_filter(prefix: bytes) -> Filter:
    return lambda key, cells: cells if key.startswith(prefix) else []


def parse_filter(text: bytes) -> Filter:
    """Compile ``PrefixFilter('p')``, ``KeyOnlyFilter()``, ``FirstKeyOnlyFilter()`` joined by ``AND``."""
    steps: list[Filter] = []
    pos = 0
    while True:
        match = _FILTER.match(text, pos)
        if match is None:
            raise _io_error("java.lang.IllegalArgumentException",
                            f"filter not supported by the test double: {_text(text)!r}")
        name, quoted = match.group(1).decode(), match.group(2)
        argument = quoted[1:-1].replace(b"''", b"'") if quoted else None
        if name == "PrefixFilter" and argument is not None:
            steps.append(_prefix_filter(argument))
        elif name == "KeyOnlyFilter" and argument is None:
            steps.append(lambda key, cells: [(f, q, t, b"") for f, q, t, _ in cells])
        elif name == "FirstKeyOnlyFilter" and argument is None:
            steps.append(lambda key, cells: cells[:1])
        else:
            raise _io_error("java.lang.IllegalArgumentException",
                            f"filter not supported by the test double: {_text(match.group(0).strip())!r}")
        pos = match.end()
        if pos == len(text):
            break
        conj = _AND.match(text, pos)
        if conj is None:
            raise _io_error("java.lang.IllegalArgumentException",
                            f"filter not supported by the test double: {_text(text)!r}")
        pos = conj.end()

    def apply(key: bytes, cells: list[Cell]) -> list[Cell]:
        for step in steps:
            cells = step(key, cells)
        return cells

    return apply


# ---------------------------------------------------------------------------------------------------------------
# The Thrift service


def _cell(ts: int, value: bytes) -> Any:
    return Hbase_thrift.TCell(value=value, timestamp=ts)


def _row_result(key: bytes, cells: list[Cell], sort_columns: bool = False) -> Any:
    """One TRowResult (latest versions only), as the real gateway's ``rowResultFromHBase``."""
    if sort_columns:
        return Hbase_thrift.TRowResult(row=key, sortedColumns=[
            Hbase_thrift.TColumn(columnName=f + b":" + q, cell=_cell(t, v)) for f, q, t, v in cells])
    columns: dict[bytes, Any] = {}
    for family, qualifier, ts, value in cells:
        columns.setdefault(family + b":" + qualifier, _cell(ts, value))
    return Hbase_thrift.TRowResult(row=key, columns=columns)


def _timestamp(ts: int | None) -> int | None:
    """An explicit mutation timestamp (None = now); negative ones are refused like HBase does."""
    if ts is None or ts == _LATEST:
        return None
    if ts < 0:
        raise _illegal(f"Timestamp cannot be negative. ts={ts}")
    return ts


@dataclass
class _Scanner:
    results: list[Any]
    position: int = 0


class HBaseHandler:
    """The Thrift v1 ``Hbase`` service of the test double: gateway state (scanners) over an ``HBaseStore``.

    Methods are named and ordered as in ``Hbase.thrift``; any service method not defined here answers
    ``IOError("not implemented by the test double: <name>")``.
    """

    def __init__(self, store: HBaseStore, server_name: bytes = b"localhost", server_port: int = 0) -> None:
        self.store = store
        self._server_name = server_name
        self._server_port = server_port
        self._scanners: dict[int, _Scanner] = {}
        self._scanner_ids = itertools.count(1)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name in Hbase_thrift.Hbase.thrift_services:
            def not_implemented(*_args: Any) -> Any:
                raise Hbase_thrift.IOError(message=f"not implemented by the test double: {name}")
            return not_implemented
        raise AttributeError(name)

    # --- tables ----------------------------------------------------------------------------------------------

    def enableTable(self, tableName: bytes) -> None:
        with self.store.lock:
            table = self.store.table(tableName, enabled=False)
            if table.enabled:
                raise _io_error("org.apache.hadoop.hbase.TableNotDisabledException", _text(tableName))
            table.enabled = True

    def disableTable(self, tableName: bytes) -> None:
        with self.store.lock:
            table = self.store.table(tableName, enabled=False)
            if not table.enabled:
                raise _io_error("org.apache.hadoop.hbase.TableNotEnabledException", _text(tableName))
            table.enabled = False

    def isTableEnabled(self, tableName: bytes) -> bool:
        with self.store.lock:
            return self.store.table(tableName, enabled=False).enabled

    def compact(self, tableNameOrRegionName: bytes) -> None:
        with self.store.lock:
            self.store.table(tableNameOrRegionName, enabled=False)

    def majorCompact(self, tableNameOrRegionName: bytes) -> None:
        with self.store.lock:
            self.store.compact(self.store.table(tableNameOrRegionName, enabled=False))

    def getTableNames(self) -> list[bytes]:
        with self.store.lock:
            return sorted(self.store.tables)

    def getColumnDescriptors(self, tableName: bytes) -> dict[bytes, Any]:
        with self.store.lock:
            table = self.store.table(tableName, enabled=False)
            return {d.name: d for d in table.families.values()}

    def getTableRegions(self, tableName: bytes) -> list[Any]:
        with self.store.lock:
            table = self.store.tables.get(tableName)
            if table is None:
                return []  # the real gateway answers an empty list for an unknown table
            return [Hbase_thrift.TRegionInfo(
                startKey=b"", endKey=b"", id=table.created_ms,
                name=b"%s,,%d.double." % (table.name, table.created_ms), version=1,
                serverName=self._server_name, port=self._server_port)]

    def createTable(self, tableName: bytes, columnFamilies: list[Any] | None) -> None:
        if not _TABLE_NAME.fullmatch(tableName or b""):
            raise _illegal(f"Illegal table name {_text(tableName or b'')!r}")
        families: dict[bytes, Any] = {}
        for descriptor in columnFamilies or []:
            family = parse_column(descriptor.name or b"")[0]
            if not family or family.startswith(b".") or any(c < 32 or c == 127 for c in family):
                raise _illegal(f"Illegal column family name {_text(family)!r}")
            if family in families:
                raise _illegal(f"Column family '{_text(family)}' already exists")
            if descriptor.maxVersions is not None and descriptor.maxVersions < 1:
                raise _illegal("Maximum versions must be positive")
            families[family] = Hbase_thrift.ColumnDescriptor(
                name=family + b":",
                maxVersions=3 if descriptor.maxVersions is None else descriptor.maxVersions,
                compression=descriptor.compression, inMemory=descriptor.inMemory,
                bloomFilterType=descriptor.bloomFilterType,
                bloomFilterVectorSize=descriptor.bloomFilterVectorSize,
                bloomFilterNbHashes=descriptor.bloomFilterNbHashes,
                blockCacheEnabled=descriptor.blockCacheEnabled, timeToLive=descriptor.timeToLive)
        with self.store.lock:
            if tableName in self.store.tables:
                raise Hbase_thrift.AlreadyExists(message="table name already in use")
            if not families:
                raise _io_error("org.apache.hadoop.hbase.DoNotRetryIOException",
                                "Table should have at least one column family.")
            self.store.tables[tableName] = _Table(tableName, families, created_ms=self.store.now())

    def deleteTable(self, tableName: bytes) -> None:
        with self.store.lock:
            table = self.store.table(tableName, enabled=False)
            if table.enabled:
                raise _io_error("org.apache.hadoop.hbase.TableNotDisabledException", _text(tableName))
            del self.store.tables[tableName]

    # --- reads -----------------------------------------------------------------------------------------------

    def _read(self, tableName: bytes, row: bytes, columns: Iterable[bytes] | None, before: int | None,
              versions: int) -> list[Cell]:
        table = self.store.table(tableName)
        chosen = selection(columns)
        if chosen is not None:
            table.check_families(chosen)
        return self.store.read(table, row, chosen, None if before == _LATEST else before, versions)

    def get(self, tableName: bytes, row: bytes, column: bytes, attributes: Any) -> list[Any]:
        return self.getVerTs(tableName, row, column, _LATEST, 1, attributes)

    def getVer(self, tableName: bytes, row: bytes, column: bytes, numVersions: int, attributes: Any) -> list[Any]:
        return self.getVerTs(tableName, row, column, _LATEST, numVersions, attributes)

    def getVerTs(self, tableName: bytes, row: bytes, column: bytes, timestamp: int, numVersions: int,
                 attributes: Any) -> list[Any]:
        if numVersions is None or numVersions < 1:
            raise _illegal("Maximum versions must be positive")
        with self.store.lock:
            return [_cell(t, v) for _, _, t, v in self._read(tableName, row, [column], timestamp, numVersions)]

    def getRow(self, tableName: bytes, row: bytes, attributes: Any) -> list[Any]:
        return self.getRowsWithColumnsTs(tableName, [row], None, _LATEST, attributes)

    def getRowWithColumns(self, tableName: bytes, row: bytes, columns: list[bytes] | None,
                          attributes: Any) -> list[Any]:
        return self.getRowsWithColumnsTs(tableName, [row], columns, _LATEST, attributes)

    def getRowTs(self, tableName: bytes, row: bytes, timestamp: int, attributes: Any) -> list[Any]:
        return self.getRowsWithColumnsTs(tableName, [row], None, timestamp, attributes)

    def getRowWithColumnsTs(self, tableName: bytes, row: bytes, columns: list[bytes] | None, timestamp: int,
                            attributes: Any) -> list[Any]:
        return self.getRowsWithColumnsTs(tableName, [row], columns, timestamp, attributes)

    def getRows(self, tableName: bytes, rows: list[bytes], attributes: Any) -> list[Any]:
        return self.getRowsWithColumnsTs(tableName, rows, None, _LATEST, attributes)

    def getRowsWithColumns(self, tableName: bytes, rows: list[bytes], columns: list[bytes] | None,
                           attributes: Any) -> list[Any]:
        return self.getRowsWithColumnsTs(tableName, rows, columns, _LATEST, attributes)

    def getRowsTs(self, tableName: bytes, rows: list[bytes], timestamp: int, attributes: Any) -> list[Any]:
        return self.getRowsWithColumnsTs(tableName, rows, None, timestamp, attributes)

    def getRowsWithColumnsTs(self, tableName: bytes, rows: list[bytes] | None, columns: list[bytes] | None,
                             timestamp: int, attributes: Any) -> list[Any]:
        results = []
        with self.store.lock:
            for row in rows or []:
                cells = self._read(tableName, row, columns, timestamp, 1)
                if cells:  # like the real gateway, rows without cells are left out
                    results.append(_row_result(row, cells))
        return results

    # --- writes ----------------------------------------------------------------------------------------------

    @staticmethod
    def _split(mutations: list[Any] | None) -> tuple[list[PutCell], list[DeleteTarget]]:
        puts: list[PutCell] = []
        deletes: list[DeleteTarget] = []
        for m in mutations or []:
            family, qualifier = parse_column(m.column or b"")
            if m.isDelete:
                deletes.append((family, qualifier))
            elif qualifier is None:
                # HBase 2's mutateRows refuses this; its mutateRow only logs and drops it: refusing is safer here.
                raise _illegal(f"Invalid famAndQf provided: {_text(m.column or b'')!r} (a put needs family:qualifier)")
            else:
                puts.append((family, qualifier, m.value if m.value is not None else b""))
        return puts, deletes

    def _apply(self, table: _Table, batches: list[tuple[bytes, list[PutCell], list[DeleteTarget]]],
               explicit: int | None, phase: str, *, as_list: bool) -> None:
        """Apply one phase (puts or deletes) of rows; rows with an unknown family fail, the others are applied.

        ``as_list``: the gateway sent a list of Puts/Deletes (``mutateRows``), and HBase's client reports the
        failed rows in a RetriesExhaustedWithDetailsException; a single Put/Delete fails with the bare cause.
        """
        ts = explicit if explicit is not None else self.store.now()
        failures: list[Exception] = []
        for key, puts, deletes in batches:
            items = puts if phase == "put" else deletes
            if not items:
                continue
            try:
                table.check_families(item[0] for item in items)
            except Hbase_thrift.IOError as exc:
                failures.append(exc)
                continue
            if phase == "put":
                self.store.put(table, key, puts, ts)
            else:
                self.store.delete(table, key, deletes, ts)
        if failures and not as_list:
            raise failures[0]
        if failures:
            raise _io_error("org.apache.hadoop.hbase.client.RetriesExhaustedWithDetailsException",
                            f"Failed {len(failures)} actions: {getattr(failures[0], 'message', failures[0])}: "
                            f"{len(failures)} times")

    def mutateRow(self, tableName: bytes, row: bytes, mutations: list[Any], attributes: Any) -> None:
        self.mutateRowTs(tableName, row, mutations, _LATEST, attributes)

    def mutateRowTs(self, tableName: bytes, row: bytes, mutations: list[Any], timestamp: int,
                    attributes: Any) -> None:
        puts, deletes = self._split(mutations)
        explicit = _timestamp(timestamp)
        with self.store.lock:
            table = self.store.table(tableName)
            self._apply(table, [(row, puts, deletes)], explicit, "delete", as_list=False)  # deletes first
            self._apply(table, [(row, puts, deletes)], explicit, "put", as_list=False)

    def mutateRows(self, tableName: bytes, rowBatches: list[Any], attributes: Any) -> None:
        self.mutateRowsTs(tableName, rowBatches, _LATEST, attributes)

    def mutateRowsTs(self, tableName: bytes, rowBatches: list[Any], timestamp: int, attributes: Any) -> None:
        batches = [(b.row, *self._split(b.mutations)) for b in rowBatches or []]
        explicit = _timestamp(timestamp)
        with self.store.lock:
            table = self.store.table(tableName)
            self._apply(table, batches, explicit, "put", as_list=True)  # all the puts, then all the deletes
            self._apply(table, batches, explicit, "delete", as_list=True)

    def atomicIncrement(self, tableName: bytes, row: bytes, column: bytes, value: int) -> int:
        family, qualifier = parse_column(column)
        return self._increment(tableName, row, family, qualifier or b"", value)

    def _increment(self, tableName: bytes, row: bytes, family: bytes, qualifier: bytes, amount: int) -> int:
        with self.store.lock:
            table = self.store.table(tableName)
            table.check_families([family])
            current = self.store.read(table, row, {family: {qualifier}}, None, 1)
            old, ts = 0, self.store.now()
            if current:
                raw = current[0][3]
                if len(raw) != _COUNTER.size:
                    raise _io_error("org.apache.hadoop.hbase.DoNotRetryIOException",
                                    f"Field is not a long, it's {len(raw)} bytes wide")
                old = _COUNTER.unpack(raw)[0]
                ts = max(ts, current[0][2] + 1)
            new = (old + amount + 2**63) % 2**64 - 2**63  # a Java long wraps around
            self.store.put(table, row, [(family, qualifier, _COUNTER.pack(new))], ts)
            return new

    def increment(self, increment: Any) -> None:
        family, qualifier = parse_column(increment.column or b"")
        self._increment(increment.table, increment.row, family, qualifier or b"", increment.ammount or 0)

    def incrementRows(self, increments: list[Any]) -> None:
        for one in increments or []:
            self.increment(one)

    def append(self, append: Any) -> list[Any]:
        columns, values = append.columns or [], append.values or []
        if len(columns) != len(values):
            raise _illegal("columns and values must have the same length")
        with self.store.lock:
            table = self.store.table(append.table)
            parsed = [(f, q or b"") for f, q in map(parse_column, columns)]
            table.check_families(f for f, _ in parsed)
            ts, out, cells = self.store.now(), [], []
            for (family, qualifier), value in zip(parsed, values, strict=True):
                current = self.store.read(table, append.row, {family: {qualifier}}, None, 1)
                new = (current[0][3] if current else b"") + value
                cells.append((family, qualifier, new))
                out.append(_cell(ts, new))
            self.store.put(table, append.row, cells, ts)
            return out

    def deleteAll(self, tableName: bytes, row: bytes, column: bytes, attributes: Any) -> None:
        self.deleteAllTs(tableName, row, column, _LATEST, attributes)

    def deleteAllTs(self, tableName: bytes, row: bytes, column: bytes, timestamp: int, attributes: Any) -> None:
        explicit = _timestamp(timestamp)
        with self.store.lock:
            table = self.store.table(tableName)
            target = parse_column(column or b"")
            table.check_families([target[0]])
            self.store.delete(table, row, [target], explicit if explicit is not None else self.store.now())

    def deleteAllRow(self, tableName: bytes, row: bytes, attributes: Any) -> None:
        self.deleteAllRowTs(tableName, row, _LATEST, attributes)

    def deleteAllRowTs(self, tableName: bytes, row: bytes, timestamp: int, attributes: Any) -> None:
        explicit = _timestamp(timestamp)
        with self.store.lock:
            table = self.store.table(tableName)
            self.store.delete_row(table, row, explicit if explicit is not None else self.store.now())

    def checkAndPut(self, tableName: bytes, row: bytes, column: bytes, value: bytes | None, mput: Any,
                    attributes: Any) -> bool:
        puts, _ = self._split([mput]) if mput is not None and not mput.isDelete else ([], [])
        if not puts:
            raise _illegal("checkAndPut needs a put mutation with family:qualifier")
        family, qualifier = parse_column(column or b"")
        with self.store.lock:
            table = self.store.table(tableName)
            table.check_families([family, puts[0][0]])
            current = self.store.read(table, row, {family: {qualifier or b""}}, None, 1)
            if (current[0][3] if current else None) != value:
                return False
            self.store.put(table, row, puts, self.store.now())
            return True

    # --- scanners --------------------------------------------------------------------------------------------

    def scannerOpenWithScan(self, tableName: bytes, scan: Any, attributes: Any) -> int:
        with self.store.lock:
            table = self.store.table(tableName)
            chosen = selection(scan.columns)
            if chosen is not None:
                table.check_families(chosen)
            keep = parse_filter(scan.filterString) if scan.filterString else None
            before = None if scan.timestamp is None or scan.timestamp == _LATEST else scan.timestamp
            results: list[Any] = []
            for key in self.store.keys_between(table, scan.startRow or b"", scan.stopRow or b"",
                                               bool(scan.reversed)):
                cells = self.store.read(table, key, chosen, before, 1)
                if keep is not None:
                    cells = keep(key, cells)
                if not cells:
                    continue
                size = scan.batchSize if scan.batchSize and scan.batchSize > 0 else len(cells)
                results.extend(_row_result(key, cells[i:i + size], bool(scan.sortColumns))
                               for i in range(0, len(cells), size))
            scanner_id = next(self._scanner_ids)
            self._scanners[scanner_id] = _Scanner(results)
            return scanner_id

    def scannerOpen(self, tableName: bytes, startRow: bytes, columns: list[bytes] | None, attributes: Any) -> int:
        return self.scannerOpenWithScan(tableName, Hbase_thrift.TScan(startRow=startRow, columns=columns), attributes)

    def scannerOpenWithStop(self, tableName: bytes, startRow: bytes, stopRow: bytes, columns: list[bytes] | None,
                            attributes: Any) -> int:
        return self.scannerOpenWithScan(
            tableName, Hbase_thrift.TScan(startRow=startRow, stopRow=stopRow, columns=columns), attributes)

    def scannerOpenWithPrefix(self, tableName: bytes, startAndPrefix: bytes, columns: list[bytes] | None,
                              attributes: Any) -> int:
        stop = bytes_increment(startAndPrefix or b"")
        return self.scannerOpenWithScan(
            tableName, Hbase_thrift.TScan(startRow=startAndPrefix, stopRow=stop, columns=columns), attributes)

    def scannerOpenTs(self, tableName: bytes, startRow: bytes, columns: list[bytes] | None, timestamp: int,
                      attributes: Any) -> int:
        return self.scannerOpenWithScan(
            tableName, Hbase_thrift.TScan(startRow=startRow, columns=columns, timestamp=timestamp), attributes)

    def scannerOpenWithStopTs(self, tableName: bytes, startRow: bytes, stopRow: bytes, columns: list[bytes] | None,
                              timestamp: int, attributes: Any) -> int:
        return self.scannerOpenWithScan(tableName, Hbase_thrift.TScan(
            startRow=startRow, stopRow=stopRow, columns=columns, timestamp=timestamp), attributes)

    def _scanner(self, scanner_id: int) -> _Scanner:
        scanner = self._scanners.get(scanner_id)
        if scanner is None:
            raise Hbase_thrift.IllegalArgument(message="scanner ID is invalid")
        return scanner

    def scannerGet(self, id: int) -> list[Any]:
        return self.scannerGetList(id, 1)

    def scannerGetList(self, id: int, nbRows: int) -> list[Any]:
        with self.store.lock:
            scanner = self._scanner(id)
            chunk = scanner.results[scanner.position:scanner.position + max(nbRows or 0, 0)]
            scanner.position += len(chunk)
            return chunk

    def scannerClose(self, id: int) -> None:
        with self.store.lock:
            self._scanner(id)
            del self._scanners[id]


class _SafeProcessor(TProcessor):
    """thriftpy2's processor, except that an unexpected handler error answers the call instead of dropping it."""

    def process(self, iprot: Any, oprot: Any) -> None:
        api, seqid, result, call = self.process_in(iprot)
        if isinstance(result, TApplicationException):
            self.send_exception(oprot, api, result, seqid)
            return
        assert call is not None
        try:
            result.success = call()
        except TApplicationException as exc:
            self.send_exception(oprot, api, exc, seqid)
            return
        except Exception as exc:
            if not self.handle_exception(exc, result):
                logger.warning("HBase test double: %s failed unexpectedly", api, exc_info=True)
                wrapped = Hbase_thrift.IOError(message=f"test double internal error in {api}: {exc!r}")
                if not self.handle_exception(wrapped, result):
                    self.send_exception(oprot, api, TApplicationException(
                        TApplicationException.INTERNAL_ERROR, repr(exc)), seqid)
                    return
        if not result.oneway:
            self.send_result(oprot, api, result, seqid)


# ---------------------------------------------------------------------------------------------------------------
# The server


class HBaseThriftDouble:
    """TEST DOUBLE of an HBase Thrift (v1) gateway: HBase's real Thrift wire protocol over in-memory tables.

    Implements the table, get, mutate, delete, counter, append, checkAndPut and scanner calls of ``Hbase.thrift``
    with HBase's data semantics (see the module docstring). It has no regions, no write-ahead log or durability,
    no filters beyond ``PrefixFilter``/``KeyOnlyFilter``/``FirstKeyOnlyFilter``, and runs in one process. The
    data outlives ``stop()``: a later ``start()`` serves the same rows on the same port, like a gateway that went
    away and came back while HBase kept the data; scanners and client connections do not survive it.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, protocol: str = "binary",
                 transport: str = "buffered", *, idle_timeout: float | None = None) -> None:
        """Configure (not start) a double; ``idle_timeout`` (s) closes silent connections like the real gateway."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, not {protocol!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {sorted(TRANSPORTS)}, not {transport!r}")
        self.host = host
        self.protocol = protocol
        self.transport = transport
        self.idle_timeout = idle_timeout
        self.store = HBaseStore()
        self._port = port
        self._lock = threading.Lock()
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._processor: TProcessor | None = None
        self._connection_ids = itertools.count(1)

    @property
    def port(self) -> int:
        """The TCP port: the real one once started (kept for later restarts), else the one asked for."""
        return self._port

    @property
    def running(self) -> bool:
        """Whether the double is accepting connections."""
        return self._accept_thread is not None

    def start(self) -> None:
        """Listen and serve in background threads; returns once connections are accepted."""
        with self._lock:
            if self._accept_thread is not None:
                raise RuntimeError("HBase test double already running")
            listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((self.host, self._port))
                listener.listen(128)
                listener.setblocking(False)
            except BaseException:
                listener.close()
                raise
            self._port = listener.getsockname()[1]
            self._wake = socket.socketpair()
            self._processor = _SafeProcessor(Hbase_thrift.Hbase, HBaseHandler(
                self.store, self.host.encode(), self._port))
            ready = threading.Event()
            self._accept_thread = threading.Thread(target=self._accept_loop, args=(listener, self._wake[0], ready),
                                                   name=f"hbase-double-accept-{self._port}", daemon=True)
            self._accept_thread.start()
        ready.wait()
        logger.info("HBase Thrift test double listening on %s:%d (%s/%s)", self.host, self._port,
                    self.protocol, self.transport)

    def stop(self) -> None:
        """Close the listening socket and every client connection, join all threads; the data is kept."""
        with self._lock:
            thread, wake = self._accept_thread, self._wake
            if thread is None or wake is None:
                return
            wake[1].send(b"x")
        thread.join()
        with self._lock:
            self._accept_thread = None
            self._wake = None
            connections = dict(self._connections)
        for sock in connections:
            self._shutdown(sock)
        for conn_thread in connections.values():
            conn_thread.join()
        for sock in wake:
            sock.close()
        logger.info("HBase Thrift test double on port %d stopped", self._port)

    def drop_connections(self) -> int:
        """Close every open client connection (the listener stays): what a gateway restart does to clients."""
        with self._lock:
            connections = dict(self._connections)
        for sock in connections:
            self._shutdown(sock)
        for conn_thread in connections.values():
            conn_thread.join()
        return len(connections)

    @property
    def connection_count(self) -> int:
        """How many client connections are open."""
        with self._lock:
            return len(self._connections)

    def __enter__(self) -> HBaseThriftDouble:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the connection's thread; it closes the socket itself
        except OSError:
            pass

    def _accept_loop(self, listener: socket.socket, wake: socket.socket, ready: threading.Event) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            ready.set()
            try:
                while True:
                    for key, _ in selector.select():
                        if key.fileobj is wake:
                            return
                        self._accept(listener)
            finally:
                listener.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:  # e.g. out of file descriptors: keep serving the others
            logger.warning("HBase test double: accept failed: %s", exc)
            time.sleep(0.01)
            return
        conn.settimeout(self.idle_timeout)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                  name=f"hbase-double-conn-{self._port}-{next(self._connection_ids)}")
        with self._lock:
            self._connections[conn] = thread
        thread.start()

    def _serve(self, conn: socket.socket) -> None:
        """Answer one client until it leaves, times out, sends garbage, or the double stops."""
        processor = self._processor
        assert processor is not None
        trans = TRANSPORTS[self.transport]().get_transport(TSocket(sock=conn))
        proto = PROTOCOLS[self.protocol]().get_protocol(trans)  # method names as str; binary fields stay bytes
        try:
            while True:
                processor.process(proto, proto)
        except TTransportException:
            pass  # the client went away
        except (OSError, TimeoutError) as exc:
            logger.debug("HBase test double: connection closed: %r", exc)
        except Exception as exc:  # garbage on the wire: drop this client like a real Thrift server, keep serving
            logger.debug("HBase test double: dropping a client after a protocol error: %r", exc)
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


# ---------------------------------------------------------------------------------------------------------------
# As a process


def _write_ready_file(path: Path, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m sim.hbase_double``: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m sim.hbase_double",
                                     description="TEST DOUBLE of an HBase Thrift (v1) gateway, data in memory.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090, help="0 = any free port (default 9090)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="binary")
    parser.add_argument("--transport", choices=sorted(TRANSPORTS), default="buffered")
    parser.add_argument("--idle-timeout", type=float, default=None, help="close connections idle this long (s)")
    parser.add_argument("--ready-file", type=Path, help="write the real port here once listening")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    double = HBaseThriftDouble(args.host, args.port, args.protocol, args.transport, idle_timeout=args.idle_timeout)
    double.start()
    try:
        if args.ready_file is not None:
            _write_ready_file(args.ready_file, double.port)
        while not done.wait(0.5):
            pass
    finally:
        double.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
