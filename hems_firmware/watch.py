"""``hems-gateway watch --url http://HOST:PORT``: follow a gateway's live page from a terminal.

It reads the page's server-sent event stream (``GET /events``, see :mod:`hems_firmware.web`) with the standard
library only, and prints one line per actuation (time, device, ON/OFF, reason, request id) and a compact power line
per poll, at most once a second. When the gateway goes away it reconnects with back-off; Ctrl-C ends it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Generator
from datetime import datetime, tzinfo
from typing import Any, TextIO
from urllib.parse import urlsplit

from mhp_wire.backoff import Backoff

KINDS = {"emergency": "emergency", "load_reduction": "load reduction", "load_shift": "load shift"}
SNAPSHOT_ACTUATIONS = 5
"""How many of the latest actuations are printed on (re)connecting."""


def clean(value: Any) -> str:
    """``value`` as text that cannot drive the terminal: control characters are shown escaped."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(value))


def _kw(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.2f} kW"
    return "-- kW"


class LineFormatter:
    """Turns the stream's events into terminal lines; state lines at most once per ``state_every_s``."""

    def __init__(self, state_every_s: float = 1.0, tz: tzinfo | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state_every_s = state_every_s
        self.tz = tz
        self.clock = clock
        self._last_state: float | None = None

    def time(self, at: Any) -> str:
        """``HH:MM:SS.mmm`` of a Unix time (local time unless a zone was given)."""
        if not isinstance(at, int | float) or isinstance(at, bool):
            return "--:--:--.---"
        return datetime.fromtimestamp(at, self.tz).strftime("%H:%M:%S.%f")[:-3]

    def lines(self, event: dict[str, Any]) -> list[str]:
        """The lines to print for one event (none for a throttled state or an unknown event type)."""
        kind = event.get("type")
        if kind == "actuation":
            return [self.actuation(event)]
        if kind == "state":
            now = self.clock()
            if self._last_state is not None and now - self._last_state < self.state_every_s:
                return []
            self._last_state = now
            return [self.state(event)]
        if kind == "snapshot":
            self._last_state = self.clock()
            return self.snapshot(event)
        if kind == "dropped":
            return [f"{'':12}  ! {clean(event.get('count', 1))} event(s) lost: this watcher fell behind"]
        return []

    def actuation(self, e: dict[str, Any]) -> str:
        """``12:00:01.234  heater        OFF  emergency: limit 1.0 kW  [request q1]``."""
        onoff = "ON " if e.get("on") else "OFF"
        request = clean(e["request_id"]) if e.get("request_id") else "-"
        return (f"{self.time(e.get('at'))}  {clean(e.get('device', '?')):<12}  {onoff}  {clean(e.get('reason', ''))}"
                f"  [request {request}]")

    def state(self, e: dict[str, Any]) -> str:
        """``12:00:02.000  power 6.15 kW | heater on  ev on  fridge on | emergency q1 <=1.00 kW until 12:00:31``."""
        parts = [f"{self.time(e.get('at'))}  power {_kw(e.get('active_power_kw'))}"]
        devices = []
        for name, st in (e.get("devices") or {}).items():
            if not isinstance(st, dict):
                continue
            if st.get("available") is False:
                devices.append(f"{clean(name)} n/a")
            elif "on" in st:
                devices.append(f"{clean(name)} {'on' if st['on'] else 'off'}")
        if devices:
            parts.append("  ".join(devices))
        for a in e.get("active") or []:
            parts.append(self.action(a))
        restore = [clean(r.get("device")) for r in e.get("to_restore") or [] if isinstance(r, dict)]
        if restore:
            parts.append("to restore: " + ", ".join(restore))
        return " | ".join(parts)

    def action(self, a: dict[str, Any]) -> str:
        """``emergency q1 <=1.00 kW until 12:00:31 shed heater,ev``."""
        kind = KINDS.get(a.get("kind", ""), clean(a.get("kind", "?")))
        shed = ",".join(clean(n) for n in a.get("shed") or []) or "nothing"
        limit = _kw(a.get("limit_kw")).replace(" kW", "")
        return f"{kind} {clean(a.get('request_id', '?'))} <={limit} kW until {self.time(a.get('end'))[:8]} shed {shed}"

    def snapshot(self, e: dict[str, Any]) -> list[str]:
        """The first event of a connection: who the gateway is, its state, its latest actuations."""
        out = [f"{self.time(e.get('at'))}  connected to gateway {clean(e.get('gateway_id', '?'))} "
               f"(client {clean(e.get('client_id', '?'))})", self.state(e)]
        recent = list(reversed((e.get("actuations") or [])[:SNAPSHOT_ACTUATIONS]))
        if recent:
            out.append(f"{'':12}  latest actuations:")
            out += [self.actuation(a) for a in recent]
        return out


class SseParser:
    """The ``text/event-stream`` format, line by line: :meth:`feed` returns an event's data when one completes."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self.retry_ms: int | None = None

    def feed(self, line: str) -> str | None:
        """Take one line (without its end of line); the data of a completed event, or ``None``."""
        if line == "":
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


class OutputClosed(Exception):
    """Nobody reads the watcher's output any more (e.g. it was piped into ``head``)."""


class Watcher:
    """Follows one gateway's event stream, reconnecting with back-off, until :meth:`stop`."""

    def __init__(self, url: str, out: TextIO | None = None, err: TextIO | None = None,
                 formatter: LineFormatter | None = None, min_delay_s: float = 0.5, max_delay_s: float = 10.0,
                 read_timeout_s: float = 45.0) -> None:
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL of a gateway page: {url!r}")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.path = parts.path.rstrip("/") + "/events"
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.formatter = formatter or LineFormatter()
        self.min_delay_s, self.max_delay_s = min_delay_s, max_delay_s
        self.read_timeout_s = read_timeout_s
        self._stopped = threading.Event()
        self._conn: http.client.HTTPConnection | None = None

    def stop(self) -> None:
        """End :meth:`run` (from another thread): the stream is closed and no reconnection follows."""
        self._stopped.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        """Print the gateway's events until stopped; connection problems are reported and retried."""
        backoff = Backoff(initial_s=self.min_delay_s, max_s=self.max_delay_s)
        while not self._stopped.is_set():
            try:
                with contextlib.closing(self.events()) as events:
                    for event in events:
                        backoff.record_success()
                        for line in self.formatter.lines(event):
                            self._print(line)
                problem = "the gateway ended the stream"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                problem = f"cannot follow the gateway: {clean(exc) or type(exc).__name__}"
            if self._stopped.is_set():
                break
            delay = backoff.record_failure(time.monotonic())
            print(f"hems-gateway watch: {problem}; retrying in {delay:.1f} s", file=self.err, flush=True)
            self._stopped.wait(delay)

    def _print(self, line: str) -> None:
        try:
            print(line, file=self.out, flush=True)
        except BrokenPipeError:
            raise OutputClosed from None

    def events(self) -> Generator[dict[str, Any], None, None]:
        """One connection's events, decoded, until it ends."""
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.read_timeout_s)
        self._conn = conn
        try:
            conn.request("GET", self.path, headers={"Accept": "text/event-stream", "Cache-Control": "no-cache"})
            resp = conn.getresponse()
            if resp.status != 200 or not resp.getheader("Content-Type", "").startswith("text/event-stream"):
                raise ValueError(f"{self.path} answered {resp.status} {resp.reason}, not an event stream")
            parser = SseParser()
            while not self._stopped.is_set():
                raw = resp.readline()
                if not raw:
                    return
                data = parser.feed(raw.decode("utf-8", "replace").rstrip("\r\n"))
                if data is not None:
                    event = json.loads(data)
                    if isinstance(event, dict):
                        yield event
        finally:
            self._conn = None
            conn.close()


def main(url: str) -> int:
    """``hems-gateway watch``: follow ``url`` until Ctrl-C."""
    try:
        watcher = Watcher(url)
    except ValueError as exc:
        print(f"hems-gateway watch: {exc}", file=sys.stderr)
        return 2
    print(f"hems-gateway watch: following {watcher.scheme}://{watcher.host}"
          f"{':' + str(watcher.port) if watcher.port else ''}{watcher.path} (Ctrl-C to stop)", file=sys.stderr,
          flush=True)
    try:
        watcher.run()
    except KeyboardInterrupt:
        print("", file=sys.stderr)
    except OutputClosed:  # e.g. piped into head: stop quietly
        with contextlib.suppress(OSError):
            sys.stdout.close()
    return 0
