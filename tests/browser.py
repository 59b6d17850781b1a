"""A headless Chromium (Debian's ``chromium``) for browser tests: started with its DevTools on a free port, in its
own process group, and gone (with every helper process) at teardown. Each test drives it over the DevTools
protocol on its websocket."""

from __future__ import annotations

import contextlib
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

__all__ = ["CHROMIUM", "FLAGS", "Browser", "chromium", "needs_chromium", "page_problems"]

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
