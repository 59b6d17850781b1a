"""An ``ack`` (now MQTT QoS 0) lost because its receiver was offline is repaired by that receiver's own re-send.

Mosquitto queues QoS 1 messages for an offline client with a persistent session, but not QoS 0 ones. The bridge
(towards the hub) and the gateway (towards the bridge) keep what they sent in a stored outbox until it is
acknowledged; when the acknowledgement is dropped because they were offline, they send the message again after
their restart, the other side recognises the duplicate, applies nothing twice and acknowledges it again.

The whole stack runs as processes (``sim.stack``, as ``mhp-stack up``), unsupervised here so that the test decides
who is down. To have the acknowledger answer while the receiver of its ``ack`` is offline, the acknowledger is
paused (SIGSTOP: its connection stays up and the broker writes the message into its socket), the receiver is
stopped (SIGTERM: its session stays at the broker), and the acknowledger is resumed (SIGCONT): it applies the
message and publishes its ``ack`` to an offline client, which the broker drops.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sim.stack.stack import Stack
from tests.test_end_to_end import run_emergency_started


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path / "stack", retailers=1, homes=1, log_level="WARNING")
    try:
        await s.start(timeout_s=60)
        yield s
    finally:
        await s.stop()


def rows(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read the component's real SQLite store (read-only, as another process may be writing it)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return list(conn.execute(sql, params))


async def until(what: str, ready: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait for a condition on the stack's state (polled, as it lives in other processes)."""
    for _ in range(int(timeout_s * 20)):
        if ready():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


async def client_state(stack: Stack, request_id: str, client_id: str) -> str:
    async with stack.http_client() as http:
        r = await http.get(f"/v1/requests/{request_id}",
                           headers={"Authorization": f"Bearer {stack.tokens['dso']}"})
        return str(r.json()["clients"][client_id]["state"])


async def wait_client(stack: Stack, request_id: str, client_id: str, states: set[str], timeout_s: float = 30) -> None:
    for _ in range(int(timeout_s * 10)):
        if await client_state(stack, request_id, client_id) in states:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{client_id} not in {states} within {timeout_s} s")


def pid(stack: Stack, name: str) -> int:
    got = stack.sup.children[name].pid
    assert got is not None, f"{name} is not running"
    return got


async def terminate(stack: Stack, name: str) -> None:
    """SIGTERM one process and wait for it to exit (its MQTT session stays at the broker)."""
    proc = stack.sup.children[name].proc
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(proc.wait, 15)


async def emergency_delivered(stack: Stack, client_id: str, bridge_db: Path
                              ) -> tuple[Callable[[], Awaitable[dict[str, Any]]], str]:
    """An emergency to ``client_id`` starting in 3 s, once its command reached the gateway: ``(follow, request_id)``."""
    follow = await run_emergency_started(stack, [client_id], lead_s=3.0)
    await until("the bridge stored the command", lambda: bool(rows(bridge_db, "SELECT 1 FROM commands")))
    request_id = rows(bridge_db, "SELECT request_id FROM commands")[0][0]
    await wait_client(stack, request_id, client_id, {"delivered", "executed"})
    return follow, request_id


async def test_a_hub_ack_lost_while_the_bridge_is_offline_is_repaired_by_the_bridges_resend(stack: Stack) -> None:
    home = stack.homes[0]
    bridge_db = stack.dir / "bridge-r1.db"
    follow, request_id = await emergency_delivered(stack, home.client_id, bridge_db)
    hub = pid(stack, "hub")
    os.kill(hub, signal.SIGSTOP)
    try:
        # The gateway executes at start; the bridge sends the outcome to the paused hub (in its socket).
        await until("the bridge sent the executed outcome", lambda: any(
            b"executed" in bytes(p) and n >= 1 for p, n in rows(bridge_db, "SELECT payload, attempts FROM hub_outbox")))
        await terminate(stack, "bridge-r1")
    finally:
        os.kill(hub, signal.SIGCONT)
    # The hub applies it and acks at QoS 0 to the offline bridge: Mosquitto drops that ack.
    await wait_client(stack, request_id, home.client_id, {"executed"})
    pending = [m for (m, p) in rows(bridge_db, "SELECT msg_id, payload FROM hub_outbox") if b"executed" in bytes(p)]
    assert pending, "the bridge's outbox still holds the outcome: it never got an ack"
    stack.sup.start(stack.sup.children["bridge-r1"])
    # The bridge re-sends it; the hub recognises the duplicate and acknowledges it again.
    await until("the bridge's outbox emptied", lambda: not any(
        m in pending for (m,) in rows(bridge_db, "SELECT msg_id FROM hub_outbox")))
    req = await follow()
    assert req["state"] == "completed", req
    assert req["clients"][home.client_id]["state"] == "executed"
    assert len(rows(bridge_db, "SELECT 1 FROM commands WHERE request_id = ?", request_id)) == 1


async def test_a_bridge_ack_lost_while_the_gateway_is_offline_is_repaired_by_the_gateways_resend(stack: Stack) -> None:
    home = stack.homes[0]
    bridge_db = stack.dir / "bridge-r1.db"
    gateway_db = stack.dir / "gateways" / f"gateway-{home.gateway_id}.db"
    follow, request_id = await emergency_delivered(stack, home.client_id, bridge_db)
    bridge = pid(stack, "bridge-r1")
    os.kill(bridge, signal.SIGSTOP)
    try:
        # The gateway executes at start and sends its outcome to the paused bridge (in its socket).
        await until("the gateway sent its outcome", lambda: any(
            n >= 1 for (n,) in rows(gateway_db, "SELECT attempts FROM outbox")))
        await terminate(stack, "gateways-1")
    finally:
        os.kill(bridge, signal.SIGCONT)
    # The bridge applies it, forwards it, and acks at QoS 0 to the offline gateway: Mosquitto drops that ack.
    await wait_client(stack, request_id, home.client_id, {"executed"})
    pending = [m for (m,) in rows(gateway_db, "SELECT msg_id FROM outbox")]
    assert pending, "the gateway's outbox still holds the outcome: it never got an ack"
    stack.sup.start(stack.sup.children["gateways-1"])
    # The gateway re-sends it; the bridge recognises the duplicate and acknowledges it again.
    await until("the gateway's outbox emptied", lambda: not any(
        m in pending for (m,) in rows(gateway_db, "SELECT msg_id FROM outbox")))
    req = await follow()
    assert req["state"] == "completed", req
    assert req["clients"][home.client_id]["state"] == "executed"
    assert rows(gateway_db, "SELECT reported FROM commands WHERE request_id = ?", request_id) == [(1,)]
