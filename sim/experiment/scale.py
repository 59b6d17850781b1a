"""``mhp-sim experiment scale``: the base setup once per size, clients or retailers (the paper's Figures 7-10).

Each size is a full base run in ``OUT/clients-N`` or ``OUT/retailers-N`` (its own results.json, CSVs, plots).
Combined: ``results.json`` (per size: accounting, per component mean latency, per type mean / p99),
``scale.csv`` (one row per size and type, plus an ``all`` row), ``scale_components.png`` (Figures 7 / 9: mean
latency per component per size, stacked, with the p99 of POST → completed), ``scale_types.png`` (Figures 8 / 10:
mean and p99 per request type per size) and ``report.md``.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import replace
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from sim.experiment import report
from sim.experiment.base import BaseParams, Experiment
from sim.experiment.dso_sim import TYPES, pct
from sim.experiment.report import COMPONENTS


def size_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One size: per component mean over every measured completed request, per type mean / p99."""
    done = [r for r in records if not r.get("warmup") and r.get("outcome") == "completed"]
    comps: dict[str, float | None] = {}
    for comp in COMPONENTS:
        vals = [float(r["other_ms"] if comp == "other_ms" else r["trace"][comp]) for r in done
                if (r.get("other_ms") is not None if comp == "other_ms" else comp in r.get("trace", {}))]
        # Per request, averaged over all requests (billing has no retailer share: it counts as 0 there).
        comps[comp] = round(sum(vals) / len(done), 3) if done else None
    e2e = [float(r["end_to_end_ms"]) for r in done if "end_to_end_ms" in r]
    per_type: dict[str, Any] = {}
    for kind in TYPES:
        v = [float(r["end_to_end_ms"]) for r in done if r["type"] == kind and "end_to_end_ms" in r]
        p202 = [float(r["post_ms"]) for r in records if r["type"] == kind and not r.get("warmup")
                and r.get("status") == 202]
        per_type[kind] = {"n": len(v), "mean_ms": round(sum(v) / len(v), 3) if v else None, "p50_ms": pct(v, 50),
                          "p99_ms": pct(v, 99), "post_to_202_mean_ms": round(sum(p202) / len(p202), 3) if p202
                          else None, "post_to_202_p99_ms": pct(p202, 99)}
    return {"components_mean_ms": comps,
            "all": {"n": len(e2e), "mean_ms": round(sum(e2e) / len(e2e), 3) if e2e else None,
                    "p50_ms": pct(e2e, 50), "p99_ms": pct(e2e, 99)},
            "per_type": per_type}


def capped_fractions(fractions: dict[str, float], clients: int, max_targets: int) -> dict[str, float]:
    """The type fractions, each lowered so that a request targets at most ``max_targets`` clients (0: as is)."""
    if max_targets <= 0:
        return dict(fractions)
    return {k: min(f, max_targets / clients) for k, f in fractions.items()}


def run(base: BaseParams, axis: str, sizes: list[int], *, max_targets: int = 0) -> dict[str, Any]:
    """Run the base setup for each size of ``axis`` (``clients`` or ``retailers``); write the combined outputs.
    ``max_targets`` > 0 caps the clients per request (the fractions are lowered where needed, per size)."""
    out = base.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    started = time.time()
    for i, n in enumerate(sizes):
        clients = n if axis == "clients" else base.clients
        p = replace(base, out=out / f"{axis}-{n}", clients=clients,
                    retailers=n if axis == "retailers" else base.retailers,
                    fractions=capped_fractions(base.fractions, clients, max_targets))
        print(f"[scale] size {i + 1}/{len(sizes)}: {p.clients} clients, {p.retailers} retailer(s), "
              f"{p.duration_s:g} s -> {p.out}", flush=True)
        t = time.time()
        res = Experiment(p).run()
        records = report.read_records(p.out / "run" / "requests.jsonl")
        for r in records:
            r["other_ms"] = report._other_ms(r.get("trace", {}))
        tot = res["totals"]
        runs.append({"size": n, "clients": p.clients, "retailers": p.retailers, "dir": p.out.name,
                     "fractions": p.fractions,
                     "wall_s": round(time.time() - t, 1), "setup_s": res["setup"]["setup_s"],
                     "totals": tot, **size_summary(records),
                     "hub_cpu_pct": res["processes"].get("hub", {}).get("cpu_pct_of_one_core"),
                     "hub_max_rss_mib": res["processes"].get("hub", {}).get("max_rss_mib")})
        s = runs[-1]
        print(f"[scale] size {n}: sent {tot['sent']} completed {tot['completed']} failed {tot['failed']} missing "
              f"{tot['missing']}; POST->completed mean {s['all']['mean_ms']} p99 {s['all']['p99_ms']} ms; "
              f"components {s['components_mean_ms']} ({s['wall_s']:.0f} s)", flush=True)
    params = {k: (str(v) if k == "out" else v) for k, v in vars(base).items() if k not in (axis, "fault",
                                                                                          "fault_at_s", "fault_down_s")}
    params["max_targets"] = max_targets
    results = {"experiment": "scale", "axis": axis, "sizes": sizes, "params": params,
               "wall_s": round(time.time() - started, 1), "runs": runs,
               "totals": {k: sum(r["totals"][k] for r in runs) for k in ("sent", "completed", "failed", "missing")},
               "files": {"csv": "scale.csv", "plots": ["scale_components.png", "scale_types.png"],
                         "report": "report.md", "per_size": [r["dir"] for r in runs]}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    with (out / "scale.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["axis", "size", "clients", "retailers", "type", "n", "mean_ms", "p50_ms", "p99_ms",
                    "post_to_202_mean_ms", "post_to_202_p99_ms", *[c for c in COMPONENTS]])
        for r in runs:
            w.writerow([axis, r["size"], r["clients"], r["retailers"], "all", r["all"]["n"], r["all"]["mean_ms"],
                        r["all"]["p50_ms"], r["all"]["p99_ms"], "", "", *[r["components_mean_ms"][c]
                                                                          for c in COMPONENTS]])
            for kind, t in r["per_type"].items():
                w.writerow([axis, r["size"], r["clients"], r["retailers"], kind, t["n"], t["mean_ms"], t["p50_ms"],
                            t["p99_ms"], t["post_to_202_mean_ms"], t["post_to_202_p99_ms"], *[""] * len(COMPONENTS)])
    for name, fn in (("scale_components", plot_components), ("scale_types", plot_types)):
        fig = fn(axis, runs)
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
    (out / "report.md").write_text(markdown(results))
    return results


