"""``mhp-sim experiment``: run one of the paper's experiments and write its results to a folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sim.experiment import faults as faults_mod
from sim.experiment import scale as scale_mod
from sim.experiment import scaleout as scaleout_mod
from sim.experiment.base import BaseParams, Experiment


def _common(sp: argparse.ArgumentParser, *, duration_s: float, sizes: bool = False) -> None:
    sp.add_argument("--out", type=Path, required=True, help="folder for results.json, CSVs, PNGs, report.md")
    if sizes:
        sp.add_argument("--clients", default="1000", help="a number, or a comma-separated list of sizes (e.g. "
                        "100,1000,10000); exactly one of --clients / --retailers may be a list")
        sp.add_argument("--retailers", default="1", help="a number, or a comma-separated list of sizes (e.g. 1,5,10)")
    else:
        sp.add_argument("--clients", type=int, default=100)
        sp.add_argument("--retailers", type=int, default=1)
    sp.add_argument("--duration-s", type=float, default=duration_s, help="measured period (after the warm-up)")
    sp.add_argument("--warmup-s", type=float, default=5.0, help="sent and accounted, not in the latency figures")
    sp.add_argument("--rate-per-min", type=float, default=30.0, help="requests per minute of each of the 4 types")
    sp.add_argument("--rp-delay-min-ms", type=float, default=100.0)
    sp.add_argument("--rp-delay-max-ms", type=float, default=110.0)
    sp.add_argument("--drain-s", type=float, default=30.0, help="how long requests are followed after the last send")
    sp.add_argument("--seed", type=int, default=1)


def _sizes(parser: argparse.ArgumentParser, text: str, what: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--{what}: expected a number or a comma-separated list of numbers, got {text!r}")
    if not sizes or min(sizes) < 1:
        parser.error(f"--{what}: sizes must be positive")
    return sizes


def _print_base(results: dict[str, object], out: Path) -> None:
    t: dict[str, int] = results["totals"]  # type: ignore[assignment]
    print(f"[experiment] done: sent {t['sent']}, completed {t['completed']}, failed {t['failed']}, missing "
          f"{t['missing']}; results in {out}", flush=True)
    per_type: dict[str, dict[str, dict[str, dict[str, float]]]] = results["per_type"]  # type: ignore[assignment]
    for kind, s in per_type.items():
        d, a = s["latency_ms"]["accepted_to_completed"], s["latency_ms"]["post_to_202"]
        print(f"[experiment] {kind:15s} POST->202 p50 {a['p50']} p99 {a['p99']} ms | 202->completed p50 {d['p50']} "
              f"p99 {d['p99']} ms | breakdown " + json.dumps({k: v["mean"] for k, v in s["breakdown_ms"].items()
                                                               if k in ("hub_ms", "storage_ms", "dispatch_ms",
                                                                        "retailer_ms", "other_ms")}), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mhp-sim experiment``."""
    parser = argparse.ArgumentParser(prog="mhp-sim experiment", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="experiment", required=True)
    base = sub.add_parser("base", help="the paper's base setup: DSO simulator -> hub -> RP simulators, measured")
    _common(base, duration_s=60.0)
    scale = sub.add_parser("scale", help="the base setup once per number of clients or retailers (Figures 7-10)")
    _common(scale, duration_s=20.0, sizes=True)
    faults = sub.add_parser("faults", help="the base setup with a hub or storage fault injected (Figures 12-13)")
    _common(faults, duration_s=60.0)
    faults.add_argument("--fault", choices=("hub", "storage"), required=True,
                        help="hub: kill -9 of the hub process and an immediate restart; storage: the hub's SQLite "
                             "database locked by another process for --down-s")
    faults.add_argument("--at-s", type=float, default=20.0, help="when, in seconds after the DSO simulator started")
    faults.add_argument("--down-s", type=float, default=5.0, help="how long the storage stays locked")
    faults.add_argument("--bucket-s", type=float, default=2.0, help="latency-over-time bucket")
    faults.add_argument("--retry-s", type=float, default=0.5, help="the DSO's pause before re-sending a POST")
    scaleout = sub.add_parser("scaleout", help="hub replicas behind one HTTP entry (HAProxy), one killed mid-run")
    _common(scaleout, duration_s=60.0)
    scaleout.add_argument("--replicas", type=int, default=2, help="hub replicas (at least 2)")
    scaleout.add_argument("--kill-at-s", type=float, default=20.0,
                          help="when replica 1 is killed with SIGKILL, in seconds after the DSO simulator started")
    scaleout.add_argument("--restart-after-s", type=float,
                          help="start the killed replica again this long after the kill (default: it stays down)")
    scaleout.add_argument("--bucket-s", type=float, default=2.0, help="latency-over-time bucket")
    scaleout.add_argument("--retry-s", type=float, default=0.5, help="the DSO's pause before re-sending a POST")
    args = parser.parse_args(argv)
    if args.duration_s <= 0 or args.rate_per_min <= 0:
        parser.error("duration and rate must be positive")
    common = dict(out=args.out, duration_s=args.duration_s, warmup_s=args.warmup_s, rate_per_min=args.rate_per_min,
                  rp_delay_min_ms=args.rp_delay_min_ms, rp_delay_max_ms=args.rp_delay_max_ms, drain_s=args.drain_s,
                  seed=args.seed)
    if args.experiment == "scale":
        clients, retailers = _sizes(parser, args.clients, "clients"), _sizes(parser, args.retailers, "retailers")
        if len(clients) > 1 and len(retailers) > 1:
            parser.error("only one of --clients / --retailers can be a list of sizes")
        axis, sizes = ("retailers", retailers) if len(retailers) > 1 else ("clients", clients)
        res = scale_mod.run(BaseParams(clients=clients[0], retailers=retailers[0], **common), axis, sizes)
        t = res["totals"]
        print(f"[scale] done: {len(sizes)} sizes of {axis}; sent {t['sent']}, completed {t['completed']}, failed "
              f"{t['failed']}, missing {t['missing']}; results in {args.out}", flush=True)
        return 0 if t["sent"] == t["completed"] else 1
    if args.clients < 1 or args.retailers < 1:
        parser.error("clients and retailers must be positive")
    if args.experiment == "faults":
        if args.at_s < 0 or args.down_s <= 0 or args.bucket_s <= 0:
            parser.error("--at-s must be >= 0, --down-s and --bucket-s positive")
        if args.at_s >= args.warmup_s + args.duration_s:
            parser.error("--at-s must fall before the end of the run (warm-up + duration)")
        p = BaseParams(clients=args.clients, retailers=args.retailers, fault=args.fault, fault_at_s=args.at_s,
                       fault_down_s=args.down_s, retry_s=args.retry_s, **common)
        res = faults_mod.run(p, args.bucket_s)
        a, f = res["accounting"], res["fault"]
        print(f"[faults] done: {json.dumps(f)}", flush=True)
        print(f"[faults] sent {a['sent']} accepted {a['accepted']} completed {a['completed']} lost {a['lost']} "
              f"(retried {a['retried_requests']} requests, {a['retries']} re-sends: {a['status_503']} 503s, "
              f"{a['no_answer']} without an answer); results in {args.out}", flush=True)
        return 0 if a["accounted"] and a["lost"] == 0 and f["injected"] else 1
    if args.experiment == "scaleout":
        if args.replicas < 2:
            parser.error("--replicas must be at least 2")
        if args.kill_at_s < 0 or args.bucket_s <= 0 or (args.restart_after_s is not None and args.restart_after_s < 0):
            parser.error("--kill-at-s and --restart-after-s must be >= 0, --bucket-s positive")
        if args.kill_at_s >= args.warmup_s + args.duration_s:
            parser.error("--kill-at-s must fall before the end of the run (warm-up + duration)")
        sp = scaleout_mod.ScaleoutParams(clients=args.clients, retailers=args.retailers, replicas=args.replicas,
                                         fault_at_s=args.kill_at_s, restart_after_s=args.restart_after_s,
                                         bucket_s=args.bucket_s, retry_s=args.retry_s, **common)
        res = scaleout_mod.run(sp)
        a, f = res["accounting"], res["fault"]
        print(f"[scaleout] done: {json.dumps(f)}", flush=True)
        print(f"[scaleout] sent {a['sent']} accepted {a['accepted']} completed {a['completed']} lost {a['lost']} "
              f"duplicate ids {a['duplicate_request_ids']} (retried {a['retried_requests']} requests, "
              f"{a['redelivered_to_retailers']} requests re-delivered to retailers and dropped there); CPU per "
              f"replica " + json.dumps({k: v["cpu_s"] for k, v in res["replicas"]["cpu"].items()})
              + f"; results in {args.out}", flush=True)
        return 0 if a["accounted"] and a["lost"] == 0 and f["injected"] else 1
    results = Experiment(BaseParams(clients=args.clients, retailers=args.retailers, **common)).run()
    _print_base(results, args.out)
    t = results["totals"]
    return 0 if t["accounted"] and t["missing"] == 0 and t["failed"] == 0 else 1

if __name__ == "__main__":
    sys.exit(main())
