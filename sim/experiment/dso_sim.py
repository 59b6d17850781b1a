"""DSO simulator (the paper's "DSO Simulator"): an open-loop load generator against the hub's HTTP API.

It runs in its own process (so its CPU is visible, and not taken from the hub unnoticed). For each request type
it sends at a fixed rate, on a schedule fixed in advance (open loop: a slow answer never delays the next send),
numbers every request (``seq``, also its ``Idempotency-Key``), times POST → 202, then follows the request with
``GET /v1/requests/{id}`` until it reaches a terminal state, keeping the hub's per-component ``trace``.

Completion is timed on the hub's own clock: ``end_to_end_ms`` is the request's ``completed_at`` (set by the hub when
the last client's outcome arrived) minus the wall-clock time of the first POST, both read from the same host clock;
the GETs only fetch that result, so they can be sparse (``first_poll_s``, then ``poll_interval_s`` doubling up to
``poll_max_s`` while the request is open) and the figure does not depend on the polling grid. ``seen_ms`` is when
the simulator itself saw the terminal state.

The generator checks itself: ``lag_ms`` is how late each send left against its schedule; when the p99 of the lag
exceeds ``lag_bound_ms`` the simulator, not the hub, set the pace, and its stats say ``schedule_kept: false``.
With ``follow: "feed"`` the simulator learns when a request ends from the hub's change feed (one ``GET
/v1/events`` stream per process, resumed with ``Last-Event-ID`` when it drops) instead of polling, and reads each
request once, when the feed says it ended (a request still open after ``feed_poll_s`` is read anyway, as a safety
net): one GET per request instead of one per poll, and a backlog at the hub no longer multiplies the GETs.
``follow: "poll"`` (the default) is the paper's simulator.

One process may not generate a high rate: ``workers`` processes then share one schedule, worker ``i`` sending the
requests whose ``seq`` is ``i`` modulo ``workers`` (every ``seq`` is still unique and scheduled exactly once).

    python -m sim.experiment.dso_sim --config dso.json --out requests.jsonl [--worker I]

``dso.json``: ``hub_url``, ``token``, ``clients`` (ids), ``rates_per_min`` and ``fractions`` per type,
``duration_s``, ``warmup_s``, ``drain_s``, ``first_poll_s``, ``poll_interval_s``, ``poll_max_s``, ``lag_bound_ms``,
``follow``, ``feed_poll_s``, ``workers``, ``progress_interval_s``, ``seed``. Every request scheduled is written to
``--out`` (one JSON object per line), finished or not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import random
import resource
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from mhp_wire.gc_tuning import tune_for_throughput
from mhp_wire.loopwatch import LoopWatch

TYPES = ("emergency", "load_reduction", "load_shift", "billing")
"""The paper's four request types."""
PATHS = {"emergency": "/v1/emergencies", "load_reduction": "/v1/load-reductions", "load_shift": "/v1/load-shifts",
         "billing": "/v1/billing-data"}
FEED_READ_BUFSIZE = 1 << 24
"""aiohttp's read buffer (a line may be twice as long): a change-feed event names every client its write touched,
~63 bytes each, so an event of a 10,000-client request is over aiohttp's default 512 KiB line."""
FOLLOW_MODES = ("poll", "feed")
"""How the simulator learns that a request ended: polling ``GET /v1/requests/{id}``, or the change feed."""
TERMINAL = frozenset({"completed", "partially_completed", "failed", "expired", "cancelled"})
BILLING_PERIOD_START = datetime(2026, 1, 1, tzinfo=UTC)
"""The day whose readings the experiment uploads and bills."""


