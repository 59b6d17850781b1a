"""``mhp-sim experiment scaleout`` end to end, CI-sized: real broker, two hub replicas on one SQLite file, HAProxy
as the HTTP entry, RP and DSO simulators; replica 1 killed with SIGKILL mid-run and restarted."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sim.experiment.scaleout import haproxy_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def test_haproxy_accepts_the_generated_config(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(18080, {"hub-1": 18081, "hub-2": 18082}))
    proc = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = cfg.read_text()
    assert "server hub-1 127.0.0.1:18081 check" in text and "server hub-2 127.0.0.1:18082 check" in text
    assert "option httpchk GET /readyz" in text


def test_scaleout_kill_one_replica_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "scaleout"
    # The drain bounds the wait (the run ends once every request is terminal): 40 s covers a POST in flight to the
    # killed replica, whose Idempotency-Key claim the survivor answers with 409 in_progress until it is 30 s stale.
    proc = subprocess.run(
        [sys.executable, "-m", "sim.cli", "experiment", "scaleout", "--out", str(out), "--replicas", "2",
         "--clients", "20", "--duration-s", "6", "--warmup-s", "0.5", "--rate-per-min", "120", "--kill-at-s", "2",
         "--restart-after-s", "1", "--drain-s", "40", "--bucket-s", "1"],
        capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[scaleout] done" in proc.stdout and "[dso-sim]" in proc.stdout and "killed with SIGKILL" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == "scaleout"
    f, a, rep = res["fault"], res["accounting"], res["replicas"]
    assert f["injected"] and f["kind"] == "replica" and f["replica"] == "1" and f["adopted"]
    assert f["at_s"] <= f["ready_s"] < f["restarted_s"]
    assert a["accounted"] and a["sent"] > 0
    assert a["lost"] == 0 and a["completed"] == a["accepted"] == a["sent"]
    assert a["duplicate_request_ids"] == 0
    assert a["retries"] == a["status_503"] + a["no_answer"] + a["status_5xx_other"] + a["status_409_in_progress"]
    # Both replicas worked: each process (the killed one under its own name) used CPU; the survivor's counters.
    assert {"hub-1 (killed)", "hub-1", "hub-2"} <= set(rep["cpu"])
    assert rep["cpu"]["hub-1 (killed)"]["cpu_s"] > 0 and rep["cpu"]["hub-2"]["cpu_s"] > 0
    assert rep["counters"]["hub-2"]["requests_created"] > 0
    buckets = res["buckets"]
    assert sum(b["sent"] for b in buckets) == a["sent"] and sum(b["completed"] for b in buckets) == a["completed"]
    assert len(list(csv.DictReader((out / "latency_buckets.csv").open()))) == len(buckets)
    cpu_rows = list(csv.DictReader((out / "replica_cpu.csv").open()))
    # The killed replica's last sample is taken right before the kill, not a periodic one up to a second earlier.
    killed = [r for r in cpu_rows if r["process"] == "hub-1 (killed)"]
    assert killed and float(killed[-1]["t_s"]) >= f["at_sample_s"]
    for png in ("latency_fault.png", "replica_cpu.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert "## Scale-out: 2 hub replicas" in (out / "report.md").read_text()


@pytest.mark.parametrize("args", [["--replicas", "1"], ["--kill-at-s", "100", "--duration-s", "5"]])
def test_scaleout_refuses_bad_arguments(tmp_path: Path, args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "experiment", "scaleout", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2 and "must" in proc.stderr
