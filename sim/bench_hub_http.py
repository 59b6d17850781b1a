"""The hub's CPU per hot HTTP request over real HTTP, with its lean path (``cloud_hub.lean``) and without it.

Each run starts a hub process of its own (``sim.hub_process``: a real hub broker with retailer ``r1``, who
acknowledges every request message, and ``cloud-hub serve``: uvicorn with uvloop and httptools), registers
``--clients`` clients and sends, one at a time over one keep-alive connection from this process:

* the **mix**: ``--requests`` requests of the rate experiment's four types in turn (``sim.experiment.dso_sim``'s
  bodies, ``--targets`` random clients each, an ``Idempotency-Key`` each), each followed by its
  ``GET /v1/requests/{id}``: the hub's CPU per request (POST + GET), every thread, until the hub is idle again
  (its relay's sends and the acknowledgements included, as in the rate experiment);
* the **polls**: ``--gets`` ``GET /v1/requests/{id}`` of one request: the hub's CPU per GET, HTTP and the view only.

The hub's CPU is read from ``/proc/<pid>/stat`` (the client's is this process's, not counted); ``--warmup``
requests are sent first and not counted. Runs alternate ``lean`` (``cloud-hub serve`` as shipped) and ``fastapi``
(the same hub built with ``create_app(settings, lean=False)``: this module's ``fastapi-only`` entry point), each
``--rounds`` times. A shared machine: the 1-minute load is printed with every run.

    python -m sim.bench_hub_http [--requests 1000] [--gets 2000] [--rounds 3] [--variants lean,fastapi]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from sim.bench_feed import cpu_s
from sim.experiment.dso_sim import BILLING_PERIOD_START, PATHS, TYPES, body_for
from sim.hub_process import hub_process, register_r1_clients, retailer_r1, wait_ready

VARIANTS = {"lean": ("cloud_hub.cli",), "fastapi": ("sim.bench_hub_http", "fastapi-only")}
"""What ``python -m`` runs for each variant."""

UNLIMITED = {"MHP_HUB_RATE_LIMIT_PER_S": "1000000", "MHP_HUB_RATE_LIMIT_BURST": "1000000",
             "MHP_HUB_MQTT_RATE_LIMIT_PER_S": "1000000", "MHP_HUB_MQTT_RATE_LIMIT_BURST": "1000000"}


async def idle(pid: int, quiet_s: float = 0.3, timeout_s: float = 30.0) -> None:
    """Wait until the hub used under 10 ms of CPU in ``quiet_s`` (its sends and acknowledgements done)."""
    deadline = time.monotonic() + timeout_s
    last = cpu_s(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet_s)
        now = cpu_s(pid)
        if now - last < 0.01:
            return
        last = now


async def one_run(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmpdir, hub_process(Path(tmpdir), UNLIMITED, VARIANTS[variant]) as hub:
        async with httpx.AsyncClient(base_url=hub.url, timeout=60) as http:
            await wait_ready(http)
            # supplied since before the billed day of the DSO simulator's billing bodies
            since = (BILLING_PERIOD_START - timedelta(days=1)).isoformat()
            clients = await register_r1_clients(http, hub.admin, hub.dso, args.clients, {"valid_from": since})
            link, box = retailer_r1(hub.broker)
            async with link:
                box.append(link)
                auth = {"Authorization": f"Bearer {hub.dso}"}
                last = ""
                load = os.getloadavg()[0]
                for seq in range(args.warmup + args.requests):
                    if seq == args.warmup:
                        await idle(hub.pid)
                        c0, t0 = cpu_s(hub.pid), time.monotonic()
                    kind = TYPES[seq % len(TYPES)]
                    r = await http.post(PATHS[kind], json=body_for(kind, rng.sample(clients, args.targets), seq),
                                        headers={**auth, "Idempotency-Key": f"bench-{seq}"})
                    if r.status_code != 202:
                        raise SystemExit(f"POST {kind} answered {r.status_code}: {r.text[:300]}")
                    last = r.json()["request_id"]
                    g = await http.get(f"/v1/requests/{last}", headers=auth)
                    if g.status_code != 200:
                        raise SystemExit(f"GET answered {g.status_code}: {g.text[:300]}")
                await idle(hub.pid)
                mix_cpu, mix_wall = cpu_s(hub.pid) - c0, time.monotonic() - t0
                c0 = cpu_s(hub.pid)
                for _ in range(args.gets):
                    g = await http.get(f"/v1/requests/{last}", headers=auth)
                    if g.status_code != 200:
                        raise SystemExit(f"GET answered {g.status_code}: {g.text[:300]}")
                await idle(hub.pid)
                gets_cpu = cpu_s(hub.pid) - c0
    return {"variant": variant, "load_1min_before": round(load, 2), "load_1min_after": round(os.getloadavg()[0], 2),
            "mix_requests": args.requests, "mix_wall_s": round(mix_wall, 2),
            "hub_cpu_ms_per_request": round(mix_cpu / args.requests * 1000, 3),
            "hub_cpu_ms_per_get": round(gets_cpu / max(1, args.gets) * 1000, 3)}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    variants = args.variants.split(",")
    runs = []
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            run = await one_run(variant, args)
            print(json.dumps(run), file=sys.stderr, flush=True)
            runs.append(run)
    summary = {}
    for variant in variants:
        mine = [run for run in runs if run["variant"] == variant]
        summary[variant] = {k: statistics.median(run[k] for run in mine)
                            for k in ("hub_cpu_ms_per_request", "hub_cpu_ms_per_get")}
    return {"runs": runs, "median": summary, "clients": args.clients, "targets": args.targets,
            "requests": args.requests, "gets": args.gets, "warmup": args.warmup}


def fastapi_only(argv: list[str]) -> int:
    """``cloud-hub`` with every request answered by FastAPI (``create_app(..., lean=False)``): the comparison."""
    import cloud_hub.app
    from cloud_hub import cli

    cloud_hub.app.create_app = functools.partial(cloud_hub.app.create_app, lean=False)
    return cli.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fastapi-only"]:
        return fastapi_only(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--gets", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="lean,fastapi")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(bench(args)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
