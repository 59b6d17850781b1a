"""``mhp-sim experiment fanout --timeline``: when the first and the last client passed each stage of the critical
path, from the parts' own records (issue 14, seventh round)."""

from __future__ import annotations

from pathlib import Path

from sim.experiment.timeline import STAGES, floor_span, run_timeline, span
from tests.sim.test_experiment_fanout import run_fanout

CLIENT_STAGES = ("bridge_received", "bridge_sent", "gateway_received", "gateway_answered", "bridge_outcome",
                 "hub_executed")


def test_a_timeline_run_orders_every_stage_and_counts_every_client(tmp_path: Path) -> None:
    out = tmp_path / "timeline"
    _, res = run_fanout(out, "--gateways", "30", "--runs", "1", "--floor", "--timeline")
    (run,) = res["runs"]
    stages = run["timeline"]
    assert tuple(stages) == STAGES
    for name in CLIENT_STAGES:
        assert stages[name]["n"] == 30, (name, stages[name])
    # The same clock (one machine): each stage's first client passed no earlier than the one before it, and the
    # request was stored before it was answered.
    firsts = [stages[s]["first_ms"] for s in STAGES if s != "202"]
    assert firsts == sorted(firsts), stages
    assert stages["hub_stored"]["first_ms"] <= stages["202"]["first_ms"]
    assert stages["hub_executed"]["last_ms"] <= stages["hub_completed"]["first_ms"]
    assert abs(stages["hub_completed"]["first_ms"] - run["hub_completed_s"] * 1000) < 1.0  # the same record
    assert res["floor_timeline"]["runs"] == 1 and res["floor_timeline"]["last_ack_ms"] > 0
    assert "## Timeline of each run" in (out / "report.md").read_text()


def test_span_is_first_and_last_from_the_origin_and_ignores_unknown_times() -> None:
    assert span([10.5, None, 10.1, 10.3], 10.0) == {"first_ms": 100.0, "last_ms": 500.0, "n": 3}
    assert span([None], 10.0) == {"first_ms": None, "last_ms": None, "n": 0}


def test_run_timeline_joins_the_hub_view_the_bridge_store_and_the_fleet() -> None:
    post = 1000.0
    view = {"created_at": 1000.004, "completed_at": 1000.300, "trace": {"dispatch_ms": 20.0}, "clients": {
        "c1": {"state": "executed", "updated_at": 1000.250, "trace": {"gateway_rtt_ms": 50.0}},
        "c2": {"state": "executed", "updated_at": 1000.300, "trace": {"gateway_rtt_ms": 80.0}},
        "c3": {"state": "unreachable", "updated_at": 1000.290, "trace": {}}}}
    commands = {c: {"received_at": 1000.030, "first_sent_at": 1000.040} for c in ("c1", "c2", "c3")}
    got = run_timeline(post, 8.0, view, commands, {"c1": "g1", "c2": "g2", "c3": "g3"},
                       {"g1": [1, 1000.060], "g2": [2, 1000.100]}, {"g1": 1000.061, "g2": 1000.101}, 0.35)
    assert got["202"] == {"first_ms": 8.0, "last_ms": 8.0, "n": 1}
    assert got["hub_stored"]["first_ms"] == 4.0 and got["hub_dispatched"]["first_ms"] == 24.0
    assert got["bridge_sent"] == {"first_ms": 40.0, "last_ms": 40.0, "n": 3}
    assert got["gateway_received"] == {"first_ms": 60.0, "last_ms": 100.0, "n": 2}  # g3 never got it
    assert got["bridge_outcome"] == {"first_ms": 90.0, "last_ms": 120.0, "n": 2}  # sent + the gateway's round trip
    assert got["hub_executed"] == {"first_ms": 250.0, "last_ms": 300.0, "n": 2}  # executed clients only
    assert got["hub_completed"]["first_ms"] == 300.0 and got["seen_done"]["first_ms"] == 350.0


def test_the_floor_span_is_the_median_of_its_runs() -> None:
    runs = [{"t_first_s": 0.01, "t100_s": 0.2}, {"t_first_s": 0.03, "t100_s": 0.1}, {"t_first_s": 0.02,
                                                                                      "t100_s": 0.4}]
    assert floor_span(runs) == {"first_ack_ms": 20.0, "last_ack_ms": 200.0, "runs": 3}
