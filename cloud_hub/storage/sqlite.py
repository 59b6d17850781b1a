"""The embedded backend: the HBase-shaped model in one SQLite file (WAL, ``synchronous=FULL``).

Cells live in one table keyed ``(tbl, row, col)`` without a rowid, so a row is a contiguous range of the B-tree,
a prefix scan is a range scan, and a batch is one transaction.

The puts to a **staged** table (:data:`STAGED_TABLES`: the audit log) go first to ``staged_cells``, a rowid table
appended in arrival order, in the same transaction as the rest of their batch; :meth:`SqliteKV.merge` moves them into
``cells`` in key order, in one transaction, every :attr:`SqliteKV.merge_interval_s`, after :attr:`SqliteKV.merge_rows`
staged cells, at open, and before anything deletes in a staged table; a scan reads the staged cells with the merged
ones (no write lock), the other reads merge first. A request's audit lines name 10-20 clients, so written straight
into ``cells`` each ~150-byte line rewrote its own 4 KiB leaf (and the interior pages above it) at every commit;
staged they fill one or two appended leaves per commit, and a merge writes each client's leaf once for half a second
of lines (docs/decisions.md, "Audit lines staged").
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import struct
from collections.abc import Awaitable, Callable, Iterable
from itertools import repeat
from pathlib import Path
from typing import Any, TypeVar

from cloud_hub.storage import SCHEMA, Mutation, Row, StoreUnavailable, prefix_stop
from mhp_wire.sqlite import GroupTransactions, SqliteThread, StorageError

T = TypeVar("T")
log = logging.getLogger(__name__)

OPEN_WAIT_S = 10.0
"""How long :meth:`SqliteKV.open` keeps trying a file another connection holds locked."""

DDL = """
CREATE TABLE IF NOT EXISTS cells (
    tbl TEXT NOT NULL, row TEXT NOT NULL, col TEXT NOT NULL, val BLOB NOT NULL,
    PRIMARY KEY (tbl, row, col)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staged_cells (tbl TEXT NOT NULL, row TEXT NOT NULL, col TEXT NOT NULL, val BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ping (x);
"""

STAGED_TABLES: frozenset[str] = frozenset({"audit"})
"""The tables whose puts are staged (see the module's doc): written widely (a request's lines fall into 10-20 clients'
key ranges), read rarely (``GET /v1/audit``), never read on a request's path. 47 % of the WAL's frames were leaves of
``audit`` at 12,000 requests/min; the next, ``requests`` (15 %), is read by every step of a request."""

_PUT = "INSERT OR REPLACE INTO cells (tbl, row, col, val) VALUES (?,?,?,?)"
_STAGE = "INSERT INTO staged_cells (tbl, row, col, val) VALUES (?,?,?,?)"
_MERGE = ("INSERT OR REPLACE INTO cells (tbl, row, col, val) "
          "SELECT tbl, row, col, val FROM staged_cells ORDER BY tbl, row, col, rowid")
"""Key order (each leaf of ``cells`` written once); a cell staged twice, the later put last, so it wins."""


def _check_table(table: str) -> None:
    if table not in SCHEMA:
        raise KeyError(f"no table {table!r}")


def _column_filter(columns: list[str] | None) -> tuple[str, list[str]]:
    """SQL for a column selection: exact columns as one ``IN`` list (a request row may name thousands of clients;
    a chain of ORs would exceed SQLite's expression depth of 1000), whole families as key ranges."""
    if not columns:
        return "", []
    families = [c for c in columns if c.endswith(":")]
    exact = [c for c in columns if not c.endswith(":")]
    parts: list[str] = []
    args: list[str] = []
    for fam in families:
        parts.append("(col >= ? AND col < ?)")
        args += [fam, prefix_stop(fam)]
    if exact:
        parts.append(f"col IN ({','.join('?' * len(exact))})")
        args += exact
    return " AND (" + " OR ".join(parts) + ")", args


WAL_AUTOCHECKPOINT = 10_000
"""The writer checkpoints itself when a commit takes the WAL past this many pages (~40 MiB): the bound (SQLite's
default is 1,000; at 12,000 requests/min the hub wrote ~6,000 pages a second, each page of a hot B-tree level
copied at every checkpoint)."""

CACHE_KIB = 131_072
"""The writer's page cache (SQLite's default 2 MiB): the B-tree's interior pages and hot leaves stay in memory
instead of being read again (pread) in each transaction."""


class SqliteKV:
    """The HBase-shaped store on SQLite: writes and group commits on one connection and thread, reads on a read-only
    connection and thread of their own (a file; ``:memory:`` keeps one connection). ``checkpoint_pages`` moves
    checkpoints to a third (off by default: measured no better, docs/decisions.md, "The hub store's reads off the
    writer's thread")."""

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 2000,  # noqa: PLR0913
                 wal_autocheckpoint: int = WAL_AUTOCHECKPOINT, checkpoint_pages: int | None = None,
                 cache_kib: int | None = CACHE_KIB, staged_tables: Iterable[str] = STAGED_TABLES,
                 merge_interval_s: float = 0.5, merge_rows: int = 20_000,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.path = str(path)
        self._sql = SqliteThread(path, DDL, busy_timeout_ms=busy_timeout_ms, name="hub-store", reader=True,
                                 wal_autocheckpoint=wal_autocheckpoint, checkpoint_pages=checkpoint_pages,
                                 cache_kib=cache_kib)
        self.commits = GroupTransactions(self._sql, name="hub-store-commit")
        """The group commit of :meth:`batch`: ``commits.commits`` transactions for ``commits.writes`` batches."""
        self.staged_tables = frozenset(staged_tables)
        """Tables whose puts are staged and merged (empty: every put goes straight into ``cells``)."""
        for table in self.staged_tables:
            _check_table(table)
        self.merge_interval_s = merge_interval_s
        """How long staged cells wait at most for the periodic merge (0 or less: no periodic merge)."""
        self.merge_rows = merge_rows
        """A merge starts once this many cells were staged by this process since the last one."""
        self.sleep = sleep
        """How the periodic merge waits (tests drive it)."""
        self.merges = 0
        """Merges that moved cells (at open, periodic, before a read, after :attr:`merge_rows`)."""
        self.merged_cells = 0
        """Cells those merges moved into ``cells``."""
        self._unmerged = 0
        """Cells this process staged since its last merge (another hub replica's are found by the merge itself)."""
        self._merging: asyncio.Task[int] | None = None
        self._merge_loop: asyncio.Task[None] | None = None

    @property
    def checkpoints(self) -> int:
        """Checkpoints run off the write path, on the checkpointer's thread (see ``checkpoint_pages``)."""
        return self._sql.checkpoints

    @property
    def busy_seconds(self) -> float:
        """Seconds spent in SQLite since start (the writer's thread and the reader's)."""
        return self._sql.busy_seconds + self._sql.read_busy_seconds

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, reads only, in one read transaction on the reader's connection and thread
        (:meth:`~mhp_wire.sqlite.SqliteThread.snapshot`): it sees every batch whose call has returned and does not
        wait for the write transaction in flight."""
        try:
            return await self._sql.snapshot(fn, *args)
        except StorageError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def open(self) -> None:
        """Open (and create) the database file. A file another process holds locked longer than the busy timeout
        (a replica sharing it, starting at the same moment or committing a large write on a loaded machine) is tried
        again every 0.1 s for up to ``OPEN_WAIT_S`` (the loop's clock) before the open fails."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OPEN_WAIT_S
        while True:
            try:
                await self._sql.open()
                break
            except StorageError as exc:
                if "locked" not in str(exc) or loop.time() >= deadline:
                    raise StoreUnavailable(str(exc)) from exc
                log.warning("hub store %s is locked by another connection; trying to open it again", self._sql.path)
                await asyncio.sleep(0.1)
        try:
            await self.merge()  # cells staged before a crash (kill -9, power loss) are in the file: merged now
        except StoreUnavailable:  # (a locked file) the periodic merge, or the first read of the table, tries again
            log.warning("staged cells not merged at open; merged later", exc_info=True)
        if self.staged_tables and self.merge_interval_s > 0:
            self._merge_loop = asyncio.create_task(self._merge_periodically(), name="hub-store-merge")

    async def close(self) -> None:
        """Close the database, once every batch handed in is committed (or failed) and the staged cells merged; a
        store not open (never opened, or closed already) has nothing to close."""
        try:
            self._sql.db  # noqa: B018  (raises when the store is not open)
        except StorageError:
            return
        if self._merge_loop is not None:
            self._merge_loop.cancel()
            await asyncio.gather(self._merge_loop, return_exceptions=True)
            self._merge_loop = None
        await self.commits.drain()
        if self._merging is not None:
            await asyncio.gather(self._merging, return_exceptions=True)
        try:
            await self.merge()
        except StoreUnavailable:
            log.warning("staged cells not merged at close; the next open merges them", exc_info=True)
        finally:
            await self._sql.close()

    # -- staged tables ------------------------------------------------------------------------------------

    @staticmethod
    def _merge_in(db: sqlite3.Connection) -> int:
        """Move every staged cell into ``cells`` inside the open transaction; how many were moved."""
        if db.execute("SELECT 1 FROM staged_cells LIMIT 1").fetchone() is None:
            return 0
        moved = db.execute(_MERGE).rowcount
        db.execute("DELETE FROM staged_cells")
        return int(moved)

    async def merge(self) -> int:
        """Move every staged cell into ``cells`` in key order, in one transaction (all or nothing: a failure leaves
        them staged, and the next merge takes them); returns how many cells were moved. The staged cells of every
        process on the file are merged (hub replicas share it), also by a store staging nothing itself (at open: a
        file staged by an earlier configuration)."""
        staged = self._unmerged
        self._unmerged = 0  # cells staged from here on wait for the next merge
        try:
            waiting: bool = await self._read(
                lambda: self._sql.db.execute("SELECT 1 FROM staged_cells LIMIT 1").fetchone() is not None)
            if not waiting:
                return 0
            moved: int = await self.commits.tx(self._merge_in)
        except StorageError as exc:
            self._unmerged += staged
            raise StoreUnavailable(str(exc)) from exc
        except BaseException:
            self._unmerged += staged
            raise
        if moved:
            self.merges += 1
            self.merged_cells += moved
        return moved

    async def _merged(self, table: str) -> None:
        """Before a read of ``table``: if it is staged, merge, so the read answers what it answers unstaged."""
        if table in self.staged_tables:
            await self.merge()

    async def _merge_periodically(self) -> None:
        while True:
            await self.sleep(self.merge_interval_s)
            try:
                await self.merge()
            except Exception:  # a StoreUnavailable (a locked or full file), or anything else: logged, tried again
                log.warning("periodic merge of staged cells failed; they stay staged", exc_info=True)

    def _count_staged(self, mutations: list[Mutation]) -> None:
        """After a batch: start a merge once :attr:`merge_rows` cells were staged since the last one."""
        self._unmerged += sum(len(m.put) for m in mutations if m.table in self.staged_tables)
        if self._unmerged >= self.merge_rows and (self._merging is None or self._merging.done()):
            self._merging = asyncio.create_task(self.merge(), name="hub-store-merge-rows")
            self._merging.add_done_callback(_log_merge_failure)

    def _get(self, table: str, row: str, columns: list[str] | None) -> Row:
        where, args = _column_filter(columns)
        cur = self._sql.db.execute(f"SELECT col, val FROM cells WHERE tbl=? AND row=?{where}", [table, row, *args])
        return dict(cur)  # built in C: a BLOB comes back as bytes (a request row holds thousands of cells)

    async def get(self, table: str, row: str, columns: list[str] | None = None) -> Row:
        """The cells of one row."""
        _check_table(table)
        await self._merged(table)
        result: Row = await self._read(self._get, table, row, columns)
        return result

    async def get_each(self, table: str, wanted: dict[str, list[str] | None]) -> dict[str, Row]:
        """Rows with their own column selections, in one hand-off to the SQLite thread."""
        _check_table(table)
        await self._merged(table)

        def op() -> dict[str, Row]:
            found = ((row, self._get(table, row, columns)) for row, columns in wanted.items())
            return {row: cells for row, cells in found if cells}

        result: dict[str, Row] = await self._read(op)
        return result

    async def get_many(self, table: str, rows: list[str], columns: list[str] | None = None) -> dict[str, Row]:
        """Several rows at once."""
        _check_table(table)
        await self._merged(table)

        def op() -> dict[str, Row]:
            out: dict[str, Row] = {}
            where, cargs = _column_filter(columns)
            for i in range(0, len(rows), 500):
                chunk = rows[i:i + 500]
                marks = ",".join("?" * len(chunk))
                cur = self._sql.db.execute(
                    f"SELECT row, col, val FROM cells WHERE tbl=? AND row IN ({marks}){where}",
                    [table, *chunk, *cargs])
                for r, c, v in cur:  # a BLOB comes back as bytes: no copy
                    out.setdefault(r, {})[c] = v
            return out

        result: dict[str, Row] = await self._read(op)
        return result

    async def get_many_cells(self, table: str, rows: list[str], columns: list[str] | None = None
                             ) -> list[tuple[str, str, bytes]]:
        """:meth:`get_many`'s cells as ``(row, column, value)`` triples, as SQLite returns them (built in C)."""
        _check_table(table)
        await self._merged(table)

        unique = list(dict.fromkeys(rows))  # a row named twice is answered once, as by get_many

        def op() -> list[tuple[str, str, bytes]]:
            out: list[tuple[str, str, bytes]] = []
            where, cargs = _column_filter(columns)
            for i in range(0, len(unique), 500):
                chunk = unique[i:i + 500]
                marks = ",".join("?" * len(chunk))
                cur = self._sql.db.cursor()
                cur.row_factory = None  # plain tuples
                out += cur.execute(f"SELECT row, col, val FROM cells WHERE tbl=? AND row IN ({marks}){where}",
                                   [table, *chunk, *cargs]).fetchall()
            return out

        result: list[tuple[str, str, bytes]] = await self._read(op)
        return result

    async def scan(self, table: str, *, prefix: str | None = None, start: str | None = None,
                   stop: str | None = None, limit: int | None = None,
                   columns: list[str] | None = None) -> list[tuple[str, Row]]:
        """Rows in key order."""
        _check_table(table)
        if prefix is not None:
            if start is not None or stop is not None:
                raise ValueError("prefix cannot be combined with start/stop (as in happybase)")
            start, stop = prefix, prefix_stop(prefix)
        staged = table in self.staged_tables

        def op() -> list[tuple[str, Row]]:
            where, cargs = _column_filter(columns)
            sql = " WHERE tbl=?"
            args: list[object] = [table]
            if start is not None:
                sql += " AND row >= ?"
                args.append(start)
            if stop is not None:
                sql += " AND row < ?"
                args.append(stop)
            db = self._sql.db
            cells: Iterable[tuple[str, str, bytes]] = db.execute(
                "SELECT row, col, val FROM cells" + sql + where + " ORDER BY row, col", [*args, *cargs])
            if staged:  # a staged table is read as merged, without merging (a read takes no write lock)
                waiting = db.execute("SELECT row, col, val FROM staged_cells" + sql + where + " ORDER BY rowid",
                                     [*args, *cargs]).fetchall()
                if waiting:
                    cells = _overlaid(cells, waiting)
            out: list[tuple[str, Row]] = []
            for r, c, v in cells:
                if not out or out[-1][0] != r:
                    if limit is not None and len(out) >= limit:
                        break
                    out.append((r, {}))
                out[-1][1][c] = bytes(v)
            return out

        result: list[tuple[str, Row]] = await self._read(op)
        return result

    async def scan_ranges(self, table: str, ranges: list[tuple[str, str]]) -> list[list[tuple[str, Row]]]:
        """Several key ranges, each in key order, in one hand-off to the SQLite thread."""
        _check_table(table)
        await self._merged(table)

        def op() -> list[list[tuple[str, Row]]]:
            out: list[list[tuple[str, Row]]] = []
            sql = "SELECT row, col, val FROM cells WHERE tbl=? AND row >= ? AND row < ? ORDER BY row, col"
            for start, stop in ranges:
                rows: list[tuple[str, Row]] = []
                for r, c, v in self._sql.db.execute(sql, (table, start, stop)):
                    if not rows or rows[-1][0] != r:
                        rows.append((r, {}))
                    rows[-1][1][c] = bytes(v)
                out.append(rows)
            return out

        result: list[list[tuple[str, Row]]] = await self._read(op)
        return result

    @staticmethod
    def _delete(db: sqlite3.Connection, m: Mutation) -> None:
        if not m.delete:
            db.execute("DELETE FROM cells WHERE tbl=? AND row=?", (m.table, m.row))
        else:
            db.executemany("DELETE FROM cells WHERE tbl=? AND row=? AND col=?",
                           [(m.table, m.row, c) for c in m.delete])

    def _write(self, db: sqlite3.Connection, mutations: list[Mutation]) -> None:
        """The mutations of one :meth:`batch`, in order, inside the open transaction; the puts to a staged table
        appended to ``staged_cells``."""
        # The cells of consecutive puts go in one statement (a batch of a hundred audit lines or client entries
        # is one executemany, not a hundred); a deletion first writes the puts before it, so order holds. A deletion
        # in a staged table first merges (in this transaction), so it deletes what a read would have found.
        puts: list[tuple[str, str, str, bytes]] = []
        staged: list[tuple[str, str, str, bytes]] = []
        for m in mutations:
            _check_table(m.table)
            into = staged if m.table in self.staged_tables else puts
            if m.delete is not None:
                if puts:
                    db.executemany(_PUT, puts)
                    puts.clear()
                if into is staged:
                    if staged:
                        db.executemany(_STAGE, staged)
                        staged.clear()
                    self._merge_in(db)
                self._delete(db, m)
            into.extend(zip(repeat(m.table), repeat(m.row), m.put.keys(), m.put.values()))  # the rows built in C
        if puts:
            db.executemany(_PUT, puts)
        if staged:
            db.executemany(_STAGE, staged)

    async def batch(self, mutations: list[Mutation]) -> None:
        """Apply every mutation in one transaction, durable when this returns.

        Batches handed in while the SQLite thread is busy are committed together (:attr:`commits`, a
        :class:`~mhp_wire.sqlite.GroupTransactions`): one transaction, one WAL sync for all of them, each batch in
        its own savepoint, so one that fails is rolled back alone and raises to its own caller only. No batch waits
        for company: the first starts a commit at once, and whatever arrives meanwhile goes into the next one."""
        try:
            await self.commits.tx(functools.partial(self._write, mutations=mutations))
        except StorageError as exc:
            raise StoreUnavailable(str(exc)) from exc
        if self.staged_tables:
            self._count_staged(mutations)

    async def increment(self, table: str, row: str, column: str, value: int = 1) -> int:
        """Atomically add to a big-endian 64-bit counter, as HBase stores them."""
        _check_table(table)

        def op(db: sqlite3.Connection) -> int:
            if table in self.staged_tables:
                self._merge_in(db)  # in its own transaction: nothing staged after the merge is missed
            cur = db.execute("SELECT val FROM cells WHERE tbl=? AND row=? AND col=?", (table, row, column)).fetchone()
            new = (struct.unpack(">q", cur[0])[0] if cur else 0) + value
            db.execute("INSERT OR REPLACE INTO cells VALUES (?,?,?,?)", (table, row, column, struct.pack(">q", new)))
            return int(new)

        try:
            result: int = await self._sql.tx(op)
        except StorageError as exc:
            raise StoreUnavailable(str(exc)) from exc
        return result

    async def check_and_put(self, table: str, row: str, column: str, expected: bytes | None, value: bytes) -> bool:
        """Compare and set one cell in one transaction, not waiting for the disk: its one use, a claim on an
        ``Idempotency-Key``, may be lost in a crash (the key is then unclaimed, as before the attempt), and the
        request written under it is durable with it (SQLite syncs the WAL in order)."""
        _check_table(table)

        def op(db: sqlite3.Connection) -> bool:
            if table in self.staged_tables:
                self._merge_in(db)  # in its own transaction: nothing staged after the merge is missed
            cur = db.execute("SELECT val FROM cells WHERE tbl=? AND row=? AND col=?", (table, row, column)).fetchone()
            if (bytes(cur[0]) if cur else None) != expected:
                return False
            db.execute("INSERT OR REPLACE INTO cells VALUES (?,?,?,?)", (table, row, column, value))
            return True

        try:
            result: bool = await self._sql.tx(op, durable=False)
        except StorageError as exc:
            raise StoreUnavailable(str(exc)) from exc
        return result

    async def ping(self) -> None:
        """Check that the database accepts a write."""
        try:
            await self._sql.tx(lambda db: db.execute("DELETE FROM ping"))
        except StorageError as exc:
            raise StoreUnavailable(str(exc)) from exc


def _overlaid(cells: Iterable[tuple[str, str, bytes]], staged: list[tuple[str, str, bytes]]
              ) -> list[tuple[str, str, bytes]]:
    """``cells`` (in key order) with ``staged`` (in the order they were staged) put over them, in key order: what
    the merge would make of them (a deletion in a staged table merges first, so nothing staged is ever deleted)."""
    merged = {(r, c): v for r, c, v in cells}
    for r, c, v in staged:
        merged[(r, c)] = v
    return [(r, c, v) for (r, c), v in sorted(merged.items())]


def _log_merge_failure(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("merge of staged cells failed; they stay staged", exc_info=task.exception())
