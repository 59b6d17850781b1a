"""Faults of the whole stack, every part its own process and supervised as in ``mhp-stack up``: a bridge killed
with ``kill -9`` in the middle of a request, and a retailer broker killed the same way. Nothing is lost: the
stored outboxes and application-level acknowledgements carry every request to its last home."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sim.stack.cli import read_plugs
from sim.stack.stack import Stack
from tests.test_end_to_end import run_emergency_started


@pytest.fixture
async def supervised(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path / "stack", retailers=2, homes=4, log_level="WARNING")
    try:
        await s.start(timeout_s=60)
        task = asyncio.create_task(s.supervise())
        yield s
        task.cancel()
    finally:
        await s.stop()


@pytest.mark.parametrize("victim", ["bridge-r1", "broker-r1"])
async def test_kill_9_mid_request_loses_nothing(supervised: Stack, victim: str) -> None:
    stack = supervised
    r1_clients = [h.client_id for h in stack.homes if h.retailer_id == "r1"]
    follow = await run_emergency_started(stack, r1_clients, lead_s=4.0)
    os.kill(stack.sup.children[victim].proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
    req = await follow()
    assert req["state"] == "completed", req
    assert {c["state"] for c in req["clients"].values()} == {"executed"}
    assert any(victim in e and "restarted" in e for e in stack.sup.events)
    plugs = await read_plugs(stack)
    for h in stack.homes:
        if h.retailer_id == "r1":
            assert plugs[h.gateway_id]["water-heater"] is False, h.gateway_id
