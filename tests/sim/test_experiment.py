"""``mhp-sim experiment base`` end to end, CI-sized: real broker, real hub, RP and DSO simulators as processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mhp_wire.gc_tuning import YOUNG_THRESHOLD
from sim.experiment.dso_sim import TYPES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_base_experiment_accounts_for_every_request(tmp_path: Path) -> None:
    # 12 requests of each type (a period of 0.25 s over the 3 s of warm-up and run): as many as 6 s at 120/min
    # gave, in half the time.
    out = tmp_path / "exp"
    proc = subprocess.run(
        [sys.executable, "-m", "sim.cli", "experiment", "base", "--out", str(out), "--clients", "20",
         "--retailers", "2", "--duration-s", "2", "--warmup-s", "1", "--rate-per-min", "240", "--drain-s", "10"],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[dso-sim]" in proc.stdout  # progress is printed while it runs

    results = json.loads((out / "results.json").read_text())
    totals = results["totals"]
    assert totals["accounted"] and totals["sent"] > 0
    assert totals["sent"] == totals["completed"] + totals["failed"] + totals["missing"]
    assert totals["missing"] == 0 and totals["failed"] == 0 and totals["duplicates"] == 0
    assert set(results["per_type"]) == set(TYPES)
    for kind, s in results["per_type"].items():
        assert s["sent"] == s["completed"] + s["failed"] + s["missing"], kind
        assert s["sent"] >= 10 and s["accepted_202"] == s["sent"], kind
        assert s["missing_requests"] == []
        lat = s["latency_ms"]
        assert lat["post_to_202"]["p99"] is not None and lat["accepted_to_completed"]["p50"] is not None
        assert s["breakdown_ms"]["storage_ms"]["n"] > 0
        if kind != "billing":  # the RP simulator's artificial delay shows as the retailer's share
            assert 95 <= s["breakdown_ms"]["retailer_ms"]["mean"] <= 200, kind
    assert {"hub", "broker", "rp-r1", "rp-r2", "dso-sim"} <= set(results["processes"])
    # The DSO simulator collects garbage as the services do (its default collector's passes held its loop for
    # 300-650 ms at 12,000 requests/min, charged to the hub), and says how often its loop stalled.
    [dso] = results["generator"]["workers"]
    assert dso["gc_young_threshold"] == YOUNG_THRESHOLD and isinstance(dso["loop_stalls"], int)
    assert all(p["max_rss_mib"] > 0 for p in results["processes"].values())
    for rp in results["rp_simulators"].values():
        assert rp["outcomes"] > 0 and rp["unacked_at_exit"] == 0

    rows = (out / "requests.csv").read_text().splitlines()
    assert len(rows) == totals["sent"] + 1
    assert (out / "processes.csv").stat().st_size > 0
    for name in results["files"]["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    report = (out / "report.md").read_text()
    for kind in TYPES:
        assert kind in report
