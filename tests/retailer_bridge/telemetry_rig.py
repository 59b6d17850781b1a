"""Helpers of the telemetry-export tests: polling, and a real VictoriaMetrics speaking InfluxDB's v2 write API.

VictoriaMetrics (Debian's ``victoria-metrics``) accepts ``POST /api/v2/write?org=&bucket=&precision=`` with line
protocol, as influxdb-client sends it; a line ``home,<tags> f1=v1,f2=v2 <ms>`` becomes the series ``home_f1`` and
``home_f2`` with the tags as labels (booleans as 1/0), read back with ``/api/v1/export`` (one JSON object per series
and line: ``metric``, ``values``, ``timestamps`` in ms). Fresh rows become searchable after ``/internal/force_flush``
and the registration of new series (about a second), so readers poll. It keeps duplicate samples (no
``-dedup.minScrapeInterval``), so an export shows a point written twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.broker_fixtures import free_port

VM_BINARY = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"



class VictoriaMetrics:
    """A VictoriaMetrics single-node process on 127.0.0.1 (a free port), its data under ``data_dir``."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def url(self) -> str:
        """Base URL (also the InfluxDB URL for influxdb-client)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start the process (same port and data path as before) and wait until it answers ``/health``."""
        assert self.proc is None
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [VM_BINARY, f"-httpListenAddr=127.0.0.1:{self.port}", f"-storageDataPath={self.data_dir}",
                 "-search.latencyOffset=0s", "-search.disableCache", "-retentionPeriod=100y",
                 "-loggerLevel=WARN"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"victoria-metrics exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("victoria-metrics did not come up")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop gracefully (SIGTERM: it flushes to disk), kill after 10 s."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

    def export(self, match: str = '{__name__=~"home_.*"}') -> list[dict[str, Any]]:
        """Every series matching ``match`` with all its samples, from ``/api/v1/export`` (after a flush)."""
        urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=5).close()
        query = urllib.parse.urlencode({"match[]": match, "start": "0"})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{query}", timeout=5) as resp:
            return [json.loads(line) for line in resp.read().splitlines() if line.strip()]

    def samples(self, match: str = '{__name__=~"home_.*"}') -> list[tuple[str, tuple[tuple[str, str], ...], int,
                                                                         float]]:
        """The export flattened: ``(metric name, sorted labels, timestamp ms, value)`` per sample."""
        out = []
        for series in self.export(match):
            labels = dict(series["metric"])
            name = labels.pop("__name__")
            for ts, value in zip(series["timestamps"], series["values"], strict=True):
                out.append((name, tuple(sorted(labels.items())), int(ts), float(value)))
        return out

    async def wait_for_samples(self, count: int, timeout: float = 6.0) -> list[tuple[str, tuple[tuple[str, str], ...],
                                                                                     int, float]]:
        """Poll the export until it holds at least ``count`` samples (new series take about a second)."""
        deadline = time.monotonic() + timeout
        while True:
            got = await asyncio.to_thread(self.samples)
            if len(got) >= count or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.1)
