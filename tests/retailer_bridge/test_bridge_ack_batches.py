"""Gateways' acknowledgements applied in batches: one store write and a few statements per batch (issue 14)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from mhp_wire.messages import Ack
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.store import SQL_IN_MAX, BridgeStore, NewCommand, delivered_msg_id


def _delivered(cmd: dict[str, Any]) -> tuple[str, bytes]:
    return delivered_msg_id(cmd["msg_id"]), cmd["client_id"].encode()


async def test_many_gateways_acks_move_their_own_commands_once_each(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        n = SQL_IN_MAX + 40  # more ids than one IN list holds
        await store.accept_request([NewCommand("q", f"c{i}", f"gw-{i}", f"cmd{i}", b"command", 0.0, 1e12)
                                    for i in range(n)], [])
        await store.queue_for_gateway("notice-1", "gw-1", b"cancel", 1e12)
        # Another gateway's command and notice, and an unknown id: not gw-2's to acknowledge, nothing moves.
        assert await store.deliver_many([("gw-2", ["cmd3", "notice-1", "unknown"])], _delivered) == 0
        assert await store.sql.read(lambda db: db.execute("SELECT COUNT(*) FROM gateway_outbox").fetchone()[0]) == 1
        commits = store.group.commits
        acks = [(f"gw-{i}", [f"cmd{i}"]) for i in range(n)]
        acks += [("gw-1", ["cmd1", "notice-1"])]  # a repeat in the same batch, and gw-1's own notice
        assert await store.deliver_many(acks, _delivered) == n
        assert store.group.commits == commits + 1
        states = await store.sql.read(lambda db: {r[0] for r in db.execute("SELECT state FROM commands")})
        assert states == {"delivered"}
        outbox = await store.sql.read(lambda db: [r[0] for r in db.execute("SELECT msg_id FROM hub_outbox")])
        assert sorted(outbox) == sorted(delivered_msg_id(f"cmd{i}") for i in range(n))
        assert await store.sql.read(lambda db: db.execute("SELECT COUNT(*) FROM gateway_outbox").fetchone()[0]) == 0
        # Acknowledged again (the gateway's ack was re-sent): nothing moves twice.
        assert await store.deliver_many(acks, _delivered) == 0
    finally:
        await store.close()


async def test_acks_arriving_together_share_one_write(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        await store.accept_request([NewCommand("q", f"c{i}", f"gw-{i}", f"cmd{i}", b"command", 0.0, 1e12)
                                    for i in range(50)], [])
        relay = BridgeRelay("r1", {f"c{i}": f"gw-{i}" for i in range(50)}, store)
        commits = store.group.commits
        await asyncio.gather(*(relay._on_gateway_ack(f"gw-{i}", Ack(ack_ids=[f"cmd{i}"])) for i in range(50)))
        # The first ack starts a batch of its own; the 49 that arrived meanwhile form the next one.
        assert relay.gateway_acks.writes == 50 and relay.gateway_acks.commits <= 2
        assert store.group.commits - commits <= 2
        assert await store.sql.read(lambda db: db.execute(
            "SELECT COUNT(*) FROM commands WHERE state='delivered'").fetchone()[0]) == 50
    finally:
        await store.close()
