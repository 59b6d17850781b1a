"""POST → 202 of a large emergency, in this process, broken down by step, on either storage backend.

The hub's ASGI application (``cloud_hub.app.create_app``, its lifespan run here: store, change feed, book, relay)
is called through ``httpx.ASGITransport``: FastAPI's whole request handling is measured (body read, JSON parse,
validation of every client id, the use case, the answer), the socket and uvicorn's HTTP parsing are not. The
relay is connected to a real Mosquitto hub broker rendered from ``broker_config/``, where a retailer ``r1``
acknowledges every request message (so nothing is re-sent while the next POST is measured). ``--backend hbase``
stores through happybase into the HBase Thrift test double (``sim/hbase_double.py``) run as a process of its own,
so its CPU is not charged to the hub.

    python -m sim.bench_accept --clients 10000 --posts 7 [--backend sqlite|hbase|both] [--key] [--profile F]
    python -m sim.bench_accept --mix 400 [--clients 100] [--targets 10] [--backend sqlite] [--profile F]

``--mix R`` measures instead the hub's CPU per HTTP request for the rate experiment's mix (``sim.experiment.rate``):
R requests of the four types in turn (emergency, load reduction, load shift, billing; the DSO simulator's bodies),
each to ``--targets`` random clients of ``--clients`` and with an ``Idempotency-Key`` (``--no-key``: without),
each followed by the one ``GET /v1/requests/{id}`` the DSO simulator sends when the feed says a request ended
(here: at once; the retailer acknowledges and never reports, so the requests stay open). Per endpoint, the event
loop thread's CPU inside the call, split into the use case's own (``HubService`` methods, wrapped; a background
task that runs while the use case awaits storage is charged to it), the hub's HTTP layer (the ASGI application less
the use case: middleware, routing, FastAPI's dependencies and validation, encoding of the answer) and the client
(httpx building the request and reading the answer in this process, not the hub's); and the process's CPU (every
thread, including the relay sending the requests and the SQLite thread) over the whole run, settled, per request.
The first ``--warmup`` requests are not counted.

N clients of ``r1`` are registered through ``PUT /v1/clients``; then ``--posts`` emergencies to all of them, one
after the other, each POST measured alone (the previous request expanded, its messages acknowledged, the process
idle). Per POST: wall time to the 202, the process's CPU (every thread: the event loop, the SQLite thread or
happybase's), the event loop thread's own CPU, and per step the wall time and the loop thread's CPU inside it
(wrappers around the hub's own methods, installed only by this benchmark):

* ``http``: everything outside the use case (FastAPI's body parse and validation, ``model_dump``, the answer; and,
  in this one process, httpx's encoding of the 10,000-id body and reading of the answer);
* ``authorize``, ``targets``, ``suppliers_read`` (the storage call reading the clients' supplier cells),
  ``suppliers_decode`` (the rest of ``HubStore.suppliers_at``), ``plan``, ``write`` (``HubStore.create_request``:
  the row encoded and the accepting batch durable), ``use_case_rest`` (what the use case does besides these).

The first POST warms caches (pydantic, SQLite's pages) and is reported, not counted in the medians. Wall clock on a
shared machine: give the 1-minute load average (printed per POST) with every figure; compare code back to back
(main from a detached worktree with ``PYTHONPATH``; ``hub_code`` says which code ran; a step whose method does
not exist in that code reports nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

import cloud_hub
from broker_config.launcher import die_with_parent
from cloud_hub.app import create_app
from cloud_hub.settings import HubSettings
from sim.hub_process import hub_broker, register_r1_clients, retailer_r1

STEPS = ("http", "authorize", "targets", "suppliers_read", "suppliers_decode", "plan", "write", "use_case_rest")


class Steps:
    """Wall and loop-thread CPU per step of the POST being measured (``on``), from wrapped coroutine methods."""

    def __init__(self) -> None:
        self.on = False
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.active: set[str] = set()
        """Steps being timed: a wrapped method calling another of the same step counts once (HBase's
        ``get_many_cells`` calls ``get_many``)."""

    def reset(self) -> None:
        self.wall = dict.fromkeys(STEPS, 0.0)
        self.cpu = dict.fromkeys(STEPS, 0.0)

    def add(self, name: str, wall: float, cpu: float) -> None:
        if self.on:
            self.wall[name] = self.wall.get(name, 0.0) + wall
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    def wrap(self, obj: object, attr: str, name: str, *, only: Callable[..., bool] | None = None) -> None:
        """Time ``obj.attr`` (a coroutine method) as step ``name`` (calls for which ``only`` is False are not);
        nothing when the code measured has no such method."""
        inner = getattr(obj, attr, None)
        if inner is None:
            return

        async def timed(*args: Any, **kwargs: Any) -> Any:
            if (only is not None and not only(*args, **kwargs)) or name in self.active:
                return await inner(*args, **kwargs)
            self.active.add(name)
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return await inner(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - w0, time.thread_time() - c0)
                self.active.discard(name)

        setattr(obj, attr, timed)

    def wrap_sync(self, module: object, attr: str, name: str) -> None:
        """Time a plain function ``module.attr`` as step ``name``."""
        inner = getattr(module, attr, None)
        if inner is None:
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - w0, time.thread_time() - c0)

        setattr(module, attr, timed)

    def breakdown(self, use_case_wall: float, use_case_cpu: float, total_wall: float, total_cpu: float
                  ) -> dict[str, dict[str, float]]:
        """Milliseconds per step; ``suppliers_decode`` is ``suppliers_at`` less its read, ``http`` and
        ``use_case_rest`` what the others leave of the POST and of the use case."""
        wall, cpu = dict(self.wall), dict(self.cpu)
        for d in (wall, cpu):
            d["suppliers_decode"] = max(0.0, d.pop("suppliers_at", 0.0) - d["suppliers_read"])
        wall["http"], cpu["http"] = total_wall - use_case_wall, total_cpu - use_case_cpu
        inner = ("authorize", "targets", "suppliers_read", "suppliers_decode", "plan", "write")
        wall["use_case_rest"] = use_case_wall - sum(wall[k] for k in inner)
        cpu["use_case_rest"] = use_case_cpu - sum(cpu[k] for k in inner)
        return {k: {"wall_ms": round(wall[k] * 1000, 2), "loop_cpu_ms": round(cpu[k] * 1000, 2)} for k in STEPS}


def instrument(app: Any, steps: Steps) -> tuple[Callable[[], tuple[float, float]], Callable[[], None]]:
    """Install the step timers on the running hub's parts; returns the use case's own ``(wall, cpu)`` of the last
    POST and its reset."""
    from cloud_hub import fanout

    service = app.state.service
    store = app.state.store
    flex = service.flexibility
    steps.wrap(flex.access, "named", "authorize")
    steps.wrap(flex.creator, "targets", "targets")
    steps.wrap(store, "suppliers_at", "suppliers_at")
    steps.wrap(store.kv, "get_many", "suppliers_read", only=lambda table, *a, **k: table == "clients")
    steps.wrap(store.kv, "get_many_cells", "suppliers_read", only=lambda table, *a, **k: table == "clients")
    steps.wrap(store, "create_request", "write")
    steps.wrap_sync(fanout, "make_plan", "plan")
    use_case = [0.0, 0.0]
    inner = flex.create_emergency

    async def timed(*args: Any, **kwargs: Any) -> Any:
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return await inner(*args, **kwargs)
        finally:
            use_case[0] += time.perf_counter() - w0
            use_case[1] += time.thread_time() - c0

    flex.create_emergency = timed

    def reset() -> None:
        use_case[0] = use_case[1] = 0.0

    return (lambda: (use_case[0], use_case[1])), reset


@contextlib.contextmanager
def hbase_double_process(tmp: Path) -> Iterator[str]:
    """The HBase Thrift test double as a process of its own; yields ``host:port``."""
    ready = tmp / "hbase.port"
    proc = subprocess.Popen([sys.executable, "-m", "sim.hbase_double", "--host", "127.0.0.1", "--port", "0",
                             "--ready-file", str(ready)], preexec_fn=die_with_parent())
    try:
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the HBase Thrift double did not start")
            time.sleep(0.05)
        yield f"127.0.0.1:{int(ready.read_text().strip())}"
    finally:
        proc.terminate()
        proc.wait()


@contextlib.asynccontextmanager
async def running_hub(tmp: Path, backend: str, asgi_cpu: list[float] | None = None
                      ) -> AsyncIterator[tuple[Any, httpx.AsyncClient, str, str]]:
    """Broker, (HBase double,) the hub app with its lifespan, an HTTP client on it; ``(app, http, admin, dso)``.
    ``asgi_cpu``: its first item accumulates the loop thread's CPU inside the ASGI application (the client's own
    share, httpx building the request and reading the answer, is not in it)."""
    with contextlib.ExitStack() as stack:
        parts = stack.enter_context(hub_broker(tmp))
        broker, admin, dso = parts.broker, parts.admin, parts.dso
        extra: dict[str, Any] = {}
        if backend == "hbase":
            extra = {"storage": "hbase", "hbase_hosts": [stack.enter_context(hbase_double_process(tmp))],
                     "hbase_table_prefix": "bench"}
        settings = HubSettings(db_path=tmp / "hub.db", tokens_file=parts.tokens_file, mqtt_port=broker.port,
                               mqtt_password=parts.hub_password, mqtt_rate_limit_per_s=1e6,
                               mqtt_rate_limit_burst=1_000_000, rate_limit_per_s=1e6, rate_limit_burst=1_000_000,
                               **extra)
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            link, box = retailer_r1(broker)  # acknowledges, reports nothing: the requests stay open
            served: Any = app
            if asgi_cpu is not None:
                async def served(scope: Any, receive: Any, send: Any) -> None:
                    c0 = time.thread_time()
                    try:
                        await app(scope, receive, send)
                    finally:
                        asgi_cpu[0] += time.thread_time() - c0
            async with link, httpx.AsyncClient(transport=httpx.ASGITransport(app=served), base_url="http://hub",
                                               timeout=600) as http:
                box.append(link)
                yield app, http, admin, dso


async def settle(book: Any, request_id: str, timeout_s: float = 120.0) -> None:
    """Wait until the request is expanded, its messages sent and acknowledged, and the process idle (under 10 ms
    of CPU in 0.2 s): the next POST is measured alone, not against this one's first sends."""
    await book.expanded(request_id)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if book.outbox.has(request_id):  # polled: the book has no event for "acknowledged"
            await asyncio.sleep(0.1)
            continue
        c0 = time.process_time()
        await asyncio.sleep(0.2)
        if time.process_time() - c0 < 0.01:
            return


