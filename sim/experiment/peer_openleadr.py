"""``mhp-sim experiment peer``: the emergency fan-out to N homes through a peer, OpenLEADR (OpenADR 2.0b).

One VTN (``openleadr.OpenADRServer``) in its own process, N VENs (``openleadr.OpenADRClient``, many per process on
one asyncio loop) in one or more other processes. Every VEN registers with the VTN (``oadrQueryRegistration``,
``oadrCreatePartyRegistration``) and then polls it (``oadrPoll``; the 2.0b simple HTTP profile is pull only) every
``poll_s``, the period the VTN asks for in its registration answer. Per run the VTN creates the emergency for every
registered VEN (a ``SIMPLE`` level-3 signal starting now, ``response_required="always"``; OpenLEADR queues events
per VEN, so that is one ``add_event`` per VEN, each with its own event id); a VEN receives it in the answer to its
next poll, its ``on_event`` answers ``optIn`` and OpenLEADR sends ``oadrCreatedEvent``. The VTN timestamps, on
its own clock (``time.time``): the creation, the hand-over of each VEN's event in a poll answer (OpenLEADR's
delivery callback) and each VEN's first answer (the event's response callback). Every ``oadrCreatedEvent`` is also
counted (a request hook), so duplicates show. After a run the events are cancelled (the protocol's way; the VENs
confirm) so that the next run starts from an empty queue.

No TLS and no XML signatures: neither side gets a certificate, like our hub and broker in the experiments
(plain TCP by default); see ``docs/decisions.md``. Every message is still rendered from OpenLEADR's templates,
validated against the OpenADR 2.0b XML schema and parsed on arrival, as in production.

The orchestrator (:func:`run_openleadr_fanout`) talks to the VTN process over a small HTTP control API added to
the VTN's own aiohttp application (``/bench/...``) and samples CPU time of every process from ``/proc``. Outputs
in ``out_dir``: ``results.json``, ``peer.csv`` (one row per run and VEN), ``peer_cumulative.png`` (fraction of VENs
acknowledged against time since creation, one line per run) and ``report.md``; logs in ``out_dir/logs``.

Run a process by hand: ``python -m sim.experiment.peer_openleadr vtn --port P`` or ``... vens --url URL --first 1
--count 100``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import IO, Any

import httpx

from broker_config.launcher import die_with_parent
from sim.experiment.base import machine, proc_sample
from sim.experiment.dso_sim import pct
from sim.stack.stack import free_port

VTN_ID = "MHP-PEER-VTN"
MARKET_CONTEXT = "oadr://mhp.example/emergency"
FRACTIONS = ("0.5", "0.9", "0.99", "1.0")
"""The fractions of the N VENs whose acknowledgement time ``time_to_fraction_ms`` reports."""
EVENT_DURATION = timedelta(minutes=10)


def ven_name(i: int) -> str:
    """The name (and, as the VTN assigns it, the id) of VEN number ``i`` (1-based)."""
    return f"ven-{i:05d}"


# -- the VTN process ---------------------------------------------------------------------------------------------


class _VtnBench:
    """What the VTN records: registrations, polls, and per run the creation, hand-over and answer of each event."""

    def __init__(self) -> None:
        self.server: Any = None
        self.registered: dict[str, str] = {}
        self.registrations = 0
        self.polled: set[str] = set()
        self.polls = 0
        self.runs: dict[int, dict[str, Any]] = {}
        self.event_run: dict[str, tuple[int, str]] = {}
        """event id -> (run, ven id)."""

    # OpenLEADR handlers and callbacks

    def on_create_party_registration(self, registration_info: dict[str, Any]) -> tuple[str, str] | bool:
        """Accept a VEN of this benchmark by its name, which becomes its id."""
        name = registration_info.get("ven_name")
        if not isinstance(name, str) or not name.startswith("ven-"):
            return False
        self.registrations += 1
        self.registered[name] = f"reg-{name}"
        return name, self.registered[name]

    def ven_lookup(self, ven_id: str) -> dict[str, Any]:
        """OpenLEADR asks on every message whether the VEN is registered (else it requests a re-registration)."""
        reg = self.registered.get(ven_id)
        return {"ven_id": ven_id, "ven_name": ven_id, "fingerprint": None, "registration_id": reg} if reg else {}

    async def before_handle(self, message_type: str, payload: dict[str, Any]) -> None:
        """OpenLEADR's ``before_handle`` hook: every message the VTN handles, for counting."""
        if message_type == "oadrPoll":
            self.polls += 1
            self.polled.add(payload.get("ven_id", ""))
        elif message_type == "oadrCreatedEvent":
            for resp in payload.get("event_responses") or []:
                where = self.event_run.get(resp.get("event_id", ""))
                if where is not None and resp.get("modification_number") == 0:
                    self.runs[where[0]]["responses"][where[1]] += 1

    def on_delivered(self, run: int, ven_id: str) -> None:
        """The VEN's event went out in the answer to its poll (the first time counts)."""
        self.runs[run]["delivered"].setdefault(ven_id, time.time())

    def on_response(self, run: int, ven_id: str, event_id: str, opt_type: str) -> None:
        """The event's response callback: the VEN's answer (OpenLEADR calls it for the first answer only)."""
        t = time.time()
        r = self.runs[run]
        r["acks"].setdefault(ven_id, t)
        r["opt"][opt_type] += 1

    # the control API

    def create(self, run: int, start_in_s: float) -> dict[str, Any]:
        """The emergency for every registered VEN, one OpenLEADR event each; blocks the loop while it creates."""
        from openleadr import objects

        if run in self.runs:
            raise ValueError(f"run {run} exists already")
        self.runs[run] = {"acks": {}, "delivered": {}, "responses": Counter(), "opt": Counter(), "vens": [],
                          "created_at": time.time()}
        r = self.runs[run]
        start = datetime.now(UTC) + timedelta(seconds=start_in_s)
        for ven_id in list(self.registered):
            event_id = f"emergency-{run}-{ven_id}"
            self.event_run[event_id] = (run, ven_id)
            self.server.add_event(
                ven_id=ven_id, signal_name="SIMPLE", signal_type="level", event_id=event_id,
                intervals=[objects.Interval(dtstart=start, duration=EVENT_DURATION, signal_payload=3.0)],
                callback=partial(self.on_response, run), delivery_callback=partial(self.on_delivered, run, ven_id),
                market_context=MARKET_CONTEXT, response_required="always")
            r["vens"].append(ven_id)
        r["created_done"] = time.time()
        return {"run": run, "events": len(r["vens"]), "created_at": r["created_at"], "created_done": r["created_done"]}

    def cancel(self, run: int) -> int:
        """Cancel the run's events; each VEN confirms at its next poll."""
        r = self.runs[run]
        for ven_id in r["vens"]:
            self.server.cancel_event(ven_id, f"emergency-{run}-{ven_id}")
        r["cancelled_at"] = time.time()
        return len(r["vens"])

    def pending(self, run: int) -> int:
        """Events of ``run`` still in the VTN's queues (a cancelled event leaves once its VEN confirmed)."""
        events = self.server.events
        ids = {f"emergency-{run}-{v}" for v in self.runs[run]["vens"]}
        return sum(1 for evs in events.values() for e in evs if e.event_descriptor.event_id in ids)

    def state(self) -> dict[str, Any]:
        return {"registered": len(self.registered), "registrations": self.registrations, "polled": len(self.polled),
                "polls": self.polls, "runs": {str(k): {"events": len(r["vens"]), "acked": len(r["acks"]),
                                                       "delivered": len(r["delivered"])}
                                              for k, r in self.runs.items()}}

    def run_data(self, run: int) -> dict[str, Any]:
        r = self.runs[run]
        return {"run": run, "created_at": r["created_at"], "created_done": r["created_done"], "vens": r["vens"],
                "acks": r["acks"], "delivered": r["delivered"], "responses": dict(r["responses"]),
                "opt": dict(r["opt"]), "cancelled_at": r.get("cancelled_at")}


