"""``mhp-sim experiment fanout --via openadr3``'s door run, small: a real hub process and Mosquitto, VENs on the MQTT
notifier, each reporting back over HTTP; and its section of the fan-out report."""

from __future__ import annotations

import json
from pathlib import Path

from sim.experiment.fanout import via_section
from sim.experiment.via_openadr3 import run_openadr3_fanout


def test_every_ven_is_notified_once_and_every_report_is_accepted(tmp_path: Path) -> None:
    out = tmp_path / "via"
    res = run_openadr3_fanout(4, out, runs=2, timeout_s=30)
    assert res["vens"] == 4 and len(res["runs"]) == 2
    for run in res["runs"]:
        assert (run["notified"], run["reported"], run["missing_notifications"]) == (4, 4, 0)
        assert run["notified_t100_s"] is not None and run["reported_t100_s"] >= run["notified_t50_s"]
        assert run["cpu_s"]["hub"] >= 0
    assert res["duplicates"] == 0 and res["report_errors"] == []
    assert res["summary"]["all_notified_every_run"] and res["summary"]["all_reported_every_run"]
    assert json.loads((out / "results.json").read_text())["vens"] == 4
    text = "\n".join(via_section({"via": {"name": "openadr3", "dir": "via", "result": res}}))
    assert "Through the standard door" in text and "| 2 | 4 |" in text
