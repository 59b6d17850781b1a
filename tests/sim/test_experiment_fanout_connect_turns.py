"""The fan-out's fleet processes connect in turns, a bounded number at once, through the real chain (brokers, hub,
bridges, fleet processes as in ``mhp-sim experiment fanout``): the connect storm of 40 processes opening their
connections all at once (100,000 gateways, docs/performance.md) cannot happen however many gateways there are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sim.experiment.fanout import fleet_connect, fleet_ready_timeout_s, gateway_connect_timeout_s, run_timeout_s


def most_at_once(windows: list[list[float]]) -> int:
    """The most windows ``[start, end]`` open at one instant."""
    events = sorted([(start, 1) for start, _ in windows] + [(end, -1) for _, end in windows],
                    key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    open_now = most = 0
    for _, step in events:
        open_now += step
        most = max(most, open_now)
    return most


@pytest.mark.parametrize("connecting", [1, 2])
def test_fleet_processes_connect_at_most_so_many_at_once_and_every_gateway_is_reached(
        tmp_path: Path, connecting: int) -> None:
    out = tmp_path / "fanout"
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "experiment", "fanout", "--out", str(out),
                           "--gateways", "60", "--retailers", "2", "--runs", "1", "--per-fleet", "10",
                           "--fleets-connecting", str(connecting), "--connect-concurrency", "4"],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    windows = res["setup"]["fleet_connect_windows"]
    assert len(windows) == res["setup"]["fleet_processes"] == 6  # 30 gateways per retailer, 10 per process
    assert all(start <= end for start, end in windows.values())
    assert most_at_once(list(windows.values())) <= connecting
    assert res["setup"]["fleets_connecting"] == connecting and res["setup"]["connect_concurrency"] == 4
    (run,) = res["runs"]
    assert run["executed"] == 60 and run["missing_commands"] == 0


def test_most_at_once_counts_overlapping_windows() -> None:
    assert most_at_once([]) == 0
    assert most_at_once([[0, 1], [1, 2], [2, 3]]) == 1  # one ends as the next starts
    assert most_at_once([[0, 2], [1, 3], [2.5, 4]]) == 2
    assert most_at_once([[0, 10], [1, 2], [3, 4], [5, 6]]) == 2


def test_fleet_connect_reads_the_ready_files() -> None:
    got = fleet_connect([{"file": "fleet-r1-1", "gateways": 10, "connect_s": 0.5, "connect_started_at": 100.0,
                          "connected_at": 100.5},
                         {"file": "fleet-r2-1", "gateways": 10, "connect_s": 0.25}])  # an older fleet's file
    assert got == {"fleet_connect_s": {"fleet-r1-1": 0.5, "fleet-r2-1": 0.25},
                   "fleet_connect_windows": {"fleet-r1-1": [100.0, 100.5], "fleet-r2-1": [None, None]}}


@pytest.mark.parametrize(("gateways", "connect_s", "ready_s", "run_s"), [
    (10, 60.4, 90.4, 60.0),
    (2_500, 160.0, 190.0, 60.0),
    (10_000, 460.0, 490.0, 60.0),
    (100_000, 4_060.0, 4_090.0, 300.0),
])
def test_the_waits_grow_with_the_gateways(gateways: int, connect_s: float, ready_s: float, run_s: float) -> None:
    assert gateway_connect_timeout_s(gateways) == pytest.approx(connect_s)
    assert fleet_ready_timeout_s(gateways) == pytest.approx(ready_s)
    assert run_timeout_s(gateways) == pytest.approx(run_s)
