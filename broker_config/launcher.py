"""Run a real Mosquitto broker of the platform as a child process (tests, the simulator, development stacks).

``MosquittoProcess`` renders a ``BrokerSpec`` into its data directory, starts ``mosquitto -c <conf>``, waits until
it accepts connections, and makes sure it never outlives its owner: it is stopped when the context exits, at
interpreter exit, and on Linux the kernel sends it SIGTERM when the thread that started it dies
(``PR_SET_PDEATHSIG``). Start it from a long-lived thread (the main thread, the event loop's thread): the signal
follows the *thread* that forked the child, not the process.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from .errors import BrokerConfigError, BrokerError, BrokerStartError, MosquittoNotFoundError
from .render import BrokerKind, BrokerSpec, Identity, generate_password, render

__all__ = [
    "BrokerConfigError",
    "BrokerError",
    "BrokerKind",
    "BrokerSpec",
    "BrokerStartError",
    "Identity",
    "MosquittoNotFoundError",
    "MosquittoProcess",
    "die_with_parent",
    "find_mosquitto",
    "generate_password",
    "live_processes",
    "render",
]

logger = logging.getLogger(__name__)

_FALLBACK_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")
_OUT_NAME = "mosquitto.out"
_POLL = 0.01
_PR_SET_PDEATHSIG = 1

_live: set[MosquittoProcess] = set()


def find_mosquitto() -> str:
    """The path of the ``mosquitto`` executable: ``$PATH`` first, then the usual sbin directories."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in _FALLBACK_DIRS:
        candidate = Path(directory) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise MosquittoNotFoundError(
        "mosquitto executable not found on PATH nor in "
        + ", ".join(_FALLBACK_DIRS)
        + ": install it with `apt-get install mosquitto` (Mosquitto 2.0 or later)"
    )


def live_processes() -> list[MosquittoProcess]:
    """Every ``MosquittoProcess`` started and not yet stopped or killed (for leak checks)."""
    return [p for p in _live if p.is_running()]


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when the forking thread dies; ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: no imports, no locks
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class MosquittoProcess:
    """One Mosquitto broker run as a child process from a ``BrokerSpec``; a sync and async context manager."""

    def __init__(
        self,
        spec: BrokerSpec,
        *,
        binary: str | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.spec = spec
        self.binary = binary or find_mosquitto()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"<MosquittoProcess {self.spec.kind} {self.host}:{self.port} {state}>"

    @property
    def host(self) -> str:
        """The address the listener is bound to."""
        return self.spec.host

    @property
    def port(self) -> int:
        """The listener's port."""
        return self.spec.port

    @property
    def pid(self) -> int | None:
        """The process id while running, else ``None``."""
        return self._proc.pid if self.is_running() and self._proc else None

    @property
    def log_path(self) -> Path:
        """The broker's log file."""
        return self.spec.log_path

    def is_running(self) -> bool:
        """Whether the child process exists and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the broker's log and of its stdout/stderr."""
        parts = [_tail(self.log_path, lines), _tail(self.spec.data_dir / _OUT_NAME, lines)]
        return "\n".join(p for p in parts if p) or "(no output)"

    # --- synchronous API -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Render the configuration, spawn Mosquitto and wait until it accepts TCP connections."""
        self._spawn()
        deadline = time.monotonic() + self.start_timeout
        while not self._ready():
            if time.monotonic() > deadline:
                self._fail_timeout()
            time.sleep(_POLL)
        self._started()

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM (Mosquitto writes its persistence snapshot), wait; SIGKILL if still running after ``grace`` s.

        Returns the exit code, or ``None`` if it was not running.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout if grace is None else grace)
            except subprocess.TimeoutExpired:
                logger.warning("mosquitto pid %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait()
        return self._reap()

    def kill(self) -> int | None:
        """SIGKILL, as a crash: nothing is saved, what was queued since the last autosave is lost."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        return self._reap()

    def restart(self) -> None:
        """``stop()`` then ``start()`` on the same port and data directory."""
        self.stop()
        self.start()

    def __enter__(self) -> MosquittoProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- asynchronous API ------------------------------------------------------------------------------------

    async def start_async(self) -> None:
        """``start()`` without blocking the event loop (spawned from the loop's thread)."""
        self._spawn()
        deadline = time.monotonic() + self.start_timeout
        while not await self._ready_async():
            if time.monotonic() > deadline:
                self._fail_timeout()
            await asyncio.sleep(_POLL)
        self._started()

    async def stop_async(self, grace: float | None = None) -> int | None:
        """``stop()`` without blocking the event loop."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + (self.stop_timeout if grace is None else grace)
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    logger.warning("mosquitto pid %d ignored SIGTERM; killing it", proc.pid)
                    break
                await asyncio.sleep(_POLL)
        return self.kill()  # reaps; SIGKILLs only if SIGTERM was not enough

    async def restart_async(self) -> None:
        """``stop_async()`` then ``start_async()``."""
        await self.stop_async()
        await self.start_async()

    async def __aenter__(self) -> MosquittoProcess:
        await self.start_async()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_async()

    # --- internals -------------------------------------------------------------------------------------------

    def _spawn(self) -> None:
        if self.is_running():
            raise BrokerError(f"{self!r} is already running")
        self._reap()
        conf = render(self.spec)
        try:
            self._log_offset = self.log_path.stat().st_size
        except FileNotFoundError:
            self._log_offset = 0
        self._out = open(self.spec.data_dir / _OUT_NAME, "ab")  # closed in _reap()
        try:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=subprocess.STDOUT,
                cwd=self.spec.data_dir,
                preexec_fn=die_with_parent(),  # only prctl + getppid in the child: no locks
            )
        except OSError as exc:
            self._out.close()
            self._out = None
            raise BrokerStartError(f"cannot run {self.binary}: {exc}") from exc
        _live.add(self)

    def _new_log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _check_alive(self) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            self._reap()
            raise BrokerStartError(
                f"mosquitto ({self.spec.kind}, {self.host}:{self.port}) exited with code {code} while starting;"
                f" last output:\n{self.log_tail()}"
            )

    def _ready(self) -> bool:
        """Alive, says ``running`` in its log (so the port is its own), and accepts a TCP connection."""
        self._check_alive()
        if " running" not in self._new_log():
            return False
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    async def _ready_async(self) -> bool:
        self._check_alive()
        if " running" not in self._new_log():
            return False
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 0.5)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    def _fail_timeout(self) -> None:
        tail = self.log_tail()
        self.kill()
        raise BrokerStartError(
            f"mosquitto ({self.spec.kind}, {self.host}:{self.port}) did not accept connections within"
            f" {self.start_timeout} s; last output:\n{tail}"
        )

    def _started(self) -> None:
        assert self._proc is not None
        logger.info(
            "mosquitto %s broker running: pid %d on %s:%d, data in %s",
            self.spec.kind,
            self._proc.pid,
            self.host,
            self.port,
            self.spec.data_dir,
        )

    def _reap(self) -> int | None:
        code: int | None = None
        if self._proc is not None:
            code = self._proc.poll()
            if code is not None:
                logger.info("mosquitto %s broker pid %d exited with %d", self.spec.kind, self._proc.pid, code)
                self._proc = None
        if self._out is not None and self._proc is None:
            self._out.close()
            self._out = None
        _live.discard(self)
        return code


@atexit.register
def _stop_all() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.stop(grace=5)
