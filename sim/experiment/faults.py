"""``mhp-sim experiment faults``: the base setup with one fault injected (the paper's Figures 12 and 13).

``hub``: the hub process is killed with SIGKILL at ``--at-s`` and started again at once; restart-to-ready is the
time from the kill to the first ``/readyz`` 200. ``storage``: the hub's SQLite database is locked by the experiment
process (``BEGIN EXCLUSIVE``, as in ``tests/cloud_hub/test_storage_faults.py``) for ``--down-s`` seconds.
``hbase`` (with ``--storage hbase``): the Thrift gateway is killed with SIGKILL and started again at once on the
same port. The HBase test double is gateway and "cluster" in one process holding its rows in memory, so killing it
would lose the data HBase keeps on three HDFS replicas; the gateway is therefore a process of its own, a TCP relay
in front of the double (``sim.experiment.thrift_gateway``), stateless as the real one. ``hbase-stall``: the double
itself is stopped (SIGSTOP) for ``--down-s`` and continued (SIGCONT), as a region server hung in a garbage
collection pause: connections stay open, calls hang until the hub's ``hbase_timeout_ms``. The DSO
simulator keeps its open-loop schedule throughout; a POST with no answer or a 5xx is sent again with its
Idempotency-Key. Written on top of the base outputs: ``results.json`` gets ``experiment: faults``, ``fault``,
``accounting`` and ``buckets``; ``latency_buckets.csv``; ``latency_fault.png``; a section in ``report.md``.
"""

from __future__ import annotations

import csv
import json
import statistics
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sim.experiment import report
from sim.experiment.base import BaseParams, Experiment
from sim.experiment.dso_sim import TYPES, pct


