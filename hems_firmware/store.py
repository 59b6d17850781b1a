"""The gateway's SQLite: its schema, its one migration and every SQL statement the gateway runs.

What is stored: the commands of its bridge (with what each holds shed and the newest revision whose outcome is in
the outbox), the outbox of outcomes, the buffer of telemetry, the loads waiting to be switched back on and the
customer's schedule. Nothing here decides anything: the callers (:mod:`hems_firmware.daemon`) say what to store.
May import: :mod:`mhp_wire` (messages, the SQLite thread, the outbox's storage interface), nothing of the gateway.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from mhp_wire.messages import Command, LoadShiftParams, Outcome, Schedule, Telemetry, encode
from mhp_wire.mqtt import PacketTooLarge
from mhp_wire.outbox import Pending
from mhp_wire.sqlite import SqliteThread

# commands.reported: the newest revision of the request whose outcome is in the outbox (0: none yet), set in the
# transaction that stores the outcome, so that a restart reports a revision that was not, and none twice.
SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    request_id TEXT PRIMARY KEY, payload BLOB NOT NULL, state TEXT NOT NULL, received_at REAL NOT NULL,
    shed TEXT NOT NULL DEFAULT '[]', reported INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS outbox (
    msg_id TEXT PRIMARY KEY, payload BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS telemetry (
    seq INTEGER PRIMARY KEY, msg_id TEXT NOT NULL, payload BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS telemetry_msg ON telemetry(msg_id);
CREATE TABLE IF NOT EXISTS to_restore (name TEXT PRIMARY KEY, request_id TEXT, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS schedule (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL,
    payload BLOB NOT NULL);
"""


def add_reported_column(db: sqlite3.Connection) -> None:
    """Add ``commands.reported`` to a database from before it. There the outcome was stored when a command became
    ``active`` (a load shift's when it arrived), so those rows count as reported for the revision they hold: a
    migrated gateway repeats no outcome."""
    if "reported" in {r[1] for r in db.execute("PRAGMA table_info(commands)")}:
        return
    db.execute("ALTER TABLE commands ADD COLUMN reported INTEGER NOT NULL DEFAULT 0")
    done = []
    for request_id, payload, state in db.execute("SELECT request_id, payload, state FROM commands").fetchall():
        cmd = Command.model_validate_json(payload)
        if state != "scheduled" or isinstance(cmd.params, LoadShiftParams):
            done.append((cmd.revision, request_id))
    db.executemany("UPDATE commands SET reported=? WHERE request_id=?", done)


