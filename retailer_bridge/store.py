"""The bridge's durable state: commands to gateways and outcomes to the hub, each kept until acknowledged.

Writes are group-committed (:class:`mhp_wire.sqlite.GroupTransactions`, the hub's store's as well): every write that
arrives while a commit is running joins the next transaction, so 10,000 gateways answering at once cost a few dozen
fsyncs, not 10,000. Each write still returns only once its transaction is committed, so "stored before
acknowledged" holds for every caller.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from mhp_wire.fastwire import Report, outcome_payload
from mhp_wire.groupcommit import Failed
from mhp_wire.messages import Outcome, encode
from mhp_wire.sqlite import GroupTransactions, SqliteThread, StorageError
from retailer_bridge.billing import BillingReading, readings_of, select

T = TypeVar("T")

_COMMAND_COLUMNS = ("request_id, client_id, gateway_id, msg_id, state, received_at, first_sent_at, attempts, "
                    "next_attempt_at, deadline, handling_ms, not_before, revision")
"""The columns of ``commands`` (layout 1: no payload), in order: what the payload migration copies."""
_COMMANDS_TABLE = """(
    request_id TEXT NOT NULL, client_id TEXT NOT NULL, gateway_id TEXT NOT NULL, msg_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL, received_at REAL NOT NULL, first_sent_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, deadline REAL NOT NULL,
    handling_ms REAL NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0, revision INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (request_id, client_id))"""
"""The definition of ``commands`` after its name: the primary key and ``msg_id``'s UNIQUE come with the table."""
_COMMAND_INDEXES = """
CREATE INDEX IF NOT EXISTS commands_sending ON commands(next_attempt_at) WHERE state = 'sending';
CREATE INDEX IF NOT EXISTS commands_unsent ON commands(next_attempt_at) WHERE state = 'sending' AND attempts = 0;
"""
"""The partial indexes of ``commands`` (:data:`_IS_SENDING`, :data:`_IS_UNSENT`), re-created by the migration that
rebuilds the table."""

LAYOUT = 2
"""The layout of the bridge's database this code writes, kept in ``PRAGMA user_version``: 2, a request's commands made
from one template keep that template once in ``command_templates`` instead of a payload each in ``command_payloads``
(1: every payload in ``command_payloads``, taken as it is: nothing to move; 0: the payloads in the commands' rows,
moved at open). A database of a newer layout (a newer bridge's) is refused at open (:func:`_check_layout`): an older
bridge must never run on it (a layout-1 bridge would find the template-made commands without a payload and close
them as unsendable; docs/architecture.md, "Upgrading the retailer bridge")."""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS commands {_COMMANDS_TABLE};
CREATE TABLE IF NOT EXISTS command_payloads (
    request_id TEXT NOT NULL, client_id TEXT NOT NULL, payload BLOB NOT NULL, PRIMARY KEY (request_id, client_id));
CREATE TABLE IF NOT EXISTS command_templates (
    request_id TEXT NOT NULL, revision INTEGER NOT NULL, received_at REAL NOT NULL, head BLOB NOT NULL,
    middle BLOB NOT NULL, tail BLOB NOT NULL, PRIMARY KEY (request_id, revision, received_at));
