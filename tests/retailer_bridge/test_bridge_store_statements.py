"""The bridge's store per batch, not per command (issue 14, sixth round): a sending round's attempts and a batch of
gateways' reports run a few set-based statements whatever their size, the commands still being sent have a
partial index of their own that closing a command does not touch, and an older store is migrated to it. Real
SQLite; the statements are counted as SQLite runs them (its trace callback fires for every statement run, each row
of an ``executemany`` included)."""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mhp_wire.fastwire import Report
from mhp_wire.messages import ClientState, Outcome, Outcomes, decode
from mhp_wire.sqlite import StorageError
from retailer_bridge.relay import pack_outcomes
from retailer_bridge.store import (
    CLOSED,
    COL_CLIENT,
    DELIVERED,
    LAYOUT,
    SENDING,
    BridgeStore,
    Judged,
    NewCommand,
    delivered_msg_id,
)
from sim.bench_bridge_store import Runs as SqliteRuns

N = 1_000
T = TypeVar("T")

OLD_COMMANDS = """
        CREATE TABLE commands (
            request_id TEXT NOT NULL, client_id TEXT NOT NULL, gateway_id TEXT NOT NULL, msg_id TEXT NOT NULL UNIQUE,
            payload BLOB NOT NULL, state TEXT NOT NULL, received_at REAL NOT NULL, first_sent_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, deadline REAL NOT NULL,
            handling_ms REAL NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0,
            revision INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (request_id, client_id));
"""
"""The ``commands`` table of a bridge from before ``command_payloads`` (its payload a column), with revisions."""


async def traced(store: BridgeStore) -> SqliteRuns:
    """Every statement SQLite runs on the store's connection from now on, by its first word."""
    runs = SqliteRuns()
    await store.sql.call(lambda: store.sql.db.set_trace_callback(runs))
    return runs


async def selects_run(store: BridgeStore, call: Awaitable[T]) -> tuple[T, list[str]]:
    """``call``'s result and the ``SELECT``s SQLite ran for it on the store's connection, each as run (its bound
    values in its text, as the trace callback gives it): the store's own statements, for a query plan."""
    seen: list[str] = []
    await store.sql.call(lambda: store.sql.db.set_trace_callback(seen.append))
    try:
        result = await call
    finally:
        await store.sql.call(lambda: store.sql.db.set_trace_callback(None))
    return result, [s for s in seen if s.lstrip().upper().startswith("SELECT")]


async def store_with_commands(tmp_path: Path, n: int = N) -> BridgeStore:
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    await store.accept_request([NewCommand("q", f"c{i}", f"gw-{i}", f"cmd{i}", b"command", 100.0, 1e12)
                                for i in range(n)], [])
    return store


async def states(store: BridgeStore) -> dict[str, str]:
    return {c["client_id"]: c["state"] for c in await store.commands_of("q")}


def final(cmd: Any) -> Report:
    """A terminal outcome's verdict from its command (a row of ``store.REPORT_COLUMNS``, read by position)."""
    return Report("q", cmd[COL_CLIENT], ClientState.EXECUTED, {}, {}, 1)


def dlv(cmd: dict[str, Any]) -> tuple[str, bytes]:
    """A ``delivered`` outcome as its own outbox row (which a later outcome withdraws while unsent)."""
    return delivered_msg_id(cmd["msg_id"]), b"delivered"


def dlv_report(cmd: dict[str, Any]) -> Report:
    """A ``delivered`` outcome as the relay gives it (packed with the batch's others)."""
    return Report("q", cmd["client_id"], ClientState.DELIVERED, {}, {}, 1, delivered_msg_id(cmd["msg_id"]))


async def hub_outbox(store: BridgeStore) -> set[str]:
    return await store.sql.read(lambda db: {r[0] for r in db.execute("SELECT msg_id FROM hub_outbox")})


