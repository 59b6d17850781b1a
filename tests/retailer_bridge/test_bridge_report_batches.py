"""Batch-first at the bridge (issue 14, third round): the gateways' acknowledgements and outcomes that arrive
together are applied in one store write with a few statements for the whole batch, and a command acknowledged
and closed in the same batch sends the hub no ``delivered`` outcome; a request's commands are stored with one
statement. Real SQLite; the statements are counted on the store's own connection."""

from __future__ import annotations

import _sqlite3
import asyncio
import ctypes
import sqlite3
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mhp_wire.groupcommit import Failed
from mhp_wire.messages import (
    Ack,
    ClientState,
    Command,
    EmergencyParams,
    Outcome,
    Outcomes,
    RequestKind,
    decode,
    encode,
)
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.store import (
    CLOSED,
    COL_CLIENT,
    COL_STATE,
    INSERT_ROWS,
    SQL_IN_MAX,
    BridgeStore,
    Judged,
    NewCommand,
    Refused,
    delivered_msg_id,
)
from tests.outcome_views import client_outcomes


class CountingConnection:
    """The store's real SQLite connection, counting the statements handed to it (``execute`` and
    ``executemany`` calls: one ``executemany`` of 1,000 rows counts once)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.calls: Counter[str] = Counter()

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self.calls[sql.split()[0].upper()] += 1
        return self.db.execute(sql, *args)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        self.calls[sql.split()[0].upper()] += 1
        return self.db.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def counting(store: BridgeStore) -> CountingConnection:
    conn = CountingConnection(store.sql.db)
    store.sql._db = conn  # type: ignore[assignment]  # the same connection, on the same worker thread
    return conn


def data_statements(conn: CountingConnection) -> int:
    """Statements that read or write rows (not BEGIN, SAVEPOINT, RELEASE, COMMIT)."""
    return sum(n for kind, n in conn.calls.items() if kind in ("SELECT", "INSERT", "UPDATE", "DELETE"))


async def fresh_store(tmp_path: Path, n: int) -> BridgeStore:
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    await store.accept_request([NewCommand("q", f"c{i}", f"gw-{i}", f"cmd{i}", b"command", 0.0, 1e12)
                                for i in range(n)], [])
    return store


def final(tag: str) -> Any:
    """A terminal outcome's verdict from its command (a row of ``store.REPORT_COLUMNS``, read by position)."""
    return lambda cmd: (f"{tag}-{cmd[COL_CLIENT]}", tag.encode())


def dlv(cmd: dict[str, Any]) -> tuple[str, bytes]:
    return delivered_msg_id(cmd["msg_id"]), b"delivered"


async def test_acks_and_outcomes_of_one_batch_are_one_write_and_a_few_statements(tmp_path: Path) -> None:
    n = 2 * SQL_IN_MAX + 10  # more commands than one IN list holds
    store = await fresh_store(tmp_path, n)
    try:
        conn = counting(store)
        delivered_for: list[str] = []

        def delivered(cmd: dict[str, Any]) -> tuple[str, bytes]:
            delivered_for.append(cmd["client_id"])
            return delivered_msg_id(cmd["msg_id"]), b"delivered"

        # Every gateway acknowledges; the first n - 100 also report their outcome in the same batch.
        acks = [(f"gw-{i}", [f"cmd{i}"]) for i in range(n)]
        closing = final("executed")
        judged = Judged([("q", f"c{i}") for i in range(n - 100)], lambda rows: [closing(r) for r in rows])
        commits = store.group.commits
        applied = await store.apply_reports(acks, judged, delivered)
        assert store.group.commits == commits + 1 and applied.delivered == n
        # A few statements for the whole batch, whatever its size: no statement per report.
        assert data_statements(conn) <= 12, conn.calls
        # Closed in the same batch as acknowledged: no delivered outcome built, stored or sent for them.
        assert sorted(delivered_for) == sorted(f"c{i}" for i in range(n - 100, n))
        assert applied.closed == [("delivered", 1)] * (n - 100)  # each as this batch's acknowledgement left it
        outbox = await store.sql.read(lambda db: sorted(r[0] for r in db.execute("SELECT msg_id FROM hub_outbox")))
        assert outbox == sorted([*(f"executed-c{i}" for i in range(n - 100)),
                                 *(delivered_msg_id(f"cmd{i}") for i in range(n - 100, n))])
        states = await store.sql.read(lambda db: Counter(r[0] for r in db.execute("SELECT state FROM commands")))
        assert states == {CLOSED: n - 100, "delivered": 100}
    finally:
        await store.close()