CREATE TABLE IF NOT EXISTS cancelled (request_id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS gateway_outbox (
    msg_id TEXT PRIMARY KEY, gateway_id TEXT NOT NULL, payload BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL, deadline REAL NOT NULL);
CREATE TABLE IF NOT EXISTS billing (
    request_id TEXT NOT NULL, client_id TEXT NOT NULL, period_start TEXT NOT NULL, period_end TEXT NOT NULL,
    readings TEXT NOT NULL, received_at REAL NOT NULL, PRIMARY KEY (request_id, client_id, period_start));
CREATE TABLE IF NOT EXISTS tariff (id INTEGER PRIMARY KEY CHECK (id = 1), tariff_id TEXT NOT NULL,
    version INTEGER NOT NULL, payload BLOB NOT NULL, published INTEGER);
DROP INDEX IF EXISTS commands_due;{_COMMAND_INDEXES}CREATE TABLE IF NOT EXISTS hub_outbox (
    msg_id TEXT PRIMARY KEY, payload BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS hub_outbox_due ON hub_outbox(next_attempt_at);
CREATE INDEX IF NOT EXISTS gateway_outbox_due ON gateway_outbox(next_attempt_at);
CREATE TABLE IF NOT EXISTS customers (client_id TEXT PRIMARY KEY, revision INTEGER NOT NULL, periods TEXT NOT NULL,
    received_at REAL NOT NULL);
"""

SENDING = "sending"
"""Sent to the gateway (or waiting to be), not yet acknowledged by it."""
DELIVERED = "delivered"
"""The gateway acknowledged the command and will report its outcome."""
CLOSED = "closed"
"""The outcome went to the hub's outbox."""
UNANSWERED = "unanswered"
"""Not acknowledged in time: ``unreachable`` went to the hub's outbox and the command is no longer sent, but the
gateway may still get it (from the broker's queue) and act on it; its outcome of the same revision then closes the
command and goes to the hub, which lets it replace ``unreachable`` (docs/decisions.md, "A late outcome supersedes
unreachable")."""


def delivered_msg_id(command_msg_id: str) -> str:
    """The message id of the ``delivered`` outcome of a command: fixed, so that a later terminal outcome can
    withdraw it from the outbox if it was not sent yet."""
    return f"dlv-{command_msg_id}"


ToHub = tuple[str, bytes] | Outcome | Report
"""An outcome for the hub: ``(msg_id, payload)``, or a model or a :class:`~mhp_wire.fastwire.Report` that the store
encodes (or packs with others)."""
Verdict = ToHub | Exception | None
"""What a report does to its command (:class:`Judged`): the outcome for the hub, None (it leaves the command as it
is), or an exception (:class:`Refused`, say): that report fails alone and nothing of it is written."""


@dataclass(slots=True)
class Judged:
    """Gateways' outcomes closing their commands (:meth:`BridgeStore.apply_reports`), judged together by one call
    from plain data (the relay's :meth:`~retailer_bridge.relay.BridgeRelay._judge_outcomes`): the store's one way to
    close a command from a gateway's report, nothing made per outcome but its verdict.

    ``judge`` is called once per batch, on the database's thread, with each outcome's command as stored before the
    batch (a row of :data:`REPORT_COLUMNS`, read by position; None: no such command) and gives each outcome's
    :data:`Verdict`, exactly one per outcome (another count fails the batch). It must not depend on the command's
    state: the store applies the verdicts in order, and one for a command closed before it (earlier, or by an
    earlier report of the same batch) is dropped. Each outcome's result is ``(state, revision)`` of its command as
    the reports before it left it, None (no such command) or its :class:`Failed`."""

    keys: list[tuple[str, str]]
    """``(request_id, client_id)`` of each outcome, in order."""
    judge: Callable[[list[Any]], list[Verdict]]


@dataclass(slots=True)
class Applied:
    """What one batch of gateways' reports did (:meth:`BridgeStore.apply_reports`)."""

    delivered: int
    """Commands acknowledged by their gateway in this batch (those also closed in it included)."""
    closed: list[tuple[str, int] | Failed | None]
    """Per outcome of the :class:`Judged` batch, in order: ``(state, revision)`` of its command as the reports before
    it left it, None (no such command) or its own failure."""
    queued: list[tuple[str, bytes]] = field(default_factory=list, init=False)
    """The messages ``(msg_id, payload)`` this batch queued for the hub, committed with it: the relay sends them at
    once, without reading them back (:meth:`mhp_wire.outbox.Outbox.send_stored`)."""
    withdrawn: list[str] = field(default_factory=list, init=False)
    """``delivered`` outcomes not sent yet that this batch took back out of the outbox (a terminal outcome of the same
    command says more): the relay does not send them either."""
    first_sent_at: list[float] = field(default_factory=list)
    """When each command acknowledged in this batch that was sent only once was sent: the round trips that the
    relay's re-send delay learns from (:class:`mhp_wire.backoff.RoundTrip`). A command closed in this batch by
    its outcome without an ``ack`` (still ``sending`` before it) counts as acknowledged by that outcome."""


class Refused(Exception):
    """A report refused by the caller's own check (a :data:`Verdict` of a :class:`Judged` batch: not our customer);
    nothing of it is stored."""


SQL_IN_MAX = 500
"""Ids per ``IN (...)`` list: well inside SQLite's limit on bound parameters."""

INSERT_ROWS = 256
"""Commands per multi-row ``INSERT`` statement of a request (10 bound values each, and 3 for its payload's; fewer rows
where the connection's limit on bound values is lower); the remainder of a request (fewer than this) goes in by
``executemany`` of the one-row statement. Always this many rows, so the SQL text is always the same: sqlite3 keeps
up to 128 prepared statements per connection, and one text per request size pinned a prepared statement of ~1.2 KB
per row each (2,400 rows: ~2.8 MB; 128 sizes: +350 MB) and prepared each new size anew (~9 ms at 2,400 rows)."""

_INSERT_COMMANDS = ("INSERT OR IGNORE INTO commands (request_id, client_id, gateway_id, msg_id, state, "
                    "received_at, next_attempt_at, deadline, not_before, revision) VALUES ")
_COMMAND_ROW = "(?,?,?,?,?,?,?,?,?,?)"
_INSERT_PAYLOADS = "INSERT OR REPLACE INTO command_payloads (request_id, client_id, payload) VALUES "
_PAYLOAD_ROW = "(?,?,?)"
_COMMAND_JOIN = ("commands AS c LEFT JOIN command_payloads AS p ON p.request_id = c.request_id AND "
                 "p.client_id = c.client_id LEFT JOIN command_templates AS t ON t.request_id = c.request_id AND "
                 "t.revision = c.revision AND t.received_at = c.received_at")
"""A command's row with its payload (``SELECT c.*, {_PAYLOAD} FROM`` this; what :meth:`BridgeStore.due_commands`
reads): the payload is kept apart from the command's row, so that the command's two ``UPDATE``s (its first send, its
close) rewrite a row of ~100 bytes instead of one with its payload (~400: 2.4 of 10 µs of SQLite per command). Left
joins: a command whose payload is missing (never, unless the database was damaged) is still read, its payload None,
and closed by the relay instead of staying due unseen."""
_PAYLOAD = ("COALESCE(p.payload, CAST(t.head || '\"' || c.msg_id || '\"' || t.middle || '\"' || c.client_id || '\"' "
            "|| t.tail AS BLOB)) AS payload")
"""A command's payload in :data:`_COMMAND_JOIN`: its own row in ``command_payloads`` (a command not made from its
request's template, or one replaced by a newer revision), else the template of the request message it came in (its
request, revision and ``received_at``: the hub sends a large request in several messages, and each message's
template has its own ``sent_at``) with its ``msg_id`` and ``client_id`` spliced in (:func:`_spliced`, the same
bytes), else None (a damaged store)."""


def _spliced(parts: tuple[bytes, bytes, bytes], msg_id: str, client_id: str) -> bytes:
    """The payload :data:`_PAYLOAD` makes of a template's ``parts`` for these ids: ``head``, the ``msg_id`` in quotes,
    ``middle``, the ``client_id`` in quotes, ``tail``."""
    head, middle, tail = parts
    return b"".join((head, b'"', msg_id.encode(), b'"', middle, b'"', client_id.encode(), b'"', tail))


def _command_values(c: NewCommand) -> tuple[Any, ...]:
    return (c.request_id, c.client_id, c.gateway_id, c.msg_id, SENDING, c.received_at, 0.0, c.deadline,
            c.not_before, c.revision)


def _payload_values(c: NewCommand) -> tuple[str, str, bytes]:
    return c.request_id, c.client_id, c.payload


def _insert_rows(db: sqlite3.Connection, head: str, mark: str, rows: list[tuple[Any, ...]]) -> int:
    """``rows`` inserted by ``head`` (``INSERT ... VALUES``) with :data:`INSERT_ROWS` rows a statement (fewer where the
    connection's limit on bound values is lower), the remainder by ``executemany`` of the one-row statement: one SQL
    text of many rows, so one prepared statement in the connection's cache. Returns the rows inserted."""
    if not rows:
        return 0
    width = len(rows[0])
    per = max(1, min(INSERT_ROWS, db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width))
    whole = len(rows) - len(rows) % per
    added = 0
    if whole:
        sql = head + ",".join([mark] * per)
        for k in range(0, whole, per):
            cur = db.execute(sql, [v for r in rows[k:k + per] for v in r])
            added += max(cur.rowcount, 0)
    if whole < len(rows):
        cur = db.executemany(head + mark, rows[whole:])
        added += max(cur.rowcount, 0)
    return added

_IS_SENDING = f"state = '{SENDING}'"
"""The condition of the partial index ``commands_sending``, written as a literal: SQLite uses a partial index only
for a query whose ``WHERE`` names its condition as written (a bound ``state=?`` does not)."""
_IS_UNSENT = f"state = '{SENDING}' AND attempts = 0"
"""The condition of the partial index ``commands_unsent`` (commands never sent yet), written as a literal."""


def _each_chunk(db: sqlite3.Connection, sql: str, params: tuple[Any, ...], ids: list[str]) -> None:
    """Run ``sql`` (its ``IN ({})`` filled with marks) once per :data:`SQL_IN_MAX` of ``ids``, after ``params``:
    a set-based statement per chunk instead of one statement per id (``executemany`` steps a statement per row)."""
    for k in range(0, len(ids), SQL_IN_MAX):
        chunk = ids[k:k + SQL_IN_MAX]
        db.execute(sql.format(",".join("?" * len(chunk))), (*params, *chunk))


def _dicts(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    """A cursor's rows as dicts, by position (``dict(row)`` of a :class:`sqlite3.Row` looks each column up by name,
    comparing it with every column's: 5 instead of 3.6 µs a row of the commands' 13 columns)."""
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur]

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
    revision: int = 1
    """The request's revision the command carries: a higher one replaces the stored command of its client."""


class BridgeStore:
    """Commands and the outbox towards the hub, in SQLite; every write goes through one
    :class:`~mhp_wire.sqlite.GroupTransactions`, each waiting one turn of the loop for the others of that turn."""

    def __init__(self, path: Path | str) -> None:
        self.sql = SqliteThread(path, SCHEMA, name="bridge-store")
        self.group = GroupTransactions(self.sql, name="bridge-group-commit", lone_write_at_once=False)

    async def open(self) -> None:
        """Open (and create) the database; a database of an older bridge gets the columns and tables it lacks
        (revisions, the tariff's ``published``, the commands' payloads in a table of their own, the requests'
        command templates). Raises
        :class:`StorageError` for a database of a newer layout than :data:`LAYOUT` (no downgrade)."""
        await self.sql.call(_check_layout, self.sql.path)
        await self.sql.open()
        await self.sql.tx(_add_revision_column)
        await self.sql.tx(_add_published_column)
        await self.sql.tx(_move_payloads)

    async def close(self) -> None:
        """Commit what is queued, then close the database."""
        await self.group.drain()
        await self.sql.close()

    async def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self.group.tx(fn)

    async def accept_request(self, commands: list[NewCommand], outcomes: list[tuple[str, bytes]],
                             template: tuple[bytes, bytes, bytes] | None = None) -> int:
        """Store new commands (a redelivered request adds nothing, a request cancelled meanwhile neither) and
        outcomes for the hub; returns new commands. ``commands`` are all of one request and one revision.

        ``template``: the ``(head, middle, tail)`` the commands' payloads were made from
        (:attr:`mhp_wire.fastwire.CommandTemplate.parts`), all received at the same ``received_at``. New commands
        whose payload is that template with their ids spliced in (:func:`_spliced`, checked byte for byte against the
        template stored for them) then keep no payload of their own: the template is stored once for the request
        message (``command_templates``, keyed by request, revision and ``received_at``) instead of 10,000 payloads
        of ~300 bytes in a fan-out (~2.3 µs of the store's thread per command, docs/performance.md). Replaced
        commands (a newer revision) keep their own payload."""

        def op(db: sqlite3.Connection) -> int:
            if commands and db.execute("SELECT 1 FROM cancelled WHERE request_id=?",
                                       (commands[0].request_id,)).fetchone():
                # Cancelled since the request was checked (the hub's messages are handled concurrently): its
                # cancellation closed what was stored and told those gateways; these would go out alone.
                self._queue(db, outcomes)
                return 0
            # Multi-row INSERTs of INSERT_ROWS commands, the rest by executemany: those already held (a redelivered
            # request, or an older revision) are ignored by the INSERT; only if there are any does the UPDATE run,
            # and it changes just those of a lower revision (the ones inserted here hold this revision already).
            added = _insert_rows(db, _INSERT_COMMANDS, _COMMAND_ROW, [_command_values(c) for c in commands])
            if added == len(commands):  # all new (the usual): their payloads likewise, or the template they share
                own = commands
                if template is not None and commands:
                    key = (commands[0].request_id, commands[0].revision, commands[0].received_at)
                    # The template already held for this key, if any (a message received at the very same instant),
                    # is kept: the commands it does not make keep their own payloads.
                    db.execute("INSERT OR IGNORE INTO command_templates (request_id, revision, received_at, head, "
                               "middle, tail) VALUES (?,?,?,?,?,?)", (*key, *template))
                    held = db.execute("SELECT head, middle, tail FROM command_templates WHERE request_id=? AND "
                                      "revision=? AND received_at=?", key).fetchone()
                    parts = (bytes(held[0]), bytes(held[1]), bytes(held[2]))
                    own = [c for c in commands if c.revision != key[1] or c.received_at != key[2]
                           or c.payload != _spliced(parts, c.msg_id, c.client_id)]
                _insert_rows(db, _INSERT_PAYLOADS, _PAYLOAD_ROW, [_payload_values(c) for c in own])
                self._queue(db, outcomes)
                return added
            # A newer revision replaces the command, whatever its state (re-sent anew).
            cur = db.executemany(
                "UPDATE commands SET gateway_id=?, msg_id=?, state=?, received_at=?, "
                "first_sent_at=NULL, attempts=0, next_attempt_at=0, deadline=?, handling_ms=0, not_before=?, "
                "revision=? WHERE request_id=? AND client_id=? AND revision<?",
                [(c.gateway_id, c.msg_id, SENDING, c.received_at, c.deadline, c.not_before,
                  c.revision, c.request_id, c.client_id, c.revision) for c in commands])
            added += max(cur.rowcount, 0)
            if added:  # the payloads of the commands stored or replaced here: those that hold this one's msg_id
                db.executemany("INSERT OR REPLACE INTO command_payloads (request_id, client_id, payload) "
                               "SELECT ?,?,? WHERE EXISTS (SELECT 1 FROM commands WHERE msg_id=? AND request_id=? "
                               "AND client_id=?)",
                               [(c.request_id, c.client_id, c.payload, c.msg_id, c.request_id, c.client_id)
                                for c in commands])
            self._queue(db, outcomes)
            return added

        return await self._tx(op)

    @staticmethod
    def _queue(db: sqlite3.Connection, outcomes: list[tuple[str, bytes]]) -> None:
        if outcomes:
            db.executemany("INSERT OR IGNORE INTO hub_outbox (msg_id, payload, next_attempt_at) VALUES (?,?,0)",
                           outcomes)

    async def queue_for_hub(self, outcomes: list[tuple[str, bytes]]) -> None:
        """Add outcomes to the outbox towards the hub."""
        await self._tx(lambda db: self._queue(db, outcomes))

    async def due_commands(self, now: float, limit: int = 500, horizon: float | None = None) -> list[dict[str, Any]]:
        """Commands not yet acknowledged by their gateway whose next attempt is due, in the order they fall due.

        With a ``horizon`` before ``now`` (how far the bridge has read its broker, :class:`mhp_wire.outbox.ReadHorizon`)
        a command already sent is due only once its next attempt is at or before the horizon: its gateway's silence
        is known up to there, not up to now. A command never sent is due at ``now``. Each row has its ``payload``:
        None if neither its ``command_payloads`` row nor its message's ``command_templates`` row is there (a damaged
        store), for the relay to close it rather than leave it due (``next_gateway_due`` counts it) and unread."""
        if horizon is None or horizon >= now:
            return await self.sql.read(lambda db: _dicts(db.execute(
                f"SELECT c.*, {_PAYLOAD} FROM {_COMMAND_JOIN} WHERE {_IS_SENDING} AND next_attempt_at<=? "
                "ORDER BY next_attempt_at LIMIT ?", (now, limit))))

        def op(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = _dicts(db.execute(f"SELECT c.*, {_PAYLOAD} FROM {_COMMAND_JOIN} WHERE {_IS_SENDING} AND "
                                     "next_attempt_at<=? ORDER BY next_attempt_at LIMIT ?", (horizon, limit)))
            if len(rows) < limit:  # then the unsent ones due after the horizon: the order stays that of next attempts
                rows += _dicts(db.execute(f"SELECT c.*, {_PAYLOAD} FROM {_COMMAND_JOIN} WHERE {_IS_UNSENT} AND "
                                          "next_attempt_at>? AND next_attempt_at<=? ORDER BY next_attempt_at LIMIT ?",
                                          (horizon, now, limit - len(rows))))
            return rows

        return await self.sql.read(op)

    async def next_gateway_due(self, now: float, horizon: float) -> tuple[float | None, bool]:
        """``(when, behind)``: when the next command or notice to the gateways is due as far as the store can tell
        (None: nothing), and whether a command already sent is due at ``now`` but not at the ``horizon`` (it waits
        for the bridge to read further, not for a time). Index seeks only."""

        def op(db: sqlite3.Connection) -> tuple[float | None, bool]:
            one = lambda sql, *args: db.execute(sql, args).fetchone()[0]  # noqa: E731
            values = [one(f"SELECT MIN(next_attempt_at) FROM commands WHERE {_IS_SENDING} AND next_attempt_at<=?",
                          min(now, horizon)),
                      one(f"SELECT MIN(next_attempt_at) FROM commands WHERE {_IS_SENDING} AND next_attempt_at>?", now),
                      one(f"SELECT MIN(next_attempt_at) FROM commands WHERE {_IS_UNSENT}"),
                      one("SELECT MIN(next_attempt_at) FROM gateway_outbox")]
            behind = horizon < now and one(
                f"SELECT EXISTS (SELECT 1 FROM commands WHERE {_IS_SENDING} AND next_attempt_at>? AND "
                "next_attempt_at<=? AND attempts>0)", horizon, now) == 1
            due = [v for v in values if v is not None]
            return (min(due) if due else None), behind

        return await self.sql.read(op)

    async def mark_sent(self, sent: list[tuple[str, float]], now: float) -> None:
        """Record attempts ``(msg_id, next_attempt_at)``: one ``UPDATE`` per 500 commands of the same next attempt
        (a sending round gives every command of the same attempt count the same one), not one per command."""
        by_next: dict[float, list[str]] = {}
        for msg_id, next_at in sent:
            by_next.setdefault(next_at, []).append(msg_id)

        def op(db: sqlite3.Connection) -> None:
            for next_at, ids in by_next.items():
                _each_chunk(db, "UPDATE commands SET attempts=attempts+1, next_attempt_at=?, "
                                "first_sent_at=COALESCE(first_sent_at, ?), "
                                "handling_ms=CASE WHEN first_sent_at IS NULL THEN (?-received_at)*1000 "
                                "ELSE handling_ms END WHERE msg_id IN ({})", (next_at, now, now), ids)

        await self._tx(op)

    async def postpone_commands(self, waits: list[tuple[float, str]]) -> None:
        """Commands ``(next_attempt_at, msg_id)`` still sending wait until then, their attempts unchanged."""
        await self._tx(lambda db: db.executemany(
            "UPDATE commands SET next_attempt_at=? WHERE msg_id=? AND state=?", [(t, m, SENDING) for t, m in waits]))

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

        return await self._tx(op)

    async def deliver(self, gateway_id: str, msg_ids: list[str],
                      outcome_of: Callable[[dict[str, Any]], tuple[str, bytes]]) -> int:
        """A gateway acknowledged these messages: :meth:`deliver_many` for one gateway."""
        return await self.deliver_many([(gateway_id, msg_ids)], outcome_of)

    async def deliver_many(self, acks: list[tuple[str, list[str]]],
                           outcome_of: Callable[[dict[str, Any]], tuple[str, bytes]]) -> int:
        """Gateways acknowledged these messages (``(gateway_id, msg_ids)`` each): drop their notices among them,
        and move their commands among them that still wait for that acknowledgement to ``delivered``, with the
        outcome ``outcome_of(command)`` queued for the hub; one write, a few statements for the whole batch (not
        a few per message). A message counts only for the gateway it was sent to. Returns the commands moved."""
        return (await self.apply_reports(acks, None, outcome_of)).delivered

    async def apply_reports(self, acks: list[tuple[str, list[str]]], judged: Judged | None,
                            delivered_of: Callable[[dict[str, Any]], tuple[str, bytes] | Outcome | Report] | None,
                            pack: Callable[[list[Outcome | Report]], list[tuple[str, bytes]]] | None = None
                            ) -> Applied:
        """Gateways' acknowledgements (as :meth:`deliver_many`) and outcomes (``judged``, None: none) that arrived
        together, applied in one write with a few statements for the whole batch: one ``SELECT`` per 500 commands,
        one ``executemany`` each for the state changes, the withdrawn ``delivered`` outcomes and the outcomes
        queued for the hub.

        Acknowledgements apply first, then the outcomes' verdicts in their order: a verdict (neither None nor a
        failure; the relay decides which outcomes are final) closes its command, and an unsent ``delivered``
        outcome of the same command (:func:`delivered_msg_id`) is taken back out of the outbox (the terminal one
        says more: the hub gets one message instead of two); a second report
        of the same command finds it closed by the first, and its verdict is dropped. A command acknowledged and
        closed in the same batch gets no ``delivered`` outcome at all (``delivered_of`` is not even called for
        it). Each outcome's result is ``(state, revision)`` of its command as the reports before it in the batch
        left it (``delivered`` after this batch's acknowledgement, ``closed`` after an earlier outcome), None (no
        such command) or :class:`Failed` (its verdict an exception, :class:`Refused` say: nothing of that report is
        written). ``delivered_of`` is required when there are acknowledgements. ``pack``: the batch's outcomes
        given as models or :class:`~mhp_wire.fastwire.Report` objects become these outbox messages (the relay's
        ``outcomes`` per request); without it each is encoded as one ``outcome``."""
        if acks and delivered_of is None:
            raise ValueError("acknowledgements need delivered_of")
        pairs = list(dict.fromkeys((m, gid) for gid, ids in acks for m in ids))
        keys = list(dict.fromkeys(judged.keys)) if judged is not None else []

        def op(db: sqlite3.Connection) -> Applied:
            _drop_acked_notices(db, pairs)
            acked = _acked_commands(db, pairs)
            rows = _commands_by_key(db, keys)
            # Each command's state as this batch's reports find it where it differs from its row's (read before the
            # batch): only the commands acknowledged here, not a copy of every row's state per batch.
            state: dict[tuple[str, str], str] = {}
            acked_keys = [(r[COL_REQUEST], r[COL_CLIENT]) for r in acked]
            for key in acked_keys:
                if key in rows:
                    state[key] = DELIVERED  # as this batch's outcome of the same command will see it
            plan = _close_in_order(judged, rows, state) if judged is not None else _Closings()
            closed_keys = plan.closed_keys
            moved = [r for r, key in zip(acked, acked_keys, strict=True) if key not in closed_keys] \
                if closed_keys else acked
            # Set-based: one statement per 500 commands (per request for the closed ones), not one per command.
            _each_chunk(db, f"UPDATE commands SET state='{DELIVERED}' WHERE msg_id IN ({{}})", (),
                        [r[COL_MSG] for r in moved])
            for request_id, client_ids in plan.closed.items():
                _each_chunk(db, f"UPDATE commands SET state='{CLOSED}' WHERE request_id=? AND client_id IN ({{}})",
                            (request_id,), client_ids)
            _each_chunk(db, "DELETE FROM hub_outbox WHERE attempts=0 AND msg_id IN ({})", (), plan.superseded)
            handed["withdrawn"] = list(plan.superseded)
            delivered = [delivered_of(dict(zip(_REPORT_NAMES, r, strict=True))) for r in moved] \
                if delivered_of is not None else []
            self._queue(db, _handed(handed, _packed(delivered + plan.outcomes, pack)))
            once = [r[COL_FIRST_SENT] for r in acked if r[COL_ATTEMPTS] == 1 and r[COL_FIRST_SENT] is not None]
            # An outcome that closes a command still being sent acknowledges it (a gateway sends no separate
            # ``ack`` when its outcome is ready at once): its round trip counts as the ack's would (noted by
            # _close_in_order; one acknowledged in this batch too counts once, above).
            if acked:
                seen = set(acked_keys)
                once += [s for k, s in plan.sent_once if k not in seen]
            else:
                once += [s for _, s in plan.sent_once]
            return Applied(len(acked), plan.results, once)

        handed: dict[str, list[Any]] = {}
        """What the batch queued for the hub and withdrew from it, set by ``op`` (each key set anew if it runs
        again: ``SqliteThread.call``'s one retry)."""
        applied: Applied = await self._tx(op)
        applied.queued, applied.withdrawn = handed.get("queued", []), handed.get("withdrawn", [])
        return applied

    async def due_outbox(self, now: float, limit: int = 500) -> list[dict[str, Any]]:
        """Outcomes for the hub whose next attempt is due."""
        return await self.sql.read(lambda db: [dict(r) for r in db.execute(
            "SELECT * FROM hub_outbox WHERE next_attempt_at<=? ORDER BY next_attempt_at LIMIT ?", (now, limit))])

    async def mark_outbox_sent(self, sent: list[tuple[str, float]]) -> None:
        """Record attempts ``(msg_id, next_attempt_at)`` towards the hub."""
        await self._tx(lambda db: db.executemany(
            "UPDATE hub_outbox SET attempts=attempts+1, next_attempt_at=? WHERE msg_id=?",
            [(n, m) for m, n in sent]))

    async def postpone_outbox(self, waits: list[tuple[float, str]]) -> None:
        """Outcomes for the hub ``(next_attempt_at, msg_id)`` wait until then, their attempts unchanged (parked)."""
        await self._tx(lambda db: db.executemany("UPDATE hub_outbox SET next_attempt_at=? WHERE msg_id=?", waits))

    async def ack_outbox(self, msg_ids: list[str]) -> None:
        """Drop outcomes the hub acknowledged."""
        await self._tx(lambda db: db.executemany("DELETE FROM hub_outbox WHERE msg_id=?", [(m,) for m in msg_ids]))

    async def next_hub_due(self) -> float | None:
        """When the next outcome or measurement to the hub is due, or None (towards the gateways:
        :meth:`next_gateway_due`, which also knows the read horizon)."""
        return await self.sql.read(lambda db: db.execute("SELECT MIN(next_attempt_at) FROM hub_outbox").fetchone()[0])

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

        await self._tx(op)

    async def remove_clients(self, request_id: str, client_ids: list[str], revision: int,
                             notices: list[tuple[str, str, bytes, float]]) -> None:
        """Revision ``revision`` of a request removed these clients: their commands of that revision or older stop
        (a newer one stays), and each of their gateways is told (``notices`` as in :meth:`cancel`)."""

        def op(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE commands SET state=? WHERE request_id=? AND client_id=? AND revision<=?",
                           [(CLOSED, request_id, c, revision) for c in client_ids])
            db.executemany("INSERT OR IGNORE INTO gateway_outbox (msg_id, gateway_id, payload, next_attempt_at, "
                           "deadline) VALUES (?,?,?,0,?)", notices)

        await self._tx(op)

    async def commands_of(self, request_id: str) -> list[dict[str, Any]]:
        """Every command of one request, without its payload (:meth:`payloads_of`): its callers (a cancellation, a
        removal) read none, and a command whose payload is missing is cancelled all the same."""
        return await self.sql.read(lambda db: [dict(r) for r in db.execute(
            "SELECT * FROM commands WHERE request_id=?", (request_id,))])

    async def payloads_of(self, request_id: str) -> dict[str, bytes]:
        """The payloads of one request's commands: ``client_id -> payload`` (a command without one left out)."""
        return await self.sql.read(lambda db: {r[0]: bytes(r[1]) for r in db.execute(
            f"SELECT c.client_id, {_PAYLOAD} FROM {_COMMAND_JOIN} WHERE c.request_id=?", (request_id,))
            if r[1] is not None})

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

        await self._tx(op)

    async def postpone_gateway_outbox(self, waits: list[tuple[float, str]]) -> None:
        """Notices ``(next_attempt_at, msg_id)`` wait until then, their attempts unchanged (parked)."""
        await self._tx(lambda db: db.executemany("UPDATE gateway_outbox SET next_attempt_at=? WHERE msg_id=?", waits))

    async def resend_now(self, gateway_id: str) -> None:
        """A gateway came back online: everything waiting for it is due now."""
        await self.resend_now_many([gateway_id])

    async def resend_now_many(self, gateway_ids: list[str]) -> None:
        """These gateways came back online: everything waiting for them is due now, in one write with one
        statement per table and 500 gateways (10,000 gateways connecting at once were 10,000 writes)."""
        gids = list(dict.fromkeys(gateway_ids))

        def op(db: sqlite3.Connection) -> None:
            for k in range(0, len(gids), SQL_IN_MAX):
                chunk = gids[k:k + SQL_IN_MAX]
                marks = ",".join("?" * len(chunk))
                db.execute(f"UPDATE commands SET next_attempt_at=0 WHERE {_IS_SENDING} AND gateway_id IN ({marks})",
                           chunk)
                db.execute(f"UPDATE gateway_outbox SET next_attempt_at=0 WHERE gateway_id IN ({marks})", chunk)

        await self._tx(op)

    async def postpone_hub_resends(self, now: float, until: float, queued: Callable[[str], bool]) -> None:
        """Re-sends to the hub due by ``now`` that ``queued(msg_id)`` says may still be in the hub's backlog wait
        until ``until``; the others (lost) and first sends are not touched."""

        # A read first, and a write only if something is to wait: the dispatcher asks this every round while the
        # hub acknowledges, and an empty write still cost a commit (and an fsync) each time.
        due = await self.sql.read(lambda db: [r[0] for r in db.execute(
            "SELECT msg_id FROM hub_outbox WHERE attempts>0 AND next_attempt_at<=?", (now,))])
        waiting = [(until, m, now) for m in due if queued(m)]
        if waiting:  # still due then (not acknowledged or re-sent since the read): the same rows as in one write
            await self._tx(lambda db: db.executemany(
                "UPDATE hub_outbox SET next_attempt_at=? WHERE msg_id=? AND attempts>0 AND next_attempt_at<=?",
                waiting))

    async def resend_to_hub_now(self) -> None:
        """The hub is back: every outcome waiting for its acknowledgement is due now."""
        await self._tx(lambda db: db.execute("UPDATE hub_outbox SET next_attempt_at=0"))

    async def store_billing(self, request_id: str, rows: list[tuple[str, str, str, str]], now: float) -> None:
        """Keep billing data received from the hub (``client_id, period_start, period_end, readings json``)."""
        await self._tx(lambda db: db.executemany(
            "INSERT OR REPLACE INTO billing VALUES (?,?,?,?,?,?)",
            [(request_id, c, s, e, r, now) for c, s, e, r in rows]))

    async def billing_of(self, client_id: str) -> list[dict[str, Any]]:
        """Billing data received for one client."""
        return await self.sql.read(lambda db: [dict(r) for r in db.execute(
            "SELECT * FROM billing WHERE client_id=? ORDER BY period_start", (client_id,))])

    @staticmethod
    def read_billing(path: Path | str, start: datetime, end: datetime) -> list[BillingReading]:
        """Every billing interval received that starts in ``[start, end)``, each once as last received, from the
        store's file (read-only: the bridge may be running; see :mod:`retailer_bridge.billing`). Raises
        :class:`StorageError` when the file cannot be read."""
        lo, hi = start.astimezone(UTC), end.astimezone(UTC)
        try:
            db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=10)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the bridge's store {path}: {exc}") from exc
        try:
            rows = db.execute("SELECT request_id, client_id, period_start, period_end, readings, received_at "
                              "FROM billing").fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read billing data from {path}: {exc}") from exc
        finally:
            db.close()
        readings: list[BillingReading] = []
        for request_id, client_id, p_start, p_end, blocks, received_at in rows:
            p0, p1 = datetime.fromisoformat(p_start), datetime.fromisoformat(p_end)
            if p1 <= lo or p0 >= hi:
                continue
            readings += readings_of(request_id, client_id, p0, p1, json.loads(blocks), received_at)
        return select(readings, lo, hi)

    async def put_tariff(self, tariff_id: str, version: int, payload: bytes, published: int | None = None) -> bool:
        """Keep a tariff if it was published after the one held (the hub's ``published`` order; without it, from a
        hub older than that order, a newer version of the same tariff or any other tariff); True when it replaced
        it. A re-send of an older tariff arriving after a newer one changes nothing."""

        def op(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT tariff_id, version, published FROM tariff WHERE id=1").fetchone()
            if row is not None:
                if published is not None and row[2] is not None:
                    if published <= row[2]:
                        return False
                elif row[0] == tariff_id and row[1] >= version:
                    return False
            db.execute("INSERT OR REPLACE INTO tariff (id, tariff_id, version, payload, published) "
                       "VALUES (1,?,?,?,?)", (tariff_id, version, payload, published))
            return True

        return await self._tx(op)

    async def current_tariff(self) -> bytes | None:
        """The stored tariff's payload (as published to the gateways), or None."""
        row = await self.sql.read(lambda db: db.execute("SELECT payload FROM tariff WHERE id=1").fetchone())
        return None if row is None else bytes(row[0])

    async def queue_for_gateway(self, msg_id: str, gateway_id: str, payload: bytes, deadline: float) -> None:
        """A notice for one gateway (a schedule), re-sent until that gateway acknowledges it."""
        await self._tx(lambda db: db.execute(
            "INSERT OR IGNORE INTO gateway_outbox (msg_id, gateway_id, payload, next_attempt_at, deadline) "
            "VALUES (?,?,?,0,?)", (msg_id, gateway_id, payload, deadline)))

    async def put_customers(self, changes: list[tuple[str, int, str]], now: float,
                            stale: Callable[[dict[str, Any]], tuple[tuple[str, bytes], tuple[str, str, bytes, float]]
                                            | None]) -> int:
        """Keep the hub's announcements ``(client_id, revision, periods json)`` that are newer than those held, and,
        in the same write, close every open command of those clients that ``stale(command)`` says is no longer
        ours: its outcome ``(msg_id, payload)`` goes to the hub and its notice ``(msg_id, gateway_id, payload,
        deadline)`` to the gateway. Returns the commands closed."""

        def op(db: sqlite3.Connection) -> int:
            kept = []
            for client_id, revision, periods in changes:
                cur = db.execute(
                    "INSERT INTO customers VALUES (?,?,?,?) ON CONFLICT(client_id) DO UPDATE SET "
                    "revision=excluded.revision, periods=excluded.periods, received_at=excluded.received_at "
                    "WHERE excluded.revision > customers.revision", (client_id, revision, periods, now))
                if cur.rowcount:
                    kept.append(client_id)
            closed = 0
            for client_id in kept:
                for row in db.execute("SELECT * FROM commands WHERE client_id=? AND state NOT IN (?,?)",
                                      (client_id, CLOSED, UNANSWERED)).fetchall():
                    ended = stale(dict(row))
                    if ended is None:
                        continue
                    outcome, notice = ended
                    db.execute("UPDATE commands SET state=? WHERE request_id=? AND client_id=?",
                               (CLOSED, row["request_id"], client_id))
                    db.execute("DELETE FROM hub_outbox WHERE msg_id=? AND attempts=0",
                               (delivered_msg_id(row["msg_id"]),))
                    self._queue(db, [outcome])
                    db.execute("INSERT OR IGNORE INTO gateway_outbox (msg_id, gateway_id, payload, next_attempt_at, "
                               "deadline) VALUES (?,?,?,0,?)", notice)
                    closed += 1
            return closed

        return await self._tx(op)

    async def customers(self) -> dict[str, tuple[int, str]]:
        """The hub's announcements held: ``client_id -> (revision, periods json)``."""
        return await self.sql.read(lambda db: {r[0]: (r[1], r[2]) for r in db.execute(
            "SELECT client_id, revision, periods FROM customers")})

@dataclass(slots=True)
class _Closings:
    """What a batch's outcomes write (:func:`_close_in_order`)."""

    results: list[tuple[str, int] | Failed | None] = field(default_factory=list)
    closed: dict[str, list[str]] = field(default_factory=dict)
    """``request_id -> client_ids`` closed by this batch."""
    closed_keys: set[tuple[str, str]] = field(default_factory=set)
    superseded: list[str] = field(default_factory=list)
    """The ``msg_id``s of ``delivered`` outcomes this batch's outcomes withdraw (if not sent yet)."""
    outcomes: list[tuple[str, bytes] | Outcome | Report] = field(default_factory=list)
    sent_once: list[tuple[tuple[str, str], float]] = field(default_factory=list)
    """``(key, first_sent_at)`` of each command closed by this batch that was still ``sending`` before it, sent
    once: answered by its outcome (:attr:`Applied.first_sent_at`)."""


def _handed(handed: dict[str, list[Any]], queued: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """``queued``, kept in ``handed`` for the relay (:attr:`Applied.queued`)."""
    handed["queued"] = queued
    return queued


def _packed(outcomes: list[tuple[str, bytes] | Outcome | Report],
            pack: Callable[[list[Outcome | Report]], list[tuple[str, bytes]]] | None) -> list[tuple[str, bytes]]:
    """The outbox rows of a batch's outcomes: those given as models or reports packed by ``pack`` (or one
    each)."""
    ready: list[tuple[str, bytes]] = []
    models: list[Outcome | Report] = []
    for o in outcomes:
        # A Report first, by its exact type (the usual, one per gateway's outcome): an isinstance of the model
        # class goes through its metaclass's check.
        if type(o) is Report or isinstance(o, (Outcome, Report)):
            models.append(o)
        else:
            ready.append(o)
    if not models:
        return ready
    if pack is not None:
        return ready + pack(models)
    return ready + [(o.msg_id, encode(o)) if isinstance(o, Outcome) else outcome_payload(o) for o in models]


def _close_in_order(judged: Judged, rows: dict[tuple[str, str], Any], state: dict[tuple[str, str], str]) -> _Closings:
    """The batch's outcomes judged in one call, then each verdict (in order) applied to its command (``rows``, read
    before the batch: a ``delivered`` outcome can wait in the outbox only if its command was delivered then) as the
    reports before it left it (``state`` where it differs from its row's, updated here): a verdict for a command
    closed already is dropped."""
    plan = _Closings()
    results, closed, closed_keys, superseded, outcomes, sent_once = (
        plan.results, plan.closed, plan.closed_keys, plan.superseded, plan.outcomes, plan.sent_once)
    commands = [rows.get(k) for k in judged.keys]
    verdicts = judged.judge(commands)
    # Looked up once per outcome (the rows in hand): this loop runs for each gateway's outcome of a fan-out.
    for key, row, verdict in zip(judged.keys, commands, verdicts, strict=True):
        if row is None:
            results.append(None)
            continue
        if isinstance(verdict, Exception):
            results.append(Failed(verdict))
            continue
        before = state.get(key) or row[COL_STATE]
        if verdict is not None and before != CLOSED:
            state[key] = CLOSED  # as the next report of the same command in this batch will see it
            closed_keys.add(key)
            ids = closed.get(key[0])
            if ids is None:
                closed[key[0]] = [key[1]]
            else:
                ids.append(key[1])
            was = row[COL_STATE]
            if was == DELIVERED:
                superseded.append(delivered_msg_id(row[COL_MSG]))
            elif was == SENDING and row[COL_ATTEMPTS] == 1 and row[COL_FIRST_SENT] is not None:
                sent_once.append((key, row[COL_FIRST_SENT]))
            outcomes.append(verdict)
        results.append((before, row[COL_REVISION]))
    return plan


REPORT_COLUMNS = ("request_id, client_id, gateway_id, msg_id, state, first_sent_at, attempts, handling_ms, not_before, "
                  "revision")
"""A command's columns as a gateway's report reads them (the commands its acknowledgements and outcomes name): what
the store, the relay's judgement and its ``delivered`` outcome use; not the payload, which would only be copied, nor
the send schedule (each column read costs, 10,000 times in a fan-out)."""
_REPORT_NAMES = tuple(c.strip() for c in REPORT_COLUMNS.split(","))
(COL_REQUEST, COL_CLIENT, COL_GATEWAY, COL_MSG, COL_STATE, COL_FIRST_SENT, COL_ATTEMPTS, COL_HANDLING_MS,
 COL_NOT_BEFORE, COL_REVISION) = range(len(_REPORT_NAMES))
"""Positions in a row of :data:`REPORT_COLUMNS`: the rows are read by position, and a dict is made only of those
that get a ``delivered`` outcome (a dict per row was a visible part of the bridge's CPU per client)."""



def _drop_acked_notices(db: sqlite3.Connection, pairs: list[tuple[str, str]]) -> None:
    """Drop the notices (``gateway_outbox``) among these ``(msg_id, gateway_id)`` acknowledgements, each only for
    the gateway it was sent to: one ``SELECT`` per 500 ids, and a ``DELETE`` only for the notices found (in a fan-out
    the acknowledged messages are commands, and a ``DELETE`` per acknowledgement found nothing 10,000 times)."""
    wanted = set(pairs)
    ids = list(dict.fromkeys(m for m, _ in pairs))
    found: list[tuple[str, str]] = []
    for k in range(0, len(ids), SQL_IN_MAX):
        chunk = ids[k:k + SQL_IN_MAX]
        found += [(r[0], r[1]) for r in db.execute(
            f"SELECT msg_id, gateway_id FROM gateway_outbox WHERE msg_id IN ({','.join('?' * len(chunk))})", chunk)
            if (r[0], r[1]) in wanted]
    if found:
        db.executemany("DELETE FROM gateway_outbox WHERE msg_id=? AND gateway_id=?", found)


def _tuples(cur: sqlite3.Cursor) -> sqlite3.Cursor:
    """``cur``'s rows as plain tuples, not the connection's :class:`sqlite3.Row`: the rows a batch of reports reads
    (a command each) are read by position only, and a tuple is made and indexed faster (the factory applies per row
    fetched, so setting it after ``execute`` is in time)."""
    cur.row_factory = None
    return cur


def _acked_commands(db: sqlite3.Connection, pairs: list[tuple[str, str]]) -> list[tuple[Any, ...]]:
    """The commands still waiting for these ``(msg_id, gateway_id)`` acknowledgements, each once. Found by their
    unique ``msg_id`` (``+state`` keeps SQLite off any index on the state: the ``commands_due (state, ...)`` index of
    older bridges was picked otherwise and then walked every command still being sent, 10,000 during a fan-out, once
    per 500 acknowledgements)."""
    wanted = set(pairs)
    rows: list[tuple[Any, ...]] = []
    for k in range(0, len(pairs), SQL_IN_MAX):
        chunk = [m for m, _ in pairs[k:k + SQL_IN_MAX]]
        rows += [r for r in _tuples(db.execute(
            f"SELECT {REPORT_COLUMNS} FROM commands WHERE msg_id IN ({','.join('?' * len(chunk))}) AND +state=?",
            (*chunk, SENDING))) if (r[COL_MSG], r[COL_GATEWAY]) in wanted]
    return rows


def _commands_by_key(db: sqlite3.Connection, keys: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[Any, ...]]:
    """The commands of these ``(request_id, client_id)``, by key, as rows of :data:`REPORT_COLUMNS`: per request,
    one ``SELECT`` per 500 clients on the primary key (a row-value ``IN (VALUES ...)`` list would scan the whole
    table each time)."""
    clients: dict[str, list[str]] = {}
    for request_id, client_id in keys:
        clients.setdefault(request_id, []).append(client_id)
    rows: dict[tuple[str, str], tuple[Any, ...]] = {}
    for request_id, ids in clients.items():
        for k in range(0, len(ids), SQL_IN_MAX):
            chunk = ids[k:k + SQL_IN_MAX]
            rows.update({(request_id, row[COL_CLIENT]): row for row in _tuples(db.execute(
                f"SELECT {REPORT_COLUMNS} FROM commands WHERE request_id=? AND client_id IN "
                f"({','.join('?' * len(chunk))})", (request_id, *chunk)))})
    return rows


def _add_published_column(db: sqlite3.Connection) -> None:
    if "published" not in {r[1] for r in db.execute("PRAGMA table_info(tariff)")}:
        db.execute("ALTER TABLE tariff ADD COLUMN published INTEGER")


def _add_revision_column(db: sqlite3.Connection) -> None:
    if "revision" not in {r[1] for r in db.execute("PRAGMA table_info(commands)")}:
        db.execute("ALTER TABLE commands ADD COLUMN revision INTEGER NOT NULL DEFAULT 1")


def _check_layout(path: str) -> None:
    """Refuse a database of a newer layout than :data:`LAYOUT` (a newer bridge's) before anything of it is opened for
    writing: an older bridge would read or write it wrongly. A file not there yet is new."""
    if path == ":memory:" or not Path(path).exists():
        return
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        found = db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()
    if found > LAYOUT:
        raise StorageError(f"the bridge's store {path} has layout {found}, newer than the {LAYOUT} this bridge knows: "
                           f"a newer bridge wrote it, and an older one must not run on it (no downgrade)")


def _move_payloads(db: sqlite3.Connection) -> None:
    """A bridge's database from before ``command_payloads`` (its commands' payloads in their rows): ``commands`` is
    rebuilt without the column (copied to a new table, the payloads to ``command_payloads``, the old table dropped,
    the new one renamed, its partial indexes made again), in the one transaction of this migration: a crash leaves
    the old layout, moved again at the next start. A database of layout 1 has nothing to move: ``command_templates``
    (layout 2) is made by the schema at open, empty, and its payloads stay where they are.
    A copy, not ``ALTER TABLE ... DROP COLUMN``: that rewrites each
    row in place and frees no page (20,000 commands kept 2,229 pages against 255 fresh), and had corruption bugs
    before SQLite 3.36. The database's layout (``PRAGMA user_version``) becomes :data:`LAYOUT`, in the same
    transaction, whether migrated or new."""
    if "payload" in {r[1] for r in db.execute("PRAGMA table_info(commands)")}:
        db.execute("DROP TABLE IF EXISTS commands_new")
        db.execute(f"CREATE TABLE commands_new {_COMMANDS_TABLE}")
        db.execute(f"INSERT INTO commands_new ({_COMMAND_COLUMNS}) SELECT {_COMMAND_COLUMNS} FROM commands")
        db.execute("INSERT OR REPLACE INTO command_payloads (request_id, client_id, payload) "
                   "SELECT request_id, client_id, payload FROM commands")
        db.execute("DROP TABLE commands")  # and its indexes
        db.execute("ALTER TABLE commands_new RENAME TO commands")
        for statement in _COMMAND_INDEXES.strip().splitlines():
            db.execute(statement)
    if db.execute("PRAGMA user_version").fetchone()[0] < LAYOUT:
        db.execute(f"PRAGMA user_version={LAYOUT}")
