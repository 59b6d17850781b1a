"""``mhp-sim experiment peer`` end to end, CI-sized: a real OpenLEADR VTN and real VENs as processes over HTTP."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sim.experiment import cli as experiment_cli
from sim.experiment.peer_openleadr import cumulative_curve, run_openleadr_fanout, time_to_fraction

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# Generous limits: the processes import OpenLEADR, aiohttp and lxml at start, slow on a loaded machine.
@pytest.mark.timeout(300)
def test_every_ven_acknowledges_the_emergency_exactly_once(tmp_path: Path) -> None:
    out = tmp_path / "peer"
    res = run_openleadr_fanout(5, out, runs=2, ven_procs=2, settle_s=1.0)

    assert res["system"] == "openleadr" and res["n"] == 5 and len(res["runs"]) == 2
    assert res["setup"]["registered"] == 5 and res["setup"]["polling"] == 5
    for r in res["runs"]:
        assert r["events"] == 5 and r["acked"] == 5, r
        assert r["missing"] == 0 and r["duplicates"] == 0, r
        assert r["opt"] == {"optIn": 5}
        assert set(r["ack_ms"]) >= {"p50", "p90", "p99", "max"} and set(r["time_to_fraction_ms"]) == {
            "0.5", "0.9", "0.99", "1.0"}
        # A VEN answers after the VTN handed the event out in a poll answer, which comes after the creation.
        assert 0 < r["delivered_ms"]["p50"] <= r["ack_ms"]["p50"] <= r["ack_ms"]["max"]
        assert r["time_to_fraction_ms"]["1.0"] == r["ack_ms"]["max"]
        assert r["cpu_s"]["vtn"] > 0 and set(r["cpu_s"]["per_process"]) == {"vtn", "vens-1", "vens-2"}
        assert r["cancel_unconfirmed"] == 0  # the next run started from empty queues
    assert res["exit_codes"] == {"vtn": 0, "vens-1": 0, "vens-2": 0}
    assert res["ven_errors"] == {"request_timeouts": 0, "other": 0}

    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"] == res["runs"]
    with (out / "peer.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10
    for run in ("1", "2"):
        vens = [row["ven_id"] for row in rows if row["run"] == run]
        assert sorted(vens) == [f"ven-{i:05d}" for i in range(1, 6)]
    assert all(row["responses"] == "1" and float(row["ack_ms"]) >= float(row["delivered_ms"]) for row in rows)
    assert (out / "peer_cumulative.png").read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    assert "OpenLEADR" in report and "| 2 |" in report


@pytest.mark.timeout(300)
def test_cli_peer_runs_and_prints_progress(tmp_path: Path) -> None:
    out = tmp_path / "peer-cli"
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "experiment", "peer", "--out", str(out), "--homes", "3",
                           "--runs", "1"], capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[peer] run 1: 3/3 acknowledged" in proc.stdout
    assert json.loads((out / "results.json").read_text())["runs"][0]["acked"] == 3


def test_cli_peer_rejects_bad_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--homes", "0"], ["--runs", "0"], ["--poll-s", "0"], ["--homes", "2", "--ven-procs", "3"]):
        with pytest.raises(SystemExit) as exc:
            experiment_cli.main(["peer", "--out", str(tmp_path), *args])
        assert exc.value.code == 2 and "error" in capsys.readouterr().err, args
    with pytest.raises(ValueError, match="ven_procs"):
        run_openleadr_fanout(2, tmp_path, ven_procs=3)
    assert not (tmp_path / "results.json").exists()


def test_curve_and_fractions_count_the_ones_that_never_answered() -> None:
    xs, ys = cumulative_curve([30.0, 10.0, 20.0], 4)
    assert xs == [0.0, 10.0, 20.0, 30.0] and ys == [0.0, 0.25, 0.5, 0.75]
    assert time_to_fraction([30.0, 10.0, 20.0], 4) == {"0.5": 20.0, "0.9": None, "0.99": None, "1.0": None}
    assert time_to_fraction([5.0, 1.0], 2) == {"0.5": 1.0, "0.9": 5.0, "0.99": 5.0, "1.0": 5.0}
