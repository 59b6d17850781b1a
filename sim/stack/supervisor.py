"""A small process supervisor, as systemd would do it: start children, restart one that dies, log the restart.

Children die with the supervisor (``PR_SET_PDEATHSIG`` on Linux), so a killed ``mhp-stack`` leaves no orphans.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from broker_config.launcher import die_with_parent

log = logging.getLogger(__name__)


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_restart_at: float = 0.0
    started_at: float = 0.0

    @property
    def pid(self) -> int | None:
        """The running process's id."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


class Supervisor:
    """Starts children and keeps them running until :meth:`stop_all`."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self.children: dict[str, Child] = {}
        self.events: list[str] = []
        self._on_change = on_change

    def start(self, child: Child) -> Child:
        """Start ``child`` (its output appended to its log file) and supervise it."""
        child.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(child.log_path, "ab") as out:
            child.proc = subprocess.Popen(
                child.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **child.env}, preexec_fn=die_with_parent(),
            )
        child.started_at = time.monotonic()
        self.children[child.name] = child
        return child

    def check(self) -> list[str]:
        """Restart every child that died (with back-off); returns the names restarted now."""
        restarted = []
        now = time.monotonic()
        for child in self.children.values():
            if child.proc is None or child.proc.poll() is None:
                continue
            if child.next_restart_at == 0.0:
                code = child.proc.returncode
                delay = min(10.0, 0.2 * 2 ** min(child.restarts, 6)) if now - child.started_at < 10 else 0.2
                child.next_restart_at = now + delay
                msg = f"{child.name} (pid {child.proc.pid}) exited with code {code}; restarting in {delay:.1f} s"
                log.warning("%s", msg)
                self.events.append(msg)
            if now >= child.next_restart_at:
                child.next_restart_at = 0.0
                child.restarts += 1
                self.start(child)
                msg = f"{child.name} restarted as pid {child.pid} (restart #{child.restarts})"
                log.warning("%s", msg)
                self.events.append(msg)
                restarted.append(child.name)
        if restarted and self._on_change:
            self._on_change()
        return restarted

    def stop_all(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every child (last started first), then SIGKILL what is still alive after ``timeout_s``."""
        children = [c for c in reversed(list(self.children.values())) if c.pid is not None]
        for c in children:
            assert c.proc is not None
            c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for c in children:
            assert c.proc is not None
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
        self.children.clear()

    def pids(self) -> dict[str, int | None]:
        """Each child's current pid."""
        return {name: c.pid for name, c in self.children.items()}
