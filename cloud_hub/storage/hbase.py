"""The production backend: Apache HBase through its Thrift (v1) gateway, with happybase.

The only module that imports happybase. happybase is synchronous, so operations run on a small thread pool,
each thread holding its own connection. Its own ``ConnectionPool`` replaces a broken connection and re-raises
without retrying (``reference/delivery.md``), so this backend does the retrying itself: a transport failure
(refused, reset, broken pipe, the Thrift server closing an idle connection, a timeout) drops that connection,
moves to the next Thrift gateway address, and tries again, a bounded number of times. Every write here is
idempotent (the row keys are deterministic and a put of the same cells is the same put), except the counter
increment, which is never retried after it may have reached the server.

After a failure the backend is "down" for a short moment: operations fail at once with
:class:`~cloud_hub.storage.StoreUnavailable` instead of each waiting for a timeout, so the hub answers 503
quickly; the next operation after that moment tries again, and storage that came back is used again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import happybase
from happybase.batch import Mutation as ThriftMutation
from Hbase_thrift import AlreadyExists  # the Thrift module happybase loads (``import happybase`` comes first)
from thriftpy2.transport import TTransportException

from cloud_hub.storage import SCHEMA, Mutation, Row, StoreUnavailable
from mhp_wire.backoff import delay_s

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSPORT_ERRORS = (TTransportException, socket.timeout, TimeoutError, ConnectionError, BrokenPipeError, OSError,
                    EOFError)


def hbase_columns(columns: list[str] | None) -> list[str] | None:
    """Our column selectors for HBase: a whole family is ``family`` there (``family:`` is the column with an
    empty qualifier since HBASE-9549), a single column ``family:qualifier``."""
    if columns is None:
        return None
    return [c[:-1] if c.endswith(":") else c for c in columns]


def parse_hosts(hosts: list[str] | str) -> list[tuple[str, int]]:
    """``["host:port", ...]`` (or a comma-separated string) to addresses; the port defaults to 9090."""
    items = hosts.split(",") if isinstance(hosts, str) else hosts
    out = []
    for item in (i.strip() for i in items if i.strip()):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "9090")
        out.append((host, int(port)))
    if not out:
        raise ValueError("give at least one HBase Thrift gateway address (host:port)")
    return out


class HBaseKV:
    """The HBase-shaped store on a real HBase (Thrift gateways at ``hosts``, tried in turn)."""

    def __init__(self, hosts: list[str] | str, *, table_prefix: str = "mhp", pool_size: int = 4,
                 timeout_ms: int = 2000, retries: int = 3, down_for_s: float = 1.0,
                 transport: str = "buffered", protocol: str = "binary") -> None:
        self.hosts = parse_hosts(hosts)
        self.table_prefix = table_prefix
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.down_for_s = down_for_s
        self._transport, self._protocol = transport, protocol
        self._pool = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="hbase")
        self._local = threading.local()
        self._next_host = 0
        self._down_until = 0.0
        self._conns: list[happybase.Connection] = []
        self._lock = threading.Lock()
        self.failovers = 0

    # -- connections ----------------------------------------------------------------------------------------

    def _connect(self) -> happybase.Connection:
        with self._lock:
            host, port = self.hosts[self._next_host % len(self.hosts)]
        conn = happybase.Connection(host, port, timeout=self.timeout_ms, autoconnect=False,
                                    table_prefix=self.table_prefix, transport=self._transport,
                                    protocol=self._protocol)
        conn.open()
        with self._lock:
            self._conns.append(conn)
        return conn

    def _drop(self, conn: happybase.Connection | None) -> None:
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken transport may raise anything; it is gone either way
                log.debug("closing a broken HBase connection failed", exc_info=True)
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
        self._local.conn = None

    @contextmanager
    def _connection(self) -> Iterator[happybase.Connection]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        yield conn

    def _run_sync(self, fn: Callable[[happybase.Connection], T], *, retry: bool = True) -> T:
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("HBase is unreachable (retrying shortly)")
        attempts = self.retries if retry else 1
        last: BaseException | None = None
        for attempt in range(attempts):
            conn = None
            try:
                with self._connection() as conn:
                    return fn(conn)
            except TRANSPORT_ERRORS as exc:
                last = exc
                self._drop(conn)
                with self._lock:
                    self._next_host += 1
                    self.failovers += 1
                log.warning("HBase Thrift gateway failed (%s); trying %s", exc,
                            "the next address" if attempt + 1 < attempts else "no more")
                if attempt + 1 < attempts:
                    time.sleep(delay_s(attempt + 1, 0.02, 0.2))
        self._down_until = time.monotonic() + self.down_for_s
        raise StoreUnavailable(f"HBase is unreachable through {len(self.hosts)} Thrift gateway(s): {last}")

    async def _run(self, fn: Callable[[happybase.Connection], T], *, retry: bool = True) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: self._run_sync(fn, retry=retry))

    # -- the KVStore interface ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and create the tables of :data:`SCHEMA` that are missing (idempotent)."""

        def create(conn: happybase.Connection) -> None:
            existing = {t.decode() for t in conn.tables()}
            for name, families in SCHEMA.items():
                if name not in existing:
                    try:
                        conn.create_table(name, {f: {"max_versions": 1} for f in families})
                    except AlreadyExists:  # another hub (replica) starting at the same moment created it
                        log.info("HBase table %s_%s was created meanwhile by another hub", self.table_prefix, name)
                        continue
                    log.info("created HBase table %s_%s", self.table_prefix, name)

        await self._run(create)

    async def close(self) -> None:
        """Close every connection and the thread pool."""
        self._pool.shutdown(wait=True)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.close()
            except Exception:  # already broken: nothing more to release
                log.debug("closing an HBase connection failed", exc_info=True)

    @staticmethod
    def _decode(data: dict[bytes, bytes]) -> Row:
        return {k.decode(): v for k, v in data.items()}

    async def get(self, table: str, row: str, columns: list[str] | None = None) -> Row:
        """The cells of one row."""
        cols = hbase_columns(columns)
        return await self._run(lambda c: self._decode(c.table(table).row(row.encode(), columns=cols)))

    async def get_each(self, table: str, wanted: dict[str, list[str] | None]) -> dict[str, Row]:
        """Rows with their own column selections, on one pooled connection in one thread hand-off."""

        def op(c: happybase.Connection) -> dict[str, Row]:
            t = c.table(table)
            found = ((row, self._decode(t.row(row.encode(), columns=hbase_columns(columns))))
                     for row, columns in wanted.items())
            return {row: cells for row, cells in found if cells}

        return await self._run(op)

    async def get_many(self, table: str, rows: list[str], columns: list[str] | None = None) -> dict[str, Row]:
        """Several rows at once (in chunks of 500 keys)."""

        cols = hbase_columns(columns)

        def op(c: happybase.Connection) -> dict[str, Row]:
            out: dict[str, Row] = {}
            t = c.table(table)
            for i in range(0, len(rows), 500):
                for key, data in t.rows([r.encode() for r in rows[i:i + 500]], columns=cols):
                    if data:
                        out[key.decode()] = self._decode(data)
            return out

        return await self._run(op)

    async def get_many_cells(self, table: str, rows: list[str], columns: list[str] | None = None
                             ) -> list[tuple[str, str, bytes]]:
        """:meth:`get_many`'s cells as ``(row, column, value)`` triples."""
        found = await self.get_many(table, rows, columns)
        return [(r, c, v) for r, cells in found.items() for c, v in cells.items()]

    async def scan(self, table: str, *, prefix: str | None = None, start: str | None = None,
                   stop: str | None = None, limit: int | None = None,
                   columns: list[str] | None = None) -> list[tuple[str, Row]]:
        """Rows in key order."""
        if prefix is not None and (start is not None or stop is not None):
            raise ValueError("prefix cannot be combined with start/stop (as in happybase)")

        def op(c: happybase.Connection) -> list[tuple[str, Row]]:
            it = c.table(table).scan(row_start=start.encode() if start else None,
                                     row_stop=stop.encode() if stop else None,
                                     row_prefix=prefix.encode() if prefix else None, columns=hbase_columns(columns),
                                     limit=limit,
                                     batch_size=min(limit or 1000, 1000))
            return [(k.decode(), self._decode(v)) for k, v in it]

        return await self._run(op)

    async def scan_ranges(self, table: str, ranges: list[tuple[str, str]]) -> list[list[tuple[str, Row]]]:
        """Several key ranges, each in key order, on one pooled connection in one thread hand-off."""

        def op(c: happybase.Connection) -> list[list[tuple[str, Row]]]:
            t = c.table(table)
            return [[(k.decode(), self._decode(v)) for k, v in t.scan(row_start=start.encode(), row_stop=stop.encode(),
                                                                      batch_size=1000)]
                    for start, stop in ranges]

        return await self._run(op)

    async def batch(self, mutations: list[Mutation]) -> None:
        """Apply mutations in order: consecutive mutations of one table go in one ``mutateRows`` call."""

        def op(c: happybase.Connection) -> None:
            i = 0
            while i < len(mutations):
                name = mutations[i].table
                if name not in SCHEMA:
                    raise KeyError(f"no table {name!r}")
                with c.table(name).batch(transaction=True) as b:
                    while i < len(mutations) and mutations[i].table == name:
                        m = mutations[i]
                        if m.delete is not None:
                            b.delete(m.row.encode(), columns=m.delete or None)
                        if m.put:
                            b.put(m.row.encode(), {k.encode(): v for k, v in m.put.items()})
                        i += 1

        await self._run(op)

    async def increment(self, table: str, row: str, column: str, value: int = 1) -> int:
        """Atomic increment of a counter cell; not retried once it may have reached the server."""
        return int(await self._run(lambda c: c.table(table).counter_inc(row.encode(), column.encode(), value),
                                   retry=False))

    async def check_and_put(self, table: str, row: str, column: str, expected: bytes | None, value: bytes) -> bool:
        """HBase's ``checkAndPut`` (Thrift v1; happybase has no wrapper for it, so its Thrift client is called);
        not retried once it may have reached the server: a retry could report False for its own first write."""
        if table not in SCHEMA:
            raise KeyError(f"no table {table!r}")

        def op(c: happybase.Connection) -> bool:
            return bool(c.client.checkAndPut(c.table(table).name, row.encode(), column.encode(), expected,
                                             ThriftMutation(column=column.encode(), value=value), {}))

        return await self._run(op, retry=False)

    async def ping(self) -> None:
        """Check that HBase answers and accepts a write."""
        await self._run(lambda c: c.table("health").put(b"ping", {b"d:at": str(time.time()).encode()}))
