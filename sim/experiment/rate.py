"""``mhp-sim experiment rate``: the largest request rate the machine sustains within the latency target.

Open loop at fixed total rates (the paper's mix: the four request types at equal rates), stepped up from
``start_per_min`` by ``step_per_min``; each step is ``runs`` independent base runs (a fresh broker, hub, storage
and simulators each, :class:`~sim.experiment.base.Experiment`), each with its warm-up and measured period. The
search stops after the first step that is not sustained:

* ``p99 over the bound``: the p99 of ``metric`` over the step's measured requests (all runs pooled) exceeds
  ``p99_bound_ms`` (DESIGN.md: 250 ms on the latency the hub and its storage add, ``hub_added``);
* ``lost or failed``: a request failed, went missing or was duplicated in any run;
* ``generator could not keep up``: a DSO simulator's send lag broke its bound — the step measured the load
  generator as well as the hub, so its figures do not describe the hub alone.

The sustained rate is the highest step before the first that is not. Outputs: ``results.json``, ``rate.csv`` (one
row per run, one per step), ``rate.png`` (p50 / p99 / p99.9 against the offered rate with the bound, and the CPU
of hub, broker, storage and simulators per step), ``report.md``; each run keeps its own folder
(``<rate>-per-min/run-<k>``) with the base outputs.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sim.experiment import report
from sim.experiment.base import BaseParams, Experiment
from sim.experiment.dso_sim import TYPES

METRICS = ("hub_added", "post_to_completed", "post_to_202")
PER_WORKER_PER_MIN = 6000.0
"""Requests per minute one DSO simulator process is given when the number of processes is automatic."""


@dataclass
class RateParams:
    """The search; ``base`` is the template of every run (its ``out`` the search's folder)."""

    base: BaseParams
    start_per_min: float = 1200.0
    step_per_min: float = 1200.0
    max_per_min: float = 30000.0
    runs: int = 3
    metric: str = "hub_added"
    p99_bound_ms: float = 250.0
    dso_workers: int = 0
    """DSO simulator processes per run; 0: one per :data:`PER_WORKER_PER_MIN` of offered rate, at most 8."""

    def steps(self) -> list[float]:
        """The offered total rates, per minute."""
        n = math.floor((self.max_per_min - self.start_per_min) / self.step_per_min + 1e-9) + 1
        return [round(self.start_per_min + i * self.step_per_min, 3) for i in range(max(0, n))]

    def workers(self, rate_per_min: float) -> int:
        """DSO simulator processes for ``rate_per_min``."""
        if self.dso_workers > 0:
            return self.dso_workers
        return max(1, min(8, math.ceil(rate_per_min / PER_WORKER_PER_MIN)))


def _cpu(res: dict[str, Any], prefix: str) -> float:
    """CPU % of one core of the processes whose name starts with ``prefix``, summed."""
    return round(sum(float(p.get("cpu_pct_of_one_core") or 0.0) for name, p in res["processes"].items()
                     if name.startswith(prefix)), 1)


def run_summary(rate: float, k: int, res: dict[str, Any], folder: str) -> dict[str, Any]:
    """What the search keeps of one run."""
    rec, gen = res["reconciliation"], res["generator"]
    measured_s = float(res["params"]["duration_s"])
    done_measured = res["latency_ms"]["post_to_completed"]["n"]
    return {"rate_per_min": rate, "run": k, "dir": folder, "sent": rec["sent"], "planned": rec["planned"],
            "accepted": rec["accepted"], "completed": rec["completed"], "failed": rec["failed"],
            "missing": rec["missing"], "duplicates": rec["duplicates"], "accounted": rec["accounted"],
            "rp_redelivered_requests": rec["rp_redelivered_requests"],
            "completed_per_min": round(60.0 * done_measured / measured_s, 1) if measured_s > 0 else None,
            "generator_valid": gen["valid"],
            "lag_p99_ms": max((float(w.get("lag_p99_ms") or 0.0) for w in gen["workers"]), default=None),
            "latency_ms": res["latency_ms"],
            "cpu_pct": {"hub": _cpu(res, "hub"), "broker": _cpu(res, "broker"), "storage": _cpu(res, "hbase")
                        + _cpu(res, "thrift-gateway"), "rp_sims": _cpu(res, "rp-"), "dso_sims": _cpu(res, "dso-sim"),
                        "experiment": _cpu(res, "experiment")},
            "hub_max_rss_mib": res["processes"].get("hub", {}).get("max_rss_mib")}


def step_summary(p: RateParams, rate: float, runs: list[dict[str, Any]],
                 records: list[dict[str, Any]]) -> dict[str, Any]:
    """One step: the runs' requests pooled, the verdict."""
    lat = report.latencies(records)
    p99 = lat[p.metric]["p99"]
    reasons = []
    if any(r["failed"] or r["missing"] or r["duplicates"] or not r["accounted"] for r in runs):
        reasons.append("lost or failed")
    if p99 is None or p99 > p.p99_bound_ms:
        reasons.append("p99 over the bound")
    if not all(r["generator_valid"] for r in runs):
        reasons.append("generator could not keep up")
    verdict = "; ".join(reasons) or "sustained"
    cpu_keys = runs[0]["cpu_pct"].keys() if runs else []
    return {"rate_per_min": rate, "runs": len(runs), "verdict": verdict, "sustained": verdict == "sustained",
            "metric": p.metric, "p99_ms": p99, "latency_ms": lat,
            "p99_per_run_ms": [r["latency_ms"][p.metric]["p99"] for r in runs],
            "sent": sum(r["sent"] for r in runs), "completed": sum(r["completed"] for r in runs),
            "failed": sum(r["failed"] for r in runs), "missing": sum(r["missing"] for r in runs),
            "duplicates": sum(r["duplicates"] for r in runs),
            "completed_per_min": round(sum(float(r["completed_per_min"] or 0.0) for r in runs) / len(runs), 1),
            "cpu_pct": {k: round(sum(r["cpu_pct"][k] for r in runs) / len(runs), 1) for k in cpu_keys},
            "dso_workers": p.workers(rate)}


def run(p: RateParams) -> dict[str, Any]:
    """Step the rate up until it is no longer sustained; write and return the combined results."""
    out = p.base.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    runs: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    plan = p.steps()
    for i, rate in enumerate(plan):
        step_runs: list[dict[str, Any]] = []
        pooled: list[dict[str, Any]] = []
        for k in range(1, p.runs + 1):
            folder = f"{rate:g}-per-min/run-{k}"
            bp = replace(p.base, out=out / folder, rate_per_min=rate / len(TYPES), rates_per_min={},
                         seed=p.base.seed + k - 1, dso_workers=p.workers(rate))
            print(f"[rate] step {i + 1}/{len(plan)}: {rate:g} requests/min ({rate / 60:.1f}/s), run {k}/{p.runs}, "
                  f"{bp.dso_workers} DSO simulator process(es) -> {bp.out}", flush=True)
            t = time.time()
            res = Experiment(bp).run()
            s = run_summary(rate, k, res, folder)
            step_runs.append(s)
            pooled += report.annotate(report.read_records(bp.out / "run" / "requests.jsonl"), bp.rp_delay_min_ms)
            lat = s["latency_ms"][p.metric]
            print(f"[rate] {rate:g}/min run {k}: sent {s['sent']} completed {s['completed']} failed {s['failed']} "
                  f"missing {s['missing']} duplicates {s['duplicates']}; {p.metric} p50 {lat['p50']} p99 "
                  f"{lat['p99']} p99.9 {lat['p99.9']} max {lat['max']} ms; generator "
                  f"{'ok' if s['generator_valid'] else 'LAGGED'} (lag p99 {s['lag_p99_ms']} ms); CPU % hub "
                  f"{s['cpu_pct']['hub']} broker {s['cpu_pct']['broker']} ({time.time() - t:.0f} s)", flush=True)
        runs += step_runs
        st = step_summary(p, rate, step_runs, pooled)
        steps.append(st)
        print(f"[rate] step {rate:g}/min: {st['verdict']} ({p.metric} p99 {st['p99_ms']} ms over {st['runs']} "
              f"run(s), bound {p.p99_bound_ms:g} ms)", flush=True)
        if not st["sustained"]:
            break
    sustained = None
    for st in steps:
        if not st["sustained"]:
            break
        sustained = st
    params = {**{k: v for k, v in vars(p).items() if k != "base"},
              "base": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(p.base).items()
                       if k not in ("rate_per_min", "rates_per_min", "fault", "fault_at_s", "fault_down_s")}}
    results = {"experiment": "rate", "params": params, "wall_s": round(time.time() - started, 1),
               "steps": steps, "runs": runs,
               "sustained": {"rate_per_min": sustained["rate_per_min"], "p99_ms": sustained["p99_ms"],
                             "latency_ms": sustained["latency_ms"]} if sustained else None,
               "stopped_at": next(({"rate_per_min": s["rate_per_min"], "verdict": s["verdict"]} for s in steps
                                   if not s["sustained"]), None),
               "files": {"csv": "rate.csv", "plots": ["rate.png"], "report": "report.md",
                         "per_run": [r["dir"] for r in runs]}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_csv(out / "rate.csv", p, runs, steps)
    fig = plot(p, steps)
    fig.savefig(out / "rate.png", dpi=110)
    plt.close(fig)
    (out / "report.md").write_text(markdown(results))
    return results


def write_csv(path: Path, p: RateParams, runs: list[dict[str, Any]], steps: list[dict[str, Any]]) -> None:
    """One row per run and one per step (``run`` = ``all``: the runs' requests pooled)."""
    lat_cols = [f"{m}_{q}" for m in METRICS for q in ("n", "p50", "p90", "p99", "p99.9", "max")]
    cpu_cols = ["cpu_hub", "cpu_broker", "cpu_storage", "cpu_rp_sims", "cpu_dso_sims"]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rate_per_min", "run", "verdict", "sent", "completed", "failed", "missing", "duplicates",
                    "completed_per_min", "generator_valid", *lat_cols, *cpu_cols])
        rows = [(r, str(r["run"]), "", r["generator_valid"]) for r in runs]
        rows += [(s, "all", s["verdict"], "generator could not keep up" not in s["verdict"]) for s in steps]
        for r, label, verdict, valid in sorted(rows, key=lambda x: (x[0]["rate_per_min"], x[1] == "all", x[1])):
            cpu = r["cpu_pct"]
            w.writerow([r["rate_per_min"], label, verdict, r["sent"], r["completed"], r["failed"], r["missing"],
                        r["duplicates"], r["completed_per_min"], valid,
                        *[r["latency_ms"][m][q] for m in METRICS for q in ("n", "p50", "p90", "p99", "p99.9", "max")],
                        *[cpu.get(k) for k in ("hub", "broker", "storage", "rp_sims", "dso_sims")]])


