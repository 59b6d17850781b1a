"""``mhp-sim experiment scale`` and ``faults`` end to end, CI-sized: real broker, hub, RP and DSO simulators."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sim.experiment.dso_sim import TYPES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--duration-s", "1.5", "--warmup-s", "0.5", "--rate-per-min", "240", "--drain-s", "10"]
"""8 requests of each type per run (a period of 0.25 s over 2 s), where 3.5 s at 120/min gave 7."""


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """One experiment run; ``timeout`` only guards against a hang (a two-size scale run took over 60 s on the
    2-core machine under a parallel test run: each size starts a hub, brokers and simulators)."""
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "experiment", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_scale_two_sizes_of_clients(tmp_path: Path) -> None:
    out = tmp_path / "scale"
    proc = run("scale", "--out", str(out), "--clients", "5,20", *SMALL)
    assert "[scale] size 1/2" in proc.stdout and "[scale] size 2/2" in proc.stdout and "[dso-sim]" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["axis"] == "clients" and res["sizes"] == [5, 20]
    for r in res["runs"]:
        t = r["totals"]
        assert t["sent"] > 0 and t["sent"] == t["completed"] and t["failed"] == t["missing"] == 0
        assert r["all"]["mean_ms"] is not None and r["all"]["p99_ms"] >= r["all"]["p50_ms"]
        assert r["components_mean_ms"]["storage_ms"] > 0, "the hub's measured storage time, never a made-up 0"
        assert set(r["per_type"]) == set(TYPES)
        assert (out / r["dir"] / "results.json").exists()
    rows = list(csv.DictReader((out / "scale.csv").open()))
    assert len(rows) == 2 * (1 + len(TYPES))
    for name in res["files"]["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "scale in clients" in (out / "report.md").read_text()


def test_scale_hosts_many_retailers_in_few_processes_and_caps_targets(tmp_path: Path) -> None:
    out = tmp_path / "scale"
    run("scale", "--out", str(out), "--clients", "40", "--retailers", "6", "--max-targets", "2",
        "--poll-interval-s", "0.05", *SMALL)
    res = json.loads((out / "results.json").read_text())
    (size,) = res["runs"]
    assert size["totals"]["sent"] > 0 and size["totals"]["sent"] == size["totals"]["completed"]
    assert size["fractions"] == dict.fromkeys(TYPES, 2 / 40) and res["params"]["max_targets"] == 2
    assert res["params"]["poll_interval_s"] == 0.05
    one = json.loads((out / size["dir"] / "results.json").read_text())
    # 6 retailers in 4 processes (two of them host two), each retailer with its own counters.
    assert {p for p in one["processes"] if p.startswith("rp-")} == {"rp-sim-1", "rp-sim-2", "rp-r3", "rp-r4"}
    assert set(one["rp_simulators"]) == {f"r{i}" for i in range(1, 7)}
    for rp in one["rp_simulators"].values():
        assert rp["requests"] > 0 and rp["unacked_at_exit"] == 0


@pytest.mark.parametrize("fault", ["hub", "storage", "broker", "hbase", "hbase-stall"])
def test_faults_lose_nothing(tmp_path: Path, fault: str) -> None:
    out = tmp_path / fault
    proc = run("faults", "--out", str(out), "--fault", fault, "--clients", "10", "--duration-s", "5",
               "--warmup-s", "0.5", "--at-s", "2", "--down-s", "1.5", "--rate-per-min", "120", "--drain-s", "15",
               "--bucket-s", "1")
    assert "fault:" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == "faults"
    f, a = res["fault"], res["accounting"]
    assert f["injected"] and f["kind"] == fault and f["at_s"] < f["ready_s"]
    if fault == "hub":
        assert f["exit_code"] == -9 and f["killed_pid"] != f["restarted_pid"] and 0 < f["restart_to_ready_s"] < 15
    elif fault == "storage":
        assert f["locked_s"] >= 1.5 and f["unlock_to_ready_s"] is not None
    elif fault == "hbase":  # the gateway relay died; the double (the "cluster") kept its rows
        assert f["exit_code"] == -9 and f["killed_pid"] != f["restarted_pid"] and f["kill_to_hub_ready_s"] > 0
        assert res["setup"]["storage"] == "hbase" and "thrift-gateway" in res["processes"]
    elif fault == "broker":  # Mosquitto lost its sessions and queued messages: the stored outboxes make up for it
        assert f["killed_pid"] != f["restarted_pid"] and 0 < f["restart_s"] < 15
    else:
        assert 1.5 <= f["stopped_s"] < 3 and f["resume_to_ready_s"] is not None
    assert a["accounted"] and a["sent"] > 0
    assert a["lost"] == 0 and a["completed"] == a["accepted"] == a["sent"]
    assert a["duplicate_request_ids"] == 0
    assert a["post_attempts"] == a["sent"] + a["retries"]
    # Every re-send follows exactly one unanswered or 5xx attempt (all requests ended up accepted).
    assert a["retries"] == a["status_503"] + a["no_answer"] + a["status_5xx_other"] + a["status_409_in_progress"]
    buckets = res["buckets"]
    assert sum(b["sent"] for b in buckets) == a["sent"] and sum(b["completed"] for b in buckets) == a["completed"]
    assert len(list(csv.DictReader((out / "latency_buckets.csv").open()))) == len(buckets)
    assert (out / "latency_fault.png").read_bytes()[:8] == PNG_MAGIC
    assert f"## Fault: {fault}" in (out / "report.md").read_text()