def pct(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``values``, or ``None`` when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return round(s[k], 3)


def body_for(kind: str, clients: list[str], seq: int, rp_window_s: float = 3.0,
             reduction_kw_per_client: float = 1.0) -> dict[str, Any]:
    """The POST body of one request of ``kind`` for ``clients``.

    A load reduction asks for ``reduction_kw_per_client`` per targeted client: with the RP simulator's default of
    2 kW available per client, about half of the targets are chosen for phase two, the others stay ``available``.
    """
    now = datetime.now(UTC)
    start = (now + timedelta(seconds=60)).isoformat()
    if kind == "emergency":
        return {"client_ids": clients, "start": start, "duration_s": 600, "power_limit_kw": 1.0}
    if kind == "load_reduction":
        return {"client_ids": clients, "reduction_kw": round(reduction_kw_per_client * len(clients), 3),
                "start": start, "duration_s": 900, "respond_within_s": rp_window_s}
    if kind == "load_shift":
        return {"client_ids": clients, "window_start": start,
                "window_end": (now + timedelta(hours=1)).isoformat(), "reason": f"experiment request {seq}"}
    return {"client_ids": clients, "period_start": BILLING_PERIOD_START.isoformat(),
            "period_end": (BILLING_PERIOD_START + timedelta(days=1)).isoformat()}


class DsoSimulator:
    """Sends the schedule, follows every request, keeps one record per request."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.clients: list[str] = list(cfg["clients"])
        self.rng = random.Random(int(cfg.get("seed", 1)) * 1000 + int(cfg.get("worker", 0)))
        self.records: list[dict[str, Any]] = []
        self.poll_s = float(cfg.get("poll_interval_s", 0.02))
        self.first_poll_s = float(cfg.get("first_poll_s", self.poll_s))
        self.poll_max_s = max(self.poll_s, float(cfg.get("poll_max_s", 2.0)))
        self.lag_bound_ms = float(cfg.get("lag_bound_ms", 50.0))
        self.workers = int(cfg.get("workers", 1))
        self.worker = int(cfg.get("worker", 0))
        self.planned = 0
        self.polls = 0
        self.reduction_kw = float(cfg.get("reduction_kw_per_client", 1.0))
        self.retry_s = float(cfg.get("retry_s", 0.5))
        self.follow = str(cfg.get("follow", "poll"))
        if self.follow not in FOLLOW_MODES:
            raise ValueError(f"follow must be one of {FOLLOW_MODES}, not {self.follow!r}")
        self.feed_poll_s = float(cfg.get("feed_poll_s", 10.0))
        self.ended: dict[str, asyncio.Event] = {}
        """``follow: "feed"``: per request id, set once the feed said it reached a terminal state."""
        self.feed_events = 0
        self.feed_reconnects = 0
        self.t0 = 0.0
        self.stop_following_at = float("inf")

    def schedule(self) -> list[tuple[float, str]]:
        """``(seconds from start, type)`` of every request, sorted; types are staggered within a period."""
        total = float(self.cfg["warmup_s"]) + float(self.cfg["duration_s"])
        out: list[tuple[float, str]] = []
        for k, kind in enumerate(TYPES):
            rate = float(self.cfg["rates_per_min"].get(kind, 0))
            if rate <= 0:
                continue
            period = 60.0 / rate
            t = period * k / len(TYPES)
            while t < total:
                out.append((t, kind))
                t += period
        return sorted(out)

    def targets(self, kind: str) -> list[str]:
        """A random ``fraction`` of the clients (at least one)."""
        n = max(1, round(len(self.clients) * float(self.cfg["fractions"][kind])))
        return self.rng.sample(self.clients, min(n, len(self.clients)))

    async def run(self) -> None:
        """Send this worker's share of the schedule, follow it, print progress."""
        plan = [(seq, at, kind) for seq, (at, kind) in enumerate(self.schedule()) if seq % self.workers == self.worker]
        self.planned = len(plan)
        async with self.session() as http:
            self.t0 = time.monotonic()
            send_end = float(self.cfg["warmup_s"]) + float(self.cfg["duration_s"])
            self.stop_following_at = self.t0 + send_end + float(self.cfg.get("drain_s", 30.0))
            feed: asyncio.Task[None] | None = None
            if self.follow == "feed":
                following = asyncio.Event()
                feed = asyncio.create_task(self._follow_feed(http, following), name="dso-feed")
                opened = asyncio.create_task(following.wait())
                await asyncio.wait([feed, opened], timeout=30.0, return_when=asyncio.FIRST_COMPLETED)
                opened.cancel()
                if feed.done() or not following.is_set():
                    feed.cancel()
                    raise RuntimeError("the hub's change feed did not open within 30 s")
                self.t0 = time.monotonic()
                self.stop_following_at = self.t0 + send_end + float(self.cfg.get("drain_s", 30.0))
            progress = asyncio.create_task(self._progress())
            tasks = []
            for seq, at, kind in plan:
                delay = self.t0 + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                rec: dict[str, Any] = {"seq": seq, "type": kind, "warmup": at < float(self.cfg["warmup_s"]),
                                       "scheduled_s": round(at, 4)}
                self.records.append(rec)
                tasks.append(asyncio.create_task(self._one(http, rec)))
            await asyncio.gather(*tasks)
            progress.cancel()
            if feed is not None:
                feed.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feed
            self._print_progress(final=True)

    def session(self) -> aiohttp.ClientSession:
        """The HTTP session to the hub (its token, a pool of 200 connections, a read buffer for long feed events).

        aiohttp, not httpx: httpx's pool costs several times the CPU per request, growing with the number of
        requests in flight (encode/httpx#3215), which made the generator, not the hub, the bottleneck."""
        return aiohttp.ClientSession(base_url=self.cfg["hub_url"],
                                     headers={"Authorization": f"Bearer {self.cfg['token']}"},
                                     timeout=aiohttp.ClientTimeout(total=30.0),
                                     connector=aiohttp.TCPConnector(limit=200), read_bufsize=FEED_READ_BUFSIZE)

    def _ended(self, request_id: str) -> asyncio.Event:
        event = self.ended.get(request_id)
        if event is None:
            event = self.ended[request_id] = asyncio.Event()
        return event

    async def _follow_feed(self, http: aiohttp.ClientSession, following: asyncio.Event) -> None:
        """Read the hub's change feed until cancelled; mark every request that reaches a terminal state. A stream
        that drops is resumed after its last event id (none missed, none twice: docs/api.md); after a ``reset``
        every open request is read again."""
        last: str | None = None
        while True:
            headers = {"Last-Event-ID": last} if last is not None else {}
            try:
                async with http.get("/v1/events", headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=None, sock_read=60.0)) as resp:
                    if resp.status != 200:
                        raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                    kind, data, event_id = "", "", None
                    async for raw in resp.content:
                        line = raw.decode().rstrip("\r\n")
                        if line.startswith("retry:"):
                            following.set()
                        elif line.startswith("id:"):
                            event_id = line[3:].strip()
                        elif line.startswith("event:"):
                            kind = line[6:].strip()
                        elif line.startswith("data:"):
                            data = line[5:].strip()
                        elif not line and data:
                            self._on_feed_event(kind, data)
                            if event_id is not None:  # the resume point moves once the event is handled
                                last = event_id
                            kind, data, event_id = "", "", None
            except (aiohttp.ClientError, aiohttp.http_exceptions.HttpProcessingError, ValueError,
                    TimeoutError) as exc:  # ValueError: aiohttp's line too long (a buffer overrun)
                print(f"[dso-sim] change feed dropped ({type(exc).__name__}: {exc}); resuming", flush=True)
            self.feed_reconnects += 1
            await asyncio.sleep(0.2)

    def _on_feed_event(self, kind: str, data: str) -> None:
        self.feed_events += 1
        if kind == "reset":  # events were lost to this stream: every request waiting reads itself again
            for event in self.ended.values():
                event.set()
            return
        body = json.loads(data)
        if kind == "request" and body.get("state") in TERMINAL:
            self._ended(str(body["request_id"])).set()

    # Complexity (C901, PLR0912, PLR0915): one simulated DSO request from POST to its last poll, timed step by step as
    # the paper measures it.
    async def _one(self, http: aiohttp.ClientSession, rec: dict[str, Any]) -> None:  # noqa: C901, PLR0912, PLR0915
        kind = rec["type"]
        clients = self.targets(kind)
        rec["clients"] = len(clients)
        rec["sent_s"] = round(time.monotonic() - self.t0, 4)
        rec["lag_ms"] = round((rec["sent_s"] - rec["scheduled_s"]) * 1000, 3)
        payload = body_for(kind, clients, rec["seq"], reduction_kw_per_client=self.reduction_kw)
        rec["sent_at"] = time.time()
        key = f"experiment-{rec['seq']}"
        t_post = time.perf_counter()
        rec["attempts"] = 0
        while True:
            # A POST that gets no answer, a 503, another 5xx or a 409 in_progress (the first attempt with the key is
            # still creating its request, or died doing so: docs/api.md) is sent again with the same Idempotency-Key,
            # as a real DSO would, until the drain period ends; every attempt is counted.
            rec["attempts"] += 1
            t_try = time.perf_counter()
            try:
                async with http.post(PATHS[kind], json=payload, headers={"Idempotency-Key": key}) as resp:
                    status, text = resp.status, await resp.text()
            except (aiohttp.ClientError, TimeoutError) as exc:
                rec["no_answer"] = rec.get("no_answer", 0) + 1
                rec.pop("status", None)
                rec["error"] = f"POST: {type(exc).__name__}: {exc}"
                retry = True
            else:
                rec["status"] = status
                if status == 503:
                    rec["status_503"] = rec.get("status_503", 0) + 1
                elif status >= 500:
                    rec["status_5xx_other"] = rec.get("status_5xx_other", 0) + 1
                in_progress = status == 409 and '"in_progress"' in text
                if in_progress:
                    rec["status_409_in_progress"] = rec.get("status_409_in_progress", 0) + 1
                rec["error"] = f"POST answered {status}: {text[:300]}"
                retry = status >= 500 or in_progress
            if not retry or time.monotonic() + self.retry_s >= self.stop_following_at:
                break
            await asyncio.sleep(self.retry_s)
        t_202 = time.perf_counter()
        accepted_at = time.time()
        rec["post_ms"] = round((t_202 - t_post) * 1000, 3)
        rec["last_post_ms"] = round((t_202 - t_try) * 1000, 3)
        if rec.get("status") != 202:
            rec.update(outcome="failed")
            return
        rec.pop("error", None)
        rec["request_id"] = json.loads(text)["request_id"]
        rec["state"] = "accepted"
        wait = self.first_poll_s
        while (left := self.stop_following_at - time.monotonic()) > 0:
            if self.follow == "feed":
                # Read once the feed says the request ended (or after feed_poll_s, a safety net; or when following
                # stops, the last look).
                ended = self._ended(rec["request_id"])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), min(self.feed_poll_s, left))
                ended.clear()
            else:
                await asyncio.sleep(min(wait, left))  # the last look exactly when following stops
            # Back off while the request is open: the latency comes from ``completed_at``, so a later look costs no
            # accuracy, and a backlog at the hub does not multiply the GETs that load it further.
            wait = min(self.poll_max_s, max(self.poll_s, 2 * wait))
            rec["polls"] = rec.get("polls", 0) + 1
            self.polls += 1
            try:
                async with http.get(f"/v1/requests/{rec['request_id']}") as r:
                    status, text = r.status, await r.text()
            except (aiohttp.ClientError, TimeoutError) as exc:
                rec["last_poll_error"] = f"{type(exc).__name__}: {exc}"
                continue
            if status != 200:
                rec["last_poll_error"] = f"GET answered {status}"
                continue
            body = json.loads(text)
            rec["state"] = body["state"]
            if body["state"] in TERMINAL:
                rec["seen_ms"] = round((time.perf_counter() - t_post) * 1000, 3)
                if body.get("completed_at"):  # the hub's clock: the same host clock as ``sent_at``
                    done_at = datetime.fromisoformat(body["completed_at"]).timestamp()
                    rec["done_ms"] = round((done_at - accepted_at) * 1000, 3)
                    rec["end_to_end_ms"] = round((done_at - rec["sent_at"]) * 1000, 3)
                else:
                    rec["done_ms"] = round((time.perf_counter() - t_202) * 1000, 3)
                    rec["end_to_end_ms"] = rec["seen_ms"]
                rec["trace"] = body.get("trace", {})
                states: dict[str, int] = {}
                for c in body.get("clients", {}).values():
                    states[c["state"]] = states.get(c["state"], 0) + 1
                rec["client_states"] = states
                rec["outcome"] = "completed" if body["state"] == "completed" else "failed"
                if rec["outcome"] == "failed":
                    rec["error"] = f"ended {body['state']}: {states}"
                return
        rec["outcome"] = "missing"
        rec["error"] = f"not terminal after the drain period (last state {rec.get('state')})"

    async def _progress(self) -> None:
        every = float(self.cfg.get("progress_interval_s", 5.0))
        while True:
            await asyncio.sleep(every)
            self._print_progress()

    def _print_progress(self, final: bool = False) -> None:
        recs = self.records
        done = [r["done_ms"] for r in recs if "done_ms" in r]
        posts = [r["post_ms"] for r in recs if "post_ms" in r and r.get("status") == 202]
        n_ok = sum(1 for r in recs if r.get("outcome") == "completed")
        n_fail = sum(1 for r in recs if r.get("outcome") == "failed")
        n_miss = sum(1 for r in recs if r.get("outcome") == "missing")
        head = "final" if final else f"t={time.monotonic() - self.t0:5.1f}s"
        who = f"[dso-sim {self.worker + 1}/{self.workers}]" if self.workers > 1 else "[dso-sim]"
        lags = [float(r["lag_ms"]) for r in recs if "lag_ms" in r]
        print(f"{who} {head} sent={len(recs)} accepted={len(posts)} completed={n_ok} failed={n_fail} "
              f"missing={n_miss} open={len(recs) - n_ok - n_fail - n_miss} "
              f"p99(POST->202)={pct(posts, 99)} ms p99(202->completed)={pct(done, 99)} ms "
              f"p99(send lag)={pct(lags, 99)} ms", flush=True)

    def self_check(self) -> dict[str, Any]:
        """Whether this generator kept its schedule (open loop at the offered rate) and what it cost."""
        lags = [float(r["lag_ms"]) for r in self.records if "lag_ms" in r and not r.get("warmup")]
        p99 = pct(lags, 99)
        return {"worker": self.worker, "workers": self.workers, "planned": self.planned, "sent": len(self.records),
                "polls": self.polls, "follow": self.follow, "feed_events": self.feed_events,
                "feed_reconnects": self.feed_reconnects, "lag_bound_ms": self.lag_bound_ms, "lag_p99_ms": p99,
                "lag_max_ms": round(max(lags), 3) if lags else None,
                "late_sends": sum(1 for v in lags if v > self.lag_bound_ms),
                "schedule_kept": len(self.records) == self.planned and (p99 is None or p99 <= self.lag_bound_ms)}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m sim.experiment.dso_sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stats-file", type=Path, help="written at exit: this process's CPU seconds and max RSS, "
                        "and whether it kept its schedule")
    parser.add_argument("--worker", type=int, default=0, help="which share of the schedule (0 .. workers-1)")
    args = parser.parse_args(argv)
    cfg = json.loads(args.config.read_text())
    if not 0 <= args.worker < int(cfg.get("workers", 1)):
        parser.error(f"--worker must be in 0 .. {int(cfg.get('workers', 1)) - 1}")
    sim = DsoSimulator({**cfg, "worker": args.worker})
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s dso-sim: %(message)s")
    # The simulator keeps every request's record (thousands of dicts) and parses a change-feed event per write:
    # with CPython's default thresholds its collector walked that growing heap in passes that held the loop for
    # 300-650 ms, after a request's send time was taken and before its POST was written, which the run charged to
    # the hub (docs/performance.md, "Issue 14, fourteenth round"). Tuned as the services are.
    tune_for_throughput()
    watch = LoopWatch(name="dso-sim")

    async def watched() -> None:
        with watch:  # a stall here shows as send lag, or as a late POST or poll, charged to the hub
            await sim.run()

    try:
        asyncio.run(watched())
    finally:
        tmp = args.out.with_suffix(".tmp")
        with tmp.open("w") as f:
            for rec in sim.records:
                f.write(json.dumps(rec) + "\n")
        tmp.replace(args.out)
        if args.stats_file is not None:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            args.stats_file.write_text(json.dumps({"cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
                                                   "max_rss_mib": round(ru.ru_maxrss / 1024, 2),
                                                   "generator": {**sim.self_check(), "loop_stalls": watch.stalls,
                                                                 "loop_stalled_s": round(watch.stalled_s, 3),
                                                                 "gc_young_threshold": gc.get_threshold()[0]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
