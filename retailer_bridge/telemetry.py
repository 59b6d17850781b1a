"""The telemetry export: the customers' measurements, kept for the retailer's own business.

Every accepted :class:`~mhp_wire.messages.Telemetry` becomes points: measurement ``home``, tags ``gateway_id``,
``client_id`` and ``device`` (none for the home-level fields), one field per numeric or boolean reading (booleans as
1.0/0.0, so that a field never changes type), plus ``active_power_kw`` and ``sheddable_kw`` of the home; time is the
message's ``at`` in milliseconds. Here a *point* is one value of one field of one series at one time.

Billing data the hub delivered goes to the same store (:meth:`TelemetryExporter.submit_billing`): measurement
``billing``, tag ``client_id``, fields ``energy_kwh`` and ``estimated`` (1.0 for an estimated reading, else 0.0),
one point per reading interval at its start; it is spooled before the bridge acknowledges the hub.

:meth:`TelemetryExporter.submit` never blocks: it buffers the message, and a spool task writes it to a spool table
on disk (SQLite, ``telemetry_db_path``) at once, so memory stays bounded whatever happens downstream and nothing
is lost through a restart. The spool keeps at most ``telemetry_spool_max`` points; beyond that the oldest go
(counted in ``dropped``). A drain task moves the spool to the store in batches of ``telemetry_batch_size``, at
least every ``telemetry_flush_interval_s``, and deletes a batch from the spool only once the store confirmed it;
a failed batch is retried with a capped back-off. Redelivered messages (same ``msg_id``: the gateway re-sends
until acknowledged, and its newest telemetry is retained) are exported once.

Stores: ``sqlite`` (a ``points`` table in the same file, queried with :meth:`TelemetryExporter.query`),
``influxdb`` (InfluxDB's v2 write API through influxdb-client, imported only here; its errors become
:class:`TelemetryStoreError` at this boundary), ``none`` (the exporter does nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

from mhp_wire.backoff import delay_s
from mhp_wire.messages import Telemetry
from mhp_wire.sqlite import SqliteThread, StorageError
from retailer_bridge.billing import BillingReading
from retailer_bridge.settings import BridgeSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

MEASUREMENT = "home"
BILLING_MEASUREMENT = "billing"
HOME_DEVICE = ""
"""The ``device`` of the home-level fields (``active_power_kw``, ``sheddable_kw``); no tag in line protocol."""
SEEN_KEEP = 10_000
"""Message ids remembered (on disk) to export a redelivered message only once."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

SPOOL_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time INTEGER NOT NULL, gateway_id TEXT NOT NULL,
    client_id TEXT NOT NULL, device TEXT NOT NULL, field TEXT NOT NULL, value REAL NOT NULL,
    measurement TEXT NOT NULL DEFAULT 'home');
CREATE TABLE IF NOT EXISTS seen (msg_id TEXT NOT NULL UNIQUE);
"""

POINTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    time INTEGER NOT NULL, gateway_id TEXT NOT NULL, client_id TEXT NOT NULL, device TEXT NOT NULL,
    field TEXT NOT NULL, value REAL NOT NULL, measurement TEXT NOT NULL DEFAULT 'home',
    PRIMARY KEY (client_id, time, gateway_id, device, field)) WITHOUT ROWID;
"""
"""The embedded store; its key serves per-client time-range queries and makes a repeated write harmless, a later
value of the same point replacing the earlier (a billing point has no gateway, device ``""`` and its own field
names, so it never shares a key with a home's)."""


def add_measurement_column(db: sqlite3.Connection) -> None:
    """Files written before billing was exported have no ``measurement`` column: every row there is ``home``."""
    for table in ("spool", "points"):
        cols = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        if cols and "measurement" not in cols:
            db.execute(f"ALTER TABLE {table} ADD COLUMN measurement TEXT NOT NULL DEFAULT '{MEASUREMENT}'")


