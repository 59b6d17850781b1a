"""``mhp-sim experiment fanout``: one emergency to every gateway of a simulated fleet, through the real chain.

DSO (this process, over HTTP) → hub (``cloud-hub serve``, embedded storage) → hub Mosquitto → one retailer
bridge per retailer (``retailer-bridge run``) → its retailer Mosquitto → simulated gateways (``python -m
sim.fleet``, real MQTT connections, at most ``per_fleet`` per process) → outcomes back (each standing for its ack) → the
hub records every client executed. Every part is its own process, started from ``broker_config`` and the
packages' own command lines, as in ``sim.experiment.base``.

Per run: POST → 202; when the hub had the last outcome (its ``completed_at``) and when this process saw the
request end (it follows the hub's ``/metrics`` counters while the run lasts, so that thousands of clients are not
re-read ten times a second, then reads ``GET /v1/requests/{id}`` once); the time, from the POST, by which 50, 90,
99 and 100 % of the clients were executed (each client's ``updated_at`` in that view); missing and duplicate
commands as the gateways counted them; CPU seconds of every process during the run (/proc). DESIGN.md's target:
an emergency reaches 10,000 gateways and all acknowledge in ≤ 5 s.

Outputs in OUT: ``results.json``, ``fanout.csv`` (one row per run), ``fanout_clients.csv`` (each client's time
to executed, per run), ``fanout.png`` (fraction of clients executed against time, one line per run) and
``report.md``. ``--peer openleadr`` also runs ``sim.experiment.peer_openleadr.run_openleadr_fanout`` (the same
fan-out over OpenADR 2.0b) into ``OUT/peer-openleadr`` and puts its result next to ours.

``--floor`` also measures the bare MQTT floor in the same run, with the same retailer brokers and the same fleet
processes (so the same N and layout): before the bridges start, this process connects to each retailer broker
as the extra privileged identity ``floor``, publishes one QoS 1 command per gateway on its ``down`` topic and
waits for one QoS 1 acknowledgement per gateway (each simulated gateway echoes a ``floor:`` payload back on its
``up`` topic, with no decoding and no application: ``sim.fleet.FLOOR_PREFIX``). Its time to the last
acknowledgement is the floor; each of our runs gets its ratio to the floor's median. Every run, ours and the
floor's, also reports CPU milliseconds per client per process and per group (``product`` = hub + bridges,
``fleet`` = the simulated gateways, ``brokers``, ``experiment`` = this process, which is the floor's commander),
so the simulated fleet's own cost is visible and not charged to the product.

``--bridge-instances N`` starts N bridge processes per retailer on one store and one instance lock (one active,
the others standbys: ``retailer_bridge.instance_lock``); ``--kill-bridge-after-outcomes K`` kills the active one
with SIGKILL in each run once the hub has counted K outcome messages of it, and starts it again as the next
standby. Each run's ``bridge_kills`` in ``results.json`` names the process killed and the hub's count then.

``--bridge-partitions K`` runs each retailer's bridge as K partitions by gateway (``retailer_bridge.partition``),
each its own process(es), store and logins (partition k > 0 logs in as ``{r}.p{k}``, a second login of ``r`` at the
hub broker, and as ``bridge.p{k}`` at the retailer broker); with ``--bridge-instances N`` each partition has N
processes on its own lock, and ``--kill-bridge-after-outcomes`` kills the active process of partition 0 only.
Each run's ``partitions`` in ``results.json`` counts, from each partition's store, the commands of the run's
request and those among them for a gateway that partition does not own (0 when each handled only its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import math
import os
import random
import signal
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import matplotlib
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from broker_config.launcher import BrokerSpec, Identity, MosquittoProcess, generate_password
from broker_config.render import GENERATED_PASSWORD_ITERATIONS, Delegate
from mhp_wire import topics
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from mhp_wire.secretfile import write_private
from retailer_bridge.instance_lock import holder_pid
from retailer_bridge.partition import Partition, partition_file, partition_logins
from sim.experiment.base import BaseParams, Experiment, machine, proc_sample
from sim.experiment.dso_sim import pct
from sim.experiment.timeline import floor_span, run_timeline
from sim.experiment.timeline import markdown as timeline_markdown
from sim.fleet import FLOOR_PREFIX
from sim.stack.stack import free_port

TARGET_S = 5.0
"""DESIGN.md: an emergency reaches 10,000 gateways and all acknowledge in at most this."""
QUANTILES = (50, 90, 99, 100)
ENDED = frozenset({"completed", "failed", "partially_completed", "expired", "cancelled"})
METRICS_POLL_S = 0.25
"""How often a run still going reads the hub's ``/metrics`` for the request's end. Everything the experiment asks of
the hub is charged to the hub's CPU per client: a scrape costs the hub ~0.65 ms of CPU, so at 0.05 s (before) a
10,000-client run of 3 s paid ~40 ms (0.004 ms per client) for it (docs/performance.md, "Issue 14, twelfth round").
It bounds only when the experiment sees the end (``observed_done_s``) and so when the run's CPU is read (idle time
after the end costs ~nothing); the ``t50``-``t100`` times come from each client's stored ``updated_at`` and do not
depend on it. With ``--kill-bridge-after-outcomes`` the poll stays at :data:`KILL_POLL_S`: the kill follows the
outcome count."""
KILL_POLL_S = 0.05
CHECK_INTERVAL_S = 10.0
"""How often a run still going reads the request's whole view, the sure signal behind the counter (thousands of
clients: rarely; 10,000 clients' view costs the hub ~47 ms of CPU, so at every 3 s before it was charged to most
runs, 0.005 ms per client); once per :data:`CHECK_CLIENTS` clients more, this much longer (the view of 100,000
clients costs the hub seconds)."""
CHECK_CLIENTS = 10_000
VIEW_CHECK_MAX_CLIENTS = 20_000
"""Above this many clients a run is followed by the hub's counters alone (the view is read once, at the end): at
100,000 clients, building the view held the hub's event loop long enough for its broker to drop it (keep-alive)."""
IDLE_CPU_S = 0.025
""":meth:`FanoutExperiment._settle`: every process together below this many CPU seconds per half second (5 % of a
core) counts as idle ..."""
IDLE_CPU_S_PER_CLIENT = 1.5e-6
"""... plus this much per connected gateway: each simulated gateway's keep-alive ping (every 24 s) costs its fleet
process and its broker ~50-60 us, so 100,000 idle gateways keep ~0.25 of a core busy, which no wait ends."""
RUN_TIMEOUT_S_PER_CLIENT = 0.003
"""The default time a run is followed: this per client, at least 60 s (100,000 gateways: 300 s)."""
RUN_FIELDS = ("run", "request_id", "clients", "post_ms", "executed", "other_terminal", "missing_commands",
              "duplicate_commands", "hub_completed_s", "observed_done_s", "t50_s", "t90_s", "t99_s", "t100_s",
              "gateway_first_p50_s", "gateway_first_max_s", "state", "within_target", "loadavg_1m")
WATCH_INTERVAL_S = 0.2
"""How often the experiment checks that every process it started is still running."""
LOG_TAIL_LINES = 20
"""Lines of a dead process's log in the experiment's error."""


