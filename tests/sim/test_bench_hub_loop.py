"""The loop benchmark (``python -m sim.bench_hub_loop``) runs its whole chain at a small size: a hub process, its
broker, the retailer, the ``/healthz`` thread; what it prints is the figures of one completed emergency. Its
figures are not judged here (wall clock: ``docs/performance.md``)."""

from __future__ import annotations

import json

import pytest

from sim import bench_hub_loop


@pytest.mark.timeout(180)
def test_the_loop_benchmark_runs_an_emergency_to_completion(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_hub_loop.main(["--clients", "300", "--interval-ms", "20"]) == 0
    run, summary = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert run["clients"] == 300
    assert run["healthz_failures"] == 0
    assert 1 <= len(run["longest_gaps_s_at_s"]) <= min(5, run["healthz_answers"])
    assert run["longest_healthz_gap_s"] == run["longest_gaps_s_at_s"][0][0]
    assert summary["runs"] == 1 and summary["median_longest_healthz_gap_s"] == run["longest_healthz_gap_s"]