class TelemetryStoreError(Exception):
    """The telemetry store did not take a batch; ``permanent`` when it refused the data itself (never retried)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class Point:
    """One value of one field of one series; ``time_ms`` is milliseconds since the epoch."""

    time_ms: int
    gateway_id: str
    client_id: str
    device: str
    field: str
    value: float
    measurement: str = MEASUREMENT

    @property
    def time(self) -> datetime:
        """``time_ms`` as an aware datetime."""
        return _EPOCH + self.time_ms * _MS


def to_ms(at: datetime) -> int:
    """Milliseconds since the epoch (exact, floored)."""
    return (at - _EPOCH) // _MS


def points_of(msg: Telemetry) -> list[Point]:
    """The points of one telemetry message: every finite numeric or boolean reading, and the home's power."""
    t = to_ms(msg.at)
    out = []
    readings = [(device, field, value) for device, values in msg.devices.items() for field, value in values.items()]
    readings += [(HOME_DEVICE, "active_power_kw", msg.active_power_kw), (HOME_DEVICE, "sheddable_kw", msg.sheddable_kw)]
    for device, field, value in readings:
        if value is None or not math.isfinite(value):
            continue
        out.append(Point(t, msg.gateway_id, msg.client_id, device, field, float(value)))
    return out


def billing_points(readings: Sequence[BillingReading]) -> list[Point]:
    """The points of delivered billing intervals: ``energy_kwh`` and ``estimated`` at each interval's start."""
    out = []
    for r in readings:
        t = to_ms(r.start)
        out.append(Point(t, "", r.client_id, HOME_DEVICE, "energy_kwh", r.energy_kwh, BILLING_MEASUREMENT))
        out.append(Point(t, "", r.client_id, HOME_DEVICE, "estimated", 1.0 if r.quality == "estimated" else 0.0,
                         BILLING_MEASUREMENT))
    return out


retry_delay_s = delay_s
"""Back-off before retrying a batch after ``failures`` failures in a row: the one formula of ``mhp_wire``."""


class PointStore(Protocol):
    """Where the drained points go."""

    async def open(self) -> None:
        """Get ready (create tables, connect lazily)."""

    async def write(self, points: Sequence[Point]) -> None:
        """Store one batch; returns only once the store confirmed it, else raises :class:`TelemetryStoreError`."""

    async def close(self) -> None:
        """Release the store's resources."""


class SqlitePointStore:
    """The embedded store: the ``points`` table in the spool's own SQLite file."""

    def __init__(self, db: SqliteThread) -> None:
        self._db = db

    async def open(self) -> None:
        """Nothing to do: the exporter opened the file with :data:`POINTS_SCHEMA`."""

    async def write(self, points: Sequence[Point]) -> None:
        """Write a batch; a point already stored under the same key takes the newer value, as InfluxDB does (a
        repeated write changes nothing; a billing correction of an interval replaces the first delivery)."""
        rows = [(p.time_ms, p.gateway_id, p.client_id, p.device, p.field, p.value, p.measurement) for p in points]
        try:
            await self._db.tx(lambda db: db.executemany(
                "INSERT INTO points (time, gateway_id, client_id, device, field, value, measurement) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT (client_id, time, gateway_id, device, field) "
                "DO UPDATE SET value=excluded.value, measurement=excluded.measurement", rows))
        except StorageError as exc:
            raise TelemetryStoreError(str(exc)) from exc

    async def query(self, client_id: str, start: datetime, end: datetime) -> list[Point]:
        """A client's points with ``start <= time < end``, in time order."""
        args = (client_id, to_ms(start), to_ms(end))

        def read(db: sqlite3.Connection) -> list[Point]:
            return [Point(*row) for row in db.execute(
                "SELECT time, gateway_id, client_id, device, field, value, measurement FROM points "
                "WHERE client_id=? AND time>=? AND time<? ORDER BY time, gateway_id, device, field", args)]

        return await self._db.read(read)

    async def close(self) -> None:
        """Nothing to do: the exporter closes the file."""