async def test_each_report_of_a_batch_keeps_its_own_answer(tmp_path: Path) -> None:
    store = await fresh_store(tmp_path, 4)
    try:
        await store.deliver_many([("gw-0", ["cmd0"]), ("gw-1", ["cmd1"])], dlv)  # delivered, unsent
        await store.mark_outbox_sent([(delivered_msg_id("cmd1"), 1e12)])  # c1's delivered one is on its way

        seen: list[tuple[str, str] | None] = []

        def judge(rows: list[Any]) -> list[Any]:  # a store.Verdict each
            seen.extend(None if r is None else (r[COL_CLIENT], r[COL_STATE]) for r in rows)
            return [("executed-c0", b"executed"), ("again-c0", b"again"),  # a re-sent report
                    ("executed-c1", b"executed"),
                    Refused("moved to another supplier"),  # the caller's check refuses it
                    ValueError("cannot build this outcome"),  # its judgement failed (the relay catches it per report)
                    ("executed-nobody", b"executed")]

        keys = [("q", "c0"), ("q", "c0"), ("q", "c1"), ("q", "c2"), ("q", "c3"), ("q", "nobody")]
        applied = await store.apply_reports([("gw-2", ["cmd2"]), ("gw-1", ["cmd3"])], Judged(keys, judge), dlv)
        # Judged in one call, each command as stored before the batch (c2 not yet acknowledged by it, the re-sent
        # report's command still open): the store, not the judge, knows what the batch's reports before it did.
        assert seen == [("c0", "delivered"), ("c0", "delivered"), ("c1", "delivered"), ("c2", "sending"),
                        ("c3", "sending"), None]
        first, second, c1, refused, failed, unknown = applied.closed
        assert first == ("delivered", 1)
        assert second == (CLOSED, 1)  # closed by the first: its verdict is dropped, no second outcome
        assert c1 == ("delivered", 1)
        assert isinstance(refused, Failed) and isinstance(refused.error, Refused)
        assert isinstance(failed, Failed) and isinstance(failed.error, ValueError)
        assert unknown is None
        assert applied.delivered == 1  # gw-2's own command; gw-1 cannot acknowledge gw-3's
        outbox = await store.sql.read(lambda db: sorted(r[0] for r in db.execute("SELECT msg_id FROM hub_outbox")))
        # c0's unsent delivered outcome is withdrawn by its executed one; c1's, already sent, stays until the hub
        # acknowledges it; c2 was refused but its acknowledgement stands (delivered); c3's failed report wrote
        # nothing.
        assert outbox == sorted(["executed-c0", delivered_msg_id("cmd1"), "executed-c1", delivered_msg_id("cmd2")])
        states = await store.sql.read(lambda db: dict(db.execute("SELECT client_id, state FROM commands")))
        assert states == {"c0": CLOSED, "c1": CLOSED, "c2": "delivered", "c3": "sending"}
        with pytest.raises(ValueError, match="delivered_of"):
            await store.apply_reports([("gw-3", ["cmd3"])], None, None)
    finally:
        await store.close()


def command(client_id: str, request_id: str = "q") -> Command:
    start = datetime.now(UTC) + timedelta(minutes=1)
    return Command(request_id=request_id, client_id=client_id, kind=RequestKind.EMERGENCY,
                   params=EmergencyParams(start=start, end=start + timedelta(minutes=5), power_limit_kw=1.0),
                   expires_at=start + timedelta(minutes=5))


async def test_gateways_answering_together_cost_one_write_and_no_delivered_outcome(tmp_path: Path) -> None:
    """Through the relay's handlers: 60 gateways acknowledge their command and report it executed at once."""
    n = 60
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        cmds = [command(f"c{i}") for i in range(n)]
        await store.accept_request([NewCommand("q", c.client_id, f"gw-{i}", c.msg_id, encode(c), 0.0, 1e12)
                                    for i, c in enumerate(cmds)], [])
        relay = BridgeRelay("r1", {f"c{i}": f"gw-{i}" for i in range(n)}, store)
        conn = counting(store)
        writes = store.group.writes
        reports = []
        for i, c in enumerate(cmds):
            reports.append(relay._on_gateway_ack(f"gw-{i}", Ack(ack_ids=[c.msg_id])))
            reports.append(relay._on_gateway_outcome(f"gw-{i}", Outcome(request_id="q", client_id=c.client_id,
                                                                        state=ClientState.EXECUTED)))
        await asyncio.gather(*reports)
        # The first report starts a batch of its own; the others arrived meanwhile and form the next one.
        assert store.group.writes - writes <= 2, store.group.writes - writes
        assert data_statements(conn) <= 2 * 12, conn.calls
        messages = await store.sql.read(lambda db: [decode(p) for (p,) in db.execute(
            "SELECT payload FROM hub_outbox")])
        assert all(isinstance(m, (Outcome, Outcomes)) for m in messages)
        queued = [v for m in messages for v in client_outcomes(m)]
        # No delivered outcome for a client whose executed one is in the same batch; one executed each.
        executed = Counter(m.client_id for m in queued if isinstance(m, Outcome) and m.state is ClientState.EXECUTED)
        assert executed == {f"c{i}": 1 for i in range(n)}
        assert sum(1 for m in queued if isinstance(m, Outcome) and m.state is ClientState.DELIVERED) <= 2
    finally:
        await store.close()


