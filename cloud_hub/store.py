"""The hub's embedded store: SQLite in WAL mode with ``synchronous=FULL``, so a commit survives ``kill -9``.

All SQL runs on one dedicated thread (:class:`mhp_wire.sqlite.SqliteThread`). Times are stored as float epoch
seconds (UTC). A storage failure becomes
:class:`StoreUnavailable`, which the HTTP layer answers with 503.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cloud_hub.lifecycle import RequestState, may_move, request_state, state_after_deadline
from mhp_wire.messages import ClientState
from mhp_wire.sqlite import SqliteThread, StorageError

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS retailers (
    retailer_id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY, contracted_power_kw REAL NOT NULL, feeder_id TEXT, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS clients_feeder ON clients(feeder_id);
CREATE TABLE IF NOT EXISTS supplier_periods (
    client_id TEXT NOT NULL, valid_from REAL NOT NULL, retailer_id TEXT NOT NULL,
    PRIMARY KEY (client_id, valid_from));
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, type TEXT NOT NULL, issuer TEXT NOT NULL, state TEXT NOT NULL,
    body TEXT NOT NULL, created_at REAL NOT NULL, deadline REAL NOT NULL, completed_at REAL,
    first_dispatch_at REAL, hub_ms REAL NOT NULL DEFAULT 0, storage_ms REAL NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS requests_open ON requests(state, deadline);
CREATE TABLE IF NOT EXISTS request_clients (
    request_id TEXT NOT NULL, client_id TEXT NOT NULL, retailer_id TEXT NOT NULL, state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}', trace TEXT NOT NULL DEFAULT '{}', updated_at REAL NOT NULL,
    PRIMARY KEY (request_id, client_id));
CREATE TABLE IF NOT EXISTS outbox (
    msg_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, retailer_id TEXT NOT NULL, payload BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, deadline REAL NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(next_attempt_at);
CREATE TABLE IF NOT EXISTS idempotency (
    principal TEXT NOT NULL, key TEXT NOT NULL, body_hash TEXT NOT NULL, status INTEGER NOT NULL,
    response TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (principal, key));
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, principal TEXT NOT NULL, client_id TEXT NOT NULL,
    action TEXT NOT NULL, right TEXT NOT NULL, allowed INTEGER NOT NULL, ref TEXT);
CREATE INDEX IF NOT EXISTS audit_client ON audit(client_id, at);
"""


class StoreUnavailable(Exception):
    """The storage cannot be used right now (locked, read-only, gone); nothing was half-written."""


class Conflict(Exception):
    """The write contradicts what is stored (HTTP 409)."""


@dataclass(slots=True)
class AuditEntry:
    """One line of the data access log."""

    principal: str
    client_id: str
    action: str
    right: str
    allowed: bool = True
    ref: str | None = None
    at: float = field(default_factory=time.time)


@dataclass(slots=True)
class NewRequest:
    """Everything stored, in one transaction, when a request is accepted."""

    request_id: str
    type: str
    issuer: str
    body: dict[str, Any]
    created_at: float
    deadline: float
    clients: list[tuple[str, str]]
    """``(client_id, retailer_id)`` pairs: the retailer is the client's supplier at the time the action refers to."""
    outbox: list[tuple[str, str, bytes]]
    """``(msg_id, retailer_id, payload)``: one message per addressed retailer."""
    audit: list[AuditEntry]
    hub_ms: float = 0.0
    idempotency: tuple[str, str, str, int, dict[str, Any]] | None = None
    """``(principal, key, body_hash, status, response)``."""


@dataclass(slots=True)
class OutcomeResult:
    """What recording one client outcome changed."""

    known: bool
    addressed_retailer: str | None = None
    changed: bool = False
    request_state: RequestState | None = None


