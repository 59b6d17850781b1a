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
    handling_ms REAL NOT NULL DEFAULT 0, PRIMARY KEY (request_id, client_id));
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
                    "received_at, next_attempt_at, deadline) VALUES (?,?,?,?,?,?,?,?,?)",
                    (c.request_id, c.client_id, c.gateway_id, c.msg_id, c.payload, SENDING, c.received_at, 0.0,
                     c.deadline),
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
            values = [v for v in (a, b) if v is not None]
            return min(values) if values else None

        return await self.sql.read(op)

    async def counts(self) -> dict[str, int]:
        """Commands per state and outcomes waiting for the hub."""

        def op(db: sqlite3.Connection) -> dict[str, int]:
            out = {r[0]: r[1] for r in db.execute("SELECT state, COUNT(*) FROM commands GROUP BY state")}
            out["hub_outbox"] = db.execute("SELECT COUNT(*) FROM hub_outbox").fetchone()[0]
            return out

        return await self.sql.read(op)