@dataclass
class FanoutParams:
    """Parameters of a fan-out experiment."""

    out: Path
    gateways: int = 10_000
    retailers: int = 1
    runs: int = 3
    per_fleet: int = 2_500
    """Simulated gateways per fleet process (each retailer's gateways are split over ``ceil(n / per_fleet)``)."""
    timeout_s: float = 60.0
    """How long one run is followed before it counts as not done."""
    settle_s: float = 120.0
    """At most this long waiting, before each run, for every process to be idle (presence storms, earlier runs)."""
    progress_interval_s: float = 1.0
    peer: str = ""
    """``""`` or ``"openleadr"``: also run that peer's fan-out with as many VENs as gateways."""
    via: str = ""
    """``""`` or ``"openadr3"``: also run the fan-out through the hub's OpenADR 3 door (``sim.experiment.via_openadr3``)
    with ``vens`` VENs on its MQTT notifier."""
    vens: int = 0
    """VENs of ``via`` (0: as many as gateways)."""
    floor: bool = False
    """Also measure the bare MQTT command+ack floor (``runs`` times, before the bridges start) and each ratio."""
    bridge_instances: int = 1
    """Bridge processes per retailer: one store, one instance lock; one is active, the others its standbys."""
    kill_bridge_after_outcomes: int | None = None
    """In each run, as soon as the hub has received this many outcome messages of it (``outcome`` and ``outcomes``
    alike; a condition, not a time: the
    kill falls mid-way however fast the machine), SIGKILL the active bridge process of every retailer; its standby
    takes over (needs ``bridge_instances`` > 1). With ``bridge_partitions`` > 1: partition 0's active process."""
    bridge_partitions: int = 1
    """Bridge partitions per retailer (by gateway): each its own process(es), store, instance lock and logins."""
    fleets_connecting: int = 2
    """At most this many fleet processes connect their gateways at once (the others, started, wait for their turn:
    ``sim.fleet --go-file``); with ``connect_concurrency`` it bounds the CONNECTs in flight across the fleet."""
    connect_concurrency: int = 200
    """CONNECTs in flight per fleet process while it connects (``sim.fleet --connect-concurrency``)."""
    timeline: bool = False
    """Also record each run's stages of the critical path, first and last client (``sim.experiment.timeline``)."""
    shuffled: bool = False
    """POST each run's clients in a random order (seeded by the run's number) instead of in id order: a DSO that
    lists its clients by feeder or area, not by id (docs/performance.md, "Clients in id order")."""


FLOOR_FIELDS = ("run", "clients", "acked", "duplicates", "t50_s", "t90_s", "t99_s", "t100_s", "loadavg_1m")


def bridge_name(r: str, k: int, partition: int | None = None) -> str:
    """The process name of retailer ``r``'s ``k``-th bridge process (0: ``bridge-{r}``), of one ``partition``
    (``bridge-{r}-p{j}``, ``bridge-{r}-p{j}-2``) when the bridge is partitioned."""
    base = f"bridge-{r}" if partition is None else f"bridge-{r}-p{partition}"
    return base if k == 0 else f"{base}-{k + 1}"


def partition_counts(db_path: Path, request_id: str, partition: Partition) -> dict[str, int]:
    """From one partition's store: the commands it holds for ``request_id``, and how many of them are for a
    gateway it does not own (read-only; the bridge may still be running)."""
    if not db_path.exists():
        return {"commands": 0, "foreign": 0}
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        gateways = [g for (g,) in db.execute("SELECT gateway_id FROM commands WHERE request_id=?", (request_id,))]
    finally:
        db.close()
    return {"commands": len(gateways), "foreign": sum(not partition.owns_gateway(g) for g in gateways)}


def process_group(name: str) -> str:
    """Which group a measured process belongs to: ``product`` (hub, bridges), ``fleet``, ``brokers`` or
    ``experiment`` (this process: the DSO's HTTP client, and the floor's MQTT commander)."""
    if name == "hub" or name.startswith("bridge-"):
        return "product"
    if name.startswith("fleet-"):
        return "fleet"
    if name == "hub-broker" or name.startswith("broker-"):
        return "brokers"
    return "experiment"


def cpu_per_client(cpu_s: dict[str, float], clients: int) -> dict[str, dict[str, float]]:
    """CPU milliseconds per client, per process and per group (:func:`process_group`)."""
    per_process = {k: round(v * 1000 / clients, 4) for k, v in sorted(cpu_s.items())}
    groups: dict[str, float] = {}
    for k, v in cpu_s.items():
        groups[process_group(k)] = groups.get(process_group(k), 0.0) + v
    return {"process": per_process, "group": {k: round(v * 1000 / clients, 4) for k, v in sorted(groups.items())}}