async def one_backend(backend: str, n: int, posts: int, key: bool, profile: Path | None) -> dict[str, Any]:
    """Register ``n`` clients, then ``posts`` emergencies to all of them, each measured alone."""
    with tempfile.TemporaryDirectory() as tmpdir:
        async with running_hub(Path(tmpdir), backend) as (app, http, admin, dso):
            clients = await register_r1_clients(http, admin, dso, n)
            steps = Steps()
            use_case, reset = instrument(app, steps)
            book = app.state.service.book
            prof = cProfile.Profile() if profile is not None else None
            out: list[dict[str, Any]] = []
            for p in range(posts):
                start = datetime.now(UTC) + timedelta(minutes=10)
                body = {"client_ids": clients, "start": start.isoformat(), "duration_s": 600, "power_limit_kw": 2.0}
                headers = {"Authorization": f"Bearer {dso}"}
                if key:
                    headers["Idempotency-Key"] = f"bench-{p}"
                steps.reset()
                reset()
                load = os.getloadavg()[0]
                steps.on = True
                if prof is not None and p == posts - 1:
                    prof.enable()
                w0, c0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
                r = await http.post("/v1/emergencies", json=body, headers=headers)
                wall, cpu, loop_cpu = time.perf_counter() - w0, time.process_time() - c0, time.thread_time() - t0
                if prof is not None and p == posts - 1:
                    prof.disable()
                steps.on = False
                if r.status_code != 202:
                    raise SystemExit(f"POST answered {r.status_code}: {r.text[:300]}")
                uc_wall, uc_cpu = use_case()
                out.append({"post": p, "load_1min": round(load, 2), "wall_ms": round(wall * 1000, 2),
                            "process_cpu_ms": round(cpu * 1000, 2), "loop_cpu_ms": round(loop_cpu * 1000, 2),
                            "steps": steps.breakdown(uc_wall, uc_cpu, wall, loop_cpu)})
                await settle(book, r.json()["request_id"])
            if prof is not None and profile is not None:
                prof.dump_stats(str(profile.with_suffix(f".{backend}.prof")))
    counted = out[1:] or out
    med = {k: round(statistics.median(float(p[k]) for p in counted), 2)
           for k in ("wall_ms", "process_cpu_ms", "loop_cpu_ms")}
    step_med = {s: {m: round(statistics.median(p["steps"][s][m] for p in counted), 2)
                    for m in ("wall_ms", "loop_cpu_ms")} for s in STEPS}
    return {"backend": backend, "clients": n, "posts": out, "median": med, "median_steps": step_med}