def plot(p: RateParams, steps: list[dict[str, Any]]) -> Any:
    """Latency percentiles against the offered rate with the bound; CPU per process group per step."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    xs = [s["rate_per_min"] for s in steps]
    for q, style in (("p50", "o-"), ("p99", "s-"), ("p99.9", "^--")):
        ys = [s["latency_ms"][p.metric][q] for s in steps]
        ax.plot([x for x, y in zip(xs, ys, strict=True) if y is not None], [y for y in ys if y is not None], style,
                label=q)
    ax.axhline(p.p99_bound_ms, color="red", linewidth=1.2, label=f"p99 bound {p.p99_bound_ms:g} ms")
    for s in steps:
        if not s["sustained"]:
            ax.axvline(s["rate_per_min"], color="grey", linestyle=":", label=f"stopped: {s['verdict']}")
    ax.set_xlabel("offered rate (requests/min, the four types together)")
    ax.set_ylabel(f"{p.metric} (ms)")
    ax.set_yscale("log")
    ax.set_title(f"Latency ({p.metric}) per offered rate, {p.runs} run(s) pooled per step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for key in (steps[0]["cpu_pct"] if steps else {}):
        ax2.plot(xs, [s["cpu_pct"][key] for s in steps], "o-", label=key)
    ax2.axhline(100, color="grey", linewidth=0.8)
    ax2.set_xlabel("offered rate (requests/min)")
    ax2.set_ylabel("CPU (% of one core, mean over the runs)")
    ax2.set_title("CPU per process group per step")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def markdown(results: dict[str, Any]) -> str:
    """The search's report."""
    p, b = results["params"], results["params"]["base"]
    s = results["sustained"]
    metric = p["metric"]
    if s:
        lat = s["latency_ms"][metric]
        head = (f"**Largest sustained rate: {s['rate_per_min']:g} requests/min ({s['rate_per_min'] / 60:g}/s)**, "
                f"{metric} over its {p['runs']} run(s): p50 {lat['p50']}, p90 {lat['p90']}, p99 {lat['p99']}, "
                f"p99.9 {lat['p99.9']}, max {lat['max']} ms (n {lat['n']}; bound on p99 {p['p99_bound_ms']:g} ms).")
    else:
        head = "**No step was sustained.**"
    stop = results["stopped_at"]
    lines = ["# Experiment: sustained rate", "",
             f"Open loop, the four request types at equal rates, {b['clients']} clients, {b['retailers']} "
             f"retailer(s), storage {b['storage']}, RP delay [{b['rp_delay_min_ms']:g}, {b['rp_delay_max_ms']:g}) ms; "
             f"steps from {p['start_per_min']:g} by {p['step_per_min']:g} up to {p['max_per_min']:g} requests/min, "
             f"{p['runs']} run(s) of {b['duration_s']:g} s after {b['warmup_s']:g} s of warm-up per step. A step is "
             f"sustained when no request failed, went missing or was duplicated, every DSO simulator kept its "
             f"schedule, and the p99 of `{metric}` over the step's runs is at most {p['p99_bound_ms']:g} ms.", "",
             head, "",
             f"Stopped at {stop['rate_per_min']:g}/min: {stop['verdict']}." if stop else
             "Every step up to the maximum was sustained.", "",
             f"## {metric} per step (ms, the runs' requests pooled)", "",
             "| offered /min | verdict | completed /min | n | p50 | p90 | p99 | p99.9 | max | p99 per run | "
             "CPU % hub | broker | storage | DSO sims |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for st in results["steps"]:
        lat, cpu = st["latency_ms"][metric], st["cpu_pct"]
        lines.append(f"| {st['rate_per_min']:g} | {st['verdict']} | {st['completed_per_min']} | {lat['n']} | "
                     f"{lat['p50']} | {lat['p90']} | {lat['p99']} | {lat['p99.9']} | {lat['max']} | "
                     f"{st['p99_per_run_ms']} | {cpu.get('hub')} | {cpu.get('broker')} | {cpu.get('storage')} | "
                     f"{cpu.get('dso_sims')} |")
    for m in METRICS:
        if m == metric:
            continue
        lines += ["", f"## {m} per step (ms)", "",
                  *report.latency_table({f"{st['rate_per_min']:g}/min": st["latency_ms"][m]
                                         for st in results["steps"]}, first="offered")]
    lines += ["", "## Runs", "", "| offered /min | run | sent | completed | failed | missing | duplicates | "
              "generator | lag p99 ms | folder |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['rate_per_min']:g} | {r['run']} | {r['sent']} | {r['completed']} | {r['failed']} | "
                     f"{r['missing']} | {r['duplicates']} | {'ok' if r['generator_valid'] else 'LAGGED'} | "
                     f"{r['lag_p99_ms']} | `{r['dir']}` |")
    lines += ["", "`hub_added` is POST -> completed (the hub's `completed_at` against the DSO's send time) minus the "
              "RP simulator's minimum delay once per phase that waits for retailers; see `sim/experiment/report.py`. "
              "Plot: `rate.png`.", ""]
    return "\n".join(lines)
