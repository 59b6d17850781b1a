"""The bridge's durable state: commands to gateways and outcomes to the hub, each kept until acknowledged."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mhp_wire.sqlite import SqliteThread

SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    request_id TEXT NOT NULL, client_id TEXT NOT NULL, gateway_id TEXT NOT NULL, msg_id TEXT NOT NULL UNIQUE,
    payload BLOB NOT NULL, state TEXT NOT NULL, received_at REAL NOT NULL, first_sent_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, deadline REAL NOT NULL,
    handling_ms REAL NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0, PRIMARY KEY (request_id, client_id));
CREATE TABLE IF NOT EXISTS cancelled (request_id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS gateway_outbox (
    msg_id TEXT PRIMARY KEY, gateway_id TEXT NOT NULL, payload BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL, deadline REAL NOT NULL);
CREATE TABLE IF NOT EXISTS billing (
    request_id TEXT NOT NULL, client_id TEXT NOT NULL, period_start TEXT NOT NULL, period_end TEXT NOT NULL,
    readings TEXT NOT NULL, received_at REAL NOT NULL, PRIMARY KEY (request_id, client_id, period_start));
CREATE TABLE IF NOT EXISTS tariff (id INTEGER PRIMARY KEY CHECK (id = 1), tariff_id TEXT NOT NULL,
    version INTEGER NOT NULL, payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS commands_due ON commands(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS hub_outbox (
    msg_id TEXT PRIMARY KEY, payload BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL);
"""

SENDING = "sending"
"""Sent to the gateway (or waiting to be), not yet acknowledged by it."""
DELIVERED = "delivered"
"""The gateway acknowledged the command and will report its outcome."""
CLOSED = "closed"
"""The outcome went to the hub's outbox."""


@dataclass(slots=True)
class NewCommand:
    """A command for one gateway, derived from a hub request."""

    request_id: str
    client_id: str
    gateway_id: str
    msg_id: str
    payload: bytes
    received_at: float
    deadline: float
    not_before: float = 0.0
    """The gateway counts as unreachable only after this time (the action's start) plus the ack timeout."""


