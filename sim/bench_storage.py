"""Storage benchmark: writes/s and reads/s per backend, and the latency of a client lookup and of a fan-out read
of 1,000 clients (10 % of the 10,000 set, the paper's request size) with 10,000 and with 1,000,000 clients
registered.

    python -m sim.bench_storage --backend sqlite --clients 10000,1000000
    python -m sim.bench_storage --backend hbase-double --clients 10000,1000000

``hbase-double`` runs happybase against the HBase Thrift gateway *test double* (``sim/hbase_double.py``) in
another process: it measures the hub's client side and the Thrift round trips, not HBase itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cloud_hub.store import HubStore

FANOUT = 1_000
BATCH = 2_000


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) in ms."""
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000, 3)


async def run_size(store: HubStore, n: int, already: int, rounds: int) -> dict[str, Any]:
    """Grow the registry to ``n`` clients, then time lookups and fan-out reads."""
    t0 = time.perf_counter()
    for i in range(already, n, BATCH):
        await store.import_clients([(f"client-{j:07d}", f"r{j % 10}", 6.9, f"f{j % 500}", 0.0)
                                    for j in range(i, min(n, i + BATCH))])
    load_s = time.perf_counter() - t0
    writes_per_s = (n - already) / load_s if n > already else None
    rng = random.Random(n)
    lookups = []
    for _ in range(rounds * 20):
        cid = f"client-{rng.randrange(n):07d}"
        t = time.perf_counter()
        assert await store.get_client(cid) is not None
        lookups.append(time.perf_counter() - t)
    t = time.perf_counter()
    reads = 0
    while time.perf_counter() - t < 2.0:
        await store.get_client(f"client-{rng.randrange(n):07d}")
        reads += 1
    reads_per_s = reads / (time.perf_counter() - t)
    fanouts = []
    for _ in range(rounds):
        ids = [f"client-{rng.randrange(n):07d}" for _ in range(FANOUT)]
        t = time.perf_counter()
        got = await store.get_clients(ids)
        fanouts.append(time.perf_counter() - t)
        assert len(got) == len(set(ids))
    return {"clients": n, "writes_per_s": None if writes_per_s is None else round(writes_per_s),
            "reads_per_s": round(reads_per_s), "lookup_p50_ms": pct(lookups, 50), "lookup_p99_ms": pct(lookups, 99),
            "fanout_1000_p50_ms": pct(fanouts, 50), "fanout_1000_p99_ms": pct(fanouts, 99),
            "fanout_1000_mean_ms": round(statistics.mean(fanouts) * 1000, 3)}


def start_double(tmp: str) -> tuple[subprocess.Popen[bytes], int]:
    """The HBase Thrift test double in its own process (so it does not share this one's CPU time)."""
    ready = Path(tmp) / "port"
    proc = subprocess.Popen([sys.executable, "-m", "sim.hbase_double", "--port", "0", "--ready-file", str(ready)])
    while not ready.exists() or not ready.read_text().strip():
        time.sleep(0.05)
    return proc, int(ready.read_text())


async def bench(backend: str, sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    """Run every size on one growing store of ``backend``."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        if backend == "sqlite":
            store = HubStore.embedded(Path(tmp) / "bench.db")
        else:
            from cloud_hub.storage.hbase import HBaseKV

            proc, port = await asyncio.to_thread(start_double, tmp)
            store = HubStore(HBaseKV([f"127.0.0.1:{port}"], timeout_ms=30_000, pool_size=1))
        await store.open()
        try:
            results, already = [], 0
            for n in sorted(sizes):
                res = await run_size(store, n, already, rounds)
                res["backend"] = backend
                results.append(res)
                print(json.dumps(res), flush=True)
                already = n
            return results
        finally:
            await store.close()
            if proc is not None:
                proc.terminate()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m sim.bench_storage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "hbase-double"], default="sqlite")
    parser.add_argument("--clients", default="10000,1000000", help="comma-separated registry sizes")
    parser.add_argument("--rounds", type=int, default=50, help="fan-out reads per size (lookups: 20x)")
    args = parser.parse_args(argv)
    results = asyncio.run(bench(args.backend, [int(x) for x in args.clients.split(",")], args.rounds))
    if len(results) >= 2:
        small, big = results[0], results[-1]
        for k in ("lookup_p50_ms", "fanout_1000_p50_ms"):
            print(f"{k}: {big[k]} at {big['clients']} clients vs {small[k]} at {small['clients']} "
                  f"= {big[k] / small[k]:.2f}x", flush=True)
    print(f"machine: {os.cpu_count()} cores", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
