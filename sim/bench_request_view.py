"""The hub's CPU for one ``GET /v1/requests/{id}`` of a large request, without HTTP: the view's read, decode and
build (``RequestViews.get_request``) on the embedded SQLite store, as the DSO (and ``mhp-sim experiment fanout``,
every few seconds) reads an emergency to thousands of clients while it runs.

    python -m sim.bench_request_view --clients 10000 --reads 10 --runs 3

One emergency to ``--clients`` clients is accepted, expanded, sent and acknowledged, and every client's
``delivered`` and ``executed`` outcomes applied in batches of ``--batch`` (as the relay commits them); then the view
is read ``--reads`` times. The figure is the process's CPU (every thread) per read, median of ``--runs``, each on a
fresh store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cloud_hub.authz import Principal
from cloud_hub.book import ReportedOutcome, RequestBook
from cloud_hub.metrics import HubMetrics
from cloud_hub.service import HubService
from cloud_hub.store import HubStore
from mhp_wire.messages import ClientState


async def one_run(clients: int, reads: int, batch: int) -> float:
    """CPU ms per view read of one run on a fresh store."""
    with tempfile.TemporaryDirectory() as tmp:
        store = HubStore.embedded(Path(tmp) / "hub.db")
        await store.open()
        try:
            metrics = HubMetrics()
            book = RequestBook(store, metrics)
            service = HubService.build(store, book, metrics)
            await store.put_retailer("r1", "R1")
            ids = [f"c{i:06d}" for i in range(clients)]
            await store.import_clients([(c, "r1", 5.0, None, time.time() - 86_400) for c in ids])
            dso = Principal.parse("dso")
            start = datetime.now(UTC) + timedelta(minutes=5)
            body = {"client_ids": ids, "start": start.isoformat(), "duration_s": 600, "power_limit_kw": 2.0}
            accepted = await service.flexibility.create_emergency(dso, body, "bench")
            await book.expanded(accepted.request_id)
            items = [i for i in book.due(time.time()) if i.request_id == accepted.request_id]
            await book.mark_sent(items, time.time())
            await book.on_acks([("r1", [i.msg_id for i in items])])
            outcomes = [ReportedOutcome("r1", accepted.request_id, c, s, trace={"retailer_ms": 10.0})
                        for s in (ClientState.DELIVERED, ClientState.EXECUTED) for c in ids]
            for j in range(0, len(outcomes), batch):
                await book.apply_outcomes(outcomes[j:j + batch])
            c0 = time.process_time()
            for _ in range(reads):
                view = await service.requests.get_request(dso, accepted.request_id)
            cpu = time.process_time() - c0
            if sum(c["state"] == "executed" for c in view["clients"].values()) != clients:
                raise SystemExit("not every client executed: the benchmark measures nothing")
            return cpu * 1000 / reads
        finally:
            await store.close()


def main() -> None:
    """Run and print the figures as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--reads", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    runs = [asyncio.run(one_run(a.clients, a.reads, a.batch)) for _ in range(a.runs)]
    print(json.dumps({"clients": a.clients, "reads": a.reads, "cpu_ms_per_read": [round(r, 2) for r in runs],
                      "median": round(statistics.median(runs), 2)}))


if __name__ == "__main__":
    main()
