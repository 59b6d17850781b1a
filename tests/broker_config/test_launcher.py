"""MosquittoProcess: start, stop, kill, restart, errors, and never an orphan broker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from broker_config import (
    BrokerError,
    BrokerSpec,
    BrokerStartError,
    Identity,
    MosquittoNotFoundError,
    MosquittoProcess,
    find_mosquitto,
    live_processes,
)
from broker_config import launcher as launcher_module
from tests.broker_fixtures import BrokerHandle, free_port

REPO = Path(__file__).resolve().parents[2]


def spec_for(tmp_path: Path, port: int | None = None) -> BrokerSpec:
    return BrokerSpec(
        kind="retailer",
        port=port or free_port(),
        data_dir=tmp_path / "broker",
        privileged=Identity("bridge", "bridge-pw"),
        parties=[Identity("gw-1", "gw-pw")],
    )


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def is_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (absent, or a zombie waiting for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in {"Z", "X"}


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    """True once ``pid`` is gone; False if it still runs after ``timeout`` (generous: a loaded machine delays the
    kernel's parent-death signal and the broker's clean shutdown, never prevents them)."""
    deadline = time.monotonic() + timeout
    while not is_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_context_manager_starts_and_stops(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    process = MosquittoProcess(spec)
    assert process.pid is None and not process.is_running()
    with process as running:
        assert running is process
        pid = process.pid
        assert pid is not None and process.is_running()
        assert accepts(spec.host, spec.port)
        assert live_processes() == [process]
    assert not process.is_running() and process.pid is None
    assert is_gone(pid)
    assert not accepts(spec.host, spec.port)
    assert "terminating" in process.log_tail()


async def test_async_context_manager(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    async with MosquittoProcess(spec) as process:
        pid = process.pid
        assert pid is not None
        assert accepts(spec.host, spec.port)
        await process.restart_async()
        assert process.pid not in (None, pid)
    assert not process.is_running()
    assert is_gone(pid)


def test_kill_restart_and_start_again(hub_broker: BrokerHandle) -> None:
    process = hub_broker.process
    first = process.pid
    assert first is not None
    assert process.kill() == -signal.SIGKILL
    assert not process.is_running() and is_gone(first)
    assert process.kill() is None and process.stop() is None  # nothing left to do

    process.start()
    second = process.pid
    assert second not in (None, first)
    process.restart()
    assert process.pid not in (None, second)
    assert accepts(hub_broker.host, hub_broker.port)


def test_start_twice_is_refused(hub_broker: BrokerHandle) -> None:
    with pytest.raises(BrokerError, match="already running"):
        hub_broker.process.start()


def test_stop_before_start_does_nothing(tmp_path: Path) -> None:
    assert MosquittoProcess(spec_for(tmp_path)).stop() is None


def test_port_in_use_fails_with_the_log_tail(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = MosquittoProcess(spec_for(tmp_path, port=taken.getsockname()[1]))
        with pytest.raises(BrokerStartError, match="Address already in use") as info:
            process.start()
    assert "exited with code 1" in str(info.value)
    assert not process.is_running()


def test_start_timeout_kills_the_process_and_shows_its_output(tmp_path: Path) -> None:
    # Not Mosquitto: a stand-in that never listens, to exercise the launcher's own timeout.
    fake = tmp_path / "never-listens"
    fake.write_text("#!/bin/sh\necho 'stand-in started'\nexec sleep 30\n")
    fake.chmod(0o755)
    process = MosquittoProcess(spec_for(tmp_path), binary=str(fake), start_timeout=0.3)
    with pytest.raises(BrokerStartError, match=r"did not accept connections within 0\.3 s") as info:
        process.start()
    assert "stand-in started" in str(info.value)
    assert not process.is_running()


def test_missing_binary_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(launcher_module, "_FALLBACK_DIRS", ())
    with pytest.raises(MosquittoNotFoundError, match="apt-get install mosquitto"):
        find_mosquitto()


def test_finds_the_installed_mosquitto() -> None:
    assert os.access(find_mosquitto(), os.X_OK)


def test_broker_dies_with_its_parent(tmp_path: Path) -> None:
    """A parent killed with SIGKILL (no cleanup runs at all) still does not leave an orphan Mosquitto."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from broker_config import BrokerSpec, BrokerStartError, Identity, MosquittoProcess
        from mhp_wire.ports import free_port
        for attempt in range(3):  # another test run may take the free port first (as mosquitto_factory retries)
            spec = BrokerSpec(kind="hub", port=free_port(), data_dir=Path({str(tmp_path / "orphan")!r}),
                              privileged=Identity("hub", "pw"))
            process = MosquittoProcess(spec)
            try:
                process.start()
                break
            except BrokerStartError as exc:
                if "in use" not in str(exc) or attempt == 2:
                    raise
        print(process.pid, flush=True)
        time.sleep(30)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert not is_gone(pid)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout:
            parent.stdout.close()
    assert wait_gone(pid), f"mosquitto {pid} survived its parent"
    assert "terminating" in (tmp_path / "orphan" / "mosquitto.log").read_text()  # SIGTERM: clean shutdown
