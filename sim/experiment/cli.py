"""``mhp-sim experiment``: run one of the paper's experiments and write its results to a folder."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retailer_bridge.partition import MAX_PARTITIONS
from sim.experiment import fanout as fanout_mod
from sim.experiment import faults as faults_mod
from sim.experiment import peer_openleadr
from sim.experiment import rate as rate_mod
from sim.experiment import scale as scale_mod
from sim.experiment import scaleout as scaleout_mod
from sim.experiment.base import BaseParams, Experiment


def _common(sp: argparse.ArgumentParser, *, duration_s: float, sizes: bool = False, rate: bool = True,
            warmup_s: float = 5.0, drain_s: float = 30.0, rp_outcomes: str = "per-client",
            dso_follow: str | None = "poll") -> None:
    sp.add_argument("--out", type=Path, required=True, help="folder for results.json, CSVs, PNGs, report.md")
    if sizes:
        sp.add_argument("--clients", default="1000", help="a number, or a comma-separated list of sizes (e.g. "
                        "100,1000,10000); exactly one of --clients / --retailers may be a list")
        sp.add_argument("--retailers", default="1", help="a number, or a comma-separated list of sizes (e.g. 1,5,10)")
    else:
        sp.add_argument("--clients", type=int, default=100)
        sp.add_argument("--retailers", type=int, default=1)
    sp.add_argument("--duration-s", type=float, default=duration_s, help="measured period (after the warm-up)")
    sp.add_argument("--warmup-s", type=float, default=warmup_s, help="sent and accounted, not in the latency figures")
    if rate:
        sp.add_argument("--rate-per-min", type=float, default=30.0, help="requests per minute of each of the 4 types")
    sp.add_argument("--rp-delay-min-ms", type=float, default=100.0)
    sp.add_argument("--rp-delay-max-ms", type=float, default=110.0)
    sp.add_argument("--rp-outcomes", choices=("batches", "per-client"), default=rp_outcomes,
                    help="how the RP simulator answers: outcomes batches as the real bridge, or the paper's one "
                         f"outcome message per client (default here: {rp_outcomes})")
    if dso_follow is None:  # scale-out: a replica's live feed carries only its own writes (docs/architecture.md)
        sp.set_defaults(dso_follow="poll")
    else:
        sp.add_argument("--dso-follow", choices=("poll", "feed"), default=dso_follow,
                        help="how the DSO simulator learns that a request ended: polling GET /v1/requests/{id}, or "
                             f"the hub's change feed and one GET per request (default here: {dso_follow})")
    sp.add_argument("--drain-s", type=float, default=drain_s,
                    help="how long requests are followed after the last send")
    sp.add_argument("--seed", type=int, default=1)
    sp.add_argument("--storage", choices=("sqlite", "hbase"), default=None,
                    help="the hub's storage: sqlite (embedded; the default) or hbase (the HBase Thrift test double "
                         "sim.hbase_double as its own process; the default for the hbase faults)")
    sp.add_argument("--lag-bound-ms", type=float, default=50.0,
                    help="a DSO simulator whose send-lag p99 exceeds this did not keep its schedule: the run is "
                         "flagged invalid")


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
    gen: dict[str, object] = results["generator"]  # type: ignore[assignment]
    if not gen["valid"]:
        print("[experiment] WARNING: a DSO simulator did not keep its schedule (send lag over its bound): the load "
              "generator, not the hub, set the pace; see report.md", flush=True)
    per_type: dict[str, dict[str, dict[str, dict[str, float]]]] = results["per_type"]  # type: ignore[assignment]
    for kind, s in per_type.items():
        d, a = s["latency_ms"]["accepted_to_completed"], s["latency_ms"]["post_to_202"]
        print(f"[experiment] {kind:15s} POST->202 p50 {a['p50']} p99 {a['p99']} ms | 202->completed p50 {d['p50']} "
              f"p99 {d['p99']} ms | breakdown " + json.dumps({k: v["mean"] for k, v in s["breakdown_ms"].items()
                                                               if k in ("hub_ms", "storage_ms", "dispatch_ms",
                                                                        "retailer_ms", "other_ms")}), flush=True)


def _fanout(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.timeout_s is None:
        args.timeout_s = fanout_mod.run_timeout_s(args.gateways)
    if min(args.gateways, args.retailers, args.runs, args.per_fleet) < 1 or args.timeout_s <= 0:
        parser.error("--gateways, --retailers, --runs, --per-fleet and --timeout-s must be positive")
    if args.retailers > args.gateways:
        parser.error("--retailers cannot exceed --gateways (each retailer needs at least one client)")
    if args.bridge_instances < 1:
        parser.error("--bridge-instances must be positive")
    if not 1 <= args.bridge_partitions <= MAX_PARTITIONS:
        parser.error(f"--bridge-partitions must be between 1 and {MAX_PARTITIONS}")
    if args.kill_bridge_after_outcomes is not None and (args.kill_bridge_after_outcomes < 1
                                                        or args.bridge_instances < 2):
        parser.error("--kill-bridge-after-outcomes must be positive and needs --bridge-instances 2 or more")
    if args.fleets_connecting < 1 or args.connect_concurrency < 1:
        parser.error("--fleets-connecting and --connect-concurrency must be positive")
    try:
        res = fanout_mod.run(fanout_mod.FanoutParams(
            out=args.out, gateways=args.gateways, retailers=args.retailers, runs=args.runs, per_fleet=args.per_fleet,
            timeout_s=args.timeout_s, peer=args.peer or "", via=args.via or "", vens=args.vens, floor=args.floor,
            bridge_instances=args.bridge_instances, kill_bridge_after_outcomes=args.kill_bridge_after_outcomes,
            bridge_partitions=args.bridge_partitions, fleets_connecting=args.fleets_connecting,
            connect_concurrency=args.connect_concurrency, timeline=args.timeline, shuffled=args.shuffled))
    except fanout_mod.ProcessExited as exc:
        print(f"[fanout] FAILED: {exc}", file=sys.stderr, flush=True)
        return 3
    s = res["summary"]
    print(f"[fanout] done: {s['runs']} run(s); all executed every run: {s['all_executed_every_run']}; missing "
          f"{s['missing_commands']}, duplicates {s['duplicate_commands']}; 100 % executed by {s['t100_s_best']} s "
          f"(best) / {s['t100_s_worst']} s (worst), target {s['target_s']:g} s; results in {args.out}", flush=True)
    if "floor" in s:
        f = s["floor"]
        print(f"[fanout] floor: 100 % acknowledged by {f['t100_s_median']} s (median of {f['runs']}); ours over the "
              f"floor {f['ratio_best']}x (best) / {f['ratio_worst']}x (worst)", flush=True)
    return 0 if s["all_executed_every_run"] and s["missing_commands"] == 0 else 1


def _add_base(sub: Any) -> None:
    _common(sub.add_parser("base", help="the paper's base setup: DSO simulator -> hub -> RP simulators, measured"),
            duration_s=60.0)


def _add_scale(sub: Any) -> None:
    scale = sub.add_parser("scale", help="the base setup once per number of clients or retailers (Figures 7-10)")
    _common(scale, duration_s=20.0, sizes=True)
    scale.add_argument("--poll-interval-s", type=float, default=0.02,
                       help="how often the DSO simulator polls each open request (GET /v1/requests/{id})")
    scale.add_argument("--max-targets", type=int, default=0,
                       help="at most this many clients per request: the type fractions are lowered for the sizes "
                            "where they would target more (0: no cap, the paper's fractions)")


def _add_faults(sub: Any) -> None:
    faults = sub.add_parser("faults", help="the base setup with a hub or storage fault injected (Figures 12-13)")
    _common(faults, duration_s=60.0)
    faults.add_argument("--fault", choices=("hub", "storage", "broker", "hbase", "hbase-stall"), required=True,
                        help="hub: kill -9 of the hub process and an immediate restart; broker: kill -9 of the hub "
                             "broker (Mosquitto) and an immediate restart; storage: the hub's SQLite "
                             "database locked by another process for --down-s; hbase: kill -9 of the Thrift gateway "
                             "(a relay process in front of the HBase double) and an immediate restart; hbase-stall: "
                             "the HBase double stopped (SIGSTOP) for --down-s, then continued")
    faults.add_argument("--at-s", type=float, default=20.0, help="when, in seconds after the DSO simulator started")
    faults.add_argument("--down-s", type=float, default=5.0, help="how long the storage stays locked")
    faults.add_argument("--bucket-s", type=float, default=2.0, help="latency-over-time bucket")
    faults.add_argument("--retry-s", type=float, default=0.5, help="the DSO's pause before re-sending a POST")


def _add_fanout(sub: Any) -> None:
    fanout = sub.add_parser("fanout", help="one emergency to every simulated gateway through the real chain, timed")
    fanout.add_argument("--out", type=Path, required=True, help="folder for results.json, CSVs, PNG, report.md")
    fanout.add_argument("--gateways", type=int, default=10_000, help="simulated gateways (one client each)")
    fanout.add_argument("--retailers", type=int, default=1, help="bridges (and retailer brokers); clients are "
                        "spread over them")
    fanout.add_argument("--runs", type=int, default=3, help="emergencies sent, one after the other")
    fanout.add_argument("--per-fleet", type=int, default=2_500, help="simulated gateways per fleet process")
    fanout.add_argument("--timeout-s", type=float, default=None,
                        help="how long one run is followed (default: 3 ms per gateway, at least 60 s)")
    fanout.add_argument("--peer", choices=("openleadr",), help="also run this peer's fan-out to as many VENs")
    fanout.add_argument("--via", choices=("openadr3",),
                        help="also run the fan-out through the hub's OpenADR 3 door (VENs on its MQTT notifier)")
    fanout.add_argument("--vens", type=int, default=0, help="VENs of --via (default: as many as --gateways)")
    fanout.add_argument("--floor", action="store_true",
                        help="also run the bare MQTT command+ack floor (same brokers, N and fleet layout) --runs "
                             "times and report each run's ratio to it")
    fanout.add_argument("--timeline", action="store_true",
                        help="also record, per run, when the first and the last client passed each stage of the "
                             "critical path (POST, hub, bridge, gateways, back), next to the floor's "
                             "(sim/experiment/timeline.py)")
    fanout.add_argument("--shuffled", action="store_true",
                        help="POST the clients in a random order (seeded per run) instead of in id order, as a DSO "
                             "listing them by feeder would")
    fanout.add_argument("--bridge-instances", type=int, default=1,
                        help="bridge processes per retailer (one store and instance lock: one active, the others "
                             "standbys)")
    fanout.add_argument("--kill-bridge-after-outcomes", type=int,
                        help="in each run, once the hub has received this many outcome messages of it, kill -9 each "
                             "retailer's active bridge (its standby takes over)")
    fanout.add_argument("--fleets-connecting", type=int, default=2,
                        help="fleet processes connecting their gateways at once (the others wait for their turn)")
    fanout.add_argument("--connect-concurrency", type=int, default=200,
                        help="CONNECTs in flight per fleet process while it connects")
    fanout.add_argument("--bridge-partitions", type=int, default=1,
                        help="bridge partitions per retailer, by gateway: each its own process(es), store and "
                             "logins (with --bridge-instances N, N processes per partition)")


def _add_peer(sub: Any) -> None:
    peer = sub.add_parser("peer", help="the emergency fan-out to N homes through a peer, OpenLEADR (OpenADR 2.0b)")
    peer.add_argument("--out", type=Path, required=True, help="folder for results.json, peer.csv, the PNG, report.md")
    peer.add_argument("--homes", type=int, default=100, help="VENs, one per home")
    peer.add_argument("--runs", type=int, default=3, help="emergencies, one after the other, each measured")
    peer.add_argument("--poll-s", type=int, default=1, help="the VENs' poll period the VTN asks for, whole seconds "
                      "(OpenLEADR writes whole seconds into OpenADR's duration)")
    peer.add_argument("--ven-procs", type=int, default=None, help="VEN processes (default: one per 500 VENs, <= 4)")
    peer.add_argument("--timeout-s", type=float, default=None, help="a run's limit (default 30 s + 10 ms per VEN)")


def _add_rate(sub: Any) -> None:
    rate = sub.add_parser("rate", help="open loop at fixed total rates, stepped up until the p99 target breaks")
    _common(rate, duration_s=60.0, rate=False, warmup_s=10.0, drain_s=10.0, rp_outcomes="batches",
            dso_follow="feed")
    rate.add_argument("--start-per-min", type=float, default=1200.0, help="first total rate (4 types together)")
    rate.add_argument("--step-per-min", type=float, default=1200.0)
    rate.add_argument("--max-per-min", type=float, default=30000.0)
    rate.add_argument("--runs", type=int, default=3, help="runs per step (each a fresh hub, broker, storage)")
    rate.add_argument("--metric", choices=rate_mod.METRICS, default="hub_added",
                      help="the latency the p99 bound applies to (default: what DESIGN.md's targets measure, the "
                           "latency the hub and its storage add)")
    rate.add_argument("--p99-ms", type=float, default=250.0, help="the p99 bound (DESIGN.md: 250 ms)")
    rate.add_argument("--dso-workers", type=int, default=0,
                      help="DSO simulator processes per run (0: one per 6000 requests/min, at most 8)")
    rate.add_argument("--poll-s", type=float, default=0.25,
                      help="the DSO simulators' wait before each GET of an accepted request (latency comes from the "
                           "hub's completed_at, so sparse polling does not blur it and spares the hub)")


def _add_scaleout(sub: Any) -> None:
    scaleout = sub.add_parser("scaleout", help="hub replicas behind one HTTP entry (HAProxy), one killed mid-run")
    _common(scaleout, duration_s=60.0, dso_follow=None)  # behind HAProxy a feed would miss the other replicas' writes
    scaleout.add_argument("--replicas", type=int, default=2, help="hub replicas (at least 2)")
    scaleout.add_argument("--kill-at-s", type=float, default=20.0,
                          help="when replica 1 is killed with SIGKILL, in seconds after the DSO simulator started")
    scaleout.add_argument("--restart-after-s", type=float,
                          help="start the killed replica again this long after the kill (default: it stays down)")
    scaleout.add_argument("--bucket-s", type=float, default=2.0, help="latency-over-time bucket")
    scaleout.add_argument("--retry-s", type=float, default=0.5, help="the DSO's pause before re-sending a POST")


def _peer(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.homes < 1 or args.runs < 1 or args.poll_s < 1:
        parser.error("--homes, --runs and --poll-s must be positive")
    if args.ven_procs is not None and not 1 <= args.ven_procs <= args.homes:
        parser.error("--ven-procs must be between 1 and --homes")
    res = peer_openleadr.run_openleadr_fanout(args.homes, args.out, args.runs, poll_s=args.poll_s,
                                              ven_procs=args.ven_procs, timeout_s=args.timeout_s)
    s = res["summary"]
    return 0 if s["missing"] == 0 and s["duplicates"] == 0 else 1


def _common_params(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """What every experiment on the base setup shares, checked: the output, the timing, the storage."""
    if args.duration_s <= 0 or getattr(args, "rate_per_min", 1.0) <= 0:
        parser.error("duration and rate must be positive")
    fault = getattr(args, "fault", "")
    storage = args.storage or ("hbase" if fault in ("hbase", "hbase-stall") else "sqlite")
    if fault in ("hbase", "hbase-stall") and storage != "hbase":
        parser.error(f"--fault {fault} needs --storage hbase")
    if fault == "storage" and storage != "sqlite":
        parser.error("--fault storage locks the embedded SQLite database; with --storage hbase use --fault hbase "
                     "or hbase-stall")
    common = dict(out=args.out, duration_s=args.duration_s, warmup_s=args.warmup_s,
                  rp_delay_min_ms=args.rp_delay_min_ms, rp_delay_max_ms=args.rp_delay_max_ms,
                  rp_outcomes=args.rp_outcomes, dso_follow=args.dso_follow, drain_s=args.drain_s,
                  seed=args.seed, storage=storage, lag_bound_ms=args.lag_bound_ms)
    if args.experiment != "rate":
        common["rate_per_min"] = args.rate_per_min
    if args.experiment not in ("rate", "scale") and (args.clients < 1 or args.retailers < 1):
        parser.error("clients and retailers must be positive")
    return common


def _rate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    common = _common_params(parser, args)
    if args.clients < 1 or args.retailers < 1 or args.runs < 1 or args.dso_workers < 0 or args.poll_s <= 0:
        parser.error("clients, retailers and runs must be positive, --dso-workers >= 0, --poll-s > 0")
    if args.start_per_min <= 0 or args.step_per_min <= 0 or args.max_per_min < args.start_per_min:
        parser.error("--start-per-min and --step-per-min must be positive, --max-per-min >= --start-per-min")
    rp = rate_mod.RateParams(
        base=BaseParams(clients=args.clients, retailers=args.retailers, poll_interval_s=args.poll_s,
                        first_poll_s=args.poll_s, progress_interval_s=10.0, **common),
        start_per_min=args.start_per_min, step_per_min=args.step_per_min, max_per_min=args.max_per_min,
        runs=args.runs, metric=args.metric, p99_bound_ms=args.p99_ms, dso_workers=args.dso_workers)
    res = rate_mod.run(rp)
    s = res["sustained"]
    print("[rate] done: largest sustained rate "
          + (f"{s['rate_per_min']:g} requests/min ({args.metric} p99 {s['p99_ms']} ms)" if s else "none")
          + (f"; stopped at {res['stopped_at']['rate_per_min']:g}/min: {res['stopped_at']['verdict']}"
             if res["stopped_at"] else "") + f"; results in {args.out}", flush=True)
    return 0


def _scale(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    common = _common_params(parser, args)
    clients, retailers = _sizes(parser, args.clients, "clients"), _sizes(parser, args.retailers, "retailers")
    if len(clients) > 1 and len(retailers) > 1:
        parser.error("only one of --clients / --retailers can be a list of sizes")
    axis, sizes = ("retailers", retailers) if len(retailers) > 1 else ("clients", clients)
    if args.poll_interval_s <= 0 or args.max_targets < 0:
        parser.error("--poll-interval-s must be positive and --max-targets >= 0")
    res = scale_mod.run(BaseParams(clients=clients[0], retailers=retailers[0],
                                   poll_interval_s=args.poll_interval_s, **common), axis, sizes,
                        max_targets=args.max_targets)
    t = res["totals"]
    print(f"[scale] done: {len(sizes)} sizes of {axis}; sent {t['sent']}, completed {t['completed']}, failed "
          f"{t['failed']}, missing {t['missing']}; results in {args.out}", flush=True)
    return 0 if t["sent"] == t["completed"] else 1


def _faults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    common = _common_params(parser, args)
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


def _scaleout(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    common = _common_params(parser, args)
    if common["storage"] != "sqlite":
        parser.error("scaleout runs its replicas on one shared SQLite file (it checks request owners there); "
                     "--storage hbase is not supported by this experiment")
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


def _base(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    common = _common_params(parser, args)
    results = Experiment(BaseParams(clients=args.clients, retailers=args.retailers, **common)).run()
    _print_base(results, args.out)
    t = results["totals"]
    return 0 if t["accounted"] and t["missing"] == 0 and t["failed"] == 0 else 1


Runner = Callable[[argparse.ArgumentParser, argparse.Namespace], int]
EXPERIMENTS: dict[str, tuple[Callable[[Any], None], Runner]] = {
    "base": (_add_base, _base), "scale": (_add_scale, _scale), "faults": (_add_faults, _faults),
    "fanout": (_add_fanout, _fanout), "peer": (_add_peer, _peer), "rate": (_add_rate, _rate),
    "scaleout": (_add_scaleout, _scaleout),
}
"""Each experiment: how its arguments are declared, and how it runs (in the order ``--help`` lists them)."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mhp-sim experiment``."""
    parser = argparse.ArgumentParser(prog="mhp-sim experiment", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="experiment", required=True)
    for declare, _ in EXPERIMENTS.values():
        declare(sub)
    args = parser.parse_args(argv)
    return EXPERIMENTS[args.experiment][1](parser, args)


if __name__ == "__main__":
    sys.exit(main())