class InfluxPointStore:
    """InfluxDB's v2 write API (``/api/v2/write``), through influxdb-client's synchronous writer on a worker thread."""

    def __init__(self, url: str, token: str, org: str, bucket: str, *, timeout_s: float = 10.0,
                 ca_file: str | None = None) -> None:
        self.url, self.org, self.bucket = url, org, bucket
        self.ca_file = ca_file
        """The CA an ``https://`` server's certificate is verified with (the system's CAs when None)."""
        self._token = token
        self._timeout_ms = max(1, int(timeout_s * 1000))
        self._client: Any = None
        self._write_api: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="influx")
        self._inflight: Future[None] | None = None

    async def open(self) -> None:
        """Create the client (it connects on the first write)."""
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        self._client = InfluxDBClient(url=self.url, token=self._token, org=self.org, timeout=self._timeout_ms,
                                      verify_ssl=True, ssl_ca_cert=self.ca_file)
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

    @staticmethod
    def line_protocol(points: Sequence[Point]) -> list[str]:
        """The batch as line protocol, one line per series and time (ms precision)."""
        from influxdb_client import Point as InfluxPoint
        from influxdb_client import WritePrecision

        lines: dict[tuple[str, int, str, str, str], Any] = {}
        for p in points:
            key = (p.measurement, p.time_ms, p.gateway_id, p.client_id, p.device)
            line = lines.get(key)
            if line is None:
                line = InfluxPoint(p.measurement)
                if p.gateway_id:  # a billing point has none
                    line.tag("gateway_id", p.gateway_id)
                line.tag("client_id", p.client_id)
                if p.device != HOME_DEVICE:
                    line.tag("device", p.device)
                line.time(p.time_ms, WritePrecision.MS)
                lines[key] = line
            line.field(p.field, p.value)
        return [lp for lp in (line.to_line_protocol() for line in lines.values()) if lp]

    async def write(self, points: Sequence[Point]) -> None:
        """Write a batch; HTTP 400/422 (the data itself refused) is a permanent error, anything else is retried."""
        if self._write_api is None:
            raise TelemetryStoreError("the InfluxDB store is not open")
        records = self.line_protocol(points)
        self._inflight = self._pool.submit(self._write, records)
        await asyncio.wrap_future(self._inflight)

    def _write(self, records: list[str]) -> None:
        from influxdb_client import WritePrecision
        from influxdb_client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            self._write_api.write(bucket=self.bucket, org=self.org, record=records,
                                  write_precision=WritePrecision.MS)
        except ApiException as exc:
            status = exc.status or 0
            raise TelemetryStoreError(f"InfluxDB answered {status} {exc.reason}: {exc.body!r:.300}",
                                      permanent=status in (400, 422)) from exc
        except (HTTPError, OSError) as exc:
            raise TelemetryStoreError(f"InfluxDB at {self.url} unreachable: {exc}") from exc

    async def close(self) -> None:
        """Close the client and stop the worker thread (after a write in progress, bounded by the timeout)."""
        if self._inflight is not None and not self._inflight.done():
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(self._inflight)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._client is not None:
            client, self._client, self._write_api = self._client, None, None
            client.close()


