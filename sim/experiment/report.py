"""Results of an experiment: ``results.json``, CSVs of every request and of the process samples, PNG plots
(matplotlib, Agg) and a short ``report.md``.

Accounting: every request the DSO simulator scheduled is one record; it is ``completed`` (the request ended in
state ``completed``), ``failed`` (refused, unanswered POST, or ended in another terminal state) or ``missing``
(not terminal when the simulator stopped following it); ``sent = completed + failed + missing`` always holds.
The reconciliation also checks the numbering (every ``seq`` of the schedule present exactly once), duplicates
(one request id for two ``seq``, or the hub counting more accepted requests than the DSO was told of: a 202 lost
and the request accepted again), and the RP simulators' redeliveries (a request delivered to a retailer again;
the simulator answers each client once). Latency figures exclude the warm-up requests (they are still counted);
every latency table gives n, p50, p90, p99, p99.9 and max.

Resources: per process CPU (% of one core), resident memory and disk read / write (``/proc/<pid>/io``), and per
disk read / write (``/proc/diskstats``), sampled each second and aggregated per minute (``resources.csv``,
``resources.png``).
"""

from __future__ import annotations

import csv
import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from sim.experiment.dso_sim import TYPES, pct

COMPONENTS = ("hub_ms", "storage_ms", "dispatch_ms", "retailer_ms", "other_ms")
"""Figure 6's stack: hub before storage, storage (to the 202), 202 → first publish, the RP's own time (mean over
the request's clients), and the rest of ``total_ms`` (MQTT both ways, the hub applying outcomes)."""
TRACE_KEYS = ("hub_ms", "storage_ms", "dispatch_ms", "retailer_ms", "retailer_max_ms", "total_ms", "total_max_ms",
              "completion_ms")
CSV_FIELDS = ("seq", "type", "warmup", "scheduled_s", "sent_s", "lag_ms", "clients", "status", "request_id",
              "attempts", "post_ms", "done_ms", "end_to_end_ms", "hub_added_ms", "seen_ms", "polls", "state",
              "outcome", *TRACE_KEYS, "other_ms", "error")
LATENCIES = {"post_to_202": "POST -> 202", "post_to_completed": "POST -> completed",
             "accepted_to_completed": "202 -> completed", "hub_added": "hub-added (POST -> completed minus the "
             "retailers' minimum delay per phase)"}
"""The latencies every report gives; ``post_to_completed`` is the hub's ``completed_at`` minus the first POST's
send time (same host clock), ``post_to_202`` the last POST attempt's round trip, ``hub_added`` what DESIGN.md's
latency targets are about (the latency the hub and its storage add): ``post_to_completed`` minus the RP
simulator's *minimum* artificial delay once per phase that waits for the retailers' answers, so it overstates
the hub's share by at most the delay's spread (10 ms by default) per phase, never understates it."""
RETAILER_PHASES = {"emergency": 1, "load_reduction": 2, "load_shift": 1, "billing": 0}
"""Phases of each type that wait for the retailers' outcomes: a load reduction asks for availability, then
disconnects; billing data only needs the retailer's acknowledgement, which the RP simulator sends at once."""
RESOURCE_BUCKET_S = 60.0
MB = 1e6


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


def annotate(records: list[dict[str, Any]], rp_delay_min_ms: float) -> list[dict[str, Any]]:
    """Add the derived figures to each record: ``other_ms`` (trace) and ``hub_added_ms``; returns ``records``."""
    for r in records:
        r["other_ms"] = _other_ms(r.get("trace", {}))
        if "end_to_end_ms" in r:
            r["hub_added_ms"] = round(float(r["end_to_end_ms"]) - RETAILER_PHASES[r["type"]] * rp_delay_min_ms, 3)
    return records


