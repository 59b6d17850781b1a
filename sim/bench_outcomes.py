"""Outcome benchmark: outcomes/s through the hub's request book (read row → lifecycle → write, one storage batch
per group commit) on the embedded SQLite store, without MQTT.

    python -m sim.bench_outcomes --clients 10000 --batch 500 --runs 3

One request with ``--clients`` clients is created; every client reports ``delivered`` then ``executed``, in
batches of ``--batch`` outcomes (the relay's group commit); the figure is outcomes applied per second (median of
``--runs``), each run on a fresh store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from cloud_hub.book import ReportedOutcome, RequestBook
from cloud_hub.metrics import HubMetrics
from cloud_hub.store import HubStore
from mhp_wire.messages import ClientState


async def one_run(clients: int, batch: int) -> float:
    """Outcomes per second of one run on a fresh store."""
    with tempfile.TemporaryDirectory() as tmp:
        store = HubStore.embedded(Path(tmp) / "hub.db")
        await store.open()
        try:
            book = RequestBook(store, HubMetrics())
            ids = [f"c{i:06d}" for i in range(clients)]
            now = time.time()
            entries = {c: {"state": "sent", "retailers": {"r1": "sent"}, "updated_at": now} for c in ids}
            meta = {"type": "emergency", "issuer": "dso", "created_at": now, "deadline": now + 3600, "body": {}}
            await book.create("req-bench", meta, entries, [], {}, [], None)
            outcomes = [ReportedOutcome("r1", "req-bench", c, s) for s in (ClientState.DELIVERED,
                                                                            ClientState.EXECUTED) for c in ids]
            t0 = time.perf_counter()
            for k in range(0, len(outcomes), batch):
                verdicts = await book.apply_outcomes(outcomes[k:k + batch])
                if not all(v.changed for v in verdicts):
                    raise SystemExit("an outcome was not applied: the benchmark measures nothing")
            return len(outcomes) / (time.perf_counter() - t0)
        finally:
            await store.close()


def main() -> None:
    """Run and print the figures as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    rates = [asyncio.run(one_run(a.clients, a.batch)) for _ in range(a.runs)]
    print(json.dumps({"clients": a.clients, "batch": a.batch, "outcomes_per_s": [round(r) for r in rates],
                      "median": round(statistics.median(rates))}))


if __name__ == "__main__":
    main()
