"""Outcome benchmark: outcomes/s through the hub's request book (read row → lifecycle → write, one storage batch
per group commit) on the embedded SQLite store, without MQTT.

    python -m sim.bench_outcomes --clients 10000 --batch 500 --runs 3 [--gc-tuned]

One request with ``--clients`` clients is created; every client reports ``delivered`` then ``executed``, in
batches of ``--batch`` outcomes (the relay's group commit); the figure is outcomes applied per second (median of
``--runs``), each run on a fresh store, with the CPU per outcome of the event loop's thread (``loop_us``: what the
book does in Python) and of the whole process (``process_us``: with the SQLite threads). ``--gc-tuned`` tunes the
garbage collector as ``cloud-hub serve`` does; ``--fanout`` measures a fan-out's outcomes instead: every client
from ``pending`` straight to ``executed`` with its trace, the change feed on (``--scattered``: in a random order, as
a DSO's random order made them before the hub put clients in id order, so that each commit's clients spread over the
row: the writer then pays per page a commit dirties; a fan-out's commits are in client order, ``sim.commit_pages``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from cloud_hub.book import ReportedOutcome, RequestBook
from cloud_hub.feed import ChangeFeed
from cloud_hub.metrics import HubMetrics
from cloud_hub.store import HubStore
from mhp_wire.messages import ClientState


async def one_run(clients: int, batch: int, fanout: bool = False, scattered: bool = False
                  ) -> tuple[float, float, float]:
    """Outcomes per second of one run on a fresh store, and the CPU per outcome (µs) of the event loop's thread and
    of the process. ``fanout``: as at a fan-out, with the change feed, each client from ``pending`` straight to
    ``executed`` with its trace (one outcome per client); ``scattered``: those outcomes in a random order (fixed seed),
    not in the row's key order."""
    with tempfile.TemporaryDirectory() as tmp:
        store = HubStore.embedded(Path(tmp) / "hub.db")
        await store.open()
        try:
            metrics = HubMetrics()
            if fanout:
                feed = ChangeFeed(store.kv, metrics)
                await feed.open()
                store.feed = feed
            book = RequestBook(store, metrics)
            ids = [f"c{i:06d}" for i in range(clients)]
            now = time.time()
            first = "pending" if fanout else "sent"
            entries = {c: {"state": first, "retailers": {"r1": first}, "detail": {}, "trace": {}, "updated_at": now}
                       for c in ids}
            meta = {"type": "emergency", "issuer": "dso", "created_at": now, "deadline": now + 3600, "body": {}}
            await book.create("req-bench", meta, entries, [], {}, [], None)
            if fanout:
                trace = {"gateway_ms": 0.008, "retailer_ms": 209.5}
                outcomes = [ReportedOutcome("r1", "req-bench", c, ClientState.EXECUTED, {}, dict(trace)) for c in ids]
                if scattered:  # a DSO's random order before c7e0509: a commit's clients spread over the whole row
                    random.Random(1).shuffle(outcomes)
            else:
                outcomes = [ReportedOutcome("r1", "req-bench", c, s) for s in (ClientState.DELIVERED,
                                                                                ClientState.EXECUTED) for c in ids]
            t0, loop0, cpu0 = time.perf_counter(), time.thread_time(), time.process_time()
            for k in range(0, len(outcomes), batch):
                verdicts = await book.apply_outcomes(outcomes[k:k + batch])
                if not all(v.changed for v in verdicts):
                    raise SystemExit("an outcome was not applied: the benchmark measures nothing")
            n = len(outcomes)
            return (n / (time.perf_counter() - t0), (time.thread_time() - loop0) * 1e6 / n,
                    (time.process_time() - cpu0) * 1e6 / n)
        finally:
            await store.close()


def main() -> None:
    """Run and print the figures as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gc-tuned", action="store_true", help="tune the garbage collector as cloud-hub serve does")
    ap.add_argument("--fanout", action="store_true",
                    help="pending -> executed with a trace, one outcome per client, with the change feed")
    ap.add_argument("--scattered", action="store_true", help="with --fanout: the outcomes in a random order")
    a = ap.parse_args()
    if a.gc_tuned:
        from mhp_wire.gc_tuning import tune_for_throughput

        tune_for_throughput()
    runs = [asyncio.run(one_run(a.clients, a.batch, a.fanout, a.scattered)) for _ in range(a.runs)]
    rates = [r for r, _, _ in runs]
    print(json.dumps({"clients": a.clients, "batch": a.batch, "gc_tuned": a.gc_tuned, "fanout": a.fanout,
                      "scattered": a.scattered,
                      "outcomes_per_s": [round(r) for r in rates], "median": round(statistics.median(rates)),
                      "loop_us": [round(lo, 2) for _, lo, _ in runs], "process_us": [round(p, 2) for _, _, p in runs],
                      "median_loop_us": round(statistics.median(lo for _, lo, _ in runs), 2)}))


if __name__ == "__main__":
    main()
