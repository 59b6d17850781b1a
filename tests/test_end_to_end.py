"""The walking skeleton, every hop real and every part its own process: ``POST /v1/emergencies`` on the hub
(uvicorn) -> SQLite -> hub broker (Mosquitto from broker_config) -> retailer bridge -> retailer broker -> gateway
-> Modbus TCP coil on a simulated relay board and a read of the simulated SDM630 -> acknowledgements back ->
``GET /v1/requests/{id}`` shows every client executed, with per-component timings."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from sim.stack.cli import read_plugs
from sim.stack.stack import PLUGS, Stack


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path / "stack", retailers=2, homes=3, log_level="WARNING")
    try:
        await s.start(timeout_s=60)
        yield s
    finally:
        await s.stop()


async def run_emergency_started(stack: Stack, clients: list[str], lead_s: float = 1.0
                                ) -> Callable[[], Awaitable[dict[str, Any]]]:
    """Post an emergency for ``clients``; returns a coroutine function that follows it until it ends."""
    dso = {"Authorization": f"Bearer {stack.tokens['dso']}"}
    start = datetime.now(UTC) + timedelta(seconds=lead_s)
    async with httpx.AsyncClient(base_url=stack.hub_url, timeout=10) as http:
        r = await http.post("/v1/emergencies", headers=dso, json={
            "client_ids": clients, "start": start.isoformat(), "duration_s": 60, "power_limit_kw": 1.0})
        assert r.status_code == 202, r.text
        request_id = r.json()["request_id"]

    async def follow(timeout_s: float = 40) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=stack.hub_url, timeout=10) as http:
            for _ in range(int(timeout_s * 10)):
                req: dict[str, Any] = (await http.get(f"/v1/requests/{request_id}", headers=dso)).json()
                if req["state"] not in ("accepted", "dispatching"):
                    break
                await asyncio.sleep(0.1)
        return req

    return follow


async def run_emergency(stack: Stack, clients: list[str], lead_s: float = 1.0) -> dict[str, Any]:
    """Post an emergency for ``clients`` and follow it until it ends; returns the request as the DSO sees it."""
    follow = await run_emergency_started(stack, clients, lead_s)
    return await follow()


async def test_emergency_reaches_the_plugs_and_every_client_ends_executed(stack: Stack) -> None:
    info = json.loads((stack.dir / "stack.json").read_text())
    assert info["hub_url"] == stack.hub_url
    assert set(info["processes"]) >= {"hub", "bridge-r1", "bridge-r2", "broker-hub", "broker-r1", "broker-r2",
                                      "devices", "gateways-1"}
    assert all(isinstance(pid, int) for pid in info["processes"].values())
    assert {h["retailer_id"] for h in info["homes"]} == {"r1", "r2"}
    before = await read_plugs(stack)
    assert all(all(states.values()) for states in before.values()), "every plug starts on"

    clients = [h["client_id"] for h in info["homes"]]
    req = await run_emergency(stack, clients)
    assert req["state"] == "completed", req
    assert {cid: c["state"] for cid, c in req["clients"].items()} == dict.fromkeys(clients, "executed")
    for c in req["clients"].values():
        assert c["detail"]["measured_kw_before"] == pytest.approx(7.35, abs=0.01), "read from the SDM630 registers"
        assert c["detail"]["shed"] == ["water-heater", "ev-charger", "washing-machine"]
    trace = req["trace"]
    for part in ("hub_ms", "dispatch_ms", "retailer_ms", "gateway_ms", "total_ms"):
        assert trace[part] >= 0, part
    assert 0 < trace["storage_ms"] < trace["total_ms"], "the creating write's own time, stored with the request"
    assert req["retailers"]["r1"]["clients"] + req["retailers"]["r2"]["clients"] == len(clients)

    after = await read_plugs(stack)
    for gw, states in after.items():
        for p in PLUGS:
            assert states[p["name"]] is (not p["sheddable"]), f"{gw} {p['name']}"


async def test_the_stack_restarts_a_killed_process_and_logs_it(stack: Stack) -> None:
    """``kill -9`` a bridge: the supervisor restarts it, logs the restart, updates stack.json, and requests to
    that retailer's clients complete again."""
    old_pid = stack.info["processes"]["bridge-r1"]
    supervise = asyncio.create_task(stack.supervise())
    try:
        os.kill(old_pid, signal.SIGKILL)
        for _ in range(100):
            info = json.loads((stack.dir / "stack.json").read_text())
            if info["processes"]["bridge-r1"] not in (None, old_pid):
                break
            await asyncio.sleep(0.1)
        assert info["processes"]["bridge-r1"] not in (None, old_pid)
        assert any("bridge-r1" in e and "exited" in e for e in info["restarts"])
        assert any("bridge-r1 restarted as pid" in e for e in info["restarts"])
        r1_clients = [h.client_id for h in stack.homes if h.retailer_id == "r1"]
        req = await run_emergency(stack, r1_clients)
        assert req["state"] == "completed", req
    finally:
        supervise.cancel()
