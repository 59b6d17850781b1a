"""The embedded store's audit lines written straight into ``cells`` against staged and merged (issue 14, session 12).

Each simulated second is the audit load of 12,000 requests/min: 200 commits of 22 lines, each commit's lines in 22
of 100 clients' key ranges, on a log that already holds 200,000 lines. For each merge interval (in commits: 200 =
one second) it prints the writer thread's busy ms and the bytes the process wrote (``wchar``) per second of lines,
and how long each merge held the writer.

    python -m sim.bench_audit_staging --seconds 4 --every 0,50,100,200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from cloud_hub.storage import Mutation
from cloud_hub.storage.sqlite import SqliteKV

CLIENTS = [f"c{k:03d}" for k in range(100)]
LINE = (b'{"principal":"dso","action":"trigger_emergency","right":"dso:grid-operator","allowed":true,'
        b'"ref":"0123456789abcdef0123456789abcdef","at":1765000000.123}')
COMMITS_PER_S = 200
LINES_PER_COMMIT = 22


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


async def run(every: int, seconds: int, work: Path) -> dict[str, Any]:
    """``every``: commits between merges; 0 writes straight into ``cells`` (no staging)."""
    kv = SqliteKV(work / f"audit-{every}.db", staged_tables=("audit",) if every else (), merge_interval_s=0)
    await kv.open()
    try:
        for t in range(0, 2000, 100):  # 2,000 lines per client
            await kv.batch([Mutation("audit", f"{c}|{1_000_000 + t + k:015d}|{k:06d}", {"a:l": LINE})
                            for k in range(100) for c in CLIENTS])
        await kv.merge()
        rnd = random.Random(1)
        seq = 0
        pauses: list[float] = []
        busy0, bytes0, wall0 = kv.busy_seconds, _wchar(), time.perf_counter()
        for n in range(seconds * COMMITS_PER_S):
            muts = []
            for c in sorted(rnd.sample(CLIENTS, LINES_PER_COMMIT)):
                seq += 1
                muts.append(Mutation("audit", f"{c}|{2_000_000 + n * 5:015d}|{seq:06d}", {"a:l": LINE}))
            await kv.batch(muts)
            if every and (n + 1) % every == 0:
                t0 = time.perf_counter()
                await kv.merge()
                pauses.append(round((time.perf_counter() - t0) * 1000, 1))
        busy, written, wall = kv.busy_seconds - busy0, _wchar() - bytes0, time.perf_counter() - wall0
    finally:
        await kv.close()
    return {"merge_every_commits": every or None, "merge_every_s": every / COMMITS_PER_S if every else None,
            "writer_busy_ms_per_s": round(busy / seconds * 1000), "wall_ms_per_s": round(wall / seconds * 1000),
            "written_mb_per_s": round(written / seconds / 1e6, 1), "merge_ms": pauses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=4, help="seconds of audit lines per case")
    ap.add_argument("--every", default="0,50,100,200", help="commits between merges, comma-separated (0: unstaged)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for every in (int(e) for e in args.every.split(",")):
            print(json.dumps(asyncio.run(run(every, args.seconds, Path(tmp)))), flush=True)


if __name__ == "__main__":
    main()
