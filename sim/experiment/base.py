"""``mhp-sim experiment base``: the paper's base setup, every part a real process, measured from the outside.

Starts the hub broker (Mosquitto from ``broker_config``), the hub (``cloud-hub serve``; its storage embedded SQLite,
or ``storage="hbase"``: the HBase Thrift test double ``sim.hbase_double`` as a process of its own), one RP
simulator per retailer, registers the retailers and clients over HTTP (and uploads one day of meter readings
per client for the billing requests), runs the DSO simulator in one or more processes of its own, samples CPU
time, memory and disk I/O of every process (``/proc/<pid>/stat``, ``status``, ``io``) and of every disk
(``/proc/diskstats``, iostat's source) once a second, stops everything and writes the results
(``sim.experiment.report``).

With ``fault="hbase"`` a Thrift gateway process (``sim.experiment.thrift_gateway``, a TCP relay) stands between the
hub and the double, as HBase's stateless Thrift gateway stands in front of the cluster; that process is killed
with SIGKILL and started again. ``fault="hbase-stall"`` stops the double itself (SIGSTOP) for ``fault_down_s``
and lets it go on (SIGCONT), like a region server hung in a long garbage collection: nothing is lost, every call
waits or times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

import httpx
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from broker_config.launcher import BrokerSpec, Identity, MosquittoProcess, die_with_parent, generate_password
from broker_config.render import GENERATED_PASSWORD_ITERATIONS
from cloud_hub.tokens import TokenBook
from mhp_wire.secretfile import write_private
from sim.experiment import report
from sim.experiment.dso_sim import BILLING_PERIOD_START, TYPES
from sim.stack.stack import free_port

_CLK_TCK = os.sysconf("SC_CLK_TCK")
RP_PROCESSES = 4
"""At most this many RP simulator processes (on 2 cores, 100 processes would measure the scheduler)."""
FAULT_FINISH_S = 90.0
"""How long an injected fault may go on after the DSO simulator is done (its waits for readiness are bounded too)."""


@dataclass
class BaseParams:
    """Parameters of one base-setup run."""

    out: Path
    clients: int = 100
    retailers: int = 1
    duration_s: float = 60.0
    warmup_s: float = 5.0
    rate_per_min: float = 30.0
    rates_per_min: dict[str, float] = field(default_factory=dict)
    """Per type; a type missing here runs at ``rate_per_min``."""
    fractions: dict[str, float] = field(default_factory=lambda: {
        "emergency": 0.10, "load_reduction": 0.10, "load_shift": 0.10, "billing": 0.30})
    rp_delay_min_ms: float = 100.0
    rp_delay_max_ms: float = 110.0
    rp_outcomes: str = "per-client"
    """How the RP simulators answer: ``"per-client"`` (one ``outcome`` message per client, the paper's simulator)
    or ``"batches"`` (``outcomes`` messages, as the real bridge; ``docs/decisions.md``, "The RP simulator answers
    in batches in the rate experiment")."""
    drain_s: float = 30.0
    poll_interval_s: float = 0.02
    progress_interval_s: float = 5.0
    seed: int = 1
    fault: str = ""
    """``""`` (none), ``"hub"`` (``kill -9`` of the hub, restarted at once), ``"storage"`` (the hub's SQLite
    database locked by this process for ``fault_down_s``), ``"hbase"`` (``kill -9`` of the Thrift gateway in front
    of the HBase double, restarted at once) or ``"hbase-stall"`` (the double stopped for ``fault_down_s``)."""
    fault_at_s: float = 20.0
    """When the fault is injected, in seconds after the DSO simulator was started."""
    fault_down_s: float = 5.0
    retry_s: float = 0.5
    """The DSO simulator's pause before re-sending a POST that got no answer or a 5xx (same Idempotency-Key)."""
    storage: str = "sqlite"
    """``sqlite`` (the hub's embedded store) or ``hbase`` (the Thrift test double as its own process)."""
    dso_workers: int = 1
    """DSO simulator processes sharing the schedule (``seq`` modulo ``dso_workers``)."""
    dso_follow: str = "poll"
    """How the DSO simulator learns that a request ended: ``"poll"`` (the paper's) or ``"feed"`` (the change feed,
    one GET per request; ``docs/decisions.md``, "The rate experiment's simulators answer and follow as the real
    parties do")."""
    first_poll_s: float | None = None
    """The DSO simulator's wait before the first GET of an accepted request; ``None``: ``poll_interval_s``."""
    lag_bound_ms: float = 50.0
    """A run whose send-lag p99 exceeds this was paced by the generator, not the hub: flagged invalid."""
    sample_interval_s: float = 1.0
    """How often CPU, memory and disk counters are read from /proc."""

    def rates(self) -> dict[str, float]:
        """The rate of each type, per minute."""
        return {t: float(self.rates_per_min.get(t, self.rate_per_min)) for t in TYPES}


def proc_sample(pid: int) -> dict[str, float] | None:
    """CPU seconds (user + system), current / peak resident memory (MiB) and bytes read from / written to storage
    (``read_bytes`` / ``write_bytes`` of ``/proc/<pid>/io``: what reached the block layer, not the page cache) of a
    process, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, IndexError):
        return None
    io: dict[str, int] = {}
    with contextlib.suppress(OSError):  # another user's process (not ours) has no readable io file
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            key, _, value = line.partition(":")
            io[key] = int(value)
    mem = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            mem[key] = int(value.split()[0]) / 1024
    return {"cpu_s": (int(stat[11]) + int(stat[12])) / _CLK_TCK, "rss_mib": round(mem.get("VmRSS", 0.0), 2),
            "max_rss_mib": round(mem.get("VmHWM", 0.0), 2), "read_bytes": io.get("read_bytes", 0),
            "write_bytes": io.get("write_bytes", 0)}


def disk_sample() -> dict[str, dict[str, int]]:
    """Bytes read and written so far per physical disk (``/proc/diskstats``, sectors of 512 bytes; devices with a
    ``/sys/block/<name>/device``, so not loop, zram or partitions)."""
    out: dict[str, dict[str, int]] = {}
    try:
        lines = Path("/proc/diskstats").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        f = line.split()
        if len(f) >= 10 and Path(f"/sys/block/{f[2]}/device").exists():
            out[f[2]] = {"read_bytes": int(f[5]) * 512, "write_bytes": int(f[9]) * 512}
    return out


def machine() -> dict[str, Any]:
    """What the run ran on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = ""
    try:
        mem_total = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except (OSError, IndexError):
        pass
    return {"hostname": platform.node(), "cpus": os.cpu_count(), "cpu_model": model, "memory": mem_total,
            "kernel": platform.release(), "python": platform.python_version()}


class Experiment:
    """One run of the base setup; :meth:`run` does everything and returns ``results.json``'s content."""

    def __init__(self, p: BaseParams) -> None:
        self.p = p
        self.out = p.out.resolve()
        self.work = self.out / "run"
        self.retailer_ids = [f"r{i + 1}" for i in range(p.retailers)]
        self.client_ids = [f"client-{i + 1:05d}" for i in range(p.clients)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self.samples: list[dict[str, Any]] = []
        self.disk_samples: list[dict[str, Any]] = []
        self.hbase_port = 0
        """The HBase test double's port (``storage="hbase"``)."""
        self.gateway_port = 0
        """The Thrift gateway relay's port in front of the double (``fault="hbase"``)."""
        self.broker: MosquittoProcess | None = None
        """The hub broker, while the run lasts (``fault="broker"`` kills and restarts it)."""
        self.storage_settings: dict[str, Any] = {}
        """The hub's storage settings (empty: the embedded default)."""
        self.pids: dict[str, int] = {}
        self.fault_log: dict[str, Any] = {}
        """What the fault injection did and measured (wall-clock times, durations); empty without a fault."""
        self.sample_t0 = 0.0
        """``time.monotonic()`` of the run's time 0, the time line of :attr:`samples`."""

    def log(self, text: str) -> None:
        """A progress line."""
        print(f"[experiment] {text}", flush=True)

    def _spawn(self, name: str, argv: list[str], *, inherit_stdout: bool = False) -> subprocess.Popen[bytes]:
        logf = (self.work / "logs" / f"{name}.log").open("ab")
        self._logs.append(logf)
        proc = subprocess.Popen(argv, stdout=None if inherit_stdout else logf, stderr=logf, cwd=self.work,
                                preexec_fn=die_with_parent())
        self.procs[name] = proc
        self.pids[name] = proc.pid
        return proc

    def run(self) -> dict[str, Any]:
        """Start, measure, stop, write; returns the results."""
        p = self.p
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        passwords = {r: generate_password() for r in self.retailer_ids}
        spec = self._broker_spec(passwords)
        started = time.time()
        self.log(f"base setup: {p.clients} clients, {p.retailers} retailer(s), {p.duration_s:g} s (+{p.warmup_s:g} s "
                 f"warm-up), rates/min {p.rates()}, RP delay [{p.rp_delay_min_ms:g}, {p.rp_delay_max_ms:g}) ms")
        try:
            with MosquittoProcess(spec) as broker:
                self.broker = broker
                if broker.pid is not None:
                    self.pids["broker"] = broker.pid
                try:
                    results_raw = asyncio.run(self._run_async(broker.port, spec, passwords))
                finally:
                    self._stop_all()  # before the broker, so that nobody logs a lost connection
        finally:
            self._stop_all()
        rp_stats = {}
        for r in self.retailer_ids:
            path = self.work / f"rp-{r}.stats.json"
            rp_stats[r] = json.loads(path.read_text()) if path.exists() else {"error": "no stats written"}
        records = report.read_records(self.work / "requests.jsonl")
        params = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(p).items()}, "rates_per_min": p.rates()}
        return report.write_all(self.out, params=params, machine=machine(), records=records, rp_stats=rp_stats,
                                samples=self.samples, procs=results_raw["procs"],
                                wall_s=round(time.time() - started, 3), setup=results_raw["setup"],
                                generator=results_raw["generator"], hub_counters=results_raw["hub_counters"],
                                disk_samples=self.disk_samples)

    def _broker_spec(self, passwords: dict[str, str]) -> BrokerSpec:
        """The hub broker: the hub's identity and one per retailer."""
        return BrokerSpec(kind="hub", port=free_port(), data_dir=self.work / "broker",
                          privileged=Identity("hub", generate_password()),
                          parties=[Identity(r, pw) for r, pw in passwords.items()], use_username_as_clientid=True,
                          password_iterations=GENERATED_PASSWORD_ITERATIONS)  # every password is generated

    def _hub_config(self, name: str, broker_port: int, identity: Identity, tokens_file: Path,
                    **extra: Any) -> tuple[Path, str]:
        """Write the TOML settings of one hub process ``name``; returns the file and the hub's URL."""
        http_port = free_port()
        cfg = self.work / f"{name}.toml"
        write_private(cfg, tomli_w.dumps({"hub": {
            "http_host": "127.0.0.1", "http_port": http_port, "db_path": str(self.work / "hub.db"),
            "tokens_file": str(tokens_file), "mqtt_host": "127.0.0.1", "mqtt_port": broker_port,
            "mqtt_username": identity.username, "mqtt_password": identity.password,
            # The experiment measures the platform, not its abuse limits: lift them far above the offered load.
            "rate_limit_per_s": 1_000_000.0, "rate_limit_burst": 1_000_000,
            "mqtt_rate_limit_per_s": 1_000_000.0, "mqtt_rate_limit_burst": 1_000_000, **self.storage_settings,
            **extra}}))
        return cfg, f"http://127.0.0.1:{http_port}"

    def _spawn_hub(self, name: str, cfg: Path) -> subprocess.Popen[bytes]:
        """Start ``cloud-hub serve`` as process ``name``."""
        return self._spawn(name, [sys.executable, "-m", "cloud_hub.cli", "--log-level", "WARNING", "serve",
                                  "--config", str(cfg)])

    async def _start_hub(self, broker_port: int, spec: BrokerSpec, tokens_file: Path) -> str:
        """Start the hub and wait until it is ready; returns the URL the DSO simulator uses."""
        hub_cfg, hub_url = self._hub_config("hub", broker_port, spec.privileged, tokens_file)
        self._spawn_hub("hub", hub_cfg)
        t0 = time.monotonic()
        await self._wait_ready(hub_url)
        self.log(f"hub ready at {hub_url} ({time.monotonic() - t0:.1f} s)")
        return hub_url

    async def _run_async(self, broker_port: int, spec: BrokerSpec, passwords: dict[str, str]) -> dict[str, Any]:
        p = self.p
        t_setup = time.monotonic()
        hub_url, tokens = await self.start_hub(broker_port, spec)
        await self._register(hub_url, tokens)
        setup_s = round(time.monotonic() - t_setup, 3)
        self.log(f"registered {p.retailers} retailer(s), {p.clients} clients, uploaded one day of readings each "
                 f"({setup_s:.1f} s)")
        ready = self._spawn_rp_sims(broker_port, passwords)
        await self._wait_files(ready, "RP simulator")
        await self._wait_online(hub_url, tokens)
        self.log(f"{p.retailers} RP simulator(s) online; starting the DSO simulator")
        dso_cfg = self.work / "dso.json"
        write_private(dso_cfg, json.dumps({
            "hub_url": hub_url, "token": tokens["dso"], "clients": self.client_ids, "rates_per_min": p.rates(),
            "fractions": p.fractions, "duration_s": p.duration_s, "warmup_s": p.warmup_s, "drain_s": p.drain_s,
            "follow": p.dso_follow, "poll_interval_s": p.poll_interval_s,
            "first_poll_s": p.first_poll_s if p.first_poll_s is not None else p.poll_interval_s,
            "lag_bound_ms": p.lag_bound_ms, "workers": p.dso_workers,
            "progress_interval_s": p.progress_interval_s, "seed": p.seed, "retry_s": p.retry_s}))
        names = ["dso-sim"] if p.dso_workers == 1 else [f"dso-sim-{i + 1}" for i in range(p.dso_workers)]
        dsos = {name: self._spawn(name, [sys.executable, "-m", "sim.experiment.dso_sim", "--config", str(dso_cfg),
                                         "--worker", str(i), "--out", str(self.work / f"{name}.requests.jsonl"),
                                         "--stats-file", str(self.work / f"{name}.stats.json")], inherit_stdout=True)
                for i, name in enumerate(names)}
        self.pids["experiment"] = os.getpid()
        t0 = self.sample_t0 = time.monotonic()
        fault = asyncio.create_task(self._inject_fault(hub_url, t0)) if p.fault else None
        exited: set[str] = set()
        while any(d.poll() is None for d in dsos.values()):
            self._sample(time.monotonic() - t0)
            await asyncio.sleep(p.sample_interval_s)
            for name, proc in self.procs.items():
                if name not in dsos and name not in exited and proc.poll() is not None:
                    exited.add(name)
                    self.log(f"{name} exited with {proc.returncode} during the run; see {self.work / 'logs'}")
        if fault is not None:
            await self._finish_fault(fault)
        procs = self._sample(time.monotonic() - t0)
        hub_counters = await self._hub_counters(hub_url)
        generator: list[dict[str, Any]] = []
        merged: list[str] = []
        for name, dso in dsos.items():
            dso_stats = self.work / f"{name}.stats.json"
            if dso_stats.exists():  # it has exited: /proc no longer has it, it reported its own rusage
                st = json.loads(dso_stats.read_text())
                generator.append({"process": name, **st.pop("generator", {})})
                procs[name] = {**st, "rss_mib": 0.0}
            else:
                generator.append({"process": name, "schedule_kept": False, "error": "no stats written"})
            if dso.returncode != 0:
                self.log(f"{name} exited with {dso.returncode}; see {self.work / 'logs' / f'{name}.log'}")
            part = self.work / f"{name}.requests.jsonl"
            if part.exists():
                merged += [line for line in part.read_text().splitlines() if line.strip()]
        merged.sort(key=lambda line: int(json.loads(line)["seq"]))
        (self.work / "requests.jsonl").write_text("".join(line + "\n" for line in merged))
        return {"procs": procs, "setup": {"setup_s": setup_s, "hub_url": hub_url, "work_dir": str(self.work),
                                          "storage": p.storage},
                "fault": dict(self.fault_log), "generator": generator, "hub_counters": hub_counters}

    async def _hub_counters(self, hub_url: str) -> dict[str, Any]:
        """The hub's own count of requests it accepted and finished, per type (``/metrics``), to reconcile with the
        DSO simulator's records; a hub killed during the run restarted its counters, which the result says."""
        counters: dict[str, Any] = {"created": {}, "finished": {}, "since_restart": self.p.fault == "hub"}
        try:
            async with httpx.AsyncClient(base_url=hub_url, timeout=10) as http:
                text = (await http.get("/metrics")).text
        except httpx.HTTPError as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        for family in text_string_to_metric_families(text):
            key = {"mhp_requests_created": "created", "mhp_requests_finished": "finished"}.get(family.name)
            if key is None:
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    label = sample.labels.get("type", "") + (f":{sample.labels['state']}"
                                                             if "state" in sample.labels else "")
                    counters[key][label] = int(sample.value)
        return counters

    async def start_hub(self, broker_port: int, spec: BrokerSpec) -> tuple[str, dict[str, str]]:
        """Issue the ``dso`` and ``admin`` tokens, start the storage the run asks for (the HBase test double) and
        the hub (or, in a subclass, its replicas) on the hub broker, and wait until it is ready; returns the URL the
        DSO uses and the tokens."""
        book = TokenBook(self.work / "hub-tokens.json")
        if book.path.exists():
            book.path.unlink()
        tokens = {"dso": book.issue("dso"), "admin": book.issue("admin")}
        if self.p.storage == "hbase":
            self.storage_settings = {"storage": "hbase", "hbase_hosts": [f"127.0.0.1:{await self._start_hbase()}"]}
        return await self._start_hub(broker_port, spec, book.path), tokens

    def _spawn_rp_sims(self, broker_port: int, passwords: dict[str, str]) -> list[Path]:
        """Start the RP simulators: at most ``RP_PROCESSES`` processes, the retailers dealt round-robin among
        them (each retailer keeps its own MQTT connection and counters); returns their ready files."""
        p = self.p
        groups = [self.retailer_ids[k::RP_PROCESSES] for k in range(min(RP_PROCESSES, len(self.retailer_ids)))]
        ready = []
        for k, group in enumerate(groups):
            name = f"rp-{group[0]}" if len(group) == 1 else f"rp-sim-{k + 1}"
            ids = self.work / f"{name}.identities.json"
            write_private(ids, json.dumps({r: passwords[r] for r in group}))
            ready.append(self.work / f"{name}.ready")
            self._spawn(name, [sys.executable, "-m", "sim.experiment.rp_sim", "--port", str(broker_port),
                               "--identities", str(ids), "--delay-min-ms", str(p.rp_delay_min_ms),
                               "--delay-max-ms", str(p.rp_delay_max_ms), "--seed", str(p.seed),
                               "--outcomes", p.rp_outcomes,
                               "--ready-file", str(ready[-1]),
                               "--stats-file", str(self.work / "rp-{retailer}.stats.json")])
        return ready

    async def _finish_fault(self, fault: asyncio.Task[None]) -> None:
        """The DSO simulator is done: a fault already injected may finish (a restart to wait for, a lock to
        release), so that all its timings are in the results, however slowly a loaded machine restarts a process;
        one not yet injected is cancelled."""
        if not fault.done() and "at_wall" in self.fault_log:
            self.log("the DSO simulator ended before the fault was over; waiting for the injection to finish")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fault), FAULT_FINISH_S)
        if not fault.done():
            self.log("the DSO simulator ended before the fault was over; cancelling the injection")
            fault.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fault

    async def _inject_fault(self, hub_url: str, t0: float) -> None:
        """At ``fault_at_s``: the fault ``p.fault`` names (:attr:`FAULTS`), its timings in :attr:`fault_log`."""
        p = self.p
        inject = self.FAULTS.get(p.fault)
        if inject is None:
            raise ValueError(f"unknown fault {p.fault!r}")
        await asyncio.sleep(max(0.0, t0 + p.fault_at_s - time.monotonic()))
        self.fault_log.update(kind=p.fault, at_wall=time.time())
        await inject(self, hub_url, self.fault_log)

    def sample_before_kill(self, name: str) -> None:
        """One more sample of the process ``name``, taken right before it is killed: its CPU is counted up to the
        kill, not up to the last periodic sample (up to a second earlier, on a busy machine maybe before the DSO
        simulator sent it anything)."""
        s = proc_sample(self.procs[name].pid)
        if s is not None:
            self.samples.append({"t_s": round(time.monotonic() - self.sample_t0, 3), "process": name, **s})

    def _kill_process(self, name: str) -> tuple[subprocess.Popen[bytes], float]:
        """kill -9 the process ``name``; its CPU samples keep their own name (``name (killed)``), so that CPU is
        not mixed across it and its restart. Returns it and when it was killed."""
        old = self.procs[name]
        self.sample_before_kill(name)
        os.kill(old.pid, signal.SIGKILL)
        old.wait()
        killed = time.monotonic()
        for s in self.samples:
            if s["process"] == name:
                s["process"] = f"{name} (killed)"
        return old, killed

    async def _fault_hub(self, hub_url: str, f: dict[str, Any]) -> None:
        """kill -9 the hub and restart it."""
        old, killed = self._kill_process("hub")
        self._spawn_hub("hub", self.work / "hub.toml")
        self.log(f"fault: hub pid {old.pid} killed with SIGKILL (exit {old.returncode}); restarted as pid "
                 f"{self.procs['hub'].pid}")
        await self._wait_ready(hub_url)
        f.update(killed_pid=old.pid, exit_code=old.returncode, restarted_pid=self.procs["hub"].pid,
                 restart_to_ready_s=round(time.monotonic() - killed, 3), ready_wall=time.time())
        self.log(f"fault: hub ready again {f['restart_to_ready_s']:.3f} s after the kill")

    async def _fault_storage(self, hub_url: str, f: dict[str, Any]) -> None:
        """Lock the hub's database for ``fault_down_s``."""
        p = self.p
        db = sqlite3.connect(self.work / "hub.db", isolation_level=None, check_same_thread=False)
        try:
            db.execute("BEGIN EXCLUSIVE")
            locked = time.monotonic()
            self.log(f"fault: hub database locked (BEGIN EXCLUSIVE from pid {os.getpid()}) for "
                     f"{p.fault_down_s:g} s")
            unready: list[float] = []

            async def probe() -> None:
                # Apart from the lock's own clock: a probe waits for the hub, whose check waits behind the writes
                # queued on the locked database (a busy timeout each), seconds under load. The lock lasts what was
                # asked, however long the hub takes to answer.
                async with httpx.AsyncClient(base_url=hub_url, timeout=5) as http:
                    while not unready:
                        with contextlib.suppress(httpx.HTTPError):
                            if (await http.get("/readyz")).status_code == 503:
                                unready.append(round(time.monotonic() - locked, 3))
                        await asyncio.sleep(0.1)

            prober = asyncio.create_task(probe())
            try:
                try:
                    await asyncio.sleep(max(0.0, locked + p.fault_down_s - time.monotonic()))
                finally:
                    db.execute("ROLLBACK")
                    unlocked = time.monotonic()
                f.update(locked_s=round(unlocked - locked, 3), unlock_wall=time.time())
                self.log("fault: hub database unlocked")
                await self._wait_ready(hub_url)
                f.update(unlock_to_ready_s=round(time.monotonic() - unlocked, 3), ready_wall=time.time())
                self.log(f"fault: hub ready {f['unlock_to_ready_s']:.3f} s after the unlock")
            finally:  # a 503 that comes after the unlock (a check that waited out the lock) still counts
                prober.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await prober
                f.update(readyz_503_after_s=unready[0] if unready else None)
        finally:
            db.close()

    async def _fault_hbase(self, hub_url: str, f: dict[str, Any]) -> None:
        """kill -9 the Thrift gateway and restart it on the same port."""
        old, killed = self._kill_process("thrift-gateway")
        await self._start_gateway()
        self.log(f"fault: Thrift gateway pid {old.pid} killed with SIGKILL (exit {old.returncode}); restarted "
                 f"as pid {self.procs['thrift-gateway'].pid} on the same port")
        f.update(killed_pid=old.pid, exit_code=old.returncode, restarted_pid=self.procs["thrift-gateway"].pid,
                 restart_s=round(time.monotonic() - killed, 3))
        await self._wait_ready(hub_url)
        f.update(kill_to_hub_ready_s=round(time.monotonic() - killed, 3), ready_wall=time.time())
        self.log(f"fault: hub ready {f['kill_to_hub_ready_s']:.3f} s after the gateway was killed")

    async def _fault_broker(self, hub_url: str, f: dict[str, Any]) -> None:
        """kill -9 the hub broker and restart it on the same port."""
        assert self.broker is not None
        old_pid = self.broker.pid
        self.broker.kill()  # SIGKILL: Mosquitto saves nothing, its sessions and queued messages are gone
        killed = time.monotonic()
        self.log(f"fault: hub broker pid {old_pid} killed with SIGKILL; restarting it on the same port")
        await self.broker.start_async()
        if self.broker.pid is not None:
            self.pids["broker"] = self.broker.pid
        f.update(killed_pid=old_pid, restarted_pid=self.broker.pid,
                 restart_s=round(time.monotonic() - killed, 3), ready_wall=time.time())
        self.log(f"fault: hub broker accepting connections {f['restart_s']:.3f} s after the kill")

    async def _fault_hbase_stall(self, hub_url: str, f: dict[str, Any]) -> None:
        """Stop the HBase double (SIGSTOP) for ``fault_down_s``, then continue it."""
        p = self.p
        pid = self.procs["hbase"].pid
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        self.log(f"fault: HBase test double pid {pid} stopped (SIGSTOP) for {p.fault_down_s:g} s")
        unready: list[float] = []

        async def probe() -> None:
            # Apart from the stop's own clock: a probe waits for the hub, which waits for the stopped double.
            async with httpx.AsyncClient(base_url=hub_url, timeout=1) as http:
                while not unready:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get("/readyz")).status_code == 503:
                            unready.append(round(time.monotonic() - stopped, 3))
                    await asyncio.sleep(0.1)

        prober = asyncio.create_task(probe())
        try:
            await asyncio.sleep(p.fault_down_s)
        finally:
            os.kill(pid, signal.SIGCONT)
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
        resumed = time.monotonic()
        f.update(stopped_pid=pid, stopped_s=round(resumed - stopped, 3), unlock_wall=time.time(),
                 readyz_503_after_s=unready[0] if unready else None)
        self.log("fault: HBase test double continued (SIGCONT)")
        await self._wait_ready(hub_url)
        f.update(resume_to_ready_s=round(time.monotonic() - resumed, 3), ready_wall=time.time())
        self.log(f"fault: hub ready {f['resume_to_ready_s']:.3f} s after the double went on")

    FAULTS: ClassVar[dict[str, Callable[[Experiment, str, dict[str, Any]], Awaitable[None]]]] = {
        "hub": _fault_hub, "storage": _fault_storage, "hbase": _fault_hbase, "broker": _fault_broker,
        "hbase-stall": _fault_hbase_stall}
    """Each fault the experiments inject, by the name ``--fault`` gives it."""

    def _sample(self, t: float) -> dict[str, dict[str, float]]:
        now: dict[str, dict[str, float]] = {}
        for name, pid in self.pids.items():
            s = proc_sample(pid)
            if s is not None:
                now[name] = s
                self.samples.append({"t_s": round(t, 3), "process": name, **s})
        for dev, d in disk_sample().items():
            self.disk_samples.append({"t_s": round(t, 3), "device": dev, **d})
        return now

    async def _start_hbase(self) -> int:
        """Start the HBase Thrift test double (and, for the gateway fault, the gateway relay in front of it); the
        port the hub is to use."""
        ready = self.work / "hbase.ready"
        ready.unlink(missing_ok=True)
        self._spawn("hbase", [sys.executable, "-m", "sim.hbase_double", "--host", "127.0.0.1", "--port", "0",
                              "--ready-file", str(ready)])
        await self._wait_files([ready], "the HBase test double")
        self.hbase_port = int(ready.read_text().strip())
        self.log(f"HBase Thrift test double on port {self.hbase_port}")
        if self.p.fault != "hbase":
            return self.hbase_port
        self.gateway_port = free_port()
        await self._start_gateway()
        return self.gateway_port

    async def _start_gateway(self) -> None:
        ready = self.work / "thrift-gateway.ready"
        ready.unlink(missing_ok=True)
        self._spawn("thrift-gateway", [sys.executable, "-m", "sim.experiment.thrift_gateway", "--listen-port",
                                       str(self.gateway_port), "--upstream-port", str(self.hbase_port),
                                       "--ready-file", str(ready)])
        await self._wait_files([ready], "the Thrift gateway relay")

    async def _wait_ready(self, hub_url: str, timeout_s: float = 30.0, name: str = "hub") -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=hub_url, timeout=2) as http:
            while time.monotonic() < deadline:
                if name in self.procs and self.procs[name].poll() is not None:
                    break
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{name} did not become ready; see {self.work / 'logs' / (name + '.log')}")

    async def _wait_files(self, paths: list[Path], what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(f.exists() for f in paths):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start; see {self.work / 'logs'}")
            await asyncio.sleep(0.05)

    async def _wait_online(self, hub_url: str, tokens: dict[str, str]) -> None:
        # The hub learns presence from retained status messages; give it a moment to see every simulator.
        await asyncio.sleep(0.5)

    async def _register(self, hub_url: str, tokens: dict[str, str], *, readings: bool = True) -> None:
        """Register the retailers, then the clients in bulk (``PUT /v1/clients``, 5,000 a call) and upload their
        readings (200 clients a call; not with ``readings=False``), a few calls at a time."""
        admin = {"Authorization": f"Bearer {tokens['admin']}"}
        dso = {"Authorization": f"Bearer {tokens['dso']}"}
        async with httpx.AsyncClient(base_url=hub_url, timeout=120) as http:
            for r in self.retailer_ids:
                (await http.put(f"/v1/retailers/{r}", json={"name": f"Retailer {r}"}, headers=admin)).raise_for_status()
            sem = asyncio.Semaphore(4)

            async def call(method: str, path: str, body: dict[str, Any]) -> None:
                async with sem:
                    (await http.request(method, path, headers=dso, json=body)).raise_for_status()

            await asyncio.gather(*(call("PUT", "/v1/clients", {"clients": [
                {"client_id": cid, "retailer_id": self.retailer_ids[i % len(self.retailer_ids)],
                 "contracted_power_kw": 6.9, "feeder_id": f"feeder-{i % 3 + 1}",
                 "valid_from": "2020-01-01T00:00:00+00:00"}
                for i, cid in enumerate(self.client_ids[k:k + 5000], start=k)]})
                for k in range(0, len(self.client_ids), 5000)))
            if not readings:
                return
            values = [round(0.1 + 0.05 * (k % 8), 3) for k in range(96)]
            await asyncio.gather(*(call("POST", "/v1/meter-readings", {"readings": [
                {"client_id": c, "start": BILLING_PERIOD_START.isoformat(), "resolution_s": 900, "values_kwh": values}
                for c in self.client_ids[k:k + 200]]}) for k in range(0, len(self.client_ids), 200)))

    def _stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10  # 10 s for all from their SIGTERM, not 10 s each one after the other
        for name, proc in self.procs.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"{name} did not stop in 10 s; killed")
                proc.kill()
                proc.wait()
        for f in self._logs:
            f.close()
        self._logs.clear()
