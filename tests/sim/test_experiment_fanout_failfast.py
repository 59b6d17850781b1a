"""``mhp-sim experiment fanout`` stops at once, and says why, when one of its processes dies.

The experiment runs as its own process, as a user runs it; a fleet process it started is killed with SIGKILL the
moment it appears (long before it could connect its gateways: set-up is still going on). Before the watchdog the
experiment went on waiting for that process's ready file (60 s and more; at 100,000 gateways, half an hour), which
the test's timeout observes as a failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sim.experiment.fanout import exit_text, log_tail

STOP_WITHIN_S = 30.0
"""The experiment must have exited this soon after the kill (its watchdog looks every 0.2 s; without it, it waited
at least 60 s for the dead process's ready file)."""
FIND_WITHIN_S = 60.0
"""Set-up (brokers, hub, registration) before the first fleet process starts, on a loaded machine."""


def fleet_process(out: Path) -> tuple[int, str] | None:
    """A fleet process of the experiment writing into ``out`` (pid and its process name, ``fleet-r1-1``), if one
    is running, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "sim.fleet" in args and "--credentials" in args:
            creds = Path(args[args.index("--credentials") + 1])
            if creds.is_relative_to(out):
                return int(entry.name), creds.name.removesuffix(".creds.json")
    return None


def test_a_fleet_process_killed_during_set_up_stops_the_experiment_at_once_naming_it(tmp_path: Path) -> None:
    out = tmp_path / "fanout"
    proc = subprocess.Popen([sys.executable, "-m", "sim.cli", "experiment", "fanout", "--out", str(out),
                             "--gateways", "40", "--retailers", "2", "--runs", "1", "--per-fleet", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + FIND_WITHIN_S
        found = None
        while found is None and proc.poll() is None and time.monotonic() < deadline:
            found = fleet_process(out)
            time.sleep(0.01)
        assert found is not None, "no fleet process appeared"
        pid, name = found
        os.kill(pid, signal.SIGKILL)
        try:
            stdout, stderr = proc.communicate(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the experiment was still running {STOP_WITHIN_S:g} s after {name} (pid {pid}) was killed")
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.communicate(timeout=30)
    assert proc.returncode == 3, stdout[-3000:] + stderr[-3000:]
    # The message names the process, its exit code and when it died, then its log's last lines.
    assert (f"[fanout] FAILED: {name} (pid {pid}) exited with exit code -9 (killed by SIGKILL) during set-up "
            f"(the fleet connecting); the last lines of {out / 'run' / 'logs' / (name + '.log')}:") in stderr
    assert "Traceback" not in stderr
    assert not (out / "results.json").exists()  # no results pretending a run happened


@pytest.mark.parametrize(("code", "text"), [
    (0, "exit code 0"),
    (1, "exit code 1"),
    (-9, "exit code -9 (killed by SIGKILL)"),
    (-15, "exit code -15 (killed by SIGTERM)"),
    (-200, "exit code -200 (killed by signal 200)"),
    (None, "an unknown exit code"),
])
def test_exit_text_says_how_a_process_ended(code: int | None, text: str) -> None:
    assert exit_text(code) == text


def test_log_tail_gives_the_last_lines_or_says_there_were_none(tmp_path: Path) -> None:
    log = tmp_path / "fleet.log"
    assert log_tail(log) == "(no output)"
    log.write_text("")
    assert log_tail(log) == "(no output)"
    log.write_text("".join(f"line {k}\n" for k in range(50)))
    assert log_tail(log, 3) == "line 47\nline 48\nline 49"
