"""A write that fails while storage is unavailable must not make the hub forget what is still due: a load
reduction's availability phase that could not close during an outage closes after it, and a cancel that could not
be stored leaves the request its deadline (it still ends then if the DSO does not cancel again)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.cloud_hub.test_relay_batching import retailers
from tests.cloud_hub.test_storage_faults import faulty_hub
from tests.hub_fixtures import HubHandle

__all__ = ["faulty_hub"]  # the fixture, used by name below

Faulty = tuple[HubHandle, Callable[[], None], Callable[[], None]]


async def wait_ready(hub: HubHandle) -> None:
    for _ in range(200):
        if (await hub.http.get("/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the hub did not become ready again after the outage")


async def state_of(hub: HubHandle, request_id: str) -> dict[str, Any]:
    r = await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_an_availability_phase_due_during_an_outage_closes_after_it(faulty_hub: Faulty) -> None:
    hub, break_storage, mend_storage = faulty_hub
    await hub.setup_registry({"c1": "r1"})
    async with retailers(hub, "r1") as (r1,):
        start = (datetime.now(UTC) + timedelta(seconds=120)).isoformat()
        r = await hub.http.post("/v1/load-reductions", headers=hub.auth("dso"), json={
            "feeder_id": "f1", "reduction_kw": 1.0, "start": start, "duration_s": 900, "respond_within_s": 0.5})
        assert r.status_code == 202, r.text
        request_id = r.json()["request_id"]
        await r1.request_for(request_id)  # the availability question; r1 never answers it
        break_storage()
        await asyncio.sleep(1.5)  # the phase falls due during the outage: closing it fails
        mend_storage()
        await wait_ready(hub)
        req = await state_of(hub, request_id)
        for _ in range(100):
            if req["state"] not in ("accepted", "dispatching"):
                break
            await asyncio.sleep(0.05)
            req = await state_of(hub, request_id)
        # Nobody answered: nothing can be disconnected, and the request says so instead of staying open until
        # its deadline (a quarter of an hour after the start, here).
        assert req["state"] == "failed", req
        assert req["clients"]["c1"]["state"] == "unreachable"
        assert "no availability answer" in req["clients"]["c1"]["detail"]["reason"]


async def test_a_cancel_that_cannot_be_stored_leaves_the_request_to_its_deadline(faulty_hub: Faulty) -> None:
    hub, break_storage, mend_storage = faulty_hub
    await hub.setup_registry({"c1": "r1"})
    async with retailers(hub, "r1") as (r1,):
        start = datetime.now(UTC) + timedelta(seconds=1)
        r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json={
            "client_ids": ["c1"], "start": start.isoformat(), "duration_s": 2, "power_limit_kw": 1})
        assert r.status_code == 202, r.text
        request_id = r.json()["request_id"]
        await r1.request_for(request_id)  # acknowledged by r1, never answered
        break_storage()
        r = await hub.http.post(f"/v1/requests/{request_id}/cancel", headers=hub.auth("dso"))
        assert r.status_code == 503, r.text
        mend_storage()
        await wait_ready(hub)
        # The DSO gave up on cancelling: the request still ends at its deadline, as storage says it is open.
        req = await state_of(hub, request_id)
        for _ in range(200):
            if req["state"] not in ("accepted", "dispatching"):
                break
            await asyncio.sleep(0.05)
            req = await state_of(hub, request_id)
        assert req["state"] == "failed", req
        assert req["clients"]["c1"]["state"] == "unreachable"  # acknowledged, never executed
        assert "deadline" in req["clients"]["c1"]["detail"]["reason"]
