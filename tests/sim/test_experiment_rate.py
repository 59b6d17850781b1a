"""``mhp-sim experiment rate`` and ``--storage hbase`` end to end, CI-sized; the reconciliation and resource
aggregation on records and samples written out by hand."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from sim.experiment import report
from sim.experiment.dso_sim import TYPES, DsoSimulator

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "experiment", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_rate_two_steps_split_over_two_generators(tmp_path: Path) -> None:
    out = tmp_path / "rate"
    # Bounds lifted far out of reach: this checks the mechanics and the accounting, not this machine's speed.
    proc = run("rate", "--out", str(out), "--clients", "10", "--start-per-min", "240", "--step-per-min", "240",
               "--max-per-min", "480", "--runs", "1", "--duration-s", "2", "--warmup-s", "0.5", "--drain-s", "10",
               "--dso-workers", "2", "--p99-ms", "100000", "--lag-bound-ms", "100000")
    assert "[rate] step 1/2" in proc.stdout and "[rate] step 2/2" in proc.stdout
    assert "[dso-sim 1/2]" in proc.stdout and "[dso-sim 2/2]" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert [s["rate_per_min"] for s in res["steps"]] == [240, 480]
    assert all(s["verdict"] == "sustained" for s in res["steps"]) and res["stopped_at"] is None
    assert res["sustained"]["rate_per_min"] == 480 and res["sustained"]["p99_ms"] is not None
    for r in res["runs"]:
        assert r["sent"] == r["planned"] == r["accepted"] == r["completed"] > 0 and r["accounted"]
        assert r["failed"] == r["missing"] == r["duplicates"] == 0 and r["generator_valid"]
        run_res = json.loads((out / r["dir"] / "results.json").read_text())
        assert {"dso-sim-1", "dso-sim-2"} <= set(run_res["processes"])
        # Two processes shared one schedule: every seq of it sent once, the hub counted as many as were accepted.
        seqs = sorted(int(row["seq"]) for row in csv.DictReader((out / r["dir"] / "requests.csv").open()))
        assert seqs == list(range(r["planned"]))
        rec = run_res["reconciliation"]
        assert rec["hub_accepted"] == rec["accepted"] and rec["accepted_unknown_to_dso"] == 0
        assert [w["planned"] for w in run_res["generator"]["workers"]] == [(r["planned"] + 1) // 2, r["planned"] // 2]
        assert sum(w["polls"] for w in run_res["generator"]["workers"]) >= r["accepted"]
    step = res["steps"][1]
    for metric in ("hub_added", "post_to_completed", "post_to_202"):
        lat = step["latency_ms"][metric]
        assert lat["n"] > 0 and lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    # Requests of every type complete at least their retailer phases after they were sent.
    assert step["latency_ms"]["post_to_completed"]["max"] >= 100
    rows = list(csv.DictReader((out / "rate.csv").open()))
    assert [(row["rate_per_min"], row["run"]) for row in rows] == [("240.0", "1"), ("240.0", "all"), ("480.0", "1"),
                                                                    ("480.0", "all")]
    assert (out / "rate.png").read_bytes()[:8] == PNG_MAGIC
    assert "Largest sustained rate: 480 requests/min" in (out / "report.md").read_text()


def test_base_on_hbase_storage(tmp_path: Path) -> None:
    out = tmp_path / "hbase"
    run("base", "--out", str(out), "--storage", "hbase", "--clients", "10", "--duration-s", "3", "--warmup-s", "0.5",
        "--rate-per-min", "120", "--drain-s", "10")
    res = json.loads((out / "results.json").read_text())
    assert res["setup"]["storage"] == "hbase" and res["params"]["storage"] == "hbase"
    t, rec = res["totals"], res["reconciliation"]
    assert t["sent"] > 0 and t["sent"] == t["completed"] and t["accounted"] and t["duplicates"] == 0
    assert rec["hub_accepted"] == rec["accepted"] == t["sent"]
    assert "hbase" in res["processes"] and res["processes"]["hbase"]["cpu_s"] > 0
    assert not (out / "run" / "hub.db").exists()  # the hub really kept its data in HBase
    minutes = list(csv.DictReader((out / "resources.csv").open()))
    assert {"hub", "hbase", "broker"} <= {m["name"] for m in minutes if m["kind"] == "process"}
    assert (out / "resources.png").read_bytes()[:8] == PNG_MAGIC
    assert "Storage: hbase." in (out / "report.md").read_text()


def test_reconciliation_counts_gaps_duplicates_and_redeliveries() -> None:
    recs = [{"seq": 0, "type": "emergency", "status": 202, "request_id": "a", "outcome": "completed", "attempts": 1},
            {"seq": 1, "type": "billing", "status": 202, "request_id": "a", "outcome": "completed", "attempts": 3},
            {"seq": 1, "type": "billing", "status": 503, "outcome": "failed", "attempts": 2},
            {"seq": 4, "type": "load_shift", "status": 202, "request_id": "b", "outcome": "missing", "attempts": 1}]
    rec = report.reconcile(recs, [{"planned": 3}, {"planned": 2}], {"created": {"emergency": 1, "billing": 3}},
                           {"r1": {"redelivered_requests": 2, "outcome_resends": 5, "unacked_at_exit": 1}})
    assert rec["seq_not_sent"] == [2, 3] and rec["seq_duplicates"] == [1]
    assert rec["duplicate_request_ids"] == 1 and rec["hub_accepted"] == 4 and rec["accepted_unknown_to_dso"] == 1
    assert rec["duplicates"] == 3 and not rec["accounted"]
    assert rec["retries"] == 3 and rec["post_attempts"] == 7
    assert (rec["rp_redelivered_requests"], rec["rp_outcome_resends"], rec["rp_unacked_at_exit"]) == (2, 5, 1)


def test_resources_per_minute_from_cumulative_counters() -> None:
    samples = [{"t_s": float(t), "process": "hub", "cpu_s": 0.5 * t, "rss_mib": 50.0 + t, "max_rss_mib": 50.0 + t,
                "read_bytes": 0, "write_bytes": 2_000_000 * t} for t in range(0, 121, 10)]
    disks = [{"t_s": float(t), "device": "vda", "read_bytes": 1_000_000 * t, "write_bytes": 0}
             for t in range(0, 121, 10)]
    rows = report.resources(samples, disks)
    hub = [r for r in rows if r["name"] == "hub"]
    assert [r["minute"] for r in hub] == [0, 1, 2]
    assert [r["seconds"] for r in hub] == [50.0, 60.0, 10.0]  # each interval counts in the minute it ends in
    assert all(r["cpu_pct"] == 50.0 and r["write_mb_s"] == 2.0 and r["read_mb_s"] == 0.0 for r in hub)
    assert hub[1]["rss_max_mib"] == 160.0 and hub[1]["rss_mean_mib"] == 135.0
    vda = [r for r in rows if r["kind"] == "disk"]
    assert all(r["read_mb_s"] == 1.0 and r["cpu_pct"] is None for r in vda)


def test_generator_flags_a_schedule_it_did_not_keep() -> None:
    sim = DsoSimulator({"hub_url": "http://127.0.0.1:1", "token": "t", "clients": ["c"], "warmup_s": 0,
                        "duration_s": 1, "rates_per_min": dict.fromkeys(TYPES, 60.0), "fractions": {},
                        "lag_bound_ms": 50.0})
    sim.planned = 100
    sim.records = [{"seq": i, "lag_ms": 1.0} for i in range(98)] + [{"seq": 98, "lag_ms": 400.0},
                                                                     {"seq": 99, "lag_ms": 900.0}]
    check = sim.self_check()
    assert check["late_sends"] == 2 and check["lag_max_ms"] == 900.0
    assert check["lag_p99_ms"] == 400.0 and not check["schedule_kept"]
    sim.records[98]["lag_ms"] = 2.0
    assert sim.self_check()["schedule_kept"]  # one late send in 100 is within the p99
    sim.planned = 101
    assert not sim.self_check()["schedule_kept"]  # a scheduled request never sent