def latencies(records: list[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """The latencies of :data:`LATENCIES` of the measured (non-warm-up) requests among ``records``."""
    measured = [r for r in records if not r.get("warmup")]
    done = [r for r in measured if r.get("outcome") == "completed"]
    return {"post_to_202": stats([float(r["post_ms"]) for r in measured if r.get("status") == 202]),
            "post_to_completed": stats([float(r["end_to_end_ms"]) for r in done if "end_to_end_ms" in r]),
            "accepted_to_completed": stats([float(r["done_ms"]) for r in done if "done_ms" in r]),
            "hub_added": stats([float(r["hub_added_ms"]) for r in done if "hub_added_ms" in r])}


def reconcile(records: list[dict[str, Any]], generator: list[dict[str, Any]], hub_counters: dict[str, Any],
              rp_stats: dict[str, Any]) -> dict[str, Any]:
    """Every numbered request against the schedule, the hub's own counters and the RP simulators' counters."""
    planned = sum(int(g.get("planned", 0)) for g in generator)
    seqs = Counter(int(r["seq"]) for r in records)
    accepted = [r for r in records if r.get("status") == 202 and r.get("request_id")]
    ids = Counter(r["request_id"] for r in accepted)
    outcomes = Counter(r.get("outcome", "missing") for r in records)
    created = hub_counters.get("created", {})
    # Only the DSO's request types: the hub also creates requests of its own (a registration's ``customers``
    # announcement to the retailers), which no DSO record stands for.
    hub_created = sum(int(v) for k, v in created.items() if k in TYPES) if created else None
    out: dict[str, Any] = {
        "planned": planned, "sent": len(records), "accepted": len(accepted), "completed": outcomes["completed"],
        "failed": outcomes["failed"], "missing": outcomes["missing"],
        "seq_not_sent": sorted(set(range(planned)) - set(seqs))[:100],
        "seq_duplicates": sorted(k for k, n in seqs.items() if n > 1)[:100],
        "duplicate_request_ids": sum(n - 1 for n in ids.values() if n > 1),
        "hub_accepted": hub_created,
        "hub_counters_since_restart": bool(hub_counters.get("since_restart")),
        "post_attempts": sum(int(r.get("attempts", 1)) for r in records if "attempts" in r),
        "retries": sum(int(r.get("attempts", 1)) - 1 for r in records if "attempts" in r),
        "rp_redelivered_requests": sum(int(v.get("redelivered_requests", 0)) for v in rp_stats.values()),
        "rp_outcome_resends": sum(int(v.get("outcome_resends", 0)) for v in rp_stats.values()),
        "rp_outcomes": sum(int(v.get("outcomes", 0)) for v in rp_stats.values()),
        "rp_outcome_messages": sum(int(v.get("outcome_messages", 0)) for v in rp_stats.values()),
        "rp_unacked_at_exit": sum(int(v.get("unacked_at_exit", 0)) for v in rp_stats.values()),
    }
    # The hub accepted requests the DSO was never told of (a 202 lost, the POST re-sent and accepted again under
    # a new id). Only comparable when the hub's counters cover the whole run (not restarted).
    out["accepted_unknown_to_dso"] = (hub_created - len(accepted) if hub_created is not None
                                      and not out["hub_counters_since_restart"] else None)
    out["duplicates"] = out["duplicate_request_ids"] + len(out["seq_duplicates"]) + max(
        0, out["accepted_unknown_to_dso"] or 0)
    out["accounted"] = (len(records) == planned and not out["seq_not_sent"] and not out["seq_duplicates"]
                        and len(records) == out["completed"] + out["failed"] + out["missing"])
    return out


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
            "latency_ms": latencies(recs),
            "seen_after_ms": stats([float(r["seen_ms"]) - float(r["end_to_end_ms"]) for r in done
                                    if "seen_ms" in r and "end_to_end_ms" in r]),
            "polls_per_request": stats([float(r["polls"]) for r in measured if "polls" in r])["mean"],
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


def resources(samples: list[dict[str, Any]], disk_samples: list[dict[str, Any]],
              bucket_s: float = RESOURCE_BUCKET_S) -> list[dict[str, Any]]:
    """Per ``bucket_s`` (a minute) and per process or disk: CPU % of one core, RSS (mean / max MiB), disk read /
    write MB/s, from the cumulative counters sampled each second (each interval counts in the bucket it ends in)."""
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in samples:
        series.setdefault(("process", s["process"]), []).append(s)
    for d in disk_samples:
        series.setdefault(("disk", d["device"]), []).append(d)
    rows = []
    for (kind, name), pts in sorted(series.items()):
        acc: dict[int, dict[str, Any]] = {}
        for prev, cur in itertools.pairwise(pts):
            dt = float(cur["t_s"]) - float(prev["t_s"])
            if dt <= 0:
                continue
            b = acc.setdefault(int(float(cur["t_s"]) // bucket_s), {"dt": 0.0, "cpu": 0.0, "rd": 0, "wr": 0,
                                                                     "rss": []})
            b["dt"] += dt
            b["rd"] += max(0, int(cur["read_bytes"]) - int(prev["read_bytes"]))
            b["wr"] += max(0, int(cur["write_bytes"]) - int(prev["write_bytes"]))
            if kind == "process":
                b["cpu"] += float(cur["cpu_s"]) - float(prev["cpu_s"])
                b["rss"].append(float(cur["rss_mib"]))
        for i, b in sorted(acc.items()):
            rows.append({"minute": i, "t_start_s": round(i * bucket_s, 3), "kind": kind, "name": name,
                         "seconds": round(b["dt"], 3),
                         "cpu_pct": round(100 * b["cpu"] / b["dt"], 1) if kind == "process" else None,
                         "rss_mean_mib": round(sum(b["rss"]) / len(b["rss"]), 2) if b["rss"] else None,
                         "rss_max_mib": round(max(b["rss"]), 2) if b["rss"] else None,
                         "read_mb_s": round(b["rd"] / MB / b["dt"], 4), "write_mb_s": round(b["wr"] / MB / b["dt"], 4)})
    return rows


# Complexity (PLR0913): everything a report is written from, passed once.
def write_all(out: Path, *, params: dict[str, Any], machine: dict[str, Any], records: list[dict[str, Any]],  # noqa: PLR0913
              rp_stats: dict[str, Any], samples: list[dict[str, Any]], procs: dict[str, dict[str, float]],
              wall_s: float, setup: dict[str, Any], generator: list[dict[str, Any]] | None = None,
              hub_counters: dict[str, Any] | None = None,
              disk_samples: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write every output to ``out``; returns the content of ``results.json``."""
    out.mkdir(parents=True, exist_ok=True)
    generator = generator or []
    disk_samples = disk_samples or []
    annotate(records, float(params.get("rp_delay_min_ms", 0.0)))
    per_type = summarize(records)
    run_s = max((s["t_s"] for s in samples), default=0.0)
    totals = {k: sum(t[k] for t in per_type.values()) for k in ("sent", "completed", "failed", "missing",
                                                                  "duplicates", "accepted_202")}
    rec = reconcile(records, generator, hub_counters or {}, rp_stats)
    totals["duplicates"] = max(totals["duplicates"], rec["duplicates"])
    res_rows = resources(samples, disk_samples)
    results = {
        "experiment": "base",
        "params": params,
        "machine": machine,
        "wall_s": wall_s,
        "run_s": run_s,
        "setup": setup,
        "totals": {**totals, "accounted": totals["sent"] == totals["completed"] + totals["failed"]
                   + totals["missing"]},
        "reconciliation": rec,
        "generator": {"valid": bool(generator) and all(g.get("schedule_kept") for g in generator),
                      "workers": generator},
        "latency_ms": latencies(records),
        "per_type": per_type,
        "processes": process_summary(samples, procs, run_s),
        "hub_counters": hub_counters or {},
        "rp_simulators": rp_stats,
        "resources_per_minute": res_rows,
        "files": {"requests_csv": "requests.csv", "process_samples_csv": "processes.csv",
                  "disk_samples_csv": "disks.csv", "resources_csv": "resources.csv",
                  "plots": [*(f"{name}.png" for name in PLOTS), "resources.png"], "report": "report.md"},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    with (out / "requests.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({**r, **{k: r.get("trace", {}).get(k) for k in TRACE_KEYS}, "outcome": r.get("outcome",
                                                                                                     "missing")})
    with (out / "processes.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["t_s", "process", "cpu_s", "rss_mib", "max_rss_mib", "read_bytes",
                                          "write_bytes"])
        w.writeheader()
        w.writerows(samples)
    with (out / "disks.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["t_s", "device", "read_bytes", "write_bytes"])
        w.writeheader()
        w.writerows(disk_samples)
    with (out / "resources.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["minute", "t_start_s", "kind", "name", "seconds", "cpu_pct",
                                          "rss_mean_mib", "rss_max_mib", "read_mb_s", "write_mb_s"])
        w.writeheader()
        w.writerows(res_rows)
    for name, plot in PLOTS.items():
        fig = plot(records, per_type, samples)
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
    fig = plot_resources(res_rows)
    fig.savefig(out / "resources.png", dpi=110)
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


def plot_resources(rows: list[dict[str, Any]]) -> Any:
    """Resource use per minute (as the paper's Figure 11): CPU and memory per process, disk MB/s per disk and
    per process that wrote."""
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    procs = sorted({r["name"] for r in rows if r["kind"] == "process"})
    for name in procs:
        pts = [r for r in rows if r["kind"] == "process" and r["name"] == name]
        xs = [r["minute"] for r in pts]
        ax1.plot(xs, [r["cpu_pct"] for r in pts], "o-", label=name)
        ax2.plot(xs, [r["rss_max_mib"] for r in pts], "o-", label=name)
        if any(r["write_mb_s"] or r["read_mb_s"] for r in pts):
            ax3.plot(xs, [r["write_mb_s"] for r in pts], "x--", label=f"{name} write")
    for dev in sorted({r["name"] for r in rows if r["kind"] == "disk"}):
        pts = [r for r in rows if r["kind"] == "disk" and r["name"] == dev]
        ax3.plot([r["minute"] for r in pts], [r["read_mb_s"] for r in pts], "o-", label=f"{dev} read (all)")
        ax3.plot([r["minute"] for r in pts], [r["write_mb_s"] for r in pts], "s-", label=f"{dev} write (all)")
    for ax, title, ylabel in ((ax1, "CPU per process", "% of one core"), (ax2, "Memory per process", "max RSS (MiB)"),
                              (ax3, "Disk", "MB/s")):
        ax.set_title(f"{title}, per minute")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("minute of the run")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


PLOTS = {"latency_breakdown": plot_breakdown, "latency_distribution": plot_distribution,
         "latency_over_time": plot_over_time, "cpu_per_process": plot_cpu}


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def latency_table(rows: dict[str, dict[str, Any]], first: str = "type") -> list[str]:
    """A markdown table of latency statistics, one row per key: n, p50, p90, p99, p99.9, max (ms)."""
    out = [f"| {first} | n | p50 | p90 | p99 | p99.9 | max |", "|---|---|---|---|---|---|---|"]
    for name, st in rows.items():
        out.append(f"| {name} | {st['n']} | " + " | ".join(_fmt(st[k]) for k in ("p50", "p90", "p99", "p99.9", "max"))
                   + " |")
    return out


def reconciliation_text(results: dict[str, Any]) -> str:
    """The reconciliation and the generator's self-check in a few sentences."""
    r, g = results["reconciliation"], results["generator"]
    hub = ("not comparable (the hub restarted its counters)" if r["hub_counters_since_restart"]
           else f"{r['hub_accepted']} ({r['accepted_unknown_to_dso']} unknown to the DSO)")
    kept = ("kept its schedule" if g["valid"] else
            "DID NOT keep its schedule: the run is INVALID (the load generator, not the hub, set the pace)")
    workers = ", ".join(f"{w['process']}: lag p99 {_fmt(w.get('lag_p99_ms'))} ms, max {_fmt(w.get('lag_max_ms'))} "
                        f"ms, {w.get('late_sends')} sends later than {_fmt(w.get('lag_bound_ms'))} ms"
                        for w in g["workers"])
    return (f"Scheduled {r['planned']}, sent {r['sent']}, accepted {r['accepted']}, completed {r['completed']}, "
            f"failed {r['failed']}, missing {r['missing']}; seq not sent {len(r['seq_not_sent'])}, seq twice "
            f"{len(r['seq_duplicates'])}, request ids for two seqs {r['duplicate_request_ids']}; hub's own count of "
            f"accepted requests {hub}; POST attempts {r['post_attempts']} ({r['retries']} re-sends). RP simulators: "
            f"{r['rp_redelivered_requests']} requests delivered again (acked again, answered once), "
            f"{r.get('rp_outcomes', 0)} outcomes in {r.get('rp_outcome_messages', 0)} messages, "
            f"{r['rp_outcome_resends']} messages re-sent, {r['rp_unacked_at_exit']} unacknowledged at exit.\n\n"
            f"Generator (open loop): {kept} — {workers}.")


def markdown(results: dict[str, Any]) -> str:
    """The short human-readable report."""
    p, m, t = results["params"], results["machine"], results["totals"]
    lines = [
        "# Experiment: base setup", "",
        f"{p['clients']} clients, {p['retailers']} retailer(s) (RP simulators, delay "
        f"[{p['rp_delay_min_ms']:g}, {p['rp_delay_max_ms']:g}) ms), {p['duration_s']:g} s measured after "
        f"{p['warmup_s']:g} s of warm-up, rates per minute {p['rates_per_min']}, targets {p['fractions']} of the "
        f"clients. Machine: {m['cpus']} CPUs, {m['cpu_model']}, {m['memory']}.", "",
        f"Storage: {results['setup'].get('storage', 'sqlite')}.", "",
        f"Requests sent {t['sent']}: completed {t['completed']}, failed {t['failed']}, missing {t['missing']}, "
        f"duplicates {t['duplicates']} — every request accounted for: {'yes' if t['accounted'] else 'NO'}.", "",
        "## Reconciliation", "", reconciliation_text(results), "",
        "## Latency per request type (ms, warm-up excluded)", "",
        "| type | sent | 202 | completed | failed | missing |", "|---|---|---|---|---|---|",
    ]
    for kind, s in results["per_type"].items():
        lines.append(f"| {kind} | {s['sent']} | {s['accepted_202']} | {s['completed']} | {s['failed']} | "
                     f"{s['missing']} |")
    lines += ["", "`POST -> completed` is the hub's `completed_at` minus the first POST's send time (one host clock); "
              "`seen after` is how much later the DSO simulator's polling saw it.", ""]
    for key, title in LATENCIES.items():
        lines += [f"### {title}", "", *latency_table({k: s["latency_ms"][key] for k, s in results["per_type"].items()}
                                                     | {"all": results["latency_ms"][key]}), ""]
    lines += ["", "## Breakdown per component (hub trace, mean ms; Figure 6)", "",
              "| type | hub | storage | dispatch | retailer | other | total | completion |",
              "|---|---|---|---|---|---|---|---|"]
    for kind, s in results["per_type"].items():
        b = s["breakdown_ms"]
        lines.append(f"| {kind} | " + " | ".join(_fmt(b[k]["mean"]) for k in (
            "hub_ms", "storage_ms", "dispatch_ms", "retailer_ms", "other_ms", "total_ms", "completion_ms")) + " |")
    lines += ["", "## Resources per minute", "", "| minute | process / disk | CPU % | RSS max MiB | read MB/s | "
              "write MB/s |", "|---|---|---|---|---|---|"]
    for r in results["resources_per_minute"]:
        lines.append(f"| {r['minute']} | {r['name']} | {_fmt(r['cpu_pct'])} | {_fmt(r['rss_max_mib'])} | "
                     f"{_fmt(r['read_mb_s'])} | {_fmt(r['write_mb_s'])} |")
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
