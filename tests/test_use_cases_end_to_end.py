"""Every hub use case relayed through real bridges and gateways (two retailers, every part its own process):
tariff, billing data, load shift, two-phase load reduction, cancel, and active-power measurements."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from sim.stack.stack import Stack


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path / "stack", retailers=2, homes=3, log_level="WARNING")
    try:
        await s.start(timeout_s=60)
        yield s
    finally:
        await s.stop()


async def follow(http: httpx.AsyncClient, dso: dict[str, str], request_id: str, timeout_s: float = 20
                 ) -> dict[str, Any]:
    for _ in range(int(timeout_s * 10)):
        req: dict[str, Any] = (await http.get(f"/v1/requests/{request_id}", headers=dso)).json()
        if req["state"] not in ("accepted", "dispatching"):
            return req
        await asyncio.sleep(0.1)
    return req


async def test_every_use_case_through_real_bridges_and_gateways(stack: Stack) -> None:
    dso = {"Authorization": f"Bearer {stack.tokens['dso']}"}
    clients = [h.client_id for h in stack.homes]
    now = datetime.now(UTC)
    iso = datetime.isoformat
    async with httpx.AsyncClient(base_url=stack.hub_url, timeout=10) as http:
        # Tariff: every retailer acknowledges, and each retailer broker holds it retained for its gateways.
        r = await http.post("/v1/tariffs", headers=dso, json={
            "tariff_id": "tou", "valid_from": iso(now), "valid_to": iso(now + timedelta(days=1)),
            "periods": [{"start": iso(now), "end": iso(now + timedelta(hours=1)), "price_eur_per_kwh": 0.1}]})
        req = await follow(http, dso, r.json()["request_id"])
        assert req["state"] == "completed" and {v["state"] for v in req["retailers"].values()} == {"acknowledged"}
        for _ in range(50):
            if {"r1", "r2"} <= set(stack.tariffs):
                break
            await asyncio.sleep(0.1)
        assert stack.tariffs["r1"][:2] == ("tou", 1) and stack.tariffs["r2"][:2] == ("tou", 1)
        # Billing data: readings uploaded by the DSO reach each client's retailer, which acknowledges.
        day = now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)
        r = await http.post("/v1/meter-readings", headers=dso, json={"readings": [
            {"client_id": c, "start": iso(day), "resolution_s": 3600, "values_kwh": [0.5] * 24} for c in clients]})
        assert r.json() == {"stored": 3, "corrections": 0}
        r = await http.post("/v1/billing-data", headers=dso, json={
            "client_ids": clients, "period_start": iso(day), "period_end": iso(day + timedelta(days=1))})
        req = await follow(http, dso, r.json()["request_id"])
        assert req["state"] == "completed" and {c["state"] for c in req["clients"].values()} == {"acknowledged"}
        # Load shift: gateways acknowledge the window.
        r = await http.post("/v1/load-shifts", headers=dso, json={
            "client_ids": clients, "window_start": iso(now + timedelta(minutes=30)),
            "window_end": iso(now + timedelta(minutes=60)), "reason": "test"})
        req = await follow(http, dso, r.json()["request_id"])
        assert req["state"] == "completed", req
        assert all(c["detail"]["will_shift"] == ["water-heater", "ev-charger", "washing-machine"]
                   for c in req["clients"].values())
        # Two-phase load reduction: availability from the bridges, then disconnects.
        r = await http.post("/v1/load-reductions", headers=dso, json={
            "client_ids": clients, "reduction_kw": 5.0, "start": iso(datetime.now(UTC) + timedelta(seconds=2)),
            "duration_s": 30, "respond_within_s": 2})
        req = await follow(http, dso, r.json()["request_id"])
        assert req["state"] == "completed", req
        assert req["selection"]["covered"] and len(req["selection"]["chosen"]) == 1
        # Cancel: an emergency announced for later is cancelled; both retailers and so the homes are told.
        r = await http.post("/v1/emergencies", headers=dso, json={
            "client_ids": clients, "start": iso(datetime.now(UTC) + timedelta(minutes=10)), "duration_s": 60,
            "power_limit_kw": 1.0})
        request_id = r.json()["request_id"]
        for _ in range(50):
            got = (await http.get(f"/v1/requests/{request_id}", headers=dso)).json()
            if all(c["state"] == "delivered" for c in got["clients"].values()):
                break
            await asyncio.sleep(0.1)
        r = await http.post(f"/v1/requests/{request_id}/cancel", headers=dso)
        assert r.status_code == 200 and r.json()["cancel_sent_to"] == ["r1", "r2"]
        for _ in range(50):
            got = (await http.get(f"/v1/requests/{request_id}", headers=dso)).json()
            if len(got["cancel"]["acknowledged_by"]) == 2:
                break
            await asyncio.sleep(0.1)
        assert got["state"] == "cancelled" and set(got["cancel"]["acknowledged_by"]) == {"r1", "r2"}
        # Measurements: the bridges forward their customers' active power.
        window = {"from": iso(now - timedelta(minutes=1)), "to": iso(datetime.now(UTC) + timedelta(minutes=1))}
        for _ in range(100):
            m = (await http.get("/v1/measurements", headers=dso, params={**window, "client_id": clients[0]})).json()
            if m["series"]:
                break
            await asyncio.sleep(0.1)
        assert m["series"] and m["series"][0]["retailer_id"] == stack.homes[0].retailer_id