async def _vtn_main(port: int, poll_s: int) -> None:
    from aiohttp import web
    from openleadr import OpenADRServer, hooks

    bench = _VtnBench()
    server: Any = OpenADRServer(vtn_id=VTN_ID, http_host="127.0.0.1", http_port=port, ven_lookup=bench.ven_lookup,
                                requested_poll_freq=timedelta(seconds=poll_s), show_fingerprint=False)
    bench.server = server
    server.add_handler("on_create_party_registration", bench.on_create_party_registration)
    hooks.register("before_handle", bench.before_handle)

    def run_of(request: web.Request) -> int:
        try:
            run = int(request.query["run"])
        except (KeyError, ValueError):
            raise web.HTTPBadRequest(text="query parameter run=<integer> required") from None
        if request.method == "GET" or request.path.endswith("/cancel"):
            if run not in bench.runs:
                raise web.HTTPNotFound(text=f"no run {run}")
        return run

    async def create(request: web.Request) -> web.Response:
        try:
            start_in_s = float(request.query.get("start_in_s", "0"))
            return web.json_response(bench.create(run_of(request), start_in_s))
        except ValueError as exc:
            raise web.HTTPConflict(text=str(exc)) from None

    async def cancel(request: web.Request) -> web.Response:
        return web.json_response({"cancelled": bench.cancel(run_of(request))})

    async def state(request: web.Request) -> web.Response:
        body = bench.state()
        if "pending" in request.query:
            body["pending"] = bench.pending(run_of(request))
        return web.json_response(body)

    async def run_data(request: web.Request) -> web.Response:
        return web.json_response(bench.run_data(run_of(request)))

    server.app.add_routes([web.post("/bench/event", create), web.post("/bench/cancel", cancel),
                           web.get("/bench/state", state), web.get("/bench/run", run_data)])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.run()
    print(f"[peer-vtn] listening on 127.0.0.1:{port}, poll period {poll_s:g} s", flush=True)
    await stop.wait()
    await server.stop()
    print(f"[peer-vtn] stopped: {bench.registrations} registrations, {bench.polls} polls", flush=True)


