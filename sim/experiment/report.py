"""Results of an experiment: ``results.json``, CSVs of every request and of the process samples, PNG plots
(matplotlib, Agg) and a short ``report.md``.

Accounting: every request the DSO simulator scheduled is one record; it is ``completed`` (the request ended in
state ``completed``), ``failed`` (refused, unanswered POST, or ended in another terminal state) or ``missing``
(not terminal when the simulator stopped following it); ``sent = completed + failed + missing`` always holds.
Latency figures exclude the warm-up requests (they are still counted).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sim.experiment.dso_sim import TYPES, pct

COMPONENTS = ("hub_ms", "storage_ms", "dispatch_ms", "retailer_ms", "other_ms")
"""Figure 6's stack: hub before storage, storage (to the 202), 202 → first publish, the RP's own time (mean over
the request's clients), and the rest of ``total_ms`` (MQTT both ways, the hub applying outcomes)."""
TRACE_KEYS = ("hub_ms", "storage_ms", "dispatch_ms", "retailer_ms", "retailer_max_ms", "total_ms", "total_max_ms",
              "completion_ms")
CSV_FIELDS = ("seq", "type", "warmup", "scheduled_s", "sent_s", "lag_ms", "clients", "status", "request_id",
              "post_ms", "done_ms", "end_to_end_ms", "state", "outcome", *TRACE_KEYS, "other_ms", "error")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The DSO simulator's records (empty if it wrote none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stats(values: list[float]) -> dict[str, float | int | None]:
    """Count, mean and the percentiles the paper's discussion needs."""
    return {"n": len(values), "mean": round(sum(values) / len(values), 3) if values else None,
            "p50": pct(values, 50), "p90": pct(values, 90), "p99": pct(values, 99), "p99.9": pct(values, 99.9),
            "max": round(max(values), 3) if values else None}


def _other_ms(trace: dict[str, Any]) -> float | None:
    if "total_ms" not in trace:
        return None
    known = sum(float(trace.get(k, 0.0)) for k in ("storage_ms", "dispatch_ms", "retailer_ms"))
    return round(max(0.0, float(trace["total_ms"]) - known), 3)


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per type: accounting, latencies, the per-component breakdown."""
    out: dict[str, Any] = {}
    for kind in TYPES:
        recs = [r for r in records if r["type"] == kind]
        if not recs:
            continue
        outcomes = Counter(r.get("outcome", "missing") for r in recs)
        ids = Counter(r["request_id"] for r in recs if r.get("request_id"))
        measured = [r for r in recs if not r.get("warmup")]
        done = [r for r in measured if r.get("outcome") == "completed"]
        breakdown: dict[str, Any] = {}
        for key in (*TRACE_KEYS, "other_ms"):
            vals = [float(r["trace"][key]) if key != "other_ms" else r["other_ms"] for r in done
                    if (key in r.get("trace", {}) if key != "other_ms" else r.get("other_ms") is not None)]
            breakdown[key] = stats(vals)
        out[kind] = {
            "sent": len(recs),
            "warmup": len(recs) - len(measured),
            "accepted_202": sum(1 for r in recs if r.get("status") == 202),
            "completed": outcomes["completed"],
            "failed": outcomes["failed"],
            "missing": outcomes["missing"],
            "duplicates": sum(n - 1 for n in ids.values() if n > 1),
            "missing_requests": [{"seq": r["seq"], "request_id": r.get("request_id"), "state": r.get("state"),
                                  "error": r.get("error")} for r in recs if r.get("outcome", "missing") == "missing"],
            "failed_requests": [{"seq": r["seq"], "request_id": r.get("request_id"), "error": r.get("error")}
                                for r in recs if r.get("outcome") == "failed"][:50],
            "clients_per_request": stats([float(r["clients"]) for r in recs if "clients" in r])["mean"],
            "send_lag_ms": stats([float(r["lag_ms"]) for r in measured if "lag_ms" in r]),
            "latency_ms": {
                "post_to_202": stats([float(r["post_ms"]) for r in measured if r.get("status") == 202]),
                "accepted_to_completed": stats([float(r["done_ms"]) for r in done if "done_ms" in r]),
                "post_to_completed": stats([float(r["end_to_end_ms"]) for r in done if "end_to_end_ms" in r]),
            },
            "breakdown_ms": breakdown,
        }
    return out


def process_summary(samples: list[dict[str, Any]], final: dict[str, dict[str, float]],
                    run_s: float) -> dict[str, Any]:
    """CPU seconds during the run and peak RSS per process (first sample to the last)."""
    first: dict[str, float] = {}
    for s in samples:
        first.setdefault(s["process"], s["cpu_s"])
    out = {}
    for name, last in final.items():
        cpu = round(last["cpu_s"] - first.get(name, 0.0), 3)
        out[name] = {"cpu_s": cpu, "cpu_s_total": round(last["cpu_s"], 3),
                     "cpu_pct_of_one_core": round(100 * cpu / run_s, 1) if run_s > 0 else None,
                     "max_rss_mib": last["max_rss_mib"]}
    return out


def write_all(out: Path, *, params: dict[str, Any], machine: dict[str, Any], records: list[dict[str, Any]],
              rp_stats: dict[str, Any], samples: list[dict[str, Any]], procs: dict[str, dict[str, float]],
              wall_s: float, setup: dict[str, Any]) -> dict[str, Any]:
    """Write every output to ``out``; returns the content of ``results.json``."""
    out.mkdir(parents=True, exist_ok=True)
    for r in records:
        r["other_ms"] = _other_ms(r.get("trace", {}))
    per_type = summarize(records)
    run_s = max((s["t_s"] for s in samples), default=0.0)
    totals = {k: sum(t[k] for t in per_type.values()) for k in ("sent", "completed", "failed", "missing",
                                                                  "duplicates", "accepted_202")}
    results = {
        "experiment": "base",
        "params": params,
        "machine": machine,
        "wall_s": wall_s,
        "run_s": run_s,
        "setup": setup,
        "totals": {**totals, "accounted": totals["sent"] == totals["completed"] + totals["failed"]
                   + totals["missing"]},
        "per_type": per_type,
        "processes": process_summary(samples, procs, run_s),
        "rp_simulators": rp_stats,
        "files": {"requests_csv": "requests.csv", "process_samples_csv": "processes.csv",
                  "plots": [f"{name}.png" for name in PLOTS], "report": "report.md"},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    with (out / "requests.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({**r, **{k: r.get("trace", {}).get(k) for k in TRACE_KEYS}, "outcome": r.get("outcome",
                                                                                                     "missing")})
    with (out / "processes.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["t_s", "process", "cpu_s", "rss_mib", "max_rss_mib"])
        w.writeheader()
        w.writerows(samples)
    for name, plot in PLOTS.items():
        fig = plot(records, per_type, samples)
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
    (out / "report.md").write_text(markdown(results))
    return results


# -- plots -------------------------------------------------------------------------------------------------


def plot_breakdown(records: list[dict[str, Any]], per_type: dict[str, Any], samples: list[dict[str, Any]]) -> Any:
    """Figure 6: mean latency per component, stacked, per request type."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    kinds = list(per_type)
    bottom = [0.0] * len(kinds)
    for comp in COMPONENTS:
        vals = [float(per_type[k]["breakdown_ms"][comp]["mean"] or 0.0) for k in kinds]
        ax.bar(kinds, vals, bottom=bottom, label=comp.removesuffix("_ms"))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("mean latency per client (ms)")
    ax.set_title("Latency breakdown per component (hub trace), per request type")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_distribution(records: list[dict[str, Any]], per_type: dict[str, Any], samples: list[dict[str, Any]]) -> Any:
    """Empirical CDFs of POST → 202 and 202 → completed, per type."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "post_ms", "POST -> 202"), (axes[1], "done_ms", "202 -> completed")):
        for kind in per_type:
            vals = sorted(float(r[key]) for r in records if r["type"] == kind and not r.get("warmup")
                          and r.get(key) is not None and (key == "post_ms" or r.get("outcome") == "completed"))
            if vals:
                ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=f"{kind} (n={len(vals)})")
        ax.set_xscale("log")
        ax.set_xlabel("ms (log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_over_time(records: list[dict[str, Any]], per_type: dict[str, Any], samples: list[dict[str, Any]]) -> Any:
    """Figure 11: latency (202 → completed) of each request against when it was sent, with a moving mean."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for kind in per_type:
        pts = sorted((float(r["sent_s"]), float(r["done_ms"])) for r in records
                     if r["type"] == kind and r.get("done_ms") is not None)
        if not pts:
            continue
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], ".", alpha=0.35, markersize=3)[0]
        window = 5.0
        xs, ys = [], []
        for i in range(int(pts[-1][0] // window) + 1):
            chunk = [p[1] for p in pts if i * window <= p[0] < (i + 1) * window]
            if chunk:
                xs.append((i + 0.5) * window)
                ys.append(sum(chunk) / len(chunk))
        ax.plot(xs, ys, "-", color=line.get_color(), label=f"{kind} (mean per {window:g} s)")
    warm = [float(r["sent_s"]) for r in records if r.get("warmup") and "sent_s" in r]
    if warm:
        ax.axvspan(0, max(warm), color="grey", alpha=0.15, label="warm-up")
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel("202 -> completed (ms)")
    ax.set_title("Request latency over time, as measured by the DSO simulator")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_cpu(records: list[dict[str, Any]], per_type: dict[str, Any], samples: list[dict[str, Any]]) -> Any:
    """CPU use per process over the run (% of one core) and peak RSS."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    by_proc: dict[str, list[tuple[float, float, float]]] = {}
    for s in samples:
        by_proc.setdefault(s["process"], []).append((s["t_s"], s["cpu_s"], s["max_rss_mib"]))
    names = sorted(by_proc)
    for name in names:
        pts = by_proc[name]
        xs = [pts[i][0] for i in range(1, len(pts))]
        ys = [100 * (pts[i][1] - pts[i - 1][1]) / max(1e-9, pts[i][0] - pts[i - 1][0]) for i in range(1, len(pts))]
        ax.plot(xs, ys, label=name)
    ax.set_xlabel("time since the DSO simulator started (s)")
    ax.set_ylabel("CPU (% of one core)")
    ax.set_title("CPU per process")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.barh(names, [max(p[2] for p in by_proc[n]) for n in names])
    ax2.set_xlabel("max RSS (MiB)")
    ax2.set_title("Peak memory")
    fig.tight_layout()
    return fig


PLOTS = {"latency_breakdown": plot_breakdown, "latency_distribution": plot_distribution,
         "latency_over_time": plot_over_time, "cpu_per_process": plot_cpu}


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def markdown(results: dict[str, Any]) -> str:
    """The short human-readable report."""
    p, m, t = results["params"], results["machine"], results["totals"]
    lines = [
        "# Experiment: base setup", "",
        f"{p['clients']} clients, {p['retailers']} retailer(s) (RP simulators, delay "
        f"[{p['rp_delay_min_ms']:g}, {p['rp_delay_max_ms']:g}) ms), {p['duration_s']:g} s measured after "
        f"{p['warmup_s']:g} s of warm-up, rates per minute {p['rates_per_min']}, targets {p['fractions']} of the "
        f"clients. Machine: {m['cpus']} CPUs, {m['cpu_model']}, {m['memory']}.", "",
        f"Requests sent {t['sent']}: completed {t['completed']}, failed {t['failed']}, missing {t['missing']}, "
        f"duplicates {t['duplicates']} — every request accounted for: {'yes' if t['accounted'] else 'NO'}.", "",
        "## Latency per request type (ms, warm-up excluded)", "",
        "| type | sent | 202 | completed | failed | missing | POST→202 p50 | p99 | 202→completed p50 | p90 | p99 "
        "| p99.9 | max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, s in results["per_type"].items():
        a, d = s["latency_ms"]["post_to_202"], s["latency_ms"]["accepted_to_completed"]
        lines.append(f"| {kind} | {s['sent']} | {s['accepted_202']} | {s['completed']} | {s['failed']} | "
                     f"{s['missing']} | {_fmt(a['p50'])} | {_fmt(a['p99'])} | {_fmt(d['p50'])} | {_fmt(d['p90'])} | "
                     f"{_fmt(d['p99'])} | {_fmt(d['p99.9'])} | {_fmt(d['max'])} |")
    lines += ["", "## Breakdown per component (hub trace, mean ms; Figure 6)", "",
              "| type | hub | storage | dispatch | retailer | other | total | completion |",
              "|---|---|---|---|---|---|---|---|"]
    for kind, s in results["per_type"].items():
        b = s["breakdown_ms"]
        lines.append(f"| {kind} | " + " | ".join(_fmt(b[k]["mean"]) for k in (
            "hub_ms", "storage_ms", "dispatch_ms", "retailer_ms", "other_ms", "total_ms", "completion_ms")) + " |")
    lines += ["", "`other` is `total_ms` minus storage, dispatch and retailer time: MQTT both ways and the hub "
              "applying outcomes. A load reduction's total covers both phases (availability, then disconnects); "
              "billing has no per-client outcome (the RP simulator only acknowledges), so it has no retailer or "
              "total share.", "", "## Processes", "", "| process | CPU s | % of one core | max RSS MiB |",
              "|---|---|---|---|"]
    for name, s in results["processes"].items():
        lines.append(f"| {name} | {s['cpu_s']} | {s['cpu_pct_of_one_core']} | {s['max_rss_mib']} |")
    lines += ["", "Plots: " + ", ".join(f"`{f}`" for f in results["files"]["plots"]) + ".", ""]
    missing = [m for s in results["per_type"].values() for m in s["missing_requests"]]
    if missing:
        lines += [f"Missing requests: {missing[:20]}", ""]
    return "\n".join(lines)