def plot_components(axis: str, runs: list[dict[str, Any]]) -> Any:
    """Figures 7 / 9: mean latency per component per size (stacked), p99 of POST → completed marked."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [str(r["size"]) for r in runs]
    bottom = [0.0] * len(runs)
    for comp in COMPONENTS:
        vals = [float(r["components_mean_ms"][comp] or 0.0) for r in runs]
        ax.bar(labels, vals, bottom=bottom, label=comp.removesuffix("_ms"))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.plot(labels, [r["all"]["mean_ms"] or 0.0 for r in runs], "ko-", label="POST -> completed, mean")
    ax.plot(labels, [r["all"]["p99_ms"] or 0.0 for r in runs], "k^--", label="POST -> completed, p99")
    ax.set_xlabel(axis)
    ax.set_ylabel("ms")
    ax.set_title(f"Mean latency per component (hub trace) per number of {axis}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def plot_types(axis: str, runs: list[dict[str, Any]]) -> Any:
    """Figures 8 / 10: mean (bar) and p99 (marker) of POST → completed per request type per size."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        xs = [k + (i - (len(runs) - 1) / 2) * width for k in range(len(TYPES))]
        bars = ax.bar(xs, [r["per_type"][t]["mean_ms"] or 0.0 for t in TYPES], width=width,
                      label=f"{r['size']} {axis} (mean)")
        ax.plot(xs, [r["per_type"][t]["p99_ms"] or 0.0 for t in TYPES], "v", color=bars.patches[0].get_facecolor(),
                markeredgecolor="k", label=f"{r['size']} {axis} (p99)")
    ax.set_xticks(range(len(TYPES)), list(TYPES))
    ax.set_yscale("log")
    ax.set_ylabel("POST -> completed (ms, log)")
    ax.set_title(f"Latency per request type per number of {axis}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def markdown(results: dict[str, Any]) -> str:
    """The combined report."""
    axis = results["axis"]
    lines = [f"# Experiment: scale in {axis}", "",
             f"Sizes {results['sizes']}; each a base run ({results['params']['duration_s']:g} s measured) in its "
             f"own folder. Latency is POST -> completed as measured by the DSO simulator, warm-up excluded.", "",
             "| size | sent | completed | failed | missing | mean ms | p99 ms | " + " | ".join(
                 c.removesuffix("_ms") for c in COMPONENTS) + " | hub CPU % | setup s |",
             "|---|---|---|---|---|---|---|" + "---|" * len(COMPONENTS) + "---|---|"]
    for r in results["runs"]:
        t = r["totals"]
        lines.append(f"| {r['size']} | {t['sent']} | {t['completed']} | {t['failed']} | {t['missing']} | "
                     f"{r['all']['mean_ms']} | {r['all']['p99_ms']} | "
                     + " | ".join(str(r["components_mean_ms"][c]) for c in COMPONENTS)
                     + f" | {r['hub_cpu_pct']} | {r['setup_s']} |")
    lines += ["", "## Per request type (mean / p99 ms)", "", "| size | " + " | ".join(TYPES) + " |",
              "|---|" + "---|" * len(TYPES)]
    for r in results["runs"]:
        lines.append(f"| {r['size']} | " + " | ".join(
            f"{r['per_type'][k]['mean_ms']} / {r['per_type'][k]['p99_ms']}" for k in TYPES) + " |")
    lines += ["", "Plots: `scale_components.png` (Figures 7 / 9), `scale_types.png` (Figures 8 / 10).", ""]
    return "\n".join(lines)
