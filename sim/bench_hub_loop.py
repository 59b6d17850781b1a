"""The hub's responsiveness during a large emergency: the longest time ``GET /healthz`` goes unanswered.

A real Mosquitto (hub broker), the real hub (``cloud-hub serve``) as its own process on the embedded store, N
clients registered through ``PUT /v1/clients`` (5,000 a call), one emergency to all of them, and a retailer ``r1``
on MQTT that acknowledges every request message and reports every client ``executed`` in ``outcomes`` messages of
2,000. Meanwhile a thread polls ``GET /healthz`` every ``--interval-ms`` over its own connection and records every
time between two answers: while the hub's event loop is held by one synchronous step, no answer comes (issue 14,
fourth round: ~56 s at 100,000 clients). The figures run from the POST until the emergency has completed.

    python -m sim.bench_hub_loop --clients 60000 [--runs 3]

Wall clock on a shared machine: give the load average (printed) with every figure, and compare code only back to
back (e.g. main from a detached worktree with ``PYTHONPATH``: the hub runs as ``sys.executable -m cloud_hub.cli``,
so it imports the code that ``PYTHONPATH`` names; the ``hub_code`` field says which).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

import cloud_hub
from broker_config.launcher import MosquittoProcess
from mhp_wire.messages import ClientState, OutcomeReport, Outcomes, Request, encode
from sim.bench_feed import cpu_s
from sim.hub_process import hub_process, register_r1_clients, retailer_r1, wait_ready

REPORTS_PER_MESSAGE = 2_000
COMPLETED = 'mhp_requests_finished_total{state="completed",type="emergency"} 1.0'


class HealthProbe:
    """``GET /healthz`` every ``interval_s`` from a thread of its own: the monotonic time of every answer."""

    def __init__(self, url: str, interval_s: float) -> None:
        self.url = url
        self.interval_s = interval_s
        self.answers: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-healthz-probe", daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=300, trust_env=False) as http:
            while not self._stop.is_set():
                try:
                    ok = http.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.answers.append(time.monotonic())
                else:
                    self.failures += 1
                self._stop.wait(self.interval_s)

    def gaps_after(self, t0: float) -> list[tuple[float, float]]:
        """``(length, start)`` of every time between two answers from ``t0`` (the first runs from ``t0`` to the first
        answer after it), ``start`` in seconds after ``t0``."""
        times = [t0, *(t for t in self.answers if t > t0)]
        return [(b - a, a - t0) for a, b in itertools.pairwise(times)]

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=310)


async def one_run(n: int, interval_s: float) -> dict[str, Any]:
    """One fresh broker, hub and store; the figures of one emergency to ``n`` clients."""
    with tempfile.TemporaryDirectory() as tmpdir:
        # The retailer reports N outcomes at once: the per-retailer MQTT rate limit is not measured.
        with hub_process(Path(tmpdir), {"MHP_HUB_MQTT_RATE_LIMIT_PER_S": "1000000",
                                        "MHP_HUB_MQTT_RATE_LIMIT_BURST": "1000000"}) as h:
            return await _drive(h.url, h.pid, h.broker, h.admin, h.dso, n, interval_s)


def _executed_once(named: set[str]) -> Callable[[Request], list[bytes]]:
    """Each client executed, once (a request delivered again names them again), in ``outcomes`` batches."""

    def answer(msg: Request) -> list[bytes]:
        new = [cid for cid in msg.client_ids if cid not in named]
        named.update(new)
        return [encode(Outcomes(request_id=msg.request_id, reports=[
            OutcomeReport(client_id=cid, state=ClientState.EXECUTED) for cid in new[k:k + REPORTS_PER_MESSAGE]]))
            for k in range(0, len(new), REPORTS_PER_MESSAGE)]

    return answer


async def _drive(url: str, pid: int, broker: MosquittoProcess, admin: str, dso: str, n: int,
                 interval_s: float) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=300, trust_env=False) as http:
        await wait_ready(http)
        clients = await register_r1_clients(http, admin, dso, n, {"feeder_id": "f1"})
        named: set[str] = set()
        link, box = retailer_r1(broker, _executed_once(named))
        async with link:
            box.append(link)
            with HealthProbe(url, interval_s) as probe:
                load = os.getloadavg()[0]
                cpu0 = cpu_s(pid)
                t0 = time.monotonic()
                start = datetime.now(UTC) + timedelta(seconds=120)
                r = await http.post("/v1/emergencies", headers={"Authorization": f"Bearer {dso}"}, json={
                    "client_ids": clients, "start": start.isoformat(), "duration_s": 600, "power_limit_kw": 1.5})
                r.raise_for_status()
                accepted_s = time.monotonic() - t0
                while COMPLETED not in (await http.get("/metrics")).text:
                    if time.monotonic() - t0 > 600:
                        raise TimeoutError(f"not completed in 600 s ({len(named)} of {n} clients sent)")
                    await asyncio.sleep(0.2)
                done_s = time.monotonic() - t0
                cpu = cpu_s(pid) - cpu0
        gaps = sorted(probe.gaps_after(t0), reverse=True)
    return {"clients": n, "load_1min_at_post": round(load, 2), "post_to_202_ms": round(accepted_s * 1000, 1),
            "completed_s": round(done_s, 2), "hub_cpu_s": round(cpu, 2),
            "longest_healthz_gap_s": round(gaps[0][0], 3) if gaps else None,
            # Where each began, in seconds after the POST (before post_to_202_ms: the accepting request itself).
            "longest_gaps_s_at_s": [(round(g, 3), round(at, 2)) for g, at in gaps[:5]],
            "healthz_answers": len(gaps), "healthz_failures": probe.failures}


def main(argv: list[str] | None = None) -> int:
    """Entry point: one JSON line per run, then the median of the longest gaps."""
    parser = argparse.ArgumentParser(prog="python -m sim.bench_hub_loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=60_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--interval-ms", type=float, default=50.0, help="time between two /healthz polls")
    args = parser.parse_args(argv)
    longest = []
    for _ in range(args.runs):
        result = asyncio.run(one_run(args.clients, args.interval_ms / 1000))
        result["hub_code"] = str(Path(cloud_hub.__file__).parent)
        longest.append(result["longest_healthz_gap_s"])
        print(json.dumps(result), flush=True)
    print(json.dumps({"runs": args.runs, "median_longest_healthz_gap_s": statistics.median(longest),
                      "machine_cores": os.cpu_count()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