# -- a VEN process -------------------------------------------------------------------------------------------------


async def _vens_main(url: str, first: int, count: int, concurrency: int, poll_s: float, seed: int) -> None:
    from openleadr import OpenADRClient

    rng = random.Random(seed)

    async def opt_in(event: dict[str, Any]) -> str:
        return "optIn"

    clients: list[Any] = []
    for i in range(first, first + count):
        c = OpenADRClient(ven_name=ven_name(i), vtn_url=url, show_fingerprint=False)
        c.add_handler("on_event", opt_in)
        c.add_handler("on_update_event", opt_in)
        clients.append(c)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sem = asyncio.Semaphore(concurrency)

    async def start(c: Any, delay_s: float) -> bool:
        # Homes come up at random times: spread the poll phases over one period, as in steady operation.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await stop.wait()
        async with sem:
            if stop.is_set():
                return False
            await c.run()
            return bool(c.registration_id)

    host, _, rest = url.removeprefix("http://").partition(":")
    port = int(rest.split("/", 1)[0])
    async with asyncio.timeout(60):  # the VTN starts at the same time as this process
        while True:
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            break
    started = time.monotonic()
    ok = await asyncio.gather(*(start(c, rng.uniform(0, poll_s)) for c in clients))
    print(f"[peer-vens] {sum(ok)}/{count} VENs registered and polling after {time.monotonic() - started:.1f} s",
          flush=True)
    await stop.wait()
    # A VEN that never registered has no session to close: its stop() raises, which changes nothing here.
    await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
    print(f"[peer-vens] stopped {count} VENs", flush=True)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _process_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.experiment.peer_openleadr")
    sub = parser.add_subparsers(dest="role", required=True)
    vtn = sub.add_parser("vtn", help="the OpenLEADR VTN with the benchmark's control API")
    vtn.add_argument("--port", type=int, required=True)
    vtn.add_argument("--poll-s", type=int, default=1)
    vens = sub.add_parser("vens", help="a group of OpenLEADR VENs on one asyncio loop")
    vens.add_argument("--url", required=True, help="the VTN's OpenADR base URL")
    vens.add_argument("--first", type=int, required=True, help="number of the first VEN (1-based)")
    vens.add_argument("--count", type=int, required=True)
    vens.add_argument("--concurrency", type=int, default=50, help="registrations in flight at once")
    vens.add_argument("--poll-s", type=float, default=1.0, help="each VEN starts after a random delay up to this")
    vens.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import openleadr  # its import turns on its own INFO logging to stdout; the levels below override that

    del openleadr
    # Quiet as in production: OpenLEADR logs every message at INFO and warns on every hand-over of a SIMPLE event
    # before its start; APScheduler warns when a poll is still running at the next tick.
    logging.getLogger("openleadr").setLevel(logging.ERROR)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    _raise_fd_limit()
    if args.role == "vtn":
        asyncio.run(_vtn_main(args.port, args.poll_s))
    else:
        if args.first < 1 or args.count < 1 or args.concurrency < 1:
            parser.error("--first, --count and --concurrency must be positive")
        asyncio.run(_vens_main(args.url, args.first, args.count, args.concurrency, args.poll_s, args.seed))
    return 0


