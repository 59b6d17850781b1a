"""``mhp-sim experiment``: run one of the paper's experiments and write its results to a folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sim.experiment.base import BaseParams, Experiment


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mhp-sim experiment``."""
    parser = argparse.ArgumentParser(prog="mhp-sim experiment", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="experiment", required=True)
    base = sub.add_parser("base", help="the paper's base setup: DSO simulator -> hub -> RP simulators, measured")
    base.add_argument("--out", type=Path, required=True, help="folder for results.json, CSVs, PNGs, report.md")
    base.add_argument("--clients", type=int, default=100)
    base.add_argument("--retailers", type=int, default=1)
    base.add_argument("--duration-s", type=float, default=60.0, help="measured period (after the warm-up)")
    base.add_argument("--warmup-s", type=float, default=5.0, help="sent and accounted, not in the latency figures")
    base.add_argument("--rate-per-min", type=float, default=30.0, help="requests per minute of each of the 4 types")
    base.add_argument("--rp-delay-min-ms", type=float, default=100.0)
    base.add_argument("--rp-delay-max-ms", type=float, default=110.0)
    base.add_argument("--drain-s", type=float, default=30.0, help="how long requests are followed after the last send")
    base.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.retailers < 1 or args.duration_s <= 0 or args.rate_per_min <= 0:
        parser.error("clients, retailers, duration and rate must be positive")
    params = BaseParams(out=args.out, clients=args.clients, retailers=args.retailers, duration_s=args.duration_s,
                        warmup_s=args.warmup_s, rate_per_min=args.rate_per_min, rp_delay_min_ms=args.rp_delay_min_ms,
                        rp_delay_max_ms=args.rp_delay_max_ms, drain_s=args.drain_s, seed=args.seed)
    results = Experiment(params).run()
    t = results["totals"]
    print(f"[experiment] done: sent {t['sent']}, completed {t['completed']}, failed {t['failed']}, missing "
          f"{t['missing']}; results in {args.out}", flush=True)
    for kind, s in results["per_type"].items():
        d, a = s["latency_ms"]["accepted_to_completed"], s["latency_ms"]["post_to_202"]
        print(f"[experiment] {kind:15s} POST->202 p50 {a['p50']} p99 {a['p99']} ms | 202->completed p50 {d['p50']} "
              f"p99 {d['p99']} ms | breakdown " + json.dumps({k: v["mean"] for k, v in s["breakdown_ms"].items()
                                                               if k in ("hub_ms", "storage_ms", "dispatch_ms",
                                                                        "retailer_ms", "other_ms")}), flush=True)
    return 0 if t["accounted"] and t["missing"] == 0 and t["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