class TelemetryExporter:
    """Spools every submitted telemetry on disk and drains it to the telemetry store in batches.

    Use as an async context manager (opens the spool and runs :meth:`run` in a task until exit), or call
    :meth:`open`, run :meth:`run` until cancelled, then :meth:`close`. Counters: ``spooled``, ``written``,
    ``dropped``, ``failed_batches``, ``duplicates``; ``spool_size`` is the points on disk, ``pending`` in memory.
    """

    # Complexity (PLR0913): the telemetry backend's settings, each a keyword with a default.
    def __init__(self, kind: Literal["sqlite", "influxdb", "none"], db_path: Path | str, *,  # noqa: PLR0913
                 influx_url: str | None = None, influx_token: str = "", influx_org: str = "mhp",
                 influx_bucket: str = "telemetry", influx_timeout_s: float = 10.0,
                 influx_ca_file: str | None = None, batch_size: int = 500,
                 flush_interval_s: float = 1.0, spool_max: int = 1_000_000, pending_max: int = 10_000,
                 retry_base_s: float = 0.5, retry_max_s: float = 30.0) -> None:
        self.kind = kind
        self.db_path = Path(db_path)
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.spool_max = spool_max
        self.pending_max = max(pending_max, batch_size)
        self.retry_base_s, self.retry_max_s = retry_base_s, retry_max_s
        self.spooled = 0
        self.written = 0
        self.dropped = 0
        self.failed_batches = 0
        self.duplicates = 0
        self.spool_size = 0
        self._pending: list[tuple[str, list[Point]]] = []
        self._pending_points = 0
        self._submitted = asyncio.Event()
        self._grown = asyncio.Event()
        self._dropping = False
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Future[Any]] = set()
        self._db: SqliteThread | None = None
        self.store: PointStore | None = None
        if kind == "sqlite":
            self._db = SqliteThread(self.db_path, SPOOL_SCHEMA + POINTS_SCHEMA, name="telemetry")
            self.store = SqlitePointStore(self._db)
        elif kind == "influxdb":
            if not influx_url:
                raise ValueError("telemetry store 'influxdb' needs influx_url")
            self._db = SqliteThread(self.db_path, SPOOL_SCHEMA, name="telemetry")
            self.store = InfluxPointStore(influx_url, influx_token, influx_org, influx_bucket,
                                          timeout_s=influx_timeout_s, ca_file=influx_ca_file)

    @classmethod
    def from_settings(cls, settings: BridgeSettings, **tuning: Any) -> TelemetryExporter:
        """The bridge's exporter; unless ``telemetry_db_path`` is set, a bridge given its own ``db_path`` keeps
        its telemetry next to it (``<db stem>-telemetry.db``) so that bridges sharing a directory stay apart."""
        db_path = settings.telemetry_db_path
        if "telemetry_db_path" not in settings.model_fields_set and "db_path" in settings.model_fields_set:
            db_path = settings.db_path.with_name(f"{settings.db_path.stem}-telemetry.db")
        return cls(settings.telemetry_store, db_path, influx_url=settings.influx_url,
                   influx_token=settings.influx_token, influx_org=settings.influx_org,
                   influx_bucket=settings.influx_bucket, influx_ca_file=settings.influx_ca_file,
                   batch_size=settings.telemetry_batch_size,
                   flush_interval_s=settings.telemetry_flush_interval_s, spool_max=settings.telemetry_spool_max,
                   **tuning)

    @property
    def enabled(self) -> bool:
        """False for the ``none`` store."""
        return self._db is not None

    @property
    def pending(self) -> int:
        """Points submitted but not yet on disk."""
        return self._pending_points

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the spool (and the embedded store) and the store client."""
        if self._db is None or self.store is None:
            return
        await self._db.open()
        await self._db.tx(add_measurement_column)
        self.spool_size = await self._db.read(lambda db: int(db.execute("SELECT COUNT(*) FROM spool").fetchone()[0]))
        await self.store.open()
        if self.spool_size:
            log.info("telemetry export: %d points left in the spool from before", self.spool_size)
            self._grown.set()

    async def run(self) -> None:
        """Spool and drain until cancelled."""
        if self._db is None:
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._spool_loop(), name="telemetry-spool")
            tg.create_task(self._drain_loop(), name="telemetry-drain")

    async def close(self) -> None:
        """Stop, put what is still in memory on disk, close the store and the spool."""
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._inflight:  # a spool write or a batch that was under way when run() was cancelled
            done, _ = await asyncio.wait(set(self._inflight))
            for fut in done:
                if not fut.cancelled() and fut.exception() is not None:
                    log.debug("telemetry export: unfinished at close: %r", fut.exception())
        if self._db is None or self.store is None:
            return
        try:
            if self._pending:
                await self._flush_pending()
        except StorageError as exc:
            log.error("telemetry export: %d points not spooled at shutdown: %s", self._pending_points, exc)
        finally:
            await self.store.close()
            await self._db.close()

    async def __aenter__(self) -> TelemetryExporter:
        try:
            await self.open()
        except BaseException:
            await self.close()
            raise
        if self._db is not None:
            self._task = asyncio.create_task(self.run(), name="telemetry-export")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- intake -------------------------------------------------------------------------------------------

    def submit(self, msg: Telemetry) -> None:
        """Take one telemetry message for export; never blocks (the spool task puts it on disk)."""
        if self._db is None:
            return
        points = points_of(msg)
        if not points:
            return
        self._pending.append((msg.msg_id, points))
        self._pending_points += len(points)
        while self._pending_points > self.pending_max and len(self._pending) > 1:
            _, lost = self._pending.pop(0)
            self._pending_points -= len(lost)
            self._count_dropped(len(lost), "the spool does not keep up")
        self._submitted.set()

    async def submit_billing(self, msg_id: str, readings: Sequence[BillingReading]) -> None:
        """Take the intervals of one billing delivery for export and put them in the spool now (returns once
        they are on disk; a redelivery of the same ``msg_id`` is exported once)."""
        if self._db is None:
            return
        points = billing_points(readings)
        if not points:
            return
        self._pending.append((f"billing-{msg_id}", points))
        self._pending_points += len(points)
        await self._shielded(self._flush_pending())

    async def _spool_loop(self) -> None:
        while True:
            await self._submitted.wait()
            self._submitted.clear()
            try:
                await self._shielded(self._flush_pending())
            except StorageError as exc:
                log.error("telemetry export: cannot write the spool (%d points waiting): %s",
                          self._pending_points, exc)
                await asyncio.sleep(1.0)
                self._submitted.set()

    async def _shielded(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` to its end even when the caller is cancelled (:meth:`close` waits for it): a batch taken
        from memory is on disk, a batch the store confirmed leaves the spool."""
        task = asyncio.ensure_future(work)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    async def _flush_pending(self) -> None:
        assert self._db is not None
        batch, self._pending, self._pending_points = self._pending, [], 0
        spool_max = self.spool_max

        def tx(db: sqlite3.Connection) -> tuple[int, int, int]:
            added = dup = 0
            for msg_id, points in batch:
                if db.execute("INSERT OR IGNORE INTO seen (msg_id) VALUES (?)", (msg_id,)).rowcount == 0:
                    dup += 1
                    continue
                db.executemany(
                    "INSERT INTO spool (time, gateway_id, client_id, device, field, value, measurement) "
                    "VALUES (?,?,?,?,?,?,?)",
                    [(p.time_ms, p.gateway_id, p.client_id, p.device, p.field, p.value, p.measurement)
                     for p in points])
                added += len(points)
            db.execute("DELETE FROM seen WHERE rowid <= (SELECT MAX(rowid) FROM seen) - ?", (SEEN_KEEP,))
            size = int(db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])
            over = max(0, size - spool_max)
            if over:
                db.execute("DELETE FROM spool WHERE id IN (SELECT id FROM spool ORDER BY id LIMIT ?)", (over,))
            return added, dup, over

        try:
            added, dup, over = await self._db.tx(tx)
        except StorageError:
            self._pending = batch + self._pending
            self._pending_points = sum(len(p) for _, p in self._pending)
            raise
        self.spooled += added
        self.duplicates += dup
        self.spool_size += added - over
        if over:
            self._count_dropped(over, f"the spool is full ({spool_max} points)")
        elif self._dropping and self.spool_size < spool_max:
            self._dropping = False
        if added:
            self._grown.set()

    def _count_dropped(self, n: int, why: str) -> None:
        self.dropped += n
        if not self._dropping:
            self._dropping = True
            log.warning("telemetry export: dropping the oldest points: %s", why)
        log.debug("telemetry export: dropped %d points (%d in all)", n, self.dropped)

    # -- drain --------------------------------------------------------------------------------------------

    async def _drain_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            while self.spool_size == 0:
                self._grown.clear()
                await self._grown.wait()
            deadline = loop.time() + self.flush_interval_s
            while self.spool_size < self.batch_size and (left := deadline - loop.time()) > 0:
                self._grown.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._grown.wait()
            while self.spool_size > 0:
                try:
                    sent = await self._shielded(self._send_batch(failures))
                except StorageError as exc:
                    log.log(logging.ERROR if failures == 0 else logging.DEBUG,
                            "telemetry export: cannot read the spool (retrying): %s", exc)
                    sent = False
                if sent:
                    if failures:
                        log.info("telemetry export: the %s store is back after %d failed batches",
                                 self.kind, failures)
                    failures = 0
                else:
                    failures += 1
                    await asyncio.sleep(retry_delay_s(failures, self.retry_base_s, self.retry_max_s))

    async def _send_batch(self, failures: int) -> bool:
        """Send the oldest batch of the spool; True when it left the spool (stored, or refused for good)."""
        assert self._db is not None and self.store is not None
        limit = self.batch_size
        batch = await self._db.read(lambda db: db.execute(
            "SELECT id, time, gateway_id, client_id, device, field, value, measurement FROM spool ORDER BY id "
            "LIMIT ?",
            (limit,)).fetchall())
        if not batch:
            self.spool_size = 0
            return True
        points = [Point(*row[1:]) for row in batch]
        try:
            await self.store.write(points)
        except TelemetryStoreError as exc:
            self.failed_batches += 1
            if exc.permanent:
                log.error("telemetry export: the %s store refused %d points, dropped: %s",
                          self.kind, len(points), exc)
                self.dropped += len(points)
            else:
                level = logging.ERROR if failures == 0 else logging.DEBUG
                log.log(level, "telemetry export: the %s store failed (%d points spooled, retrying): %s",
                        self.kind, self.spool_size, exc)
                return False
        else:
            self.written += len(points)
        last_id = batch[-1][0]
        deleted = await self._db.tx(lambda db: db.execute("DELETE FROM spool WHERE id <= ?", (last_id,)).rowcount)
        self.spool_size = max(0, self.spool_size - deleted)
        return True

    # -- reading back -------------------------------------------------------------------------------------

    async def query(self, client_id: str, start: datetime, end: datetime) -> list[Point]:
        """A client's stored points with ``start <= time < end`` (the ``sqlite`` store only)."""
        if not isinstance(self.store, SqlitePointStore):
            raise RuntimeError(f"the {self.kind} telemetry store is not queried here")
        return await self.store.query(client_id, start, end)
