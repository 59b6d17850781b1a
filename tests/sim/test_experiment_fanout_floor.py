"""``mhp-sim experiment fanout --floor``: the bare MQTT command+ack floor in the same run, and the ratios."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sim.experiment.fanout import cpu_per_client, floor_ratios, process_group


def test_fanout_with_the_floor_measures_both_on_the_same_brokers_and_fleet(tmp_path: Path) -> None:
    out = tmp_path / "floor"
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "experiment", "fanout", "--out", str(out),
                           "--gateways", "40", "--retailers", "2", "--runs", "2", "--per-fleet", "15", "--floor"],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[fanout] floor 1/2:" in proc.stdout and "[fanout] floor: 100 % acknowledged by" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["params"]["floor"] is True
    # Two retailers of 20 gateways, at most 15 per fleet process: four fleet processes serve both measurements.
    assert res["setup"]["fleet_processes"] == 4
    floor = res["floor_runs"]
    assert [f["run"] for f in floor] == [1, 2]
    for f in floor:
        assert f["acked"] == f["clients"] == 40 and f["duplicates"] == 0
        assert 0 < f["t50_s"] <= f["t90_s"] <= f["t99_s"] <= f["t100_s"]
        groups = f["cpu_ms_per_client"]["group"]
        # No bridge runs yet during the floor; the fleet and the brokers are charged apart (40 clients are too few
        # for /proc's 10 ms ticks to show the fleet's CPU, so only its presence is checked).
        assert "bridge-r1" not in f["cpu_s"] and {"fleet", "brokers", "experiment"} <= set(groups)
    # Our runs are unchanged by the floor: every gateway executed exactly once, nothing missing.
    for r in res["runs"]:
        assert r["executed"] == r["clients"] == 40 and r["missing_commands"] == 0 and r["duplicate_commands"] == 0
        assert {"product", "fleet", "brokers"} <= set(r["cpu_ms_per_client"]["group"])
        assert r["cpu_ms_per_client"]["process"]["bridge-r1"] == round(r["cpu_s"]["bridge-r1"] * 1000 / 40, 4)
    s = res["summary"]["floor"]
    assert s["runs"] == 2 and s["all_acked_every_run"]
    median = (floor[0]["t100_s"] + floor[1]["t100_s"]) / 2
    assert s["t100_s_median"] == round(median, 4)
    # Over the median itself, not its rounded copy in the summary (5.795 rounds apart on either side).
    assert [r["floor_ratio"] for r in res["runs"]] == [round(r["t100_s"] / median, 2) for r in res["runs"]]
    assert s["ratio_best"] == min(r["floor_ratio"] for r in res["runs"])
    rows = list(csv.DictReader((out / "floor.csv").open()))
    assert [row["acked"] for row in rows] == ["40", "40"]
    report = (out / "report.md").read_text()
    assert "## The bare MQTT floor" in report and "## CPU milliseconds per client" in report
    # The floor's acknowledgements never reached the product: the bridges started after it, and no gateway
    # counted a floor command as a command of a request.
    stats = [json.loads(f.read_text()) for f in (out / "run").glob("fleet-*.stats.json")]
    assert {rid for st in stats for rid in st["commands"]} == {r["request_id"] for r in res["runs"]}


@pytest.mark.parametrize(("name", "group"), [
    ("hub", "product"), ("bridge-r7", "product"), ("fleet-r1-2", "fleet"), ("hub-broker", "brokers"),
    ("broker-r3", "brokers"), ("experiment", "experiment"),
])
def test_each_process_is_charged_to_its_group(name: str, group: str) -> None:
    assert process_group(name) == group


def test_cpu_per_client_keeps_the_fleet_apart_from_the_product() -> None:
    got = cpu_per_client({"hub": 0.3, "bridge-r1": 0.5, "fleet-r1-1": 2.0, "broker-r1": 0.4, "hub-broker": 0.1}, 1000)
    assert got["process"] == {"bridge-r1": 0.5, "broker-r1": 0.4, "fleet-r1-1": 2.0, "hub": 0.3, "hub-broker": 0.1}
    assert got["group"] == {"brokers": 0.5, "fleet": 2.0, "product": 0.8}


def test_floor_ratios_use_the_floor_median_and_say_when_a_run_never_finished() -> None:
    floor = [{"t100_s": 0.2}, {"t100_s": 0.1}, {"t100_s": 0.4}]
    ours = [{"t100_s": 0.5}, {"t100_s": 0.25}]
    assert floor_ratios(ours, floor) == {"floor_t100_s_median": 0.2, "ratios": [2.5, 1.25], "ratio_best": 1.25,
                                         "ratio_worst": 2.5}
    # An unfinished run of ours has no ratio and no worst; an unfinished floor run leaves no floor at all.
    assert floor_ratios([{"t100_s": None}, {"t100_s": 0.3}], floor)["ratio_worst"] is None
    assert floor_ratios(ours, [{"t100_s": 0.2}, {"t100_s": None}])["ratios"] == [None, None]
