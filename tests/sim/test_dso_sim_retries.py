"""The DSO simulator retries a POST answered ``409 in_progress`` with the same Idempotency-Key, as docs/api.md tells
a DSO to: the first attempt with the key is still creating its request, or died doing so (a hub replica killed
with a POST in flight: the survivor answers 409 until the claim is stale). Against a real HTTP server on a free port
that answers the first attempt 409 and the second 202."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from mhp_wire.ports import free_port
from sim.experiment.dso_sim import DsoSimulator
from sim.experiment.faults import accounting


@pytest.mark.known_leak("pycares (aiohttp's default resolver through aiodns) starts one channel-shutdown thread per "
                        "process on first use and keeps it for the life of the process")
def test_a_post_answered_409_in_progress_is_sent_again_with_its_key_and_counted() -> None:
    # Its own event loop, closed by asyncio.run: aiohttp resolves the host in the loop's default executor, whose
    # threads asyncio.run joins before returning (a test loop would leave them to the leak check).
    keys: list[str] = []
    sim = asyncio.run(_scenario(keys))
    assert keys == ["experiment-0", "experiment-0"]
    (rec,) = sim.records
    assert rec["attempts"] == 2 and rec["status_409_in_progress"] == 1 and rec["outcome"] == "completed"
    acc = accounting(sim.records)
    assert acc["retries"] == acc["status_409_in_progress"] == 1 and acc["lost"] == 0


async def _scenario(keys: list[str]) -> DsoSimulator:

    async def post(request: web.Request) -> web.Response:
        keys.append(request.headers["Idempotency-Key"])
        if len(keys) == 1:
            return web.json_response({"error": "in_progress"}, status=409, headers={"Retry-After": "1"})
        return web.json_response({"request_id": "r1", "state": "accepted"}, status=202)

    async def get(request: web.Request) -> web.Response:
        return web.json_response({"request_id": "r1", "state": "completed",
                                  "completed_at": datetime.now(UTC).isoformat(), "clients": {}})

    app = web.Application()
    app.router.add_post("/v1/emergencies", post)
    app.router.add_get("/v1/requests/{rid}", get)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        cfg: dict[str, Any] = {"clients": ["c1"], "rates_per_min": {"emergency": 60}, "fractions": {"emergency": 1.0},
                               "warmup_s": 0, "duration_s": 0.5, "drain_s": 5, "retry_s": 0.05,
                               "token": "t", "hub_url": f"http://127.0.0.1:{port}", "poll_interval_s": 0.02}
        sim = DsoSimulator(cfg)
        await sim.run()
    finally:
        await runner.cleanup()
    return sim
