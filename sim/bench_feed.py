"""Change-feed benchmark: events per second the hub delivers to N Server-Sent Events subscribers, and its CPU.

A real Mosquitto (hub broker), the real hub (``cloud-hub serve``) as its own process on the embedded store, a
retailer ``r1`` on MQTT that acknowledges every request and reports every client ``executed``, and N subscribers
following ``GET /v1/events`` as the DSO. The driver posts emergencies and waits until every subscriber has seen each
of them end.

    python -m sim.bench_feed --subscribers 100 --requests 200 --clients-per-request 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from broker_config.launcher import MosquittoProcess
from mhp_wire.messages import ClientState, Outcome, Request, encode
from sim.hub_process import hub_process, retailer_r1, wait_ready

TERMINAL = ("completed", "partially_completed", "failed", "expired", "cancelled")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Subscriber:
    """One SSE follower: counts the events it receives and the requests it has seen end."""

    def __init__(self) -> None:
        self.events = 0
        self.ended = 0
        self.done = asyncio.Event()
        self.want = 0
        self.resumed = 0

    async def run(self, http: httpx.AsyncClient, token: str, opened: asyncio.Event, count: list[int]) -> None:
        """Follow until stopped, resuming with Last-Event-ID whenever the hub closes the stream (it does when this
        follower falls ``feed_queue_max`` events behind), as a browser's EventSource does."""
        last: str | None = None
        first = True
        while True:
            headers = {"Authorization": f"Bearer {token}", **({"Last-Event-ID": last} if last else {})}
            try:
                async with http.stream("GET", "/v1/events", headers=headers,
                                       timeout=httpx.Timeout(10.0, read=None)) as resp:
                    resp.raise_for_status()
                    if first:
                        first = False
                        count[0] += 1
                        if count[0] >= count[1]:
                            opened.set()
                    async for line in resp.aiter_lines():
                        if line.startswith("id: "):
                            last = line[4:]
                        elif line.startswith("data: "):
                            self.events += 1
                            if json.loads(line[6:])["state"] in TERMINAL:
                                self.ended += 1
                                if self.want and self.ended >= self.want:
                                    self.done.set()
            except httpx.HTTPError:
                pass
            self.resumed += 1


async def bench(n_subscribers: int, n_requests: int, per_request: int, rate_per_s: float) -> dict[str, Any]:
    """Run the benchmark; returns its figures."""
    with tempfile.TemporaryDirectory() as tmpdir:
        with hub_process(Path(tmpdir), {"MHP_HUB_RATE_LIMIT_PER_S": "100000", "MHP_HUB_RATE_LIMIT_BURST": "100000",
                                        "MHP_HUB_MQTT_RATE_LIMIT_PER_S": "100000",
                                        "MHP_HUB_MQTT_RATE_LIMIT_BURST": "100000"}) as h:
            return await _drive(h.url, h.pid, h.broker, h.admin, h.dso, n_subscribers, n_requests, per_request,
                                rate_per_s)


def _executed(msg: Request) -> list[bytes]:
    """Every client of a request executed, one ``outcome`` message each."""
    return [encode(Outcome(request_id=msg.request_id, client_id=cid, state=ClientState.EXECUTED))
            for cid in msg.client_ids]


# Complexity (PLR0913): a benchmark's knobs, passed once.
async def _drive(url: str, pid: int, broker: MosquittoProcess, admin: str, dso: str, n_subscribers: int,  # noqa: PLR0913
                 n_requests: int, per_request: int, rate_per_s: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=n_subscribers + 20, max_keepalive_connections=n_subscribers + 20)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits, trust_env=False) as http:
        await wait_ready(http)
        await http.put("/v1/retailers/r1", json={"name": "R1"}, headers={"Authorization": f"Bearer {admin}"})
        clients = [f"c-{i:04d}" for i in range(per_request)]
        for cid in clients:
            r = await http.put(f"/v1/clients/{cid}", headers={"Authorization": f"Bearer {dso}"}, json={
                "retailer_id": "r1", "contracted_power_kw": 6.9, "feeder_id": "f1"})
            r.raise_for_status()
        link, box = retailer_r1(broker, _executed)
        async with link:
            box.append(link)
            subs = [Subscriber() for _ in range(n_subscribers)]
            opened, count = asyncio.Event(), [0, n_subscribers]
            tasks = [asyncio.create_task(s.run(http, dso, opened, count), name=f"bench-sse-{i}")
                     for i, s in enumerate(subs)]
            await asyncio.wait_for(opened.wait(), 60)
            for s in subs:
                s.want = n_requests
            cpu0, t0 = cpu_s(pid), time.perf_counter()
            for _ in range(n_requests):
                start = datetime.now(UTC) + timedelta(seconds=60)
                r = await http.post("/v1/emergencies", headers={"Authorization": f"Bearer {dso}"}, json={
                    "client_ids": clients, "start": start.isoformat(), "duration_s": 300, "power_limit_kw": 1.0})
                r.raise_for_status()
                await asyncio.sleep(1 / rate_per_s)
            await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in subs)), 300)
            elapsed, cpu = time.perf_counter() - t0, cpu_s(pid) - cpu0
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    delivered = sum(s.events for s in subs)
    per_sub = delivered / n_subscribers
    return {"subscribers": n_subscribers, "requests": n_requests, "clients_per_request": per_request,
            "events_per_subscriber": round(per_sub, 1), "events_delivered": delivered,
            "seconds": round(elapsed, 2), "events_per_s_delivered": round(delivered / elapsed),
            "events_per_s_produced": round(per_sub / elapsed, 1),
            "hub_cpu_percent_of_one_core": round(100 * cpu / elapsed, 1),
            "hub_cpu_us_per_delivered_event": round(1e6 * cpu / delivered, 1),
            "streams_resumed": sum(s.resumed for s in subs)}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m sim.bench_feed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients-per-request", type=int, default=10)
    parser.add_argument("--rate", type=float, default=20.0, help="emergencies posted per second")
    args = parser.parse_args(argv)
    result = asyncio.run(bench(args.subscribers, args.requests, args.clients_per_request, args.rate))
    print(json.dumps(result), flush=True)
    print(f"machine: {os.cpu_count()} cores", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