# -- figures shared with our own fan-out ---------------------------------------------------------------------------


def time_to_fraction(ack_ms: Sequence[float], n: int) -> dict[str, float | None]:
    """When 50 / 90 / 99 / 100 % of ``n`` receivers had acknowledged (ms since creation); ``None`` if never."""
    s = sorted(ack_ms)
    out: dict[str, float | None] = {}
    for f in FRACTIONS:
        k = max(1, math.ceil(float(f) * n))
        out[f] = round(s[k - 1], 3) if k <= len(s) else None
    return out


def ack_stats(ack_ms: Sequence[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 / max (and mean) of the acknowledgement times of the receivers that answered."""
    vals = list(ack_ms)
    return {"p50": pct(vals, 50), "p90": pct(vals, 90), "p99": pct(vals, 99),
            "max": round(max(vals), 3) if vals else None,
            "mean": round(sum(vals) / len(vals), 3) if vals else None}


def cumulative_curve(ack_ms: Sequence[float], n: int) -> tuple[list[float], list[float]]:
    """The step curve "fraction of ``n`` receivers acknowledged" against ms since creation, from (0, 0).

    Receivers that never answered keep the curve below 1.
    """
    xs, ys = [0.0], [0.0]
    for i, t in enumerate(sorted(ack_ms)):
        xs.append(float(t))
        ys.append((i + 1) / n if n else 0.0)
    return xs, ys


def plot_cumulative(curves: Sequence[tuple[str, Sequence[float], int]], path: Path, title: str) -> Path:
    """One PNG, one line per ``(label, ack_ms, n)``: the fraction acknowledged against time since creation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, acks, n in curves:
        xs, ys = cumulative_curve(acks, n)
        ax.step(xs, ys, where="post", label=label)
    ax.set_xlabel("time since the event was created (ms)")
    ax.set_ylabel("fraction of receivers acknowledged")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the orchestrator ------------------------------------------------------------------------------------------------


class _Procs:
    """The VTN and VEN processes: start, sample, stop."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []

    def spawn(self, name: str, argv: list[str]) -> None:
        f = (self.logs / f"{name}.log").open("wb")  # this experiment's only
        self._files.append(f)
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "sim.experiment.peer_openleadr", *argv],
                                            stdout=f, stderr=f, preexec_fn=die_with_parent())

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; see {self.logs / (name + '.log')}")

    def cpu(self) -> dict[str, float]:
        out = {}
        for name, p in self.procs.items():
            s = proc_sample(p.pid)
            if s is not None:
                out[name] = s["cpu_s"]
        return out

    def memory(self) -> dict[str, float]:
        return {name: s["max_rss_mib"] for name, p in self.procs.items() if (s := proc_sample(p.pid)) is not None}

    def stop(self, first: Callable[[str], bool]) -> dict[str, int | None]:
        """SIGTERM to the processes ``first`` selects, then to the rest; each gets 20 s before a SIGKILL."""
        codes: dict[str, int | None] = {}
        for group in ([n for n in self.procs if first(n)], [n for n in self.procs if not first(n)]):
            for name in group:
                if self.procs[name].poll() is None:
                    self.procs[name].send_signal(signal.SIGTERM)
            for name in group:
                try:
                    codes[name] = self.procs[name].wait(20)
                except subprocess.TimeoutExpired:
                    self.procs[name].kill()
                    codes[name] = self.procs[name].wait()
        for f in self._files:
            f.close()
        self._files.clear()
        return codes


def _delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, Any]:
    d = {name: round(after[name] - before.get(name, 0.0), 3) for name in after}
    vens = sum(v for k, v in d.items() if k.startswith("vens"))
    return {"vtn": d.get("vtn", 0.0), "vens": round(vens, 3), "total": round(d.get("vtn", 0.0) + vens, 3),
            "per_process": d}


def _progress(text: str) -> None:
    print(f"[peer] {text}", flush=True)


# Complexity (PLR0913, PLR0915): the peer benchmark's whole run, its knobs passed once.
def run_openleadr_fanout(n_vens: int, out_dir: Path, runs: int = 3, *, poll_s: int = 1,  # noqa: PLR0913, PLR0915
                         ven_procs: int | None = None, timeout_s: float | None = None,
                         register_timeout_s: float | None = None, settle_s: float | None = None,
                         write: bool = True) -> dict[str, Any]:
    """The emergency fan-out to ``n_vens`` OpenLEADR VENs, ``runs`` times; writes the outputs, returns the results.

    ``poll_s`` is whole seconds: OpenADR carries the poll period as an RFC 5545 duration, and OpenLEADR writes
    only whole seconds into it (1 s is the shortest period). ``ven_procs`` VEN processes share the VENs (default:
    one per 500, at most 4). A run ends when every VEN answered or after ``timeout_s`` (default 30 s + 10 ms per
    VEN); its CPU figures cover creation to that end. ``settle_s`` (default two poll periods) passes before each
    run. ``write=False`` leaves ``out_dir`` with the logs only. Synchronous, without an event loop of its own in
    the calling process: callable from a plain function or a worker thread.
    """
    if n_vens < 1 or runs < 1 or poll_s < 1:
        raise ValueError("n_vens and runs must be positive, poll_s at least 1")
    procs_n = ven_procs if ven_procs is not None else min(4, max(1, math.ceil(n_vens / 500)))
    if procs_n < 1 or procs_n > n_vens:
        raise ValueError(f"ven_procs must be between 1 and n_vens ({n_vens}), got {procs_n}")
    timeout = timeout_s if timeout_s is not None else 30.0 + 0.01 * n_vens
    reg_timeout = register_timeout_s if register_timeout_s is not None else 60.0 + 0.02 * n_vens
    settle = settle_s if settle_s is not None else 2 * poll_s
    out = out_dir.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    params = {"n_vens": n_vens, "runs": runs, "poll_s": poll_s, "ven_procs": procs_n, "timeout_s": timeout,
              "register_timeout_s": reg_timeout, "settle_s": settle, "tls": False, "xml_signatures": False,
              "signal": "SIMPLE level 3, starts at creation, response required"}
    _progress(f"OpenLEADR fan-out: {n_vens} VENs in {procs_n} process(es), poll every {poll_s:g} s, {runs} run(s)")
    procs = _Procs(logs)
    started = time.time()
    setup: dict[str, Any] = {}
    run_results: list[dict[str, Any]] = []
    ven_errors: dict[str, int] = {}
    raw_runs: list[dict[str, Any]] = []
    try:
        procs.spawn("vtn", ["vtn", "--port", str(port), "--poll-s", str(poll_s)])
        per = math.ceil(n_vens / procs_n)
        for k in range(procs_n):  # they start (imports) while the VTN does, then wait for its port
            first = 1 + k * per
            count = min(per, n_vens - first + 1)
            procs.spawn(f"vens-{k + 1}", ["vens", "--url", f"{base}/OpenADR2/Simple/2.0b", "--first", str(first),
                                          "--count", str(count), "--poll-s", str(poll_s), "--seed", str(k + 1)])
        with httpx.Client(base_url=base, timeout=60) as http:
            _wait_vtn(http, procs)
            t_reg = time.monotonic()
            st = _wait_polling(http, procs, n_vens, reg_timeout)
            setup = {"loadavg_1min_at_start": round(os.getloadavg()[0], 2), "registered": st["registered"],
                     "polling": st["polled"], "register_s": round(time.monotonic() - t_reg, 3),
                     "cpu_s": _delta(procs.cpu(), {})}
            _progress(f"{st['registered']}/{n_vens} VENs registered, {st['polled']} polling after "
                      f"{setup['register_s']:.1f} s")
            cpu_a, polls_a, t_a = procs.cpu(), st["polls"], time.monotonic()
            time.sleep(settle)
            st = _state(http)
            idle_s = time.monotonic() - t_a
            idle = _delta(procs.cpu(), cpu_a)
            setup["idle"] = {"seconds": round(idle_s, 3), "polls_per_s": round((st["polls"] - polls_a) / idle_s, 1),
                             "cpu_s_per_s": {k: round(v / idle_s, 3) for k, v in idle.items() if k != "per_process"}}
            for run in range(1, runs + 1):
                if run > 1:
                    time.sleep(settle)
                raw, res = _one_run(http, procs, run, n_vens, timeout, poll_s)
                raw_runs.append(raw)
                run_results.append(res)
            ven_errors = _ven_errors(logs)  # before the stop, which cancels the polls in flight
            setup["memory_max_rss_mib"] = procs.memory()
            setup["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    finally:
        exit_codes = procs.stop(first=lambda name: name.startswith("vens"))
    results: dict[str, Any] = {
        "system": "openleadr", "n": n_vens, "runs": run_results, "summary": _summary(run_results),
        "setup": setup, "params": params, "machine": machine(), "exit_codes": exit_codes,
        "ven_errors": ven_errors, "versions": _versions(), "wall_s": round(time.time() - started, 3),
    }
    if write:
        _write(out, results, raw_runs)
    t = results["summary"]
    _progress(f"done: {runs} run(s) to {n_vens} VENs; all acknowledged after (median over runs) "
              f"{t['time_to_fraction_ms']['1.0']} ms, p50 {t['ack_ms']['p50']} ms; missing {t['missing']}, "
              f"duplicates {t['duplicates']}; results in {out}")
    return results


def _state(http: httpx.Client, **query: Any) -> dict[str, Any]:
    resp = http.get("/bench/state", params=query)
    resp.raise_for_status()
    body: dict[str, Any] = resp.json()
    return body


def _wait_vtn(http: httpx.Client, procs: _Procs, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.check()
        with contextlib.suppress(httpx.HTTPError):
            _state(http)
            return
        time.sleep(0.1)
    raise RuntimeError(f"the VTN did not answer in {timeout_s:g} s; see {procs.logs / 'vtn.log'}")


def _wait_polling(http: httpx.Client, procs: _Procs, n: int, timeout_s: float) -> dict[str, Any]:
    deadline, last = time.monotonic() + timeout_s, 0.0
    while True:
        procs.check()
        st = _state(http)
        if st["polled"] >= n or time.monotonic() > deadline:
            return st
        if time.monotonic() - last >= 2.0:
            _progress(f"registering: {st['registered']}/{n} registered, {st['polled']} polling")
            last = time.monotonic()
        time.sleep(0.25)


def _one_run(http: httpx.Client, procs: _Procs, run: int, n: int, timeout_s: float,
             poll_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    cpu0, t0 = procs.cpu(), time.monotonic()
    resp = http.post("/bench/event", params={"run": run})
    resp.raise_for_status()
    created = resp.json()
    _progress(f"run {run}: emergency created for {created['events']} VENs in "
              f"{1000 * (created['created_done'] - created['created_at']):.0f} ms")
    last = 0.0
    while True:
        procs.check()
        st = _state(http)["runs"][str(run)]
        elapsed = time.monotonic() - t0
        if st["acked"] >= created["events"] or elapsed > timeout_s:
            break
        if elapsed - last >= 1.0:
            _progress(f"run {run}: {st['acked']}/{n} acknowledged, {st['delivered']} handed out, {elapsed:.1f} s")
            last = elapsed
        time.sleep(0.05)
    cpu = _delta(procs.cpu(), cpu0)
    window_s = time.monotonic() - t0
    time.sleep(min(2 * poll_s, 5.0))  # a second answer from a VEN would come within a poll or two
    raw = http.get("/bench/run", params={"run": run}).json()
    resp = http.post("/bench/cancel", params={"run": run})
    resp.raise_for_status()
    t_c, pending = time.monotonic(), -1
    while time.monotonic() - t_c < timeout_s:
        pending = _state(http, run=run, pending=1)["pending"]
        if pending == 0:
            break
        time.sleep(0.1)
    res = _run_result(raw, n)
    res["cpu_s"], res["window_s"] = cpu, round(window_s, 3)
    res["cancel_confirmed_s"] = round(time.monotonic() - t_c, 3) if pending == 0 else None
    res["loadavg_1min"] = round(os.getloadavg()[0], 2)  # other work on the machine shows here
    res["cancel_unconfirmed"] = pending
    _progress(f"run {run}: {res['acked']}/{n} acknowledged; p50 {res['ack_ms']['p50']} ms, p99 "
              f"{res['ack_ms']['p99']} ms, all after {res['time_to_fraction_ms']['1.0']} ms; missing "
              f"{res['missing']}, duplicates {res['duplicates']}; CPU s VTN {cpu['vtn']}, VENs {cpu['vens']}")
    return raw, res


def _run_result(raw: dict[str, Any], n: int) -> dict[str, Any]:
    t0 = raw["created_at"]
    acks = [1000 * (t - t0) for t in raw["acks"].values()]
    delivered = [1000 * (t - t0) for t in raw["delivered"].values()]
    responses = raw["responses"]
    return {
        "run": raw["run"], "events": len(raw["vens"]), "acked": len(acks),
        "ack_ms": ack_stats(acks), "time_to_fraction_ms": time_to_fraction(acks, n),
        "delivered_ms": ack_stats(delivered),
        "create_ms": round(1000 * (raw["created_done"] - t0), 3),
        "missing": n - len(acks), "duplicates": sum(c - 1 for c in responses.values() if c > 1),
        "opt": raw["opt"],
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the runs of each figure; missing and duplicates summed."""
    def med(vals: list[float | None]) -> float | None:
        v = sorted(x for x in vals if x is not None)
        return round(v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2, 3) if v else None

    return {"ack_ms": {k: med([r["ack_ms"][k] for r in runs]) for k in ("p50", "p90", "p99", "max")},
            "time_to_fraction_ms": {f: med([r["time_to_fraction_ms"][f] for r in runs]) for f in FRACTIONS},
            "missing": sum(r["missing"] for r in runs), "duplicates": sum(r["duplicates"] for r in runs),
            "cpu_s": {k: med([r["cpu_s"][k] for r in runs]) for k in ("vtn", "vens", "total")}}


def _ven_errors(logs: Path) -> dict[str, int]:
    """What OpenLEADR's VENs logged as errors up to now: their requests that timed out (aiohttp's 10 s read limit;
    OpenLEADR does not retry them, so an answer lost that way stays missing) and the others."""
    counts = {"request_timeouts": 0, "other": 0}
    for path in sorted(logs.glob("vens-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if " ERROR " in line:
                counts["request_timeouts" if "TimeoutError" in line else "other"] += 1
    return counts


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("openleadr", "aiohttp", "lxml", "signxml", "xmltodict", "apscheduler")}


def _write(out: Path, results: dict[str, Any], raw_runs: list[dict[str, Any]]) -> None:
    n = results["n"]
    with (out / "peer.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "ven_id", "delivered_ms", "ack_ms", "responses"])
        for raw in raw_runs:
            t0 = raw["created_at"]
            for ven in raw["vens"]:
                d, a = raw["delivered"].get(ven), raw["acks"].get(ven)
                w.writerow([raw["run"], ven, "" if d is None else round(1000 * (d - t0), 3),
                            "" if a is None else round(1000 * (a - t0), 3), raw["responses"].get(ven, 0)])
    curves = [(f"run {raw['run']}", [1000 * (t - raw["created_at"]) for t in raw["acks"].values()], n)
              for raw in raw_runs]
    plot_cumulative(curves, out / "peer_cumulative.png",
                    f"OpenLEADR: emergency to {n} VENs, fraction acknowledged (poll {results['params']['poll_s']:g} s)")
    results["files"] = {"csv": "peer.csv", "plots": ["peer_cumulative.png"], "report": "report.md", "logs": "logs/"}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(markdown(results))


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def markdown(results: dict[str, Any]) -> str:
    """The short human-readable report."""
    p, m, s = results["params"], results["machine"], results["setup"]
    lines = [
        "# Peer: emergency fan-out through OpenLEADR (OpenADR 2.0b)", "",
        f"{results['n']} VENs (openleadr {results['versions']['openleadr']}) in {p['ven_procs']} process(es), one "
        f"VTN process, poll period {p['poll_s']:g} s (pull: simple HTTP profile), no TLS, no XML signatures. "
        f"Machine: {m['cpus']} CPUs, {m['cpu_model']}, {m['memory']}.", "",
        f"Registration: {s.get('registered')}/{results['n']} registered, {s.get('polling')} polling after "
        f"{s.get('register_s')} s. Idle (polling only): {s.get('idle', {}).get('polls_per_s')} polls/s, CPU s per s "
        f"{s.get('idle', {}).get('cpu_s_per_s')}.", "",
        "## Per run (ms since the VTN started creating the emergency)", "",
        "| run | created in | acked | missing | dup | handed out p50 | ack p50 | p90 | p99 | max | 50 % | 90 % | 99 % "
        "| 100 % | CPU s VTN | CPU s VENs | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        a, t = r["ack_ms"], r["time_to_fraction_ms"]
        lines.append(f"| {r['run']} | {_fmt(r['create_ms'])} | {r['acked']} | {r['missing']} | {r['duplicates']} | "
                     f"{_fmt(r['delivered_ms']['p50'])} | {_fmt(a['p50'])} | {_fmt(a['p90'])} | {_fmt(a['p99'])} | "
                     f"{_fmt(a['max'])} | {_fmt(t['0.5'])} | {_fmt(t['0.9'])} | {_fmt(t['0.99'])} | "
                     f"{_fmt(t['1.0'])} | {_fmt(r['cpu_s']['vtn'])} | {_fmt(r['cpu_s']['vens'])} | "
                     f"{_fmt(r['loadavg_1min'])} |")
    sm = results["summary"]
    lines += [
        "", f"Median over runs: ack p50 {_fmt(sm['ack_ms']['p50'])} ms, p99 {_fmt(sm['ack_ms']['p99'])} ms, all "
        f"acknowledged after {_fmt(sm['time_to_fraction_ms']['1.0'])} ms; missing {sm['missing']}, duplicates "
        f"{sm['duplicates']} (summed).", "",
        "Each VEN sees the emergency in the answer to its next poll (\"handed out\"), answers optIn and the VTN's "
        "response callback stamps the acknowledgement; all times are on the VTN's clock. A run's CPU covers "
        "creation to the last acknowledgement (or the time-out) and includes the VENs' ongoing polling. `load` is the "
        "machine's 1-minute load average after the run: above the number of CPUs, other work competed for them.", "",
        f"Errors the VENs logged: {results['ven_errors']['request_timeouts']} requests timed out (10 s, not "
        f"retried), {results['ven_errors']['other']} others.", "",
        "Plot: `peer_cumulative.png`. Per VEN: `peer.csv`.", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_process_main())