MIX_USE_CASES = {"emergency": ("flexibility", "create_emergency"),
                 "load_reduction": ("flexibility", "create_load_reduction"),
                 "load_shift": ("flexibility", "create_load_shift"), "billing": ("data", "request_billing"),
                 "get": ("requests", "get_request")}
"""Per endpoint of the mix, the use case it calls: ``(HubService attribute, method)``."""


def _time_use_cases(service: Any, use_case_cpu: dict[str, float]) -> None:
    """Wrap every use case of the mix to add its loop-thread CPU to ``use_case_cpu[endpoint]``."""
    for name, (part, method) in MIX_USE_CASES.items():
        owner = getattr(service, part)
        inner = getattr(owner, method)

        def timed(inner: Any = inner, name: str = name) -> Any:
            async def call(*args: Any, **kwargs: Any) -> Any:
                c0 = time.thread_time()
                try:
                    return await inner(*args, **kwargs)
                finally:
                    use_case_cpu[name] += time.thread_time() - c0
            return call

        setattr(owner, method, timed())


async def idle(book: Any, request_id: str, timeout_s: float = 30.0) -> None:
    """Wait until the last request is expanded and the process idle (under 10 ms of CPU in 0.2 s). Unlike
    :func:`settle`, its outbox is not awaited: a load reduction's later phase is sent only when its retailer
    answers, which the retailer here never does."""
    await book.expanded(request_id)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        c0 = time.process_time()
        await asyncio.sleep(0.2)
        if time.process_time() - c0 < 0.01:
            return


