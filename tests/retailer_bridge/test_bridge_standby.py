"""Several bridge processes of one retailer (issue 14, item 3): one store, one instance lock, one active process and
its standbys; the active one killed with ``kill -9`` in the middle of an emergency to a fleet loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retailer_bridge.instance_lock import InstanceLock, holder_pid
from retailer_bridge.settings import BridgeSettings

GATEWAYS = 1000


def test_one_holder_at_a_time_and_the_lock_is_free_again_once_released(tmp_path: Path) -> None:
    path = tmp_path / "state" / "bridge.lock"
    first, second = InstanceLock(path), InstanceLock(path)
    assert first.try_acquire() and first.held
    assert holder_pid(path) == os.getpid()
    assert not second.try_acquire() and not second.held  # flock: two open descriptions conflict, even in one process
    assert first.try_acquire()  # held already: still True
    first.release()
    assert not first.held
    assert second.try_acquire() and second.held
    second.release()
    assert holder_pid(tmp_path / "missing.lock") is None


def test_a_process_killed_with_kill_9_frees_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "bridge.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from retailer_bridge.instance_lock import InstanceLock\n"
        f"assert InstanceLock(Path({str(path)!r})).try_acquire(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        assert holder_pid(path) == holder.pid
        standby = InstanceLock(path)
        assert not standby.try_acquire()
        holder.kill()
        holder.wait()
        assert standby.try_acquire()  # the kernel dropped the dead holder's lock: no lease to wait out
        assert holder_pid(path) == os.getpid()
        standby.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_the_setting_is_optional_and_read_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert BridgeSettings(retailer_id="r1").instance_lock_path is None
    monkeypatch.setenv("MHP_BRIDGE_INSTANCE_LOCK_PATH", str(tmp_path / "r1.lock"))
    assert BridgeSettings(retailer_id="r1").instance_lock_path == tmp_path / "r1.lock"


def test_two_bridge_processes_the_active_one_killed_mid_emergency_lose_nothing(tmp_path: Path) -> None:
    """Real hub, hub broker, retailer broker, two ``retailer-bridge run`` processes of r1 and a fleet of simulated
    gateways (``sim.fleet``), through ``mhp-sim experiment fanout``; the active bridge is killed once the hub has its
    first outcome of the emergency."""
    out = tmp_path / "fanout"
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "experiment", "fanout", "--out", str(out),
                           "--gateways", str(GATEWAYS), "--runs", "1", "--per-fleet", "500",
                           "--bridge-instances", "2", "--kill-bridge-after-outcomes", "1"],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    (run,) = res["runs"]
    (kill,) = run["bridge_kills"]
    # The active one was killed, mid-way: the hub had some outcomes of the emergency, not all of them.
    assert kill["killed"] in ("bridge-r1", "bridge-r1-2"), kill
    assert 0 < kill["hub_outcomes_before"] < GATEWAYS, kill
    survivor = "bridge-r1-2" if kill["killed"] == "bridge-r1" else "bridge-r1"
    assert "took over as the active bridge" in (out / "run" / "logs" / f"{survivor}.log").read_text()
    assert "took over" not in (out / "run" / "logs" / f"{kill['killed']}.log").read_text()
    # Nothing lost: every client executed, the request completed, every gateway got its command.
    assert run["state"] == "completed", run["states"]
    assert run["states"] == {"executed": GATEWAYS} and run["executed"] == GATEWAYS
    assert run["missing_commands"] == 0 and run["missing_gateways"] == []
    # Each gateway's receipts of the one command (the fleet's own count): a command whose acknowledgement died with
    # the killed process is sent again by the standby (at least once), and a gateway keeps one command per request.
    stats = [json.loads(f.read_text()) for f in (out / "run").glob("fleet-*.stats.json")]
    got = {g: n for s in stats for g, (n, _) in s["commands"][run["request_id"]].items()}
    assert len(got) == GATEWAYS and min(got.values()) >= 1
    assert run["duplicate_commands"] == sum(n - 1 for n in got.values())


@pytest.mark.parametrize(("args", "says"), [
    (["--kill-bridge-after-outcomes", "1"], "needs --bridge-instances 2 or more"),
    (["--bridge-instances", "2", "--kill-bridge-after-outcomes", "0"], "must be positive"),
    (["--bridge-instances", "0"], "--bridge-instances must be positive"),
])
def test_the_experiment_refuses_a_kill_without_a_standby_with_a_clear_error(tmp_path: Path, args: list[str],
                                                                             says: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "sim.cli", "experiment", "fanout", "--out", str(tmp_path / "x"),
                           "--gateways", "10", *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()