def floor_ratios(runs: list[dict[str, Any]], floor_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each of our runs' time to 100 % executed over the floor's median time to 100 % acknowledged."""
    floor_t = sorted(r["t100_s"] for r in floor_runs if r.get("t100_s"))
    if not floor_t or len(floor_t) < len(floor_runs):
        return {"floor_t100_s_median": None, "ratios": [None for _ in runs], "ratio_best": None,
                "ratio_worst": None}
    median = floor_t[len(floor_t) // 2] if len(floor_t) % 2 else (floor_t[len(floor_t) // 2 - 1]
                                                                  + floor_t[len(floor_t) // 2]) / 2
    ratios = [None if r.get("t100_s") is None else round(r["t100_s"] / median, 2) for r in runs]
    known = [x for x in ratios if x is not None]
    return {"floor_t100_s_median": round(median, 4), "ratios": ratios, "ratio_best": min(known) if known else None,
            "ratio_worst": max(known) if len(known) == len(ratios) and known else None}


def cpu_spent(before: dict[str, float], after: dict[str, float], kills: list[dict[str, Any]]) -> dict[str, float]:
    """CPU seconds of each process during a run; a process killed during it and started again under its name
    counts what it spent until the kill plus what its successor spent (which started from 0)."""
    spent = {k: after[k] - before.get(k, 0.0) for k in after}
    for kill in kills:
        name = kill.get("killed")
        if name is not None and kill.get("cpu_s_at_kill") is not None:
            spent[name] = kill["cpu_s_at_kill"] - before.get(name, 0.0) + after.get(name, 0.0)
    return {k: round(v, 3) for k, v in spent.items()}


def gateway_of(client_id: str) -> str:
    """The simulated gateway of a client (``client-00042`` → ``gw-00042``)."""
    return "gw-" + client_id.removeprefix("client-")


def time_to_fraction(times: list[float], total: int, q: float) -> float | None:
    """When ``q`` % of ``total`` clients had been executed, from their times; None if that many never were."""
    need = max(1, math.ceil(q / 100 * total))
    if len(times) < need:
        return None
    return round(sorted(times)[need - 1], 4)


def loadavg() -> float | None:
    """The machine's 1-minute load average (other work on it shows here), from /proc."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class ProcessExited(RuntimeError):
    """A process the experiment needs (a broker, the hub, a bridge, a fleet process) exited before the end: the
    experiment stops at once and says which, with what exit code, and the tail of its log."""

    def __init__(self, name: str, pid: int | None, returncode: int | None, phase: str, log: Path, tail: str) -> None:
        self.name, self.pid, self.returncode, self.phase, self.log, self.tail = name, pid, returncode, phase, log, tail
        super().__init__(f"{name} (pid {pid}) exited with {exit_text(returncode)} during {phase}; the last lines of "
                         f"{log}:\n{tail}")


def exit_text(returncode: int | None) -> str:
    """``exit code 1`` or, for a process a signal ended, ``exit code -9 (killed by SIGKILL)``."""
    if returncode is None:
        return "an unknown exit code"
    if returncode < 0:
        try:
            return f"exit code {returncode} (killed by {signal.Signals(-returncode).name})"
        except ValueError:
            return f"exit code {returncode} (killed by signal {-returncode})"
    return f"exit code {returncode}"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file (``(no output)`` when it is missing or empty)."""
    try:
        text = path.read_text("utf-8", errors="replace")
    except OSError:
        text = ""
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


def fleet_connect(fleet_ready: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """From the fleet processes' ready files: each one's connect time (``fleet_connect_s``) and its connecting
    window, from its first CONNECT to its last CONNACK (``fleet_connect_windows``, epoch seconds)."""
    return {"fleet_connect_s": {f["file"]: f["connect_s"] for f in fleet_ready},
            "fleet_connect_windows": {f["file"]: [f.get("connect_started_at"), f.get("connected_at")]
                                      for f in fleet_ready}}


def run_timeout_s(gateways: int) -> float:
    """The default time one run of ``gateways`` is followed before it counts as not done."""
    return max(60.0, gateways * RUN_TIMEOUT_S_PER_CLIENT)


def gateway_connect_timeout_s(gateways: int) -> float:
    """How long one simulated gateway of a fleet process of ``gateways`` keeps trying to connect: the process
    connects them ``connect_concurrency`` at a time, so the last one starts late in a big process."""
    return 60.0 + gateways / 25


def fleet_ready_timeout_s(gateways: int) -> float:
    """How long the experiment waits for a fleet process of ``gateways``, given its turn, to be connected (a
    process that dies meanwhile is caught at once by the watchdog; this bounds one that hangs)."""
    return gateway_connect_timeout_s(gateways) + 30.0


def start_brokers(brokers: list[MosquittoProcess], pool: ThreadPoolExecutor) -> None:
    """Start the brokers in ``pool``'s threads, as many at once as it has: writing a password file is one PBKDF2
    hash per gateway (100,000 at 100,000 gateways, ~1.3 ms each), and ``hashlib`` releases the GIL while it hashes,
    so every core hashes. The pool must outlive the brokers: a broker is started with ``PR_SET_PDEATHSIG``
    (``broker_config.launcher.die_with_parent``), which Linux ties to the thread that forked it, so a pool thread
    that ends takes its broker with it."""
    for f in [pool.submit(b.start) for b in brokers]:
        f.result()


def reconcile(expected: dict[str, list[str]], fleet_stats: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per request id: gateways that got no command, commands received more than once, first-receipt times.

    ``expected``: request id → the gateways it targeted; ``fleet_stats``: what each fleet process wrote.
    """
    got: dict[str, dict[str, list[float]]] = {}
    for s in fleet_stats:
        for request_id, per_gateway in s.get("commands", {}).items():
            got.setdefault(request_id, {}).update(per_gateway)
    out = {}
    for request_id, gateways in expected.items():
        seen = got.get(request_id, {})
        missing = [g for g in gateways if g not in seen]
        out[request_id] = {"missing": len(missing), "missing_gateways": missing[:50],
                           "duplicates": int(sum(max(0, n - 1) for n, _ in seen.values())),
                           "first_at": sorted(at for _, at in seen.values())}
    return out


class FanoutExperiment(Experiment):
    """The fan-out experiment; :meth:`run` does everything and returns ``results.json``'s content."""

    def __init__(self, fp: FanoutParams) -> None:
        super().__init__(BaseParams(out=fp.out, clients=fp.gateways, retailers=fp.retailers))
        self.fp = fp
        self.clients_of = {r: self.client_ids[i::fp.retailers] for i, r in enumerate(self.retailer_ids)}
        """Each retailer's clients, as ``Experiment._register`` assigns them (client i to retailer i mod R)."""
        self.gateway_passwords = {gateway_of(c): generate_password() for c in self.client_ids}
        self.fleets: list[str] = []
        self.brokers: dict[str, MosquittoProcess] = {}
        """Every broker by its process name (``hub-broker``, ``broker-{r}``), for the watchdog."""
        self.phase = "set-up"
        """What the experiment is doing now (named in the error when a process dies)."""
        self.timeline_parts: dict[str, dict[str, Any]] = {}
        """``--timeline``: per request id, the hub's view at the end of its run and the bridges' stored commands."""

    def log(self, text: str) -> None:
        """A progress line."""
        print(f"[fanout] {text}", flush=True)

    def run(self) -> dict[str, Any]:
        """Start, measure, stop, write; returns the results."""
        fp = self.fp
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        for stale in self.work.glob("fleet-*.json"):
            stale.unlink()
        started = time.time()
        passwords = {r: generate_password() for r in self.retailer_ids}
        self.floor_password = generate_password()
        self.partition_passwords = {(r, j): (generate_password(), generate_password())
                                    for r in self.retailer_ids for j in range(1, fp.bridge_partitions)}
        """Each partition's (hub, retailer broker) passwords, partition 0 excepted (it has the retailer's own)."""
        hub_spec = BrokerSpec(kind="hub", port=free_port(), data_dir=self.work / "broker",
                              privileged=Identity("hub", generate_password()),
                              parties=[Identity(r, pw) for r, pw in passwords.items()], use_username_as_clientid=True,
                              delegates=[Delegate(Identity(partition_logins(r, j)[0], pws[0]), r)
                                         for (r, j), pws in self.partition_passwords.items()],
                              password_iterations=GENERATED_PASSWORD_ITERATIONS)  # every password is generated
        self.log(f"{fp.gateways} gateways, {fp.retailers} retailer(s), {fp.runs} run(s); target: all executed in "
                 f"<= {TARGET_S:g} s")
        runs: list[dict[str, Any]] = []
        self.floor_runs: list[dict[str, Any]] = []
        setup: dict[str, Any] = {}
        try:
            with MosquittoProcess(hub_spec) as hub_broker, contextlib.ExitStack() as stack:
                self._track("hub-broker", hub_broker.pid)
                self.brokers["hub-broker"] = hub_broker
                brokers: dict[str, MosquittoProcess] = {}
                pool = ThreadPoolExecutor(max_workers=max(1, min(fp.retailers, os.cpu_count() or 1)),
                                          thread_name_prefix="broker-start")
                stack.callback(pool.shutdown)  # last, after every broker stopped (see start_brokers)
                for r in self.retailer_ids:
                    spec = BrokerSpec(kind="retailer", port=free_port(), data_dir=self.work / f"broker-{r}",
                                      privileged=Identity("bridge", generate_password()),
                                      parties=[Identity(gateway_of(c), self.gateway_passwords[gateway_of(c)])
                                               for c in self.clients_of[r]],
                                      extra_privileged=([Identity("floor", self.floor_password)] if fp.floor else [])
                                      + [Identity(partition_logins(r, j)[1], self.partition_passwords[r, j][1])
                                         for j in range(1, fp.bridge_partitions)],
                                      # every password is generated; thousands of gateways log in
                                      password_iterations=GENERATED_PASSWORD_ITERATIONS)
                    brokers[r] = MosquittoProcess(spec)
                    stack.callback(brokers[r].stop)
                self.phase = "set-up (the retailer brokers' password files and start)"
                t_brokers = time.monotonic()
                start_brokers(list(brokers.values()), pool)
                for r, b in brokers.items():
                    self._track(f"broker-{r}", b.pid)
                    self.brokers[f"broker-{r}"] = b
                self.log(f"{fp.retailers} retailer broker(s) for {fp.gateways} gateways started in "
                         f"{time.monotonic() - t_brokers:.1f} s")
                try:
                    runs, setup = asyncio.run(self._fanout_async(hub_broker.port, hub_spec, passwords, brokers))
                finally:
                    self._stop_all()  # the fleets write what they received on SIGTERM
        finally:
            self._stop_all()
        stats = [json.loads(f.read_text()) for f in sorted(self.work.glob("fleet-*.stats.json"))]
        if len(stats) < len(self.fleets):
            self.log(f"only {len(stats)} of {len(self.fleets)} fleet processes wrote their counts; see "
                     f"{self.work / 'logs'}")
        setup.update(fleet_connect(setup.pop("fleet_ready", [])))
        results = self._results(runs, stats, setup, round(time.time() - started, 3))
        if fp.peer:
            results["peer"] = self._run_peer()
        if fp.via:
            results["via"] = self._run_via()
        write_all(self.out, results)
        return results

    def _track(self, name: str, pid: int | None) -> None:
        if pid is not None:
            self.pids[name] = pid

    async def _fanout_async(self, hub_port: int, hub_spec: BrokerSpec, passwords: dict[str, str],
                            brokers: dict[str, MosquittoProcess]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """:meth:`_fanout_steps` under the watchdog: a process that exits meanwhile stops the experiment at once
        (:class:`ProcessExited`) instead of leaving it waiting for a ready file or an outcome that cannot come."""
        steps = asyncio.create_task(self._fanout_steps(hub_port, hub_spec, passwords, brokers))
        watch = asyncio.create_task(self._watch())
        await asyncio.wait({steps, watch}, return_when=asyncio.FIRST_COMPLETED)
        for task in (steps, watch):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        dead = watch.exception() if watch.done() and not watch.cancelled() else None
        if dead is not None:
            if steps.done() and not steps.cancelled():
                steps.exception()  # retrieved and dropped: the dead process is the cause, not what it broke
            raise dead
        return steps.result()

    def exited(self) -> ProcessExited | None:
        """The first process of the experiment that is no longer running (a bridge killed on purpose is started
        again under its name before anything else runs), or None."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                return ProcessExited(name, proc.pid, proc.returncode, self.phase, self.work / "logs" / f"{name}.log",
                                     log_tail(self.work / "logs" / f"{name}.log"))
        for name, broker in self.brokers.items():
            if not broker.is_running():
                code = broker._proc.returncode if broker._proc is not None else None
                return ProcessExited(name, self.pids.get(name), code, self.phase, broker.log_path,
                                     broker.log_tail(LOG_TAIL_LINES))
        return None

    async def _watch(self) -> None:
        """Raise :class:`ProcessExited` as soon as a process the experiment started has exited."""
        while True:
            dead = self.exited()
            if dead is not None:
                self.log(f"FAILED: {dead}")
                raise dead
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def _fanout_steps(self, hub_port: int, hub_spec: BrokerSpec, passwords: dict[str, str],
                            brokers: dict[str, MosquittoProcess]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        fp = self.fp
        t_setup = time.monotonic()
        self.phase = "set-up (starting the hub)"
        hub_url, tokens = await self.start_hub(hub_port, hub_spec)
        self.phase = "set-up (registering the clients)"
        await self._register(hub_url, tokens)
        self.log(f"registered {fp.retailers} retailer(s) and {fp.gateways} clients "
                 f"({time.monotonic() - t_setup:.1f} s)")
        if not fp.floor:
            for r in self.retailer_ids:
                self._start_bridge(r, hub_port, passwords[r], brokers[r])
        self.phase = "set-up (the fleet connecting)"
        t_fleet = time.monotonic()
        fleet_ready = await self._connect_fleets(brokers)
        fleet_connect_wall_s = round(time.monotonic() - t_fleet, 3)
        self.log(f"{fp.gateways} gateways connected over {len(self.fleets)} fleet process(es) in "
                 f"{time.monotonic() - t_fleet:.1f} s (slowest fleet's own figure "
                 f"{max(f['connect_s'] for f in fleet_ready):.2f} s)")
        self.pids["experiment"] = os.getpid()
        if fp.floor:
            # The floor first, while no bridge listens on the retailer brokers; then the product on the same ones.
            for i in range(fp.runs):
                self.phase = f"floor run {i + 1}"
                await self._settle()
                self.floor_runs.append(await self._floor_run(brokers, i + 1))
            self.phase = "set-up (starting the bridges)"
            for r in self.retailer_ids:
                self._start_bridge(r, hub_port, passwords[r], brokers[r])
        runs = []
        async with httpx.AsyncClient(base_url=hub_url, timeout=60,
                                     headers={"Authorization": f"Bearer {tokens['dso']}"}) as http:
            for i in range(fp.runs):
                self.phase = f"run {i + 1}"
                await self._settle()
                runs.append(await self._one_run(http, i + 1))
                if fp.timeline:  # after the run's measurement: the view once more, and the bridges' stores
                    rid = runs[-1]["request_id"]
                    self.timeline_parts[rid] = {"view": (await http.get(f"/v1/requests/{rid}")).json(),
                                                "commands": self.stored_commands(rid)}
        self.phase = "the end (stopping)"
        setup = {"setup_s": round(time.monotonic() - t_setup, 3), "hub_url": hub_url, "work_dir": str(self.work),
                 "fleet_processes": len(self.fleets), "fleet_ready": fleet_ready,
                 "fleets_connecting": fp.fleets_connecting, "connect_concurrency": fp.connect_concurrency,
                 "fleet_connect_wall_s": fleet_connect_wall_s}
        return runs, setup

    async def _register(self, hub_url: str, tokens: dict[str, str], *, readings: bool = False) -> None:
        """The retailers and clients only, by default: a fan-out reads no meter readings (``Experiment._register``
        uploads a day of them per client, 500 calls at 100,000 clients)."""
        await super()._register(hub_url, tokens, readings=readings)

    async def _connect_fleets(self, brokers: dict[str, MosquittoProcess]) -> list[dict[str, Any]]:
        """Start every fleet process, then let them connect ``fleets_connecting`` at a time, each given its turn
        (its go file) when an earlier one is connected (its ready file): at most ``fleets_connecting`` x
        ``connect_concurrency`` CONNECTs are in flight across the fleet, however many gateways. Returns each fleet's
        ready file's content."""
        fp = self.fp
        sizes: dict[str, int] = {}
        per_retailer = [self._start_fleets(r, brokers[r], sizes) for r in self.retailer_ids]
        # Round-robin over the retailers, so that the fleets connecting at once load different brokers.
        order = [name for k in range(max(map(len, per_retailer))) for names in per_retailer
                 for name in names[k:k + 1]]
        waiting = list(order)
        connecting: dict[str, float] = {}
        ready: dict[str, dict[str, Any]] = {}
        while waiting or connecting:
            while waiting and len(connecting) < max(1, fp.fleets_connecting):
                name = waiting.pop(0)
                (self.work / f"{name}.go").touch()
                connecting[name] = time.monotonic() + fleet_ready_timeout_s(sizes[name])
            await asyncio.sleep(0.05)
            for name, deadline in list(connecting.items()):
                f = self.work / f"{name}.ready"
                if f.exists():
                    ready[name] = {"file": name, **json.loads(f.read_text())}
                    del connecting[name]
                elif time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not connect its {sizes[name]} gateways in "
                                       f"{fleet_ready_timeout_s(sizes[name]):.0f} s; see "
                                       f"{self.work / 'logs' / (name + '.log')}")
        return [ready[name] for name in self.fleets]

    def _start_bridge(self, r: str, hub_port: int, password: str, broker: MosquittoProcess) -> None:
        """Start retailer ``r``'s bridge processes: ``bridge-{r}``, then its standbys ``bridge-{r}-2`` ... (per
        partition ``bridge-{r}-p{j}``, ``bridge-{r}-p{j}-2`` ... when partitioned)."""
        parts = self.fp.bridge_partitions
        for j in range(parts):
            part = None if parts == 1 else j
            stem = bridge_name(r, 0, part)
            cfg = self.work / f"{stem}.toml"
            hub_login, local_login = partition_logins(r, j)
            settings: dict[str, Any] = {
                "retailer_id": r, "hub_mqtt_port": hub_port,
                "hub_mqtt_password": password if j == 0 else self.partition_passwords[r, j][0],
                "local_mqtt_port": broker.port, "local_mqtt_username": local_login,
                "local_mqtt_password": broker.spec.privileged.password if j == 0 else self.partition_passwords[r, j][1],
                "db_path": str(self.bridge_db(r, part)), "telemetry_store": "none",
                "customers": {c: gateway_of(c) for c in self.clients_of[r]}}
            if parts > 1:
                settings.update(partitions=parts, partition=j, hub_mqtt_username=hub_login)
                db = self.bridge_db(r, part)  # a new store per experiment: one left by another K would be refused
                for old in (db, partition_file(db), db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                    old.unlink(missing_ok=True)
            if self.fp.bridge_instances > 1:
                settings["instance_lock_path"] = str(self.bridge_lock(r, part))
            write_private(cfg, tomli_w.dumps({"bridge": settings}))
            for k in range(self.fp.bridge_instances):
                self._spawn(bridge_name(r, k, part), [sys.executable, "-m", "retailer_bridge.cli", "--log-level",
                                                      "WARNING", "run", "--config", str(cfg)])

    def stored_commands(self, request_id: str) -> dict[str, dict[str, Any]]:
        """The bridges' stored commands of ``request_id`` by client: ``received_at`` and ``first_sent_at`` (read-only;
        the bridges are still running)."""
        parts = self.fp.bridge_partitions
        out: dict[str, dict[str, Any]] = {}
        for r in self.retailer_ids:
            for j in range(parts):
                path = self.bridge_db(r, None if parts == 1 else j)
                if not path.exists():
                    continue
                db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
                try:
                    for cid, received_at, first_sent_at in db.execute(
                            "SELECT client_id, received_at, first_sent_at FROM commands WHERE request_id=?",
                            (request_id,)):
                        out[cid] = {"received_at": received_at, "first_sent_at": first_sent_at}
                finally:
                    db.close()
        return out

    def bridge_lock(self, r: str, partition: int | None = None) -> Path:
        """Retailer ``r``'s (or one of its partitions') bridge instance lock (its holder's pid inside)."""
        return self.work / f"{bridge_name(r, 0, partition)}.lock"

    def bridge_db(self, r: str, partition: int | None = None) -> Path:
        """Retailer ``r``'s (or one of its partitions') bridge store."""
        return self.work / f"{bridge_name(r, 0, partition)}.db"

    def partition_stats(self, request_id: str) -> dict[str, dict[str, int]]:
        """Per partition (by its first process's name): its store's commands of ``request_id``, foreign ones."""
        parts = self.fp.bridge_partitions
        if parts == 1:
            return {}
        return {bridge_name(r, 0, j): partition_counts(self.bridge_db(r, j), request_id, Partition(j, parts))
                for r in self.retailer_ids for j in range(parts)}

    def _kill_active_bridges(self, outcomes: float) -> list[dict[str, Any]]:
        """SIGKILL each retailer's active bridge process, the one holding its instance lock (the hub has received
        ``outcomes`` outcome messages of the run); its standby takes over, and the killed one is started again, as a
        supervisor would, to be the next standby (so that every run has one)."""
        kills: list[dict[str, Any]] = []
        for r in self.retailer_ids:
            pid = holder_pid(self.bridge_lock(r, None if self.fp.bridge_partitions == 1 else 0))
            name = next((n for n, p in self.procs.items() if p.pid == pid and p.poll() is None), None)
            if name is None:
                kills.append({"retailer": r, "killed": None, "hub_outcomes_before": int(outcomes)})
                continue
            proc = self.procs[name]
            at_kill = proc_sample(proc.pid)  # its CPU until now: the process started again in its place counts from 0
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            self.pids.pop(name, None)
            self.log(f"killed {name} (pid {proc.pid}), the active bridge of {r}, with SIGKILL after "
                     f"{outcomes:.0f} outcome messages")
            kills.append({"retailer": r, "killed": name, "pid": proc.pid, "at": time.time(),
                          "hub_outcomes_before": int(outcomes),
                          "cpu_s_at_kill": None if at_kill is None else at_kill["cpu_s"]})
            self._spawn(name, list(proc.args))  # type: ignore[arg-type]
        return kills

    def _start_fleets(self, r: str, broker: MosquittoProcess, sizes: dict[str, int]) -> list[str]:
        """Start retailer ``r``'s fleet processes, each waiting for its go file before it connects; their names
        (``sizes`` gets each one's number of gateways)."""
        clients = self.clients_of[r]
        n = max(1, math.ceil(len(clients) / self.fp.per_fleet))
        names = []
        for k in range(n):
            name = f"fleet-{r}-{k + 1}"
            creds = self.work / f"{name}.creds.json"
            mine = clients[k::n]
            write_private(creds, json.dumps({gateway_of(c): {"client_id": c, "password": self.gateway_passwords[
                gateway_of(c)]} for c in mine}))
            for old in (self.work / f"{name}.ready", self.work / f"{name}.stats.json", self.work / f"{name}.go"):
                old.unlink(missing_ok=True)
            sizes[name] = len(mine)
            self._spawn(name, [sys.executable, "-m", "sim.fleet", "--port", str(broker.port), "--credentials",
                               str(creds), "--ready-file", str(self.work / f"{name}.ready"), "--stats-file",
                               str(self.work / f"{name}.stats.json"), "--go-file", str(self.work / f"{name}.go"),
                               "--connect-concurrency", str(self.fp.connect_concurrency),
                               "--connect-timeout-s", str(gateway_connect_timeout_s(len(mine)))])
            self.fleets.append(name)
            names.append(name)
        return names

    async def _settle(self) -> None:
        """Wait until every process is idle: below 5 % of a core together over half a second."""
        deadline = time.monotonic() + self.fp.settle_s
        before = self._cpu()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            now = self._cpu()
            busy = sum(now[k] - before.get(k, now[k]) for k in now)
            before = now
            if busy < IDLE_CPU_S + IDLE_CPU_S_PER_CLIENT * len(self.client_ids):
                return
        self.log(f"processes still busy after {self.fp.settle_s:g} s; starting the run anyway")

    def _cpu(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            s = proc_sample(pid)
            if s is not None:
                out[name] = s["cpu_s"]
        return out

    def _posted_order(self, n: int) -> list[str]:
        """The clients as run ``n`` lists them in its POST: in id order, or shuffled (seeded by ``n``)."""
        client_ids = list(self.client_ids)
        if self.fp.shuffled:
            random.Random(n).shuffle(client_ids)
        return client_ids

    async def _one_run(self, http: httpx.AsyncClient, n: int) -> dict[str, Any]:
        fp = self.fp
        before = await self._metrics(http)
        finished_before, outcomes_before = before["finished"], before["outcomes"]
        cpu_before = self._cpu()
        load_before = loadavg()
        start = datetime.now(UTC) + timedelta(minutes=1)  # announced before it takes effect
        body = {"client_ids": self._posted_order(n), "start": start.isoformat(), "duration_s": 600,
                "power_limit_kw": 2.0}
        t_post = time.time()
        resp = await http.post("/v1/emergencies", json=body)
        post_ms = round((time.time() - t_post) * 1000, 3)
        resp.raise_for_status()
        request_id = resp.json()["request_id"]
        self.log(f"run {n}/{fp.runs}: {request_id} accepted in {post_ms:.1f} ms")
        kills: list[dict[str, Any]] | None = None
        done_at = None
        last_progress = last_check = time.monotonic()
        while time.time() - t_post < fp.timeout_s:
            await asyncio.sleep(KILL_POLL_S if fp.kill_bridge_after_outcomes is not None else METRICS_POLL_S)
            metrics = await self._metrics(http)
            if (kills is None and fp.kill_bridge_after_outcomes is not None
                    and metrics["outcomes"] - outcomes_before >= fp.kill_bridge_after_outcomes):
                kills = self._kill_active_bridges(metrics["outcomes"] - outcomes_before)
            if metrics["finished"] > finished_before:
                done_at = time.time()
                break
            check_every_s = CHECK_INTERVAL_S * max(1.0, len(self.client_ids) / CHECK_CLIENTS)
            if len(self.client_ids) <= VIEW_CHECK_MAX_CLIENTS and time.monotonic() - last_check >= check_every_s:
                # The hub's counter is the cheap signal; its request view, read now and then, the sure one.
                last_check = time.monotonic()
                if (await http.get(f"/v1/requests/{request_id}")).json()["state"] in ENDED:
                    done_at = time.time()
                    break
            if time.monotonic() - last_progress >= fp.progress_interval_s:
                last_progress = time.monotonic()
                self.log(f"run {n}/{fp.runs}: {time.time() - t_post:.1f} s, the hub has received "
                         f"{metrics['outcomes'] - outcomes_before:.0f} outcome messages")
        cpu_after = self._cpu()
        view = (await http.get(f"/v1/requests/{request_id}")).json()
        times = []
        states: dict[str, int] = {}
        for c in view["clients"].values():
            states[c["state"]] = states.get(c["state"], 0) + 1
            if c["state"] == "executed":
                times.append(datetime.fromisoformat(c["updated_at"]).timestamp() - t_post)
        completed_at = view.get("completed_at")
        run = {"run": n, "request_id": request_id, "clients": len(self.client_ids), "post_ms": post_ms,
               "state": view["state"], "states": states, "executed": states.get("executed", 0),
               "other_terminal": sum(v for k, v in states.items() if k not in ("executed", "pending", "sent",
                                                                              "delivered")),
               "hub_completed_s": None if completed_at is None else round(
                   datetime.fromisoformat(completed_at).timestamp() - t_post, 3),
               "observed_done_s": None if done_at is None else round(done_at - t_post, 3),
               "executed_s": sorted(round(t, 4) for t in times), "post_at": t_post, "trace": view.get("trace", {}),
               "cpu_s": cpu_spent(cpu_before, cpu_after, kills or []),
               "loadavg_1m": load_before}
        if kills is not None:
            run["bridge_kills"] = kills
        if fp.bridge_partitions > 1:
            run["partitions"] = self.partition_stats(request_id)
        for q in QUANTILES:
            run[f"t{q}_s"] = time_to_fraction(times, len(self.client_ids), q)
        run["within_target"] = run["t100_s"] is not None and run["t100_s"] <= TARGET_S
        run["cpu_ms_per_client"] = cpu_per_client(run["cpu_s"], len(self.client_ids))
        self.log(f"run {n}/{fp.runs}: {run['executed']}/{len(self.client_ids)} executed, state {run['state']}; "
                 + ", ".join(f"{q} % by {run[f't{q}_s']} s" for q in QUANTILES)
                 + f"; CPU s {json.dumps(run['cpu_s'])}")
        return run

    async def _floor_run(self, brokers: dict[str, MosquittoProcess], n: int) -> dict[str, Any]:
        """The bare MQTT floor: one QoS 1 command to every gateway and one QoS 1 acknowledgement back, timed."""
        fp = self.fp
        tag = f"{FLOOR_PREFIX.decode()}{n}:"
        acked: dict[str, float] = {}
        duplicates = 0
        done = asyncio.Event()

        async def on_ack(topic: str, payload: bytes, retained: bool) -> None:
            nonlocal duplicates
            text = payload.decode(errors="replace")
            if not text.startswith(tag):
                return
            gateway = text[len(tag):]
            if gateway in acked:
                duplicates += 1
                return
            acked[gateway] = time.time()
            if len(acked) == len(self.client_ids):
                done.set()

        links = [MqttLink(MqttEndpoint("127.0.0.1", brokers[r].port, "floor", self.floor_password),
                          client_id=f"floor-{n}", subscriptions=[topics.all_up_msg("gateways")], handler=on_ack,
                          clean_start=True, session_expiry_s=0) for r in self.retailer_ids]
        async with contextlib.AsyncExitStack() as stack:
            for link in links:
                await stack.enter_async_context(link)
            await asyncio.sleep(0.2)  # the SUBACKs (gmqtt's subscribe does not wait for them)
            cpu_before = self._cpu()
            load_before = loadavg()
            t0 = time.time()

            async def send(link: MqttLink, r: str) -> None:
                for c in self.clients_of[r]:
                    gw = gateway_of(c)
                    await link.publish(topics.down("gateways", gw), f"{tag}{gw}".encode(), wait_s=30.0)

            await asyncio.gather(*(send(link, r) for link, r in zip(links, self.retailer_ids, strict=True)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), fp.timeout_s)
            cpu_after = self._cpu()
        times = sorted(at - t0 for at in acked.values())
        cpu = {k: round(cpu_after[k] - cpu_before.get(k, 0.0), 3) for k in cpu_after}
        run: dict[str, Any] = {"run": n, "clients": len(self.client_ids), "acked": len(acked),
                               "duplicates": duplicates,
                               "t_first_s": round(times[0], 4) if times else None, "cpu_s": cpu,
                               "loadavg_1m": load_before,
                               "cpu_ms_per_client": cpu_per_client(cpu, len(self.client_ids))}
        for q in QUANTILES:
            run[f"t{q}_s"] = time_to_fraction(times, len(self.client_ids), q)
        self.log(f"floor {n}/{fp.runs}: {len(acked)}/{len(self.client_ids)} acknowledged; "
                 + ", ".join(f"{q} % by {run[f't{q}_s']} s" for q in QUANTILES)
                 + f"; CPU ms per client {json.dumps(run['cpu_ms_per_client']['group'])}")
        return run

    async def _metrics(self, http: httpx.AsyncClient) -> dict[str, float]:
        text = (await http.get("/metrics")).text
        out = {"finished": 0.0, "outcomes": 0.0}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "mhp_requests_finished_total" and s.labels.get("type") == "emergency":
                    out["finished"] += s.value
                elif s.name == "mhp_mqtt_received_total" and s.labels.get("type") in ("outcome", "outcomes"):
                    out["outcomes"] += s.value
        return out

    def _results(self, runs: list[dict[str, Any]], stats: list[dict[str, Any]], setup: dict[str, Any],
                 wall_s: float) -> dict[str, Any]:
        gateways = [gateway_of(c) for c in self.client_ids]
        rec = reconcile({r["request_id"]: gateways for r in runs}, stats)
        for r in runs:
            got = rec[r["request_id"]]
            first = [at - r["post_at"] for at in got.pop("first_at")]
            r.update(missing_commands=got["missing"], missing_gateways=got["missing_gateways"],
                     duplicate_commands=got["duplicates"], gateway_first_p50_s=pct(first, 50),
                     gateway_first_max_s=round(max(first), 3) if first else None,
                     gateway_first_s={f"p{q}": pct(first, q) for q in QUANTILES})
        if self.fp.timeline:
            answered: dict[str, dict[str, float]] = {}
            for st in stats:
                for request_id, per_gateway in st.get("answered", {}).items():
                    answered.setdefault(request_id, {}).update(per_gateway)
            for r in runs:
                parts = self.timeline_parts.get(r["request_id"], {})
                r["timeline"] = run_timeline(
                    r["post_at"], r["post_ms"], parts.get("view", {}), parts.get("commands", {}),
                    {c: gateway_of(c) for c in self.client_ids},
                    {g: seen for st in stats for g, seen in st.get("commands", {}).get(r["request_id"], {}).items()},
                    answered.get(r["request_id"], {}), r["observed_done_s"])
        t100 = [r["t100_s"] for r in runs if r["t100_s"] is not None]
        summary = {"runs": len(runs), "all_executed_every_run": all(r["executed"] == r["clients"] for r in runs),
                   "missing_commands": sum(r["missing_commands"] for r in runs),
                   "duplicate_commands": sum(r["duplicate_commands"] for r in runs),
                   "t100_s_best": min(t100) if t100 else None, "t100_s_worst": max(t100) if len(t100) == len(runs)
                   and t100 else None, "within_target_every_run": bool(runs) and all(r["within_target"] for r in runs),
                   "target_s": TARGET_S}
        if self.floor_runs:
            ratios = floor_ratios(runs, self.floor_runs)
            for r, x in zip(runs, ratios["ratios"], strict=True):
                r["floor_ratio"] = x
            floor_t = [f["t100_s"] for f in self.floor_runs if f["t100_s"] is not None]
            summary["floor"] = {"runs": len(self.floor_runs),
                                "all_acked_every_run": all(f["acked"] == f["clients"] for f in self.floor_runs),
                                "t100_s_best": min(floor_t) if floor_t else None,
                                "t100_s_worst": max(floor_t) if floor_t else None,
                                "t100_s_median": ratios["floor_t100_s_median"],
                                "ratio_best": ratios["ratio_best"], "ratio_worst": ratios["ratio_worst"]}
        return {"experiment": "fanout", "params": {k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(self.fp).items()},
                "machine": machine(), "wall_s": wall_s, "setup": setup, "summary": summary, "runs": runs,
                "floor_runs": self.floor_runs,
                **({"floor_timeline": floor_span(self.floor_runs)} if self.fp.timeline and self.floor_runs else {}),
                "files": {"runs_csv": "fanout.csv", "clients_csv": "fanout_clients.csv", "plots": ["fanout.png"],
                          "report": "report.md"}}

    def _run_via(self) -> dict[str, Any]:
        """The same fan-out through the hub's OpenADR 3 door, into ``OUT/via-openadr3``."""
        if self.fp.via != "openadr3":
            raise ValueError(f"unknown door {self.fp.via!r} (known: openadr3)")
        from sim.experiment.via_openadr3 import run_openadr3_fanout

        vens = self.fp.vens or self.fp.gateways
        self.log(f"via openadr3: {vens} VENs, {self.fp.runs} run(s)")
        result = run_openadr3_fanout(vens, self.out / "via-openadr3", self.fp.runs, self.fp.timeout_s)
        return {"name": "openadr3", "dir": "via-openadr3", "result": result}

    def _run_peer(self) -> dict[str, Any]:
        if self.fp.peer != "openleadr":
            raise ValueError(f"unknown peer {self.fp.peer!r} (known: openleadr)")
        try:
            from sim.experiment.peer_openleadr import run_openleadr_fanout
        except ImportError as exc:
            self.log(f"peer openleadr not run: {exc}")
            return {"name": "openleadr", "error": f"cannot import sim.experiment.peer_openleadr: {exc}"}
        self.log(f"peer openleadr: {self.fp.gateways} VENs, {self.fp.runs} run(s)")
        result: dict[str, Any] = run_openleadr_fanout(self.fp.gateways, self.out / "peer-openleadr", self.fp.runs)
        return {"name": "openleadr", "dir": "peer-openleadr", "result": result}


def via_section(results: dict[str, Any]) -> list[str]:
    """The report's section of ``--via openadr3``: the same emergency through the standard door."""
    via = results.get("via")
    if not via:
        return []
    lines = ["## Through the standard door: OpenADR 3 VENs on the hub's MQTT notifier", ""]
    summary = via.get("result", {}).get("summary")
    if summary is None:
        return [*lines, f"not run: {via.get('error')}", ""]
    lines += ["| run | VENs | notified 50/90/99/100 % (s) | reports accepted 50/90/99/100 % (s) | hub CPU s |",
              "|---|---|---|---|---|"]
    for r in via["result"]["runs"]:
        lines.append(f"| {r['run']} | {r['vens']} | " + " / ".join(_fmt(r[f'notified_t{q}_s']) for q in QUANTILES)
                     + " | " + " / ".join(_fmt(r[f'reported_t{q}_s']) for q in QUANTILES)
                     + f" | {_fmt(r['cpu_s'].get('hub'))} |")
    return [*lines, "", f"Its results: `{via.get('dir')}/results.json`.", ""]


def peer_ack_times(out: Path, results: dict[str, Any]) -> dict[str, list[float]]:
    """The peer's acknowledgement times per run (seconds, sorted) from its ``peer.csv``, to draw next to ours;
    empty without a peer run. A VEN that never answered has no time: its run's line ends below 1."""
    peer = results.get("peer") or {}
    path = out / str(peer.get("dir", "")) / "peer.csv"
    if not peer.get("dir") or not path.exists():
        return {}
    runs: dict[str, list[float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("ack_ms"):
                runs.setdefault(row["run"], []).append(float(row["ack_ms"]) / 1000)
    return {run: sorted(v) for run, v in runs.items()}


def write_all(out: Path, results: dict[str, Any]) -> None:
    """``results.json``, the two CSVs, the plot and ``report.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    with (out / "fanout.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUN_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(results["runs"])
    if results.get("floor_runs"):
        with (out / "floor.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FLOOR_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(results["floor_runs"])
    with (out / "fanout_clients.csv").open("w", newline="") as f:
        w2 = csv.writer(f)
        w2.writerow(["run", "rank", "executed_s"])
        for r in results["runs"]:
            w2.writerows((r["run"], k + 1, t) for k, t in enumerate(r["executed_s"]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results["runs"]:
        ts = r["executed_s"]
        if ts:
            ax.step([0.0, *ts], [0.0, *[(k + 1) / r["clients"] for k in range(len(ts))]], where="post",
                    label=f"run {r['run']} ({r['executed']}/{r['clients']})")
    vens = int((results.get("peer") or {}).get("result", {}).get("n", 0))
    peer_runs = peer_ack_times(out, results)
    for run, acks_s in peer_runs.items():
        n = max(vens, len(acks_s))
        ax.step([0.0, *acks_s], [0.0, *[(k + 1) / n for k in range(len(acks_s))]], where="post",
                linestyle=":", label=f"OpenLEADR run {run} ({len(acks_s)}/{n})")
    ax.axvline(TARGET_S, color="grey", linestyle="--", linewidth=1, label=f"target {TARGET_S:g} s")
    ax.set_xlabel("seconds since the DSO's POST" + (" (OpenLEADR: since the event was created)" if peer_runs else ""))
    ax.set_ylabel("fraction of clients executed (hub)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Emergency to {results['params']['gateways']} gateways, {results['params']['retailers']} "
                 "retailer(s)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "fanout.png", dpi=110)
    plt.close(fig)
    (out / "report.md").write_text(markdown(results))


GROUPS = ("product", "brokers", "fleet", "experiment")


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def markdown(results: dict[str, Any]) -> str:
    """The short human-readable report."""
    p, m, s = results["params"], results["machine"], results["summary"]
    setup = results["setup"]
    lines = [
        "# Experiment: emergency fan-out", "",
        f"One emergency to {p['gateways']} simulated gateways (real MQTT connections, "
        f"{setup.get('fleet_processes', '-')} fleet processes) through hub → hub broker → {p['retailers']} "
        f"bridge(s) → retailer broker(s) → gateways and back; {s['runs']} run(s). Machine: {m['cpus']} CPUs, "
        f"{m['cpu_model']}, {m['memory']}. Target (DESIGN.md): all executed in ≤ {s['target_s']:g} s.", "",
        f"Fleet connect time per process (s): {setup.get('fleet_connect_s', {})}.", "",
        f"Every client executed in every run: {'yes' if s['all_executed_every_run'] else 'NO'}; commands missing "
        f"{s['missing_commands']}, duplicated {s['duplicate_commands']}; within target every run: "
        f"{'yes' if s['within_target_every_run'] else 'NO'}.", "",
        "| run | POST→202 ms | executed | 50 % s | 90 % s | 99 % s | 100 % s | hub completed s | seen done s "
        "| gateways got it p50 / max s | missing | duplicates | state | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(f"| {r['run']} | {_fmt(r['post_ms'])} | {r['executed']}/{r['clients']} | {_fmt(r['t50_s'])} | "
                     f"{_fmt(r['t90_s'])} | {_fmt(r['t99_s'])} | {_fmt(r['t100_s'])} | {_fmt(r['hub_completed_s'])} "
                     f"| {_fmt(r['observed_done_s'])} | {_fmt(r['gateway_first_p50_s'])} / "
                     f"{_fmt(r['gateway_first_max_s'])} | {r['missing_commands']} | {r['duplicate_commands']} | "
                     f"{r['state']} | {_fmt(r.get('loadavg_1m'))} |")
    names = sorted({k for r in results["runs"] for k in r["cpu_s"]})
    lines += ["", "## CPU seconds per process during each run (/proc)", "",
              "| run | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in results["runs"]:
        lines.append(f"| {r['run']} | " + " | ".join(_fmt(r["cpu_s"].get(k)) for k in names) + " |")
    lines += ["", "Times are from the DSO's POST to each client's last update in the hub's request view "
              "(`executed`); \"seen done\" is when this process saw the request end on the hub's `/metrics`. "
              "Plot: `fanout.png`; per-client times: `fanout_clients.csv`. \"load avg\" is the machine's 1-minute "
              "load average at the POST: above the number of CPUs, other work shared them and times stretch.", ""]
    lines += ["## CPU milliseconds per client (per group; `product` = hub + bridges)", "",
              "| run | " + " | ".join(GROUPS) + " | per process |", "|---|" + "---|" * (len(GROUPS) + 1)]
    for r in results["runs"]:
        c = r.get("cpu_ms_per_client", {})
        lines.append(f"| {r['run']} | " + " | ".join(_fmt(c.get("group", {}).get(g)) for g in GROUPS)
                     + f" | {_fmt(c.get('process'))} |")
    if any("partitions" in r for r in results["runs"]):
        lines += ["", f"## Bridge partitions ({p.get('bridge_partitions')} per retailer, by gateway)", "",
                  "Commands of each run's request in each partition's store, and those for a gateway the partition "
                  "does not own (0: each handled only its own); CPU per process is in the tables above.", "",
                  "| run | partition | commands | foreign |", "|---|---|---|---|"]
        for r in results["runs"]:
            lines += [f"| {r['run']} | {name} | {c['commands']} | {c['foreign']} |"
                      for name, c in r.get("partitions", {}).items()]
    floor_runs = results.get("floor_runs") or []
    if floor_runs:
        fs = s["floor"]
        lines += ["", "## The bare MQTT floor (same brokers, N and fleet processes; before the bridges started)", "",
                  f"One QoS 1 command to every gateway and one QoS 1 acknowledgement back, no application. Floor "
                  f"median to 100 %: {_fmt(fs['t100_s_median'])} s; our 100 % over it: "
                  f"{_fmt(fs['ratio_best'])}x (best) to {_fmt(fs['ratio_worst'])}x (worst); per run: "
                  + ", ".join(_fmt(r.get("floor_ratio")) for r in results["runs"]) + ".", "",
                  "| floor run | acked | 50 % s | 90 % s | 99 % s | 100 % s | CPU ms/client " + " | ".join(GROUPS)
                  + " | load avg |", "|---|---|---|---|---|---|" + "---|" * len(GROUPS) + "---|"]
        for f in floor_runs:
            g = f["cpu_ms_per_client"]["group"]
            lines.append(f"| {f['run']} | {f['acked']}/{f['clients']} | {_fmt(f['t50_s'])} | {_fmt(f['t90_s'])} | "
                         f"{_fmt(f['t99_s'])} | {_fmt(f['t100_s'])} | " + " | ".join(_fmt(g.get(k)) for k in GROUPS)
                         + f" | {_fmt(f.get('loadavg_1m'))} |")
    lines.append("")
    lines += timeline_markdown([{"run": r["run"], "stages": r["timeline"]} for r in results["runs"] if "timeline" in r],
                               results.get("floor_timeline"))
    peer = results.get("peer")
    if peer:
        lines += ["## Peer: " + peer["name"], ""]
        frac = peer.get("result", {}).get("summary", {}).get("time_to_fraction_ms", {})
        if frac:
            lines += [f"The same emergency to {p['gateways']} VENs: 50 / 90 / 99 / 100 % acknowledged after "
                      + " / ".join(_fmt(frac.get(q)) for q in ("0.5", "0.9", "0.99", "1.0"))
                      + f" ms; its own report: `{peer.get('dir')}/report.md`.", ""]
        lines += ["```", json.dumps(peer.get("result", {}).get("summary", peer), indent=1)[:4000], "```", ""]
    lines += via_section(results)
    return "\n".join(lines)


def run(fp: FanoutParams) -> dict[str, Any]:
    """Run the experiment; returns ``results.json``'s content."""
    return FanoutExperiment(fp).run()