async def hub_outcomes(store: BridgeStore) -> Counter[tuple[str, str]]:
    """``(client_id, state)`` of every outcome queued for the hub, unpacked from its messages."""
    payloads = await store.sql.read(lambda db: [bytes(r[0]) for r in db.execute("SELECT payload FROM hub_outbox")])
    out: Counter[tuple[str, str]] = Counter()
    for p in payloads:
        msg = decode(p)
        if isinstance(msg, Outcomes):
            out.update((r.client_id, r.state.value) for r in msg.reports)
        elif isinstance(msg, Outcome):
            out[(msg.client_id, msg.state.value)] += 1
        else:
            out[("?", p.decode())] += 1
    return out


async def test_a_sending_round_of_1000_commands_is_a_few_statements(tmp_path: Path) -> None:
    store = await store_with_commands(tmp_path)
    try:
        runs = await traced(store)
        # A round: the first attempt of 990 commands, a second attempt of 10 (another next attempt).
        await store.mark_sent([(f"cmd{i}", 5.0 if i < 990 else 7.0) for i in range(N)], now=101.0)
        assert runs.runs["UPDATE"] <= 4, runs.runs  # one per 500 commands of one next attempt; main: 1,000
        rows = {c["client_id"]: c for c in await store.commands_of("q")}
        assert {c["attempts"] for c in rows.values()} == {1}
        assert {rows[f"c{i}"]["next_attempt_at"] for i in range(990)} == {5.0}
        assert {rows[f"c{i}"]["next_attempt_at"] for i in range(990, N)} == {7.0}
        assert {c["first_sent_at"] for c in rows.values()} == {101.0}
        assert {round(c["handling_ms"], 6) for c in rows.values()} == {1000.0}
        # A re-send keeps the first send's time and handling.
        await store.mark_sent([("cmd0", 9.0)], now=105.0)
        again = {c["client_id"]: c for c in await store.commands_of("q")}["c0"]
        assert (again["attempts"], again["next_attempt_at"], again["first_sent_at"], round(again["handling_ms"], 6)) \
            == (2, 9.0, 101.0, 1000.0)
    finally:
        await store.close()