def accounting(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every request the DSO simulator sent, and what became of it; ``lost`` must be 0."""
    sent = len(records)
    accepted = [r for r in records if r.get("status") == 202 and r.get("request_id")]
    completed = sum(1 for r in records if r.get("outcome") == "completed")
    never_accepted = sent - len(accepted)
    not_terminal = sum(1 for r in accepted if r.get("outcome", "missing") == "missing")
    ended_other = sum(1 for r in accepted if r.get("outcome") == "failed")
    ids = [r["request_id"] for r in accepted]
    return {
        "sent": sent, "accepted": len(accepted), "completed": completed,
        "lost": never_accepted + not_terminal,
        "never_accepted": never_accepted, "accepted_not_terminal": not_terminal,
        "ended_not_completed": ended_other,
        "duplicate_request_ids": len(ids) - len(set(ids)),
        "accounted": sent == completed + ended_other + never_accepted + not_terminal,
        "post_attempts": sum(int(r.get("attempts", 1)) for r in records),
        "retried_requests": sum(1 for r in records if int(r.get("attempts", 1)) > 1),
        "retries": sum(int(r.get("attempts", 1)) - 1 for r in records),
        "status_503": sum(int(r.get("status_503", 0)) for r in records),
        "no_answer": sum(int(r.get("no_answer", 0)) for r in records),
        "status_5xx_other": sum(int(r.get("status_5xx_other", 0)) for r in records),
        "status_409_in_progress": sum(int(r.get("status_409_in_progress", 0)) for r in records),
    }


def dso_t0_wall(records: list[dict[str, Any]]) -> float | None:
    """The wall-clock time of the DSO simulator's time 0 (its records carry both clocks)."""
    offsets = [float(r["sent_at"]) - float(r["sent_s"]) for r in records if "sent_at" in r and "sent_s" in r]
    return statistics.median(offsets) if offsets else None


def buckets(records: list[dict[str, Any]], bucket_s: float) -> list[dict[str, Any]]:
    """Per time bucket (by when the request was first sent): counts and POST → completed latency."""
    end = max((float(r.get("sent_s", 0.0)) for r in records), default=0.0)
    out = []
    for i in range(int(end // bucket_s) + 1):
        recs = [r for r in records if i * bucket_s <= float(r.get("sent_s", -1.0)) < (i + 1) * bucket_s]
        lat = [float(r["end_to_end_ms"]) for r in recs if r.get("outcome") == "completed" and "end_to_end_ms" in r]
        out.append({"t_start_s": round(i * bucket_s, 3), "t_end_s": round((i + 1) * bucket_s, 3),
                    "sent": len(recs), "completed": sum(1 for r in recs if r.get("outcome") == "completed"),
                    "retried": sum(1 for r in recs if int(r.get("attempts", 1)) > 1),
                    "status_503": sum(int(r.get("status_503", 0)) for r in recs),
                    "no_answer": sum(int(r.get("no_answer", 0)) for r in recs),
                    "mean_ms": round(sum(lat) / len(lat), 3) if lat else None, "p50_ms": pct(lat, 50),
                    "p99_ms": pct(lat, 99), "max_ms": round(max(lat), 3) if lat else None})
    return out


def plot(records: list[dict[str, Any]], rows: list[dict[str, Any]], fault: dict[str, Any]) -> Any:
    """Figures 12 / 13: latency over time with the fault marked, and what the DSO saw per bucket."""
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for kind in TYPES:
        pts = [(float(r["sent_s"]), float(r["end_to_end_ms"])) for r in records
               if r["type"] == kind and r.get("outcome") == "completed" and "end_to_end_ms" in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ".", alpha=0.35, markersize=3, label=kind)
    mids = [(b["t_start_s"] + b["t_end_s"]) / 2 for b in rows]
    ax.plot([m for m, b in zip(mids, rows, strict=True) if b["mean_ms"] is not None],
            [b["mean_ms"] for b in rows if b["mean_ms"] is not None], "k-", label="mean per bucket")
    ax.plot([m for m, b in zip(mids, rows, strict=True) if b["p99_ms"] is not None],
            [b["p99_ms"] for b in rows if b["p99_ms"] is not None], "k--", linewidth=0.8, label="p99 per bucket")
    for a in (ax, ax2):
        if fault.get("at_s") is not None:
            a.axvline(fault["at_s"], color="red", linewidth=1.2)
            if fault.get("ready_s") is not None:
                a.axvspan(fault["at_s"], fault["ready_s"], color="red", alpha=0.12)
        a.grid(alpha=0.3)
    what = {"hub": "hub killed (kill -9) and restarted", "storage": "hub database locked",
            "hbase": "Thrift gateway killed (kill -9) and restarted",
            "hbase-stall": "HBase stopped (SIGSTOP)",
            "replica": "one hub replica killed (kill -9)",
            "broker": "hub broker killed (kill -9) and restarted"}.get(fault["kind"], "")
    ax.set_yscale("log")
    ax.set_ylabel("first POST -> completed (ms, log)")
    ax.set_title(f"Latency over time, measured by the DSO simulator; red: {what} until ready again")
    ax.legend(fontsize=8)
    width = (rows[0]["t_end_s"] - rows[0]["t_start_s"]) * 0.4 if rows else 1.0
    ax2.bar([m - width / 2 for m in mids], [b["sent"] for b in rows], width=width, label="sent")
    ax2.bar([m + width / 2 for m in mids], [b["retried"] for b in rows], width=width, label="retried (503 / no answer)")
    ax2.set_xlabel("time since the DSO simulator's first request (s)")
    ax2.set_ylabel("requests")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run(p: BaseParams, bucket_s: float) -> dict[str, Any]:
    """Run the base setup with ``p.fault``; returns the extended ``results.json``."""
    exp = Experiment(p)
    results = exp.run()
    out = exp.out
    records = report.read_records(exp.work / "requests.jsonl")
    t0 = dso_t0_wall(records)
    f = dict(exp.fault_log)
    fault: dict[str, Any] = {"kind": p.fault, "requested_at_s": p.fault_at_s, "down_s": p.fault_down_s,
                             "injected": "at_wall" in f, **{k: v for k, v in f.items() if not k.endswith("_wall")}}
    if t0 is not None and "at_wall" in f:  # on the DSO simulator's time line, like the requests
        fault["at_s"] = round(f["at_wall"] - t0, 3)
        if "ready_wall" in f:
            fault["ready_s"] = round(f["ready_wall"] - t0, 3)
        if "unlock_wall" in f:
            fault["unlocked_s"] = round(f["unlock_wall"] - t0, 3)
    rows = buckets(records, bucket_s)
    acc = accounting(records)
    results.update(experiment="faults", fault=fault, accounting=acc, bucket_s=bucket_s, buckets=rows)
    results["files"]["buckets_csv"] = "latency_buckets.csv"
    results["files"]["plots"].append("latency_fault.png")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    with (out / "latency_buckets.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["t_start_s"])
        w.writeheader()
        w.writerows(rows)
    fig = plot(records, rows, fault)
    fig.savefig(out / "latency_fault.png", dpi=110)
    plt.close(fig)
    lines = ["", f"## Fault: {p.fault}", "",
             "Fault: " + json.dumps(fault), "",
             "Accounting: " + json.dumps(acc), "",
             f"Latency per {bucket_s:g} s bucket (first POST -> completed, including retries; `latency_fault.png`):",
             "", *bucket_table(rows)]
    with (out / "report.md").open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    return results


def bucket_table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of latency-over-time buckets (the faults and the scale-out reports)."""
    return ["| from s | sent | completed | retried | 503s | no answer | mean ms | p99 ms |",
            "|---|---|---|---|---|---|---|---|",
            *(f"| {b['t_start_s']:g} | {b['sent']} | {b['completed']} | {b['retried']} | {b['status_503']} | "
              f"{b['no_answer']} | {b['mean_ms']} | {b['p99_ms']} |" for b in rows)]