# Complexity (PLR0915): one measured loop, its counters kept side by side.
async def one_mix(backend: str, n: int, requests: int, targets: int, warmup: int, profile: Path | None,  # noqa: PLR0915
                  keyed: bool = True) -> dict[str, Any]:
    """Register ``n`` clients, then ``requests`` requests of the rate experiment's mix, each followed by its GET."""
    import random

    from sim.experiment.dso_sim import PATHS, TYPES, body_for

    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmpdir:
        asgi = [0.0]
        async with running_hub(Path(tmpdir), backend, asgi) as (app, http, admin, dso):
            r = await http.put("/v1/retailers/r1", json={"name": "R1"}, headers={"Authorization": f"Bearer {admin}"})
            r.raise_for_status()
            clients = [f"c{i:06d}" for i in range(n)]
            since = (datetime.now(UTC) - timedelta(days=400)).isoformat()
            r = await http.put("/v1/clients", headers={"Authorization": f"Bearer {dso}"}, json={"clients": [
                {"client_id": cid, "retailer_id": "r1", "contracted_power_kw": 6.9, "valid_from": since}
                for cid in clients]})
            r.raise_for_status()
            endpoints = (*TYPES, "get")
            call_cpu = dict.fromkeys(endpoints, 0.0)
            app_cpu = dict.fromkeys(endpoints, 0.0)
            use_case_cpu = dict.fromkeys(endpoints, 0.0)
            calls = dict.fromkeys(endpoints, 0)
            _time_use_cases(app.state.service, use_case_cpu)
            book = app.state.service.book
            auth = {"Authorization": f"Bearer {dso}"}
            prof = cProfile.Profile() if profile is not None else None
            last = ""
            load0 = os.getloadavg()[0]
            c_all = 0.0
            for seq in range(warmup + requests):
                counted = seq >= warmup
                if seq == warmup:
                    await idle(book, last)
                    for d in (call_cpu, use_case_cpu, app_cpu):
                        for k in d:
                            d[k] = 0.0
                    c_all = time.process_time()
                    if prof is not None:
                        prof.enable()
                kind = TYPES[seq % len(TYPES)]
                body = body_for(kind, rng.sample(clients, min(targets, n)), seq)
                t0, a0 = time.thread_time(), asgi[0]
                r = await http.post(PATHS[kind], json=body,
                                    headers={**auth, "Idempotency-Key": f"mix-{seq}"} if keyed else auth)
                t1, a1 = time.thread_time(), asgi[0]
                if r.status_code != 202:
                    raise SystemExit(f"POST {kind} answered {r.status_code}: {r.text[:300]}")
                last = r.json()["request_id"]
                g = await http.get(f"/v1/requests/{last}", headers=auth)
                t2, a2 = time.thread_time(), asgi[0]
                if g.status_code != 200:
                    raise SystemExit(f"GET answered {g.status_code}: {g.text[:300]}")
                if counted:
                    call_cpu[kind] += t1 - t0
                    call_cpu["get"] += t2 - t1
                    app_cpu[kind] += a1 - a0
                    app_cpu["get"] += a2 - a1
                    calls[kind] += 1
                    calls["get"] += 1
            await idle(book, last)
            if prof is not None and profile is not None:
                prof.disable()
                prof.dump_stats(str(profile.with_suffix(f".mix.{backend}.prof")))
            process_cpu = time.process_time() - c_all
    per = {k: {"calls": calls[k],
               "loop_cpu_ms": round(call_cpu[k] / max(1, calls[k]) * 1000, 3),
               "use_case_ms": round(use_case_cpu[k] / max(1, calls[k]) * 1000, 3),
               "http_ms": round((call_cpu[k] - use_case_cpu[k]) / max(1, calls[k]) * 1000, 3),
               "hub_http_ms": round((app_cpu[k] - use_case_cpu[k]) / max(1, calls[k]) * 1000, 3),
               "client_ms": round((call_cpu[k] - app_cpu[k]) / max(1, calls[k]) * 1000, 3)} for k in endpoints}
    post_calls = sum(calls[k] for k in TYPES)
    return {"backend": backend, "mode": "mix", "clients": n, "targets": targets, "requests": requests, "keyed": keyed,
            "load_1min_before": round(load0, 2), "load_1min_after": round(os.getloadavg()[0], 2),
            "per_endpoint": per,
            "per_request_ms": {
                "loop_cpu_in_calls": round(sum(call_cpu.values()) / post_calls * 1000, 3),
                "use_cases": round(sum(use_case_cpu.values()) / post_calls * 1000, 3),
                "http": round((sum(call_cpu.values()) - sum(use_case_cpu.values())) / post_calls * 1000, 3),
                "hub_http": round((sum(app_cpu.values()) - sum(use_case_cpu.values())) / post_calls * 1000, 3),
                "client": round((sum(call_cpu.values()) - sum(app_cpu.values())) / post_calls * 1000, 3),
                "process_cpu_whole_run": round(process_cpu / post_calls * 1000, 3)}}