async def test_a_batch_of_reports_is_a_few_statements_with_the_same_outcome(tmp_path: Path) -> None:
    store = await store_with_commands(tmp_path)
    try:
        # Batch 1: the first half acknowledged (their ``delivered`` outcomes queued for the hub).
        await store.apply_reports([(f"gw-{i}", [f"cmd{i}"]) for i in range(N // 2)], None, dlv)
        runs = await traced(store)
        # Batch 2: every gateway's acknowledgement (the first half's again: a redelivery), and outcomes of the first
        # 750: the first half's withdraw their unsent ``delivered``; 500-749 are acknowledged and closed together.
        applied = await store.apply_reports(
            [(f"gw-{i}", [f"cmd{i}"]) for i in range(N)],
            Judged([("q", f"c{i}") for i in range(750)], lambda rows: [final(r) for r in rows]), dlv_report,
            pack_outcomes)
        # main: 2,505 (a DELETE per acknowledgement and per withdrawn outcome, an UPDATE per command)
        assert runs.data() <= 16, runs.runs
        assert applied.delivered == N // 2  # the first half waited for no acknowledgement any more
        assert applied.closed == [(DELIVERED, 1)] * 750  # each as this batch's acknowledgements left it
        got = await states(store)
        assert Counter(got.values()) == {CLOSED: 750, DELIVERED: 250}
        assert {got[f"c{i}"] for i in range(750, N)} == {DELIVERED}
        # One outcome per closed command; ``delivered`` only for those acknowledged and not closed: the first
        # half's from batch 1 were withdrawn (unsent) by their outcomes, 500-749 never had one.
        assert runs.runs["INSERT"] == 1  # one ``outcomes`` message: the request's 750 executed and 250 delivered
        assert await hub_outcomes(store) == Counter(
            {**{(f"c{i}", "executed"): 1 for i in range(750)}, **{(f"c{i}", "delivered"): 1 for i in range(750, N)}})
    finally:
        await store.close()


async def test_a_notice_counts_only_for_its_own_gateway_among_many_acknowledgements(tmp_path: Path) -> None:
    store = await store_with_commands(tmp_path, 600)
    try:
        for n in ("n1", "n2", "n3"):
            await store.queue_for_gateway(n, f"gw-{n}", b"notice", 1e12)
        runs = await traced(store)
        await store.apply_reports([(f"gw-{i}", [f"cmd{i}"]) for i in range(600)]
                                  + [("gw-n1", ["n1"]), ("gw-intruder", ["n2"]), ("gw-n3", ["n3", "n3"])], None, dlv)
        assert runs.runs["DELETE"] == 2, runs.runs  # one for each of the two notices found; main: one per pair, 603
        left = await store.sql.read(lambda db: {r[0] for r in db.execute("SELECT msg_id FROM gateway_outbox")})
        assert left == {"n2"}  # acknowledged by another gateway: still waiting for its own
        assert Counter((await states(store)).values()) == {DELIVERED: 600}
    finally:
        await store.close()


async def test_a_store_of_an_older_bridge_gets_the_partial_index_and_keeps_its_commands(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_COMMANDS + "CREATE INDEX commands_due ON commands(state, next_attempt_at);")
    db.executemany("INSERT INTO commands (request_id, client_id, gateway_id, msg_id, payload, state, received_at, "
                   "next_attempt_at, deadline) VALUES ('q',?,?,?,x'00',?,0,?,1e12)",
                   [("c1", "gw-1", "m1", SENDING, 30.0), ("c2", "gw-2", "m2", SENDING, 10.0),
                    ("c3", "gw-3", "m3", DELIVERED, 1.0), ("c4", "gw-4", "m4", CLOSED, 2.0),
                    ("c5", "gw-5", "m5", SENDING, 99.0)])
    db.commit()
    db.close()
    store = BridgeStore(path)
    await store.open()
    try:
        indexes = await store.sql.read(lambda db: {r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='commands' AND sql IS NOT NULL")})
        assert indexes == {"commands_sending", "commands_unsent"}
        due = await store.due_commands(50.0)
        assert [c["msg_id"] for c in due] == ["m2", "m1"]  # the sending ones due, in the order they fall due
        assert await store.next_gateway_due(50.0, 60.0) == (10.0, False)
        plan = await store.sql.read(lambda db: " ".join(r[3] for r in db.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM commands WHERE state = 'sending' AND next_attempt_at<=? "
            "ORDER BY next_attempt_at LIMIT 10", (50.0,))))
        assert "commands_sending" in plan
        for sql, args, index in [  # the read horizon's queries: index seeks, not a walk of what waits
                ("SELECT * FROM commands WHERE state = 'sending' AND attempts = 0 AND next_attempt_at>? AND "
                 "next_attempt_at<=? ORDER BY next_attempt_at LIMIT 10", (1.0, 50.0), "commands_unsent"),
                ("SELECT MIN(next_attempt_at) FROM commands WHERE state = 'sending' AND attempts = 0", (),
                 "commands_unsent"),
                ("SELECT EXISTS (SELECT 1 FROM commands WHERE state = 'sending' AND next_attempt_at>? AND "
                 "next_attempt_at<=? AND attempts>0)", (1.0, 50.0), "commands_sending")]:
            plan = await store.sql.read(lambda db, sql=sql, args=args: " ".join(
                r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, args)))
            assert index in plan, (sql, plan)
        # Never sent: due at now whatever the horizon. Once m1 is sent (next attempt at 30), it waits for a horizon
        # past 30 (the bridge has read that far), while m2, never sent, does not.
        assert [c["msg_id"] for c in await store.due_commands(50.0, horizon=20.0)] == ["m2", "m1"]
        assert await store.next_gateway_due(50.0, 20.0) == (10.0, False)
        await store.mark_sent([("m1", 30.0)], now=5.0)
        assert [c["msg_id"] for c in await store.due_commands(50.0, horizon=20.0)] == ["m2"]
        assert await store.next_gateway_due(50.0, 20.0) == (10.0, True)
        assert [c["msg_id"] for c in await store.due_commands(50.0, horizon=30.0)] == ["m2", "m1"]
        await store.resend_now_many(["gw-5", "gw-3"])  # only a command still sending is made due
        assert [c["msg_id"] for c in await store.due_commands(0.0)] == ["m5"]
    finally:
        await store.close()


async def test_a_store_of_an_older_bridge_moves_its_commands_payloads_to_their_own_table(tmp_path: Path) -> None:
    """Issue 14, thirteenth round: a command's payload is kept in ``command_payloads``, written once per command
    (and revision), so that its send and its close rewrite a row without it. A bridge's database of the old layout
    (the payload a column of ``commands``) is migrated at open: every payload moves, the column goes, and the commands
    read, are sent and are replaced by a newer revision as before; opened again, nothing moves twice."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_COMMANDS + """
        CREATE INDEX commands_sending ON commands(next_attempt_at) WHERE state = 'sending';
        CREATE INDEX commands_unsent ON commands(next_attempt_at) WHERE state = 'sending' AND attempts = 0;""")
    db.executemany("INSERT INTO commands (request_id, client_id, gateway_id, msg_id, payload, state, received_at, "
                   "next_attempt_at, deadline) VALUES ('q',?,?,?,?,?,0,?,1e12)",
                   [("c1", "gw-1", "m1", b"one", SENDING, 30.0), ("c2", "gw-2", "m2", b"two", SENDING, 10.0),
                    ("c3", "gw-3", "m3", b"three", CLOSED, 1.0)])
    db.commit()
    db.close()
    for _ in range(2):  # the migration, then a start on the new layout
        store = BridgeStore(path)
        await store.open()
        try:
            columns = await store.sql.read(lambda db: [r[1] for r in db.execute("PRAGMA table_info(commands)")])
            assert "payload" not in columns and "state" in columns
            payloads = await store.payloads_of("q")
            assert {c["client_id"]: (c["msg_id"], c["state"], payloads[c["client_id"]])
                    for c in await store.commands_of("q")} == {
                "c1": ("m1", SENDING, b"one"), "c2": ("m2", SENDING, b"two"), "c3": ("m3", CLOSED, b"three")}
            due, [statement] = await selects_run(store, store.due_commands(50.0))
            assert [(c["msg_id"], c["payload"]) for c in due] == [("m2", b"two"), ("m1", b"one")]
            plan = await store.sql.read(lambda db, statement=statement: " ".join(
                r[3] for r in db.execute("EXPLAIN QUERY PLAN " + statement)))
            assert "commands_sending" in plan  # the join keeps the due commands' index seek (the statement run)
        finally:
            await store.close()
    store = BridgeStore(path)
    await store.open()
    try:
        redelivered = NewCommand("q", "c1", "gw-1", "m1-again", b"one again", 0.0, 1e12)
        newer = NewCommand("q", "c2", "gw-2", "m2-rev2", b"two, revision 2", 0.0, 1e12, revision=2)
        added = NewCommand("q", "c4", "gw-4", "m4", b"four", 0.0, 1e12)
        assert await store.accept_request([redelivered, newer, added], []) == 2
        payloads = await store.payloads_of("q")
        assert {c["client_id"]: (c["msg_id"], payloads[c["client_id"]], c["revision"])
                for c in await store.commands_of("q")} == {
            "c1": ("m1", b"one", 1), "c2": ("m2-rev2", b"two, revision 2", 2), "c3": ("m3", b"three", 1),
            "c4": ("m4", b"four", 1)}
        payloads = await store.sql.read(lambda db: db.execute("SELECT COUNT(*) FROM command_payloads").fetchone()[0])
        assert payloads == 4  # one per command: the replaced revision's is replaced, the redelivery's not kept
    finally:
        await store.close()


def old_store(path: Path, n: int, head: str = OLD_COMMANDS) -> None:
    """A bridge's database of the layout before ``command_payloads``: ``n`` commands being sent, ~380-byte payloads."""
    db = sqlite3.connect(path)
    db.executescript(head)
    db.executemany("INSERT INTO commands (request_id, client_id, gateway_id, msg_id, payload, state, received_at, "
                   "next_attempt_at, deadline) VALUES ('q',?,?,?,?,?,0,0,1e12)",
                   [(f"c{i}", f"gw-{i}", f"m{i}", b"p" * 380, SENDING) for i in range(n)])
    db.commit()
    db.close()


def pages_of(path: Path, table: str) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT COUNT(*) FROM dbstat WHERE name=?", (table,)).fetchone()[0])
    finally:
        db.close()


async def test_the_payload_migration_rebuilds_commands_as_compact_as_a_fresh_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of the thirteenth round: ``ALTER TABLE commands DROP COLUMN payload`` rewrote each row in place and freed
    no page (20,000 commands: 2,229 pages against 255 stored fresh, the file nearly doubled) and needed SQLite 3.35
    (its DROP COLUMN had corruption fixes up to 3.36). The table is now rebuilt (a copy, the old one dropped), which
    needs neither: it is as compact as the same commands stored fresh, with an SQLite older than 3.35 too. On e44a65f
    this fails: ``StorageError`` (needs SQLite 3.35), and without the older version's refusal 2,229 pages."""
    path = tmp_path / "old.db"
    old_store(path, 20_000)
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    store = BridgeStore(path)
    await store.open()
    try:
        indexes = await store.sql.read(lambda db: {r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='commands' AND sql IS NOT NULL")})
        assert indexes == {"commands_sending", "commands_unsent"}  # made again after the rename
        tables = await store.sql.read(lambda db: {r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")})
        assert "commands_new" not in tables
        assert len(await store.commands_of("q")) == 20_000 and len(await store.payloads_of("q")) == 20_000
    finally:
        await store.close()
    fresh = await store_with_commands(tmp_path / "fresh", 20_000)
    await fresh.close()
    assert pages_of(path, "commands") <= pages_of(tmp_path / "fresh" / "b.db", "commands") * 1.1, \
        (pages_of(path, "commands"), pages_of(tmp_path / "fresh" / "b.db", "commands"))


async def test_a_failed_payload_migration_leaves_the_old_layout_whole(tmp_path: Path) -> None:
    """A rebuild that fails half-way (here a view of the operator's naming the old table's payload: the rename
    refuses to leave it dangling) rolls back all of it: the old table with its payloads, nothing moved."""
    path = tmp_path / "old.db"
    old_store(path, 3)
    db = sqlite3.connect(path)
    db.execute("CREATE VIEW v AS SELECT payload FROM commands")
    db.commit()
    db.close()
    store = BridgeStore(path)
    with pytest.raises(StorageError):
        await store.open()
    await store.close()
    db = sqlite3.connect(path)
    try:
        assert "payload" in {r[1] for r in db.execute("PRAGMA table_info(commands)")}
        assert db.execute("SELECT COUNT(*) FROM commands").fetchone()[0] == 3
        assert db.execute("SELECT COUNT(*) FROM command_payloads").fetchone()[0] == 0
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    finally:
        db.close()


async def test_a_store_from_before_revisions_gets_revisions_then_its_payloads_moved(tmp_path: Path) -> None:
    """The migrations run in order: the revision column is added before the rebuild copies it."""
    path = tmp_path / "older.db"
    old_store(path, 1, OLD_COMMANDS.replace(",\n            revision INTEGER NOT NULL DEFAULT 1", ""))
    store = BridgeStore(path)
    await store.open()
    try:
        assert [(c["msg_id"], c["revision"]) for c in await store.commands_of("q")] == [("m0", 1)]
        assert await store.payloads_of("q") == {"c0": b"p" * 380}
    finally:
        await store.close()


async def test_the_store_records_its_layout_and_refuses_a_newer_one(tmp_path: Path) -> None:
    """Review of the thirteenth round: an older bridge on a migrated database was refused only on paper. The layout is
    now ``PRAGMA user_version`` (new and migrated databases alike), and a database of a newer layout than the code
    knows is refused at open, before anything of it is written. On e44a65f this fails: user_version 0, and the newer
    database opened."""
    old = tmp_path / "old.db"
    old_store(old, 2)
    for path in (tmp_path / "new.db", old):
        store = BridgeStore(path)
        await store.open()
        await store.close()
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA user_version").fetchone()[0] == LAYOUT == 2
        db.close()
    newer = tmp_path / "newer.db"
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA user_version={LAYOUT + 1}")
    db.execute("CREATE TABLE commands_v2 (x)")
    db.commit()
    db.close()
    store = BridgeStore(newer)
    with pytest.raises(StorageError, match=rf"layout {LAYOUT + 1}, newer than the {LAYOUT} this bridge knows"):
        await store.open()
    await store.close()
    db = sqlite3.connect(newer)
    assert {r[0] for r in db.execute("SELECT name FROM sqlite_master")} == {"commands_v2"}  # nothing written
    db.close()


async def test_a_cancellation_and_a_supplier_change_read_commands_without_their_payloads(tmp_path: Path) -> None:
    """Review of the thirteenth round: ``commands_of`` (a cancellation's, a removal's) and ``put_customers`` (a
    supplier change's) joined each command's payload, which none of their callers reads: SQLite (no ANALYZE) planned
    ``put_customers``' join as a scan of ``command_payloads``, and the inner join hid a command without a payload
    row from its cancellation. On e44a65f this fails: both statements read ``command_payloads``, and the command
    whose payload is missing is not listed."""
    store = await store_with_commands(tmp_path, 300)
    try:
        await store.sql.tx(lambda db: db.execute("DELETE FROM command_payloads WHERE client_id='c7'"))
        listed, statements = await selects_run(store, store.commands_of("q"))
        assert len(listed) == 300 and "c7" in {c["client_id"] for c in listed}
        closed, customer_statements = await selects_run(store, store.put_customers(
            [("c5", 2, "[]")], 200.0, lambda cmd: ((f"out-{cmd['client_id']}", b"refused"),
                                                  (f"n-{cmd['client_id']}", cmd["gateway_id"], b"cancel", 1e12))))
        assert closed == 1
        for statement in statements + customer_statements:
            assert "command_payloads" not in statement, statement
    finally:
        await store.close()


async def test_a_due_command_without_its_payload_row_is_read_with_none(tmp_path: Path) -> None:
    """A command whose ``command_payloads`` row is missing (a damaged store) is due as ``next_gateway_due`` says, not
    hidden by the join (the dispatcher woke for it and found nothing, for ever): its payload reads None, for the
    relay to close it (tests/retailer_bridge/test_bridge_parked_command.py). On e44a65f ``due_commands`` hides it."""
    store = await store_with_commands(tmp_path, 3)
    try:
        await store.sql.tx(lambda db: db.execute("DELETE FROM command_payloads WHERE client_id='c1'"))
        assert await store.next_gateway_due(50.0, 50.0) == (0.0, False)
        assert {c["client_id"]: c["payload"] for c in await store.due_commands(50.0)} == {
            "c0": b"command", "c1": None, "c2": b"command"}
        assert {c["client_id"]: c["payload"] for c in await store.due_commands(50.0, horizon=20.0)} == {
            "c0": b"command", "c1": None, "c2": b"command"}
    finally:
        await store.close()
