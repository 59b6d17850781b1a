"""A headless Chromium (Debian's ``chromium``) for browser tests: started with its DevTools on a free port, in its
own process group, and gone (with every helper process) at teardown. Each test drives it over the DevTools
protocol on its websocket."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

__all__ = ["CHROMIUM", "FLAGS", "Browser", "Cdp", "chromium", "needs_chromium", "page_problems"]

CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh)")


@dataclass
class Browser:
    process: subprocess.Popen[bytes]
    ws_url: str
    profile: Path


def _profile_processes(profile: Path) -> list[int]:
    """Every process whose command line names ``profile`` (the browser and its helpers)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(profile).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Browser]:
    """A headless Chromium with its DevTools on a free port, in its own process group; gone at teardown."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    log = (tmp_path / "chromium.log").open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen([CHROMIUM or "chromium", *FLAGS, f"--user-data-dir={profile}",
                             "--remote-debugging-port=0", "about:blank"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}: see {tmp_path / 'chromium.log'}"
            assert time.monotonic() - t0 < 10, "chromium did not open its DevTools port"
            time.sleep(0.02)
        port, path = port_file.read_text().split()
        print(f"chromium ready in {time.monotonic() - t0:.2f} s")
        yield Browser(proc, f"ws://127.0.0.1:{port}{path}", profile)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the browser and every helper it started
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
        deadline = time.monotonic() + 3
        while _profile_processes(profile) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _profile_processes(profile), "chromium helpers left running"


def page_problems(events: list[dict[str, Any]]) -> list[str]:
    """Console errors, uncaught exceptions and browser log errors among DevTools events (a CSP violation is one)."""
    out = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.exceptionThrown":
            out.append(json.dumps(p["exceptionDetails"]))
        elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") == "error":
            out.append(json.dumps(p.get("args")))
        elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(p["entry"]["text"])
    return out


class Cdp:
    """A minimal Chrome DevTools Protocol client: one browser websocket, flat sessions, commands and events."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._event = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg:
                fut = self._pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            else:
                self.events.append(msg)
                self._event.set()

    async def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
                   timeout: float = 5.0) -> dict[str, Any]:
        """Send one command (to ``session`` when given); its ``result`` (a protocol error fails the test)."""
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send(json.dumps(msg))
        reply = await asyncio.wait_for(fut, timeout)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"]  # type: ignore[no-any-return]

    async def wait_event(self, method: str, after: int = 0, timeout: float = 5.0) -> dict[str, Any]:
        """The first event named ``method`` among those received after the first ``after`` events."""
        async with asyncio.timeout(timeout):
            while True:
                for e in self.events[after:]:
                    if e["method"] == method:
                        return e
                self._event.clear()
                await self._event.wait()

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (a CSP violation is one)."""
        return page_problems(self.events)

    async def close(self) -> None:
        """Stop reading and close the websocket."""
        self._reader.cancel()
        await self.ws.close()