class GatewayStore:
    """One gateway's database, opened by :meth:`open` (which migrates it) and closed by :meth:`close`."""

    def __init__(self, path: Path, name: str) -> None:
        self.sql = SqliteThread(path, SCHEMA, name=name)

    async def open(self) -> None:
        await self.sql.open()
        try:
            await self.sql.tx(add_reported_column)
        except BaseException:
            await self.sql.close()
            raise

    async def close(self) -> None:
        await self.sql.close()

    # -- what a restart resumes ------------------------------------------------------------------------------

    async def last_telemetry_seq(self) -> int:
        return await self.sql.read(lambda db: int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM telemetry")
                                                  .fetchone()[0]))

    async def loads_to_restore(self) -> dict[str, str | None]:
        """``{load: request that shed it}`` for the loads waiting to be switched back on."""
        return await self.sql.read(lambda db: {r[0]: r[1] for r in db.execute(
            "SELECT name, request_id FROM to_restore")})

    async def schedule(self) -> Schedule | None:
        stored = await self.sql.read(lambda db: db.execute("SELECT payload FROM schedule WHERE id=1").fetchone())
        return None if stored is None else Schedule.model_validate_json(stored[0])

    async def unfinished_commands(self) -> list[dict[str, Any]]:
        """The stored commands still ``scheduled`` or ``active``: ``payload``, ``received_at``, ``shed`` (a list),
        ``reported`` and the rest of their row."""
        rows = await self.sql.read(lambda db: [dict(r) for r in db.execute(
            "SELECT * FROM commands WHERE state IN ('scheduled', 'active')")])
        for row in rows:
            row["shed"] = json.loads(row["shed"])
        return rows

    # -- commands -------------------------------------------------------------------------------------------

    async def store_command(self, cmd: Command, now: float) -> int | None:
        """Store ``cmd``: None when its request is new; else the revision held before (replaced when ``cmd`` is
        newer, keeping the row's ``active`` state)."""

        def store(db: sqlite3.Connection) -> int | None:
            row = db.execute("SELECT payload, state FROM commands WHERE request_id=?", (cmd.request_id,)).fetchone()
            if row is None:
                db.execute("INSERT INTO commands (request_id, payload, state, received_at) VALUES (?,?,?,?)",
                           (cmd.request_id, encode(cmd), "scheduled", now))
                return None
            held = Command.model_validate_json(row[0]).revision
            if cmd.revision > held:
                db.execute("UPDATE commands SET payload=?, state=? WHERE request_id=?",
                           (encode(cmd), "active" if row[1] == "active" else "scheduled", cmd.request_id))
            return held

        return await self.sql.tx(store)

    async def held_revision(self, request_id: str) -> int | None:
        """The revision of the stored command of ``request_id`` (None: none stored)."""
        row = await self.sql.read(lambda db: db.execute("SELECT payload FROM commands WHERE request_id=?",
                                                        (request_id,)).fetchone())
        return Command.model_validate_json(row[0]).revision if row is not None else None

    async def mark_active(self, request_id: str) -> None:
        await self.sql.tx(lambda db: db.execute(
            "UPDATE commands SET state='active' WHERE request_id=? AND state='scheduled'", (request_id,)))

    async def hold_shed(self, request_id: str, names: list[str]) -> None:
        """What a request's action holds off, stored with its command (re-armed on restart)."""
        await self.sql.tx(lambda db: db.execute("UPDATE commands SET shed=? WHERE request_id=?",
                                                (json.dumps(names), request_id)))

    async def end_command(self, request_id: str, state: str, restore: Sequence[str], at: float) -> None:
        """Set the command's final ``state`` and, in the same transaction, queue ``restore`` to come back."""

        def record(db: sqlite3.Connection) -> None:
            db.execute("UPDATE commands SET state=? WHERE request_id=?", (state, request_id))
            db.executemany("INSERT OR REPLACE INTO to_restore VALUES (?,?,?)", [(n, request_id, at) for n in restore])

        await self.sql.tx(record)

    # -- loads to restore and the schedule ---------------------------------------------------------------------

    async def queue_restore(self, names: Sequence[str], request_id: str, at: float) -> None:
        await self.sql.tx(lambda db: db.executemany("INSERT OR REPLACE INTO to_restore VALUES (?,?,?)",
                                                    [(n, request_id, at) for n in names]))

    async def forget_restore(self, name: str) -> None:
        await self.sql.tx(lambda db: db.execute("DELETE FROM to_restore WHERE name=?", (name,)))

    async def save_schedule(self, msg: Schedule) -> None:
        payload = encode(msg)
        await self.sql.tx(lambda db: db.execute("INSERT OR REPLACE INTO schedule VALUES (1,?,?)",
                                                (msg.version, payload)))

    # -- outbox and telemetry --------------------------------------------------------------------------------

    async def report(self, out: Outcome, payload: bytes | None = None) -> bool:
        """Store the outcome of a stored command's revision in the outbox (``payload``: ``out`` encoded, when the
        caller has it), unless one of that revision (or a newer one) is stored already; the mark and the outcome
        commit together. Returns whether it was stored."""
        data = encode(out) if payload is None else payload

        def store(db: sqlite3.Connection) -> bool:
            marked = db.execute("UPDATE commands SET reported=? WHERE request_id=? AND reported<?",
                                (out.revision, out.request_id, out.revision)).rowcount
            if marked:
                db.execute("INSERT OR IGNORE INTO outbox (msg_id, payload, next_attempt_at) VALUES (?,?,0)",
                           (out.msg_id, data))
            return bool(marked)

        return await self.sql.tx(store)

    async def put_outcome(self, out: Outcome, payload: bytes | None = None) -> None:
        """Store an outcome that answers no stored command (one refused on arrival) in the outbox (``payload``:
        ``out`` encoded, when the caller has it)."""
        data = encode(out) if payload is None else payload
        await self.sql.tx(lambda db: db.execute(
            "INSERT OR IGNORE INTO outbox (msg_id, payload, next_attempt_at) VALUES (?,?,0)", (out.msg_id, data)))

    async def put_telemetry(self, msg: Telemetry, keep: int) -> None:
        """Buffer ``msg``, keeping the newest ``keep`` reports."""

        def store(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO telemetry (seq, msg_id, payload) VALUES (?,?,?)", (msg.seq, msg.msg_id,
                                                                                    encode(msg)))
            db.execute("DELETE FROM telemetry WHERE seq <= ?", (msg.seq - keep,))

        await self.sql.tx(store)

    async def drop_acknowledged(self, msg_ids: Sequence[str]) -> None:
        """The bridge has these messages: drop them from the outbox and the telemetry buffer."""

        def drop(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM outbox WHERE msg_id=?", [(m,) for m in msg_ids])
            db.executemany("DELETE FROM telemetry WHERE msg_id=?", [(m,) for m in msg_ids])

        await self.sql.tx(drop)

    async def drop_outcome(self, msg_id: str) -> None:
        await self.sql.tx(lambda db: db.execute("DELETE FROM outbox WHERE msg_id=?", (msg_id,)))

    async def due_outcomes(self, now: float, limit: int) -> list[tuple[str, bytes, int]]:
        """``(msg_id, payload, attempts)`` of the outcomes due, oldest first."""
        return await self.sql.read(lambda db: db.execute(
            "SELECT msg_id, payload, attempts FROM outbox WHERE next_attempt_at<=? ORDER BY rowid LIMIT ?",
            (now, limit)).fetchall())

    async def outcomes_sent(self, sent: Sequence[tuple[Hashable, float]]) -> None:
        """Count one more attempt of each ``(msg_id, next attempt at)``."""
        await self.sql.tx(lambda db: db.executemany(
            "UPDATE outbox SET attempts=attempts+1, next_attempt_at=? WHERE msg_id=?", [(at, k) for k, at in sent]))

    async def outcomes_parked(self, parked: Sequence[tuple[Hashable, float]]) -> None:
        """Outcomes ``(msg_id, next attempt at)`` refused as too large wait until then, their attempts unchanged."""
        await self.sql.tx(lambda db: db.executemany(
            "UPDATE outbox SET next_attempt_at=? WHERE msg_id=?", [(at, k) for k, at in parked]))

    async def due_telemetry(self, now: float, limit: int) -> list[tuple[int, bytes, int]]:
        """``(seq, payload, attempts)`` of the telemetry due, in order."""
        return await self.sql.read(lambda db: db.execute(
            "SELECT seq, payload, attempts FROM telemetry WHERE next_attempt_at<=? ORDER BY seq LIMIT ?",
            (now, limit)).fetchall())

    async def telemetry_sent(self, sent: Sequence[tuple[Hashable, float]]) -> None:
        await self.sql.tx(lambda db: db.executemany(
            "UPDATE telemetry SET attempts=attempts+1, next_attempt_at=? WHERE seq=?", [(at, k) for k, at in sent]))

    async def telemetry_parked(self, parked: Sequence[tuple[Hashable, float]]) -> None:
        """Reports ``(seq, next attempt at)`` refused as too large wait until then, their attempts unchanged."""
        await self.sql.tx(lambda db: db.executemany(
            "UPDATE telemetry SET next_attempt_at=? WHERE seq=?", [(at, k) for k, at in parked]))


class OutcomeTable:
    """The ``outbox`` table (outcomes to the bridge) as an :class:`mhp_wire.outbox.OutboxStorage`."""

    def __init__(self, store: GatewayStore, topic: str) -> None:
        self.store = store
        self.topic = topic

    async def due(self, now: float, limit: int) -> list[Pending]:
        return [Pending(r[0], self.topic, r[1], r[2]) for r in await self.store.due_outcomes(now, limit)]

    async def sent(self, sent: Sequence[tuple[Pending, float]], dropped: Sequence[Pending], now: float) -> None:
        if sent:
            await self.store.outcomes_sent([(p.key, at) for p, at in sent])

    async def parked(self, parked: Sequence[tuple[Pending, float, PacketTooLarge]], now: float) -> None:
        """An outcome over the bridge's packet is kept and tried again after the park, for as long as it is queued:
        it is the only record of what this home did, and the limit it met is the broker's (a configuration the
        retailer can raise), not the outcome's; an hourly attempt costs one row of a round and one log line
        (docs/decisions.md, "A link refuses a packet over the broker's limit")."""
        await self.store.outcomes_parked([(p.key, at) for p, at, _ in parked])


class TelemetryTable:
    """The ``telemetry`` buffer as an :class:`mhp_wire.outbox.OutboxStorage`: in order, the newest report sent
    retained (for a bridge that starts later). ``newest()`` is the sequence number of the newest report queued."""

    def __init__(self, store: GatewayStore, topic: str, newest: Callable[[], int]) -> None:
        self.store = store
        self.topic = topic
        self.newest = newest

    async def due(self, now: float, limit: int) -> list[Pending]:
        rows = await self.store.due_telemetry(now, limit)
        newest = bool(rows) and rows[-1][0] == self.newest()
        return [Pending(r[0], self.topic, r[1], r[2], retain=newest and i == len(rows) - 1)
                for i, r in enumerate(rows)]

    async def sent(self, sent: Sequence[tuple[Pending, float]], dropped: Sequence[Pending], now: float) -> None:
        if sent:
            await self.store.telemetry_sent([(p.key, at) for p, at in sent])

    async def parked(self, parked: Sequence[tuple[Pending, float, PacketTooLarge]], now: float) -> None:
        """A report over the packet (the device names' bounds keep every report far under it) waits for the park;
        the buffer's own cap ends it as it ends any old report."""
        await self.store.telemetry_parked([(p.key, at) for p, at, _ in parked])