class BridgeStore:
    """Commands and the outbox towards the hub, in SQLite."""

    def __init__(self, path: Path | str) -> None:
        self.sql = SqliteThread(path, SCHEMA, name="bridge-store")

    async def open(self) -> None:
        """Open (and create) the database."""
        await self.sql.open()

    async def close(self) -> None:
        """Close the database."""
        await self.sql.close()

    async def accept_request(self, commands: list[NewCommand], outcomes: list[tuple[str, bytes]]) -> int:
        """Store new commands (a redelivered request adds nothing) and outcomes for the hub; returns new commands."""

        def op(db: sqlite3.Connection) -> int:
            added = 0
            for c in commands:
                cur = db.execute(
                    "INSERT OR IGNORE INTO commands (request_id, client_id, gateway_id, msg_id, payload, state, "
                    "received_at, next_attempt_at, deadline, not_before) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (c.request_id, c.client_id, c.gateway_id, c.msg_id, c.payload, SENDING, c.received_at, 0.0,
                     c.deadline, c.not_before),
                )
                added += cur.rowcount
            self._queue(db, outcomes)
            return added

        return await self.sql.tx(op)

    @staticmethod
    def _queue(db: sqlite3.Connection, outcomes: list[tuple[str, bytes]]) -> None:
        db.executemany(
            "INSERT OR IGNORE INTO hub_outbox (msg_id, payload, next_attempt_at) VALUES (?,?,0)", outcomes
        )

    async def queue_for_hub(self, outcomes: list[tuple[str, bytes]]) -> None:
        """Add outcomes to the outbox towards the hub."""
        await self.sql.tx(lambda db: self._queue(db, outcomes))

    async def due_commands(self, now: float, limit: int = 500) -> list[dict[str, Any]]:
        """Commands not yet acknowledged by their gateway whose next attempt is due."""
        return await self.sql.read(lambda db: [dict(r) for r in db.execute(
            "SELECT * FROM commands WHERE state=? AND next_attempt_at<=? ORDER BY next_attempt_at LIMIT ?",
            (SENDING, now, limit))])

    async def mark_sent(self, sent: list[tuple[str, float]], now: float) -> None:
        """Record attempts ``(msg_id, next_attempt_at)``."""

        def op(db: sqlite3.Connection) -> None:
            for msg_id, next_at in sent:
                db.execute(
                    "UPDATE commands SET attempts=attempts+1, next_attempt_at=?, "
                    "first_sent_at=COALESCE(first_sent_at, ?), "
                    "handling_ms=CASE WHEN first_sent_at IS NULL THEN (?-received_at)*1000 ELSE handling_ms END "
                    "WHERE msg_id=?",
                    (next_at, now, now, msg_id),
                )

        await self.sql.tx(op)

    async def command_by_msg(self, gateway_id: str, msg_ids: list[str]) -> list[dict[str, Any]]:
        """Commands of ``gateway_id`` with these message ids that are still waiting for its acknowledgement."""

        def op(db: sqlite3.Connection) -> list[dict[str, Any]]:
            out = []
            for m in msg_ids:
                row = db.execute(
                    "SELECT * FROM commands WHERE msg_id=? AND gateway_id=? AND state=?", (m, gateway_id, SENDING)
                ).fetchone()
                if row:
                    out.append(dict(row))
            return out

        return await self.sql.read(op)

    async def get_command(self, request_id: str, client_id: str) -> dict[str, Any] | None:
        """One command, or None."""

        def op(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute(
                "SELECT * FROM commands WHERE request_id=? AND client_id=?", (request_id, client_id)
            ).fetchone()
            return dict(row) if row else None

        return await self.sql.read(op)

    async def set_state(self, request_id: str, client_id: str, state: str, outcome: tuple[str, bytes] | None) -> bool:
        """Move a command to ``state`` (never back from closed) and queue its outcome for the hub, atomically."""

        def op(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE commands SET state=? WHERE request_id=? AND client_id=? AND state!=?",
                (state, request_id, client_id, CLOSED),
            )
            if cur.rowcount and outcome:
                self._queue(db, [outcome])
            return bool(cur.rowcount)

        return await self.sql.tx(op)

    async def due_outbox(self, now: float, limit: int = 500) -> list[dict[str, Any]]:
        """Outcomes for the hub whose next attempt is due."""
        return await self.sql.read(lambda db: [dict(r) for r in db.execute(
            "SELECT * FROM hub_outbox WHERE next_attempt_at<=? ORDER BY next_attempt_at LIMIT ?", (now, limit))])

    async def mark_outbox_sent(self, sent: list[tuple[str, float]]) -> None:
        """Record attempts ``(msg_id, next_attempt_at)`` towards the hub."""
        await self.sql.tx(lambda db: db.executemany(
            "UPDATE hub_outbox SET attempts=attempts+1, next_attempt_at=? WHERE msg_id=?",
            [(n, m) for m, n in sent]))

    async def ack_outbox(self, msg_ids: list[str]) -> None:
        """Drop outcomes the hub acknowledged."""
        await self.sql.tx(lambda db: db.executemany("DELETE FROM hub_outbox WHERE msg_id=?", [(m,) for m in msg_ids]))

    async def next_due(self) -> float | None:
        """When the next command or outcome is due, or None."""

        def op(db: sqlite3.Connection) -> float | None:
            a = db.execute("SELECT MIN(next_attempt_at) FROM commands WHERE state=?", (SENDING,)).fetchone()[0]
            b = db.execute("SELECT MIN(next_attempt_at) FROM hub_outbox").fetchone()[0]
            c = db.execute("SELECT MIN(next_attempt_at) FROM gateway_outbox").fetchone()[0]
            values = [v for v in (a, b, c) if v is not None]
            return min(values) if values else None

        return await self.sql.read(op)

    async def counts(self) -> dict[str, int]:
        """Commands per state and outcomes waiting for the hub."""

        def op(db: sqlite3.Connection) -> dict[str, int]:
            out = {r[0]: r[1] for r in db.execute("SELECT state, COUNT(*) FROM commands GROUP BY state")}
            out["hub_outbox"] = db.execute("SELECT COUNT(*) FROM hub_outbox").fetchone()[0]
            return out

        return await self.sql.read(op)

    async def is_cancelled(self, request_id: str) -> bool:
        """Whether the hub cancelled this request."""
        return await self.sql.read(lambda db: db.execute(
            "SELECT 1 FROM cancelled WHERE request_id=?", (request_id,)).fetchone() is not None)

    async def cancel(self, request_id: str, now: float, notices: list[tuple[str, str, bytes, float]]) -> None:
        """Record a cancellation: its commands stop, and each gateway that got one is told
        (``notices``: ``(msg_id, gateway_id, payload, deadline)``)."""

        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR IGNORE INTO cancelled VALUES (?,?)", (request_id, now))
            db.execute("UPDATE commands SET state=? WHERE request_id=?", (CLOSED, request_id))
            db.executemany("INSERT OR IGNORE INTO gateway_outbox (msg_id, gateway_id, payload, next_attempt_at, "
                           "deadline) VALUES (?,?,?,0,?)", notices)

        await self.sql.tx(op)

    async def commands_of(self, request_id: str) -> list[dict[str, Any]]:
        """Every command of one request."""
        return await self.sql.read(lambda db: [dict(r) for r in db.execute(
            "SELECT * FROM commands WHERE request_id=?", (request_id,))])

    async def due_gateway_outbox(self, now: float) -> list[dict[str, Any]]:
        """Notices to gateways (cancellations) whose next attempt is due."""
        return await self.sql.read(lambda db: [dict(r) for r in db.execute(
            "SELECT * FROM gateway_outbox WHERE next_attempt_at<=? ORDER BY next_attempt_at LIMIT 500", (now,))])

    async def mark_gateway_outbox(self, sent: list[tuple[str, float]], expired: list[str]) -> None:
        """Record attempts ``(msg_id, next_attempt_at)``; drop notices past their deadline."""

        def op(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE gateway_outbox SET attempts=attempts+1, next_attempt_at=? WHERE msg_id=?",
                           [(n, m) for m, n in sent])
            db.executemany("DELETE FROM gateway_outbox WHERE msg_id=?", [(m,) for m in expired])

        await self.sql.tx(op)

    async def ack_gateway_outbox(self, gateway_id: str, msg_ids: list[str]) -> None:
        """Drop notices a gateway acknowledged."""
        await self.sql.tx(lambda db: db.executemany(
            "DELETE FROM gateway_outbox WHERE msg_id=? AND gateway_id=?", [(m, gateway_id) for m in msg_ids]))

    async def resend_now(self, gateway_id: str) -> None:
        """A gateway came back online: everything waiting for it is due now."""

        def op(db: sqlite3.Connection) -> None:
            db.execute("UPDATE commands SET next_attempt_at=0 WHERE gateway_id=? AND state=?", (gateway_id, SENDING))
            db.execute("UPDATE gateway_outbox SET next_attempt_at=0 WHERE gateway_id=?", (gateway_id,))

        await self.sql.tx(op)

    async def store_billing(self, request_id: str, rows: list[tuple[str, str, str, str]], now: float) -> None:
        """Keep billing data received from the hub (``client_id, period_start, period_end, readings json``)."""
        await self.sql.tx(lambda db: db.executemany(
            "INSERT OR REPLACE INTO billing VALUES (?,?,?,?,?,?)",
            [(request_id, c, s, e, r, now) for c, s, e, r in rows]))

    async def billing_of(self, client_id: str) -> list[dict[str, Any]]:
        """Billing data received for one client."""
        return await self.sql.read(lambda db: [dict(r) for r in db.execute(
            "SELECT * FROM billing WHERE client_id=? ORDER BY period_start", (client_id,))])

    async def put_tariff(self, tariff_id: str, version: int, payload: bytes) -> bool:
        """Keep a tariff if it is newer than the one held; True when it replaced it."""

        def op(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT tariff_id, version FROM tariff WHERE id=1").fetchone()
            if row and row[0] == tariff_id and row[1] >= version:
                return False
            db.execute("INSERT OR REPLACE INTO tariff VALUES (1,?,?,?)", (tariff_id, version, payload))
            return True

        return await self.sql.tx(op)

    async def queue_for_gateway(self, msg_id: str, gateway_id: str, payload: bytes, deadline: float) -> None:
        """A notice for one gateway (a schedule), re-sent until that gateway acknowledges it."""
        await self.sql.tx(lambda db: db.execute(
            "INSERT OR IGNORE INTO gateway_outbox (msg_id, gateway_id, payload, next_attempt_at, deadline) "
            "VALUES (?,?,?,0,?)", (msg_id, gateway_id, payload, deadline)))
