"""``mhp-sim experiment fanout`` end to end, CI-sized: real brokers, hub, bridges and fleet processes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from sim.experiment.fanout import peer_ack_times, reconcile, time_to_fraction


def run_fanout(out: Path, *args: str, timeout_s: float = 180
               ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``mhp-sim experiment fanout --out OUT ARGS`` in a process of its own: the process (it must have succeeded) and
    its ``results.json``."""
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "experiment", "fanout", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "results.json").read_text())

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_fanout_reaches_every_gateway_exactly_once_and_the_outputs_reconcile(tmp_path: Path) -> None:
    out = tmp_path / "fanout"
    # --shuffled: the POST lists the clients in a random order (the hub hands each retailer its clients in id order).
    proc, res = run_fanout(out, "--gateways", "50", "--retailers", "2", "--runs", "1", "--per-fleet", "20",
                           "--shuffled", timeout_s=120)
    assert "[fanout] run 1/1:" in proc.stdout and "[fanout] done:" in proc.stdout
    assert res["experiment"] == "fanout" and res["params"]["gateways"] == 50 and res["params"]["shuffled"] is True
    # 25 gateways per retailer, at most 20 per fleet process: two fleet processes per retailer.
    assert res["setup"]["fleet_processes"] == 4 and len(res["setup"]["fleet_connect_s"]) == 4
    (run,) = res["runs"]
    assert run["state"] == "completed" and run["executed"] == run["clients"] == 50
    assert run["missing_commands"] == 0 and run["duplicate_commands"] == 0 and run["missing_gateways"] == []
    assert len(run["executed_s"]) == 50 and run["executed_s"] == sorted(run["executed_s"])
    assert 0 < run["t50_s"] <= run["t90_s"] <= run["t99_s"] <= run["t100_s"] == run["executed_s"][-1]
    assert run["t100_s"] <= run["hub_completed_s"] + 0.001 and run["post_ms"] > 0 and run["loadavg_1m"] >= 0
    # Gateways got their command before the hub could record them executed.
    assert 0 < run["gateway_first_p50_s"] <= run["gateway_first_max_s"] <= run["t100_s"]
    assert {"hub", "bridge-r1", "bridge-r2", "broker-r1", "hub-broker", "fleet-r1-1"} <= set(run["cpu_s"])
    assert res["summary"]["all_executed_every_run"] and res["summary"]["missing_commands"] == 0
    rows = list(csv.DictReader((out / "fanout.csv").open()))
    assert len(rows) == 1 and rows[0]["executed"] == "50" and rows[0]["missing_commands"] == "0"
    per_client = list(csv.DictReader((out / "fanout_clients.csv").open()))
    assert len(per_client) == 50 and float(per_client[-1]["executed_s"]) == run["t100_s"]
    assert (out / "fanout.png").read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    assert "emergency fan-out" in report and "| 1 |" in report
    # Each fleet process wrote what its gateways received; together: every gateway once.
    stats = [json.loads(f.read_text()) for f in (out / "run").glob("fleet-*.stats.json")]
    got = {g: n for s in stats for g, (n, _) in s["commands"][run["request_id"]].items()}
    assert len(got) == 50 and set(got.values()) == {1}


def test_fanout_with_the_openleadr_peer_puts_both_in_one_report(tmp_path: Path) -> None:
    out = tmp_path / "both"
    _, res = run_fanout(out, "--gateways", "10", "--runs", "1", "--peer", "openleadr")
    assert res["runs"][0]["executed"] == 10
    peer = res["peer"]
    assert peer["name"] == "openleadr" and "error" not in peer
    assert peer["result"]["summary"]["missing"] == 0 and (out / peer["dir"] / "results.json").exists()
    assert "## Peer: openleadr" in (out / "report.md").read_text()
    # The plot draws the peer's runs next to ours, from the peer's own per-VEN times.
    assert {run: len(acks) for run, acks in peer_ack_times(out, res).items()} == {"1": 10}


def test_time_to_fraction_and_reconcile_count_what_is_missing_and_repeated() -> None:
    times = [0.4, 0.1, 0.3, 0.2]
    assert time_to_fraction(times, 4, 50) == 0.2 and time_to_fraction(times, 4, 100) == 0.4
    assert time_to_fraction(times, 5, 100) is None  # one of five never executed
    assert time_to_fraction(times, 5, 80) == 0.4
    stats = [{"commands": {"q": {"gw-1": [1, 10.0], "gw-2": [3, 10.5]}}}, {"commands": {"q": {"gw-3": [1, 11.0]}}}]
    rec = reconcile({"q": ["gw-1", "gw-2", "gw-3", "gw-4"], "r": ["gw-1"]}, stats)
    assert rec["q"] == {"missing": 1, "missing_gateways": ["gw-4"], "duplicates": 2, "first_at": [10.0, 10.5, 11.0]}
    assert rec["r"]["missing"] == 1 and rec["r"]["duplicates"] == 0