def main(argv: list[str] | None = None) -> int:
    """Entry point: one JSON document per backend."""
    parser = argparse.ArgumentParser(prog="python -m sim.bench_accept", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--posts", type=int, default=7, help="POSTs per backend (the first is a warm-up)")
    parser.add_argument("--backend", choices=("sqlite", "hbase", "both"), default="both")
    parser.add_argument("--key", action="store_true", help="send an Idempotency-Key with every POST")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile of the last POST (per backend)")
    parser.add_argument("--mix", type=int, default=0, metavar="R",
                        help="measure R requests of the rate experiment's mix instead (each with its GET)")
    parser.add_argument("--targets", type=int, default=10, help="--mix: clients per request")
    parser.add_argument("--warmup", type=int, default=40, help="--mix: requests sent first, not counted")
    parser.add_argument("--no-key", action="store_true", help="--mix: POST without an Idempotency-Key")
    args = parser.parse_args(argv)
    backends = ("sqlite", "hbase") if args.backend == "both" else (args.backend,)
    for backend in backends:
        if args.mix:
            result = asyncio.run(one_mix(backend, args.clients, args.mix, args.targets, args.warmup, args.profile,
                                         not args.no_key))
        else:
            result = asyncio.run(one_backend(backend, args.clients, args.posts, args.key, args.profile))
        result["hub_code"] = str(Path(cloud_hub.__file__).parent)
        result["machine_cores"] = os.cpu_count()
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
