"""The RP simulator's command line: several retailers per process, and clear errors for what cannot work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def rp_sim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sim.experiment.rp_sim", "--port", "1", *args],
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize(("args", "message"), [
    ((), "no retailer"),
    (("--retailer", "r1", "--retailer", "r2", "--password", "x"), "one --password per --retailer"),
    (("--retailer", "r1", "--password", "x", "--retailer", "r2", "--password", "y", "--stats-file", "s.json"),
     "must contain {retailer}"),
])
def test_bad_command_lines_are_refused_with_a_reason(args: tuple[str, ...], message: str) -> None:
    proc = rp_sim(*args)
    assert proc.returncode == 2 and message in proc.stderr


def test_a_bad_identities_file_is_refused_with_a_reason(tmp_path: Path) -> None:
    bad = tmp_path / "ids.json"
    bad.write_text(json.dumps(["r1", "pw"]))
    proc = rp_sim("--identities", str(bad))
    assert proc.returncode == 2 and "retailer id -> password" in proc.stderr
    proc = rp_sim("--identities", str(tmp_path / "missing.json"))
    assert proc.returncode == 2 and "missing.json" in proc.stderr
