"""The hub's CPU per request, without HTTP or MQTT: each request's whole life through the hub's own use case and
request book on the embedded SQLite store (with the change feed, as ``cloud-hub serve`` runs it).

    python -m sim.bench_hub_cycle --clients 100 --requests 200 --runs 3 [--concurrent 8] [--profile out.prof]

Per request: the emergency use case accepts it (authorization, targets, the accepting write) and expands it; the
dispatcher's first send is recorded (``mark_sent``), the retailer's acknowledgement applied, then every client's
``delivered`` and ``executed`` outcomes in group commits of ``--batch`` outcomes (as the relay commits them).
The figure is the process's CPU time (every thread: the event loop and the SQLite thread) per request, median of
``--runs``, each on a fresh store, with the time the SQLite thread was busy; ``--profile`` writes a cProfile of
the last run. ``--gc-tuned`` tunes the process's garbage collector as ``cloud-hub serve`` does since the sixth round
(:func:`mhp_wire.gc_tuning.tune_for_throughput`, after the imports; the code under test does not change with it).
The store holds its expanded rows' client entries, as a hub without replicas does (where the code has them).
``--concurrent N`` runs N request lives at once (as overlapping requests do in a running hub, where
their writes share the store's group commits), and gives the store's transactions per request where it counts them.

Since the first sends' ``sent`` marks wait to settle (issue 14, tenth round: ``RequestBook.settle_due``), a book
that has them writes them at the end of each life, as its dispatcher would once the settle time passed: after the
outcomes (the homes answered within it, the default) or, with ``--slow-homes``, before them (no home answered
within it: every mark is written, then every outcome). A book without them wrote its marks in ``mark_sent``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import inspect
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cloud_hub
from cloud_hub.authz import Principal
from cloud_hub.book import ReportedOutcome, RequestBook
from cloud_hub.feed import ChangeFeed
from cloud_hub.metrics import HubMetrics
from cloud_hub.service import HubService
from cloud_hub.store import HubStore
from mhp_wire.messages import ClientState


def served_store(path: Path) -> HubStore:
    """The embedded store as ``cloud-hub serve`` opens it without replicas: holding its expanded rows' client
    entries (``keep_entries``, issue 14, fourteenth round), where the checkout under test has them."""
    if "keep_entries" in inspect.signature(HubStore.embedded).parameters:
        return HubStore.embedded(path, keep_entries=True)
    return HubStore.embedded(path)


async def settle(book: RequestBook, at: float) -> None:
    """Write the first sends' marks settled by ``at`` (a book without waiting marks wrote them in ``mark_sent``)."""
    settle_due = getattr(book, "settle_due", None)
    if settle_due is not None:
        await settle_due(at)


async def one_run(clients: int, requests: int, batch: int, profile: cProfile.Profile | None,
                  concurrent: int = 1, slow_homes: bool = False) -> dict[str, float]:
    """CPU ms per request (and per client) of one run on a fresh store."""
    with tempfile.TemporaryDirectory() as tmp:
        store = served_store(Path(tmp) / "hub.db")
        await store.open()
        try:
            metrics = HubMetrics()
            feed = ChangeFeed(store.kv, metrics)
            await feed.open()
            store.feed = feed
            book = RequestBook(store, metrics)
            service = HubService.build(store, book, metrics)
            await store.put_retailer("r1", "R1")
            ids = [f"c{i:06d}" for i in range(clients)]
            await store.import_clients([(c, "r1", 5.0, None, time.time() - 86_400) for c in ids])
            dso = Principal.parse("dso")
            if profile is not None:
                profile.enable()
            c0, t0, sqlite0 = time.process_time(), time.perf_counter(), getattr(store.kv, "busy_seconds", 0.0)
            commits = getattr(store.kv, "commits", None)  # the group commit, where the store has one
            tx0 = commits.commits if commits is not None else 0

            async def life(k: int) -> None:
                start = datetime.now(UTC) + timedelta(minutes=5)
                body = {"client_ids": ids, "start": start.isoformat(), "duration_s": 600, "power_limit_kw": 2.0}
                accepted = await service.flexibility.create_emergency(dso, body, f"bench-{k}")
                expanded = getattr(book, "expanded", None)  # absent before the accepting write was split
                if expanded is not None:
                    await expanded(accepted.request_id)  # the expansion, right after the answer
                items = [i for i in book.due(time.time()) if i.request_id == accepted.request_id]
                await book.mark_sent(items, sent_at := time.time())
                settled_at = sent_at + getattr(book, "sent_settle_s", 0.0)
                if slow_homes:
                    await settle(book, settled_at)
                await book.on_acks([("r1", [i.msg_id for i in items])])
                outcomes = [ReportedOutcome("r1", accepted.request_id, c, s)
                            for s in (ClientState.DELIVERED, ClientState.EXECUTED) for c in ids]
                for j in range(0, len(outcomes), batch):
                    verdicts = await book.apply_outcomes(outcomes[j:j + batch])
                    if not all(v.changed for v in verdicts):
                        raise SystemExit("an outcome was not applied: the benchmark measures nothing")
                if not slow_homes:
                    await settle(book, settled_at)

            for w in range(0, requests, concurrent):  # ``concurrent`` lives at once, as requests overlap in a hub
                await asyncio.gather(*(life(k) for k in range(w, min(w + concurrent, requests))))
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            sqlite_s = getattr(store.kv, "busy_seconds", 0.0)
            if profile is not None:
                profile.disable()
            out = {"cpu_ms_per_request": cpu * 1000 / requests, "wall_ms_per_request": wall * 1000 / requests,
                   "cpu_us_per_client": cpu * 1e6 / requests / clients,
                   "sqlite_ms_per_request": (sqlite_s - sqlite0) * 1000 / requests}
            if commits is not None:
                out["transactions_per_request"] = (commits.commits - tx0) / requests
            return out
        finally:
            await store.close()


def main() -> None:
    """Run and print the figures as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=1,
                    help="request lives run at once (1: one after the other, as before)")
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--slow-homes", action="store_true",
                    help="the first sends' marks settle before the outcomes come (every mark written)")
    ap.add_argument("--gc-tuned", action="store_true",
                    help="tune the garbage collector as the hub's process does (cloud-hub serve)")
    a = ap.parse_args()
    if a.gc_tuned:
        from mhp_wire.gc_tuning import tune_for_throughput

        tune_for_throughput()
    runs = []
    for k in range(a.runs):
        prof = cProfile.Profile() if a.profile is not None and k == a.runs - 1 else None
        runs.append(asyncio.run(one_run(a.clients, a.requests, a.batch, prof, a.concurrent, a.slow_homes)))
        if prof is not None:
            prof.dump_stats(a.profile)
    out = {"code": str(Path(cloud_hub.__file__).parent), "gc_tuned": a.gc_tuned, "slow_homes": a.slow_homes,
           "clients": a.clients, "requests": a.requests, "batch": a.batch, "concurrent": a.concurrent, "runs": [
        {k: round(v, 3) for k, v in r.items()} for r in runs]}
    out["median_cpu_ms_per_request"] = round(statistics.median(r["cpu_ms_per_request"] for r in runs), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