@pytest.mark.parametrize(("variables", "statements"), [(None, 2 * (6_000 // INSERT_ROWS + (6_000 % INSERT_ROWS > 0))),
                                                       (33, 2_000 + 6_000 // 11 + 1)])
async def test_a_large_request_s_commands_are_inserted_256_per_statement_within_sqlites_limit(
        tmp_path: Path, variables: int | None, statements: int) -> None:
    """Issue 14, session 13: a request's commands go in with one multi-row ``INSERT`` per :data:`INSERT_ROWS`
    (before: an ``executemany`` stepped once per command) and the remainder by one ``executemany``, fewer per statement
    where the connection allows fewer bound values (33: three commands); each is stored once, a redelivery adds
    none, and what was added is counted."""
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        if variables is not None:
            store.sql.db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, variables)
        conn = counting(store)
        n = 6_000
        commands = [NewCommand("q", f"c{i}", f"gw-{i}", f"q-{i}", f"command {i}".encode(), 1.0, 1e12, not_before=2.0,
                               revision=3) for i in range(n)]
        assert await store.accept_request(commands, []) == n
        # INSERT_ROWS a statement, the rest, for the commands and their payloads (a table of their own); or three
        # commands and eleven payloads a statement
        assert conn.calls["INSERT"] == statements
        assert await store.accept_request(commands[:10] + commands[-10:], []) == 0  # redelivered: nothing added
        rows = await store.sql.read(lambda db: [tuple(r) for r in db.execute(
            "SELECT request_id, client_id, gateway_id, msg_id, p.payload, state, received_at, attempts, "
            "next_attempt_at, deadline, not_before, revision FROM commands JOIN command_payloads AS p "
            "USING (request_id, client_id) ORDER BY commands.rowid")])
        assert rows == [("q", f"c{i}", f"gw-{i}", f"q-{i}", f"command {i}".encode(), "sending", 1.0, 0, 0.0, 1e12, 2.0,
                         3) for i in range(n)]
    finally:
        await store.close()


async def test_requests_of_many_distinct_sizes_do_not_pin_a_prepared_statement_each(tmp_path: Path) -> None:
    """Review of s13-bridge: the multi-row ``INSERT``'s SQL text was one per chunk length, and sqlite3 caches up to
    128 prepared statements per connection, so each distinct request size pinned its prepared statement (~2.8 MB at
    2,400 rows; 64 sizes: ~180 MB of SQLite's heap). One fixed chunk length and ``executemany`` for the rest keep
    it to one; measured by SQLite's own heap counter (``sqlite3_memory_used``)."""
    # The SQLite the sqlite3 module runs on (its extension module and what it links), whatever else is installed.
    lib = ctypes.CDLL(_sqlite3.__file__)
    lib.sqlite3_libversion.restype = ctypes.c_char_p
    assert lib.sqlite3_libversion().decode() == sqlite3.sqlite_version, "not the sqlite3 module's library"
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        before = lib.sqlite3_memory_used()
        for k in range(64):  # 64 requests (or hub messages of a split request) of distinct sizes
            await store.accept_request([NewCommand(f"q{k}", f"c{i}", f"gw-{i}", f"q{k}-{i}", b"x", 1.0, 1e12)
                                        for i in range(2_400 - k)], [])
        grown = (lib.sqlite3_memory_used() - before) / 2**20
        assert (await store.counts())["sending"] == sum(2_400 - k for k in range(64))
    finally:
        await store.close()
    assert grown < 50, f"SQLite's heap grew {grown:.0f} MB"


async def test_a_request_s_commands_are_stored_with_few_statements_and_revisions_still_replace(
        tmp_path: Path) -> None:
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        conn = counting(store)
        first = [NewCommand("q", f"c{i}", f"gw-{i}", f"q1-{i}", b"rev 1", 0.0, 1e12) for i in range(1000)]
        assert await store.accept_request(first, [("refused-c9", b"refused")]) == 1000
        inserts = 1000 // INSERT_ROWS + (1000 % INSERT_ROWS > 0)  # the commands' statements
        # the commands, their payloads, and the refusal
        assert conn.calls["INSERT"] == 2 * inserts + 1 and conn.calls["UPDATE"] == 0
        conn.calls.clear()
        assert await store.accept_request(first, []) == 0  # redelivered: nothing added, one UPDATE that matches none
        assert conn.calls["INSERT"] == inserts and conn.calls["UPDATE"] == 1
        second = [NewCommand("q", f"c{i}", f"gw-{i}", f"q2-{i}", b"rev 2", 0.0, 1e12, revision=2)
                  for i in range(0, 1000, 2)] + [NewCommand("q", "c-new", "gw-new", "q2-new", b"rev 2", 0.0, 1e12,
                                                            revision=2)]
        assert await store.accept_request(second, []) == 501  # 500 replaced, one added
        assert await store.accept_request(first[:10], []) == 0  # an older revision replaces nothing
        rows = await store.sql.read(lambda db: {r[0]: (r[1], r[2]) for r in db.execute(
            "SELECT client_id, revision, msg_id FROM commands")})
        assert rows["c0"] == (2, "q2-0") and rows["c1"] == (1, "q1-1") and rows["c-new"] == (2, "q2-new")
        assert len(rows) == 1001
    finally:
        await store.close()