class HubStore:
    """The hub's durable state. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 2000) -> None:
        self.path = str(path)
        self._sql = SqliteThread(path, SCHEMA, busy_timeout_ms=busy_timeout_ms, name="hub-store")

    @property
    def storage_seconds(self) -> float:
        """Seconds spent in storage operations since start."""
        return self._sql.busy_seconds

    async def open(self) -> None:
        """Open (and create) the database."""
        await self._guard(self._sql.open())

    async def close(self) -> None:
        """Close the database and its thread."""
        await self._sql.close()

    @staticmethod
    async def _guard(aw: Awaitable[T]) -> T:
        try:
            return await aw
        except StorageError as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._guard(self._sql.call(fn, *args))

    @property
    def db(self) -> sqlite3.Connection:
        return self._sql.db

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self._sql._tx(fn)

    # -- health -------------------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the database answers and accepts writes."""

        def check() -> None:
            self._tx(lambda db: db.execute("CREATE TABLE IF NOT EXISTS ping (x)"))

        await self._call(check)

    # -- registry -----------------------------------------------------------------------------------------

    async def put_retailer(self, retailer_id: str, name: str) -> bool:
        """Create or rename a retailer; True when it is new."""

        def op(db: sqlite3.Connection) -> bool:
            cur = db.execute("UPDATE retailers SET name=? WHERE retailer_id=?", (name, retailer_id))
            if cur.rowcount:
                return False
            db.execute("INSERT INTO retailers VALUES (?,?,?)", (retailer_id, name, time.time()))
            return True

        return await self._call(self._tx, op)

    async def get_retailer(self, retailer_id: str) -> dict[str, Any] | None:
        """A retailer, or None."""

        def op() -> dict[str, Any] | None:
            row = self.db.execute("SELECT * FROM retailers WHERE retailer_id=?", (retailer_id,)).fetchone()
            return dict(row) if row else None

        return await self._call(op)

    async def put_client(
        self, client_id: str, retailer_id: str, contracted_power_kw: float, feeder_id: str | None, valid_from: float
    ) -> bool:
        """Create or update a client; a different retailer from ``valid_from`` on is a supplier switch.

        Returns True when the client is new. Raises :class:`Conflict` for a switch dated before the current
        supplier's period began, or an unknown retailer.
        """

        def op(db: sqlite3.Connection) -> bool:
            if not db.execute("SELECT 1 FROM retailers WHERE retailer_id=?", (retailer_id,)).fetchone():
                raise Conflict(f"retailer {retailer_id!r} is not registered")
            row = db.execute("SELECT 1 FROM clients WHERE client_id=?", (client_id,)).fetchone()
            now = time.time()
            if row is None:
                db.execute("INSERT INTO clients VALUES (?,?,?,?)", (client_id, contracted_power_kw, feeder_id, now))
                db.execute("INSERT INTO supplier_periods VALUES (?,?,?)", (client_id, valid_from, retailer_id))
                return True
            db.execute(
                "UPDATE clients SET contracted_power_kw=?, feeder_id=? WHERE client_id=?",
                (contracted_power_kw, feeder_id, client_id),
            )
            last = db.execute(
                "SELECT valid_from, retailer_id FROM supplier_periods WHERE client_id=? "
                "ORDER BY valid_from DESC LIMIT 1",
                (client_id,),
            ).fetchone()
            if last["retailer_id"] != retailer_id:
                if valid_from <= last["valid_from"]:
                    raise Conflict(
                        f"client {client_id!r} is supplied by {last['retailer_id']!r} since "
                        f"{last['valid_from']}; a supplier switch needs a later valid_from"
                    )
                db.execute("INSERT INTO supplier_periods VALUES (?,?,?)", (client_id, valid_from, retailer_id))
            return False

        return await self._call(self._tx, op)

    async def get_client(self, client_id: str) -> dict[str, Any] | None:
        """A client with its supplier history (oldest first), or None."""

        def op() -> dict[str, Any] | None:
            row = self.db.execute("SELECT * FROM clients WHERE client_id=?", (client_id,)).fetchone()
            if row is None:
                return None
            periods = self.db.execute(
                "SELECT valid_from, retailer_id FROM supplier_periods WHERE client_id=? ORDER BY valid_from",
                (client_id,),
            ).fetchall()
            out = dict(row)
            out["suppliers"] = [dict(p) for p in periods]
            return out

        return await self._call(op)

    async def suppliers_at(self, client_ids: Iterable[str], at: float) -> dict[str, str | None]:
        """Each client's supplier at time ``at`` (None for an unknown client or a time before its first supply)."""
        ids = list(client_ids)

        def op() -> dict[str, str | None]:
            out: dict[str, str | None] = {}
            for cid in ids:
                row = self.db.execute(
                    "SELECT retailer_id FROM supplier_periods WHERE client_id=? AND valid_from<=? "
                    "ORDER BY valid_from DESC LIMIT 1",
                    (cid, at),
                ).fetchone()
                known = row is not None or self.db.execute(
                    "SELECT 1 FROM clients WHERE client_id=?", (cid,)
                ).fetchone()
                out[cid] = row["retailer_id"] if row else None
                if not known:
                    out.pop(cid)
            return out

        return await self._call(op)

    async def clients_on_feeder(self, feeder_id: str) -> list[str]:
        """The clients registered on a feeder."""

        def op() -> list[str]:
            rows = self.db.execute("SELECT client_id FROM clients WHERE feeder_id=? ORDER BY client_id", (feeder_id,))
            return [r[0] for r in rows]

        return await self._call(op)

    # -- requests -----------------------------------------------------------------------------------------

    async def idempotent_answer(self, principal: str, key: str) -> tuple[str, int, dict[str, Any]] | None:
        """``(body_hash, status, response)`` stored for this principal's ``Idempotency-Key``, or None."""

        def op() -> tuple[str, int, dict[str, Any]] | None:
            row = self.db.execute(
                "SELECT body_hash, status, response FROM idempotency WHERE principal=? AND key=?", (principal, key)
            ).fetchone()
            return (row[0], row[1], json.loads(row[2])) if row else None

        return await self._call(op)

    async def create_request(self, req: NewRequest) -> None:
        """Store a request, its clients, its outbox, its audit lines and its idempotency answer atomically."""

        def op(db: sqlite3.Connection) -> None:
            t0 = time.perf_counter()
            db.execute(
                "INSERT INTO requests (request_id, type, issuer, state, body, created_at, deadline, hub_ms) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (req.request_id, req.type, req.issuer, RequestState.ACCEPTED.value, json.dumps(req.body),
                 req.created_at, req.deadline, req.hub_ms),
            )
            db.executemany(
                "INSERT INTO request_clients (request_id, client_id, retailer_id, state, updated_at) "
                "VALUES (?,?,?,?,?)",
                [(req.request_id, c, r, ClientState.PENDING.value, req.created_at) for c, r in req.clients],
            )
            db.executemany(
                "INSERT INTO outbox (msg_id, request_id, retailer_id, payload, next_attempt_at, deadline) "
                "VALUES (?,?,?,?,?,?)",
                [(m, req.request_id, r, p, 0.0, req.deadline) for m, r, p in req.outbox],
            )
            self._insert_audit(db, req.audit)
            if req.idempotency:
                principal, key, body_hash, status, response = req.idempotency
                db.execute(
                    "INSERT INTO idempotency VALUES (?,?,?,?,?,?)",
                    (principal, key, body_hash, status, json.dumps(response), req.created_at),
                )
            db.execute(
                "UPDATE requests SET storage_ms=? WHERE request_id=?",
                ((time.perf_counter() - t0) * 1000, req.request_id),
            )

        await self._call(self._tx, op)

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        """A request with its clients, or None."""

        def op() -> dict[str, Any] | None:
            row = self.db.execute("SELECT * FROM requests WHERE request_id=?", (request_id,)).fetchone()
            if row is None:
                return None
            out = dict(row)
            out["body"] = json.loads(out["body"])
            out["clients"] = [
                {**dict(r), "detail": json.loads(r["detail"]), "trace": json.loads(r["trace"])}
                for r in self.db.execute(
                    "SELECT client_id, retailer_id, state, detail, trace, updated_at FROM request_clients "
                    "WHERE request_id=? ORDER BY client_id",
                    (request_id,),
                )
            ]
            return out

        return await self._call(op)

    async def due_outbox(self, now: float, limit: int = 500) -> list[dict[str, Any]]:
        """Outbox messages whose next attempt is due."""

        def op() -> list[dict[str, Any]]:
            rows = self.db.execute(
                "SELECT * FROM outbox WHERE next_attempt_at<=? ORDER BY next_attempt_at LIMIT ?", (now, limit)
            )
            return [dict(r) for r in rows]

        return await self._call(op)

    async def next_outbox_due(self) -> float | None:
        """When the next outbox message is due, or None when the outbox is empty."""

        def op() -> float | None:
            row = self.db.execute("SELECT MIN(next_attempt_at) FROM outbox").fetchone()
            return row[0]

        return await self._call(op)

    async def mark_sent(self, sent: list[tuple[str, str, str, float]], now: float) -> None:
        """Record attempts ``(msg_id, request_id, retailer_id, next_attempt_at)``; pending clients become sent."""

        def op(db: sqlite3.Connection) -> None:
            for msg_id, request_id, retailer_id, next_at in sent:
                db.execute(
                    "UPDATE outbox SET attempts=attempts+1, next_attempt_at=? WHERE msg_id=?", (next_at, msg_id)
                )
                db.execute(
                    "UPDATE request_clients SET state=?, updated_at=? WHERE request_id=? AND retailer_id=? AND state=?",
                    (ClientState.SENT.value, now, request_id, retailer_id, ClientState.PENDING.value),
                )
                db.execute(
                    "UPDATE requests SET state=?, first_dispatch_at=COALESCE(first_dispatch_at, ?) "
                    "WHERE request_id=? AND state=?",
                    (RequestState.DISPATCHING.value, now, request_id, RequestState.ACCEPTED.value),
                )

        await self._call(self._tx, op)

    async def ack_outbox(self, retailer_id: str, msg_ids: list[str]) -> int:
        """Drop messages the retailer acknowledged (only its own); returns how many were dropped."""

        def op(db: sqlite3.Connection) -> int:
            n = 0
            for m in msg_ids:
                n += db.execute("DELETE FROM outbox WHERE msg_id=? AND retailer_id=?", (m, retailer_id)).rowcount
            return n

        return await self._call(self._tx, op)

    def _refresh_request(self, db: sqlite3.Connection, request_id: str, now: float) -> RequestState:
        row = db.execute("SELECT state FROM requests WHERE request_id=?", (request_id,)).fetchone()
        current = RequestState(row["state"])
        states = [
            ClientState(r[0]) for r in db.execute("SELECT state FROM request_clients WHERE request_id=?", (request_id,))
        ]
        new = request_state(current, states)
        if new is not current:
            db.execute(
                "UPDATE requests SET state=?, completed_at=? WHERE request_id=?",
                (new.value, now if new.terminal else None, request_id),
            )
            if new.terminal:
                db.execute("DELETE FROM outbox WHERE request_id=?", (request_id,))
        return new

    async def addressed_retailer(self, request_id: str, client_id: str) -> str | None:
        """The retailer the hub addressed for this client in this request, or None if there is no such pair."""

        def op() -> str | None:
            row = self.db.execute(
                "SELECT retailer_id FROM request_clients WHERE request_id=? AND client_id=?", (request_id, client_id)
            ).fetchone()
            return row[0] if row else None

        return await self._call(op)

    async def record_outcome(
        self,
        request_id: str,
        client_id: str,
        retailer_id: str,
        state: ClientState,
        detail: dict[str, Any],
        trace: dict[str, float],
        now: float,
    ) -> OutcomeResult:
        """Apply one client outcome reported by ``retailer_id`` (the caller has checked it may report it)."""

        def op(db: sqlite3.Connection) -> OutcomeResult:
            row = db.execute(
                "SELECT retailer_id, state FROM request_clients WHERE request_id=? AND client_id=?",
                (request_id, client_id),
            ).fetchone()
            if row is None:
                return OutcomeResult(known=False)
            if row["retailer_id"] != retailer_id:
                return OutcomeResult(known=True, addressed_retailer=row["retailer_id"])
            if not may_move(ClientState(row["state"]), state):
                return OutcomeResult(known=True, addressed_retailer=retailer_id, changed=False)
            created = db.execute("SELECT created_at FROM requests WHERE request_id=?", (request_id,)).fetchone()[0]
            full_trace = dict(trace)
            if state.terminal:
                full_trace["total_ms"] = round((now - created) * 1000, 3)
            db.execute(
                "UPDATE request_clients SET state=?, detail=?, trace=?, updated_at=? "
                "WHERE request_id=? AND client_id=?",
                (state.value, json.dumps(detail), json.dumps(full_trace), now, request_id, client_id),
            )
            new = self._refresh_request(db, request_id, now)
            return OutcomeResult(known=True, addressed_retailer=retailer_id, changed=True, request_state=new)

        return await self._call(self._tx, op)

    async def expire_due(self, now: float) -> list[str]:
        """Close every open client of every request past its deadline; returns the requests that changed."""

        def op(db: sqlite3.Connection) -> list[str]:
            open_states = (RequestState.ACCEPTED.value, RequestState.DISPATCHING.value)
            due = [
                r[0]
                for r in db.execute(
                    "SELECT request_id FROM requests WHERE state IN (?,?) AND deadline<=?", (*open_states, now)
                )
            ]
            for request_id in due:
                for r in db.execute(
                    "SELECT client_id, state FROM request_clients WHERE request_id=?", (request_id,)
                ).fetchall():
                    old = ClientState(r["state"])
                    new = state_after_deadline(old)
                    if new is not old:
                        db.execute(
                            "UPDATE request_clients SET state=?, detail=?, updated_at=? "
                            "WHERE request_id=? AND client_id=?",
                            (new.value, json.dumps({"reason": "no outcome before the request's deadline"}), now,
                             request_id, r["client_id"]),
                        )
                self._refresh_request(db, request_id, now)
            return due

        return await self._call(self._tx, op)

    async def open_request_count(self) -> int:
        """How many requests have not ended."""

        def op() -> int:
            return int(self.db.execute("SELECT COUNT(*) FROM requests WHERE state IN ('accepted','dispatching')")
                       .fetchone()[0])

        return await self._call(op)

    # -- audit --------------------------------------------------------------------------------------------

    @staticmethod
    def _insert_audit(db: sqlite3.Connection, entries: list[AuditEntry]) -> None:
        db.executemany(
            "INSERT INTO audit (at, principal, client_id, action, right, allowed, ref) VALUES (?,?,?,?,?,?,?)",
            [(e.at, e.principal, e.client_id, e.action, e.right, int(e.allowed), e.ref) for e in entries],
        )

    async def audit(self, entries: list[AuditEntry]) -> None:
        """Append lines to the data access log."""
        await self._call(self._tx, lambda db: self._insert_audit(db, entries))

    async def get_audit(self, client_id: str, start: float, end: float) -> list[dict[str, Any]]:
        """The data access log of one client between two times."""

        def op() -> list[dict[str, Any]]:
            rows = self.db.execute(
                "SELECT at, principal, client_id, action, right, allowed, ref FROM audit "
                "WHERE client_id=? AND at>=? AND at<? ORDER BY seq",
                (client_id, start, end),
            )
            return [dict(r) for r in rows]

        return await self._call(op)
