"""``mhp-stack up`` prints the DSO console's URL (and writes it to ``stack.json``), and the console answers there."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import httpx
import pytest

PREFIX = "mhp-stack: the DSO's console: "


@pytest.mark.timeout(180)
async def test_mhp_stack_up_prints_the_consoles_url(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sim.stack.cli", "up", "--state-dir", str(tmp_path / "state"), "--retailers", "1",
        "--homes", "1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not any(line.startswith(PREFIX) for line in lines):
            line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode()
            assert line, f"mhp-stack up ended without the console's URL: {lines}"
            lines.append(line.rstrip("\n"))
        url = next(line for line in lines if line.startswith(PREFIX))[len(PREFIX):]
        first = json.loads(lines[0])
        assert first["console_url"] == url and url.startswith("http://127.0.0.1:")
        info = json.loads((tmp_path / "state" / "stack.json").read_text())
        assert info["console_url"] == url and "dso-console" in info["processes"]
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            session = await http.get("/api/session")
            assert session.status_code == 200 and session.json()["hub_url"] == info["hub_url"]
            page = await http.get("/")
            assert page.status_code == 200 and "DSO console" in page.text
            assert (await http.get("/static/uplot.js")).text.startswith("/*! https://github.com/leeoniya/uPlot")
            status = await http.get("/api/status")
            assert status.status_code == 200 and status.json()["retailers"]["r1"]["state"] == "online"
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
