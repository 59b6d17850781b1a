"""A request's commands made from one template keep that template once (issue 14, fourteenth round: layout 2): not a
payload of ~300 bytes per command in ``command_payloads`` (10,000 of them in a fan-out, ~2.3 µs of the store's thread
per command), but one ``command_templates`` row per request message (request, revision, ``received_at``), each
command's payload spliced from it when it is read (a re-send, a notice). Commands not made from it, and those a newer
revision replaced, keep their own. Real SQLite; the relay's own request handler."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mhp_wire.fastwire import CommandTemplate
from mhp_wire.messages import Command, EmergencyParams, RequestKind, decode
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.store import LAYOUT, BridgeStore, NewCommand
from tests.retailer_bridge.test_bridge import request


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[BridgeStore]:
    opened = BridgeStore(tmp_path / "b.db")
    await opened.open()
    yield opened
    await opened.close()


def template(request_id: str = "q", revision: int = 1) -> CommandTemplate:
    start = datetime.now(UTC) + timedelta(minutes=1)
    params = EmergencyParams(start=start, end=start + timedelta(minutes=5), power_limit_kw=1.0)
    return CommandTemplate(Command(request_id=request_id, client_id="c0", kind=RequestKind.EMERGENCY, params=params,
                                   expires_at=params.end, revision=revision))


def commands(t: CommandTemplate, clients: range, revision: int = 1, received_at: float = 0.0) -> list[NewCommand]:
    return [NewCommand("q", f"c{i}", f"gw-{i}", f"r{revision}-m{i}", t.payload(f"r{revision}-m{i}", f"c{i}"),
                       received_at, 1e12, revision=revision) for i in clients]


def count(store: BridgeStore, table: str) -> int:
    return store.sql.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # type: ignore[no-any-return]


async def test_a_requests_commands_keep_their_template_once_and_read_back_byte_for_byte(store: BridgeStore) -> None:
    """Fails before layout 2: ``accept_request`` took no template and stored a payload per command."""
    t = template()
    assert t.parts is not None
    stored = commands(t, range(600))
    assert await store.accept_request(stored, [], t.parts) == 600
    assert await store.sql.read(lambda db: (count(store, "command_payloads"), count(store, "command_templates"))) \
        == (0, 1)
    due = await store.due_commands(1.0, limit=1_000)
    assert {r["client_id"]: r["payload"] for r in due} == {c.client_id: c.payload for c in stored}
    assert all(type(r["payload"]) is bytes for r in due)
    assert await store.payloads_of("q") == {c.client_id: c.payload for c in stored}


async def test_commands_not_made_from_the_template_and_replaced_ones_keep_their_own_payload(store: BridgeStore) -> None:
    t1 = template()
    assert t1.parts is not None
    first = commands(t1, range(4))
    first[1].payload = b"not from the template"  # e.g. a client id the splice does not take: encoded as a copy
    await store.accept_request(first, [], t1.parts)
    assert await store.payloads_of("q") == {c.client_id: c.payload for c in first}
    assert await store.sql.read(lambda db: count(store, "command_payloads")) == 1
    # Revision 2 replaces c0 and c1 (their own payloads, as before) and adds c4 (from revision 2's template).
    t2 = template(revision=2)
    assert t2.parts is not None
    await store.accept_request(commands(t2, range(2), revision=2), [], t2.parts)
    added = commands(t2, range(4, 5), revision=2)
    await store.accept_request(added, [], t2.parts)
    expected = {**{c.client_id: c.payload for c in first}, **{c.client_id: c.payload for c in
                                                               commands(t2, range(2), revision=2) + added}}
    assert await store.payloads_of("q") == expected
    due = await store.due_commands(1.0)
    assert {r["client_id"]: (r["revision"], r["payload"]) for r in due} == {
        c: (2 if c in ("c0", "c1", "c4") else 1, p) for c, p in expected.items()}


async def test_each_message_of_a_large_request_reads_back_its_own_templates_bytes(store: BridgeStore) -> None:
    """The hub sends a large request in several messages; each message's template has its own ``sent_at``. Fails on
    b6f3506 (one template per request and revision, replaced by the next message's): the first message's commands
    read back with the second message's ``sent_at``."""
    first, second, third = template(), template(), template()
    assert first.parts is not None and second.parts is not None and third.parts is not None
    assert first.parts != second.parts  # their sent_at differs
    messages = [commands(first, range(0, 100), received_at=10.0), commands(second, range(100, 200), received_at=11.0),
                commands(third, range(200, 300), received_at=11.0)]  # the third received at the same instant
    for msg, t in zip(messages, (first, second, third), strict=True):
        await store.accept_request(msg, [], t.parts)
    sent = {c.client_id: c.payload for msg in messages for c in msg}
    assert await store.payloads_of("q") == sent
    assert {r["client_id"]: r["payload"] for r in await store.due_commands(1.0, limit=1_000)} == sent
    # Two templates held; the third message's commands, whose key was taken, keep their own payloads.
    assert await store.sql.read(lambda db: (count(store, "command_payloads"), count(store, "command_templates"))) \
        == (0 if third.parts == second.parts else 100, 2)


async def test_the_relay_stores_a_requests_template_and_its_commands_read_back_as_sent(store: BridgeStore) -> None:
    relay = BridgeRelay("r1", {f"c{i}": f"gw-{i}" for i in range(300)}, store)
    await relay._on_request(request([f"c{i}" for i in range(300)], request_id="q1", lead_s=60))
    sent = {str(p.key): p.payload for p in relay.fresh_commands}  # the hand-over's payloads, as sent
    assert len(sent) == 300
    assert await store.sql.read(lambda db: (count(store, "command_payloads"), count(store, "command_templates"))) \
        == (0, 1)
    due = await store.due_commands(1e12, limit=1_000)
    assert {r["msg_id"]: r["payload"] for r in due} == sent
    for r in due[:5]:
        cmd = decode(r["payload"])
        assert isinstance(cmd, Command) and (cmd.msg_id, cmd.client_id) == (r["msg_id"], r["client_id"])


async def test_a_layout_1_store_opens_as_layout_2_with_its_payloads_as_they_were(tmp_path: Path) -> None:
    """The previous layout (every payload in ``command_payloads``, no templates) is taken as it is: the table is
    added, the layout recorded, nothing moved; its commands read back their own payloads."""
    path = tmp_path / "b.db"
    store = BridgeStore(path)
    await store.open()
    t = template()
    old = commands(t, range(3))
    await store.accept_request(old, [])  # no template: every payload its own row, as a layout-1 bridge stored them
    await store.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE command_templates")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = BridgeStore(path)
    await store.open()
    try:
        db = store.sql.db
        assert db.execute("PRAGMA user_version").fetchone()[0] == LAYOUT == 2
        assert count(store, "command_templates") == 0 and count(store, "command_payloads") == 3
        assert await store.payloads_of("q") == {c.client_id: c.payload for c in old}
        assert {r["client_id"]: r["payload"] for r in await store.due_commands(1.0)} == \
            {c.client_id: c.payload for c in old}
    finally:
        await store.close()
