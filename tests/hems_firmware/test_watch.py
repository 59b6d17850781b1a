"""``hems-gateway watch``: its lines (a table of events), its SSE parsing, and the real command following a real
gateway's stream through a restart, then stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from hems_firmware.watch import LineFormatter, SseParser, Watcher
from mhp_wire import topics
from tests.broker_fixtures import MosquittoFactory
from tests.hems_firmware.web_rig import WebRig, emergency, running_gateway, send
from tests.mqtt_party import Party, parties

AT = datetime(2026, 1, 2, 12, 0, 1, 234000, tzinfo=UTC).timestamp()
STATE = {"type": "state", "at": AT, "active_power_kw": 6.15,
         "devices": {"meter": {"active_power_kw": 6.15}, "heater": {"on": True}, "ev": {"on": False},
                     "plug": {"available": False}},
         "active": [{"request_id": "q1", "kind": "emergency", "limit_kw": 1.0, "end": AT + 30,
                     "shed": ["heater", "ev"]}], "to_restore": [{"device": "ev", "request_id": "q0"}]}


@pytest.mark.parametrize(("event", "lines"), [
    ({"type": "actuation", "at": AT, "device": "heater", "on": False, "request_id": "q1",
      "reason": "emergency: limit 1.0 kW"},
     ["12:00:01.234  heater        OFF  emergency: limit 1.0 kW  [request q1]"]),
    ({"type": "actuation", "at": AT, "device": "ev", "on": True, "request_id": None,
      "reason": "tariff t1 v2: cheapest tariff slot"},
     ["12:00:01.234  ev            ON   tariff t1 v2: cheapest tariff slot  [request -]"]),
    ({"type": "actuation", "at": AT, "device": "heat\x1b[2Jer", "on": True, "request_id": "q\n2", "reason": "r"},
     ["12:00:01.234  heat\\x1b[2Jer  ON   r  [request q\\n2]"]),
    (STATE, ["12:00:01.234  power 6.15 kW | heater on  ev off  plug n/a"
             " | emergency q1 <=1.00 kW until 12:00:31 shed heater,ev | to restore: ev"]),
    ({"type": "state", "at": AT, "active_power_kw": None, "devices": {}, "active": []},
     ["12:00:01.234  power -- kW"]),
    ({"type": "snapshot", "at": AT, "gateway_id": "gw-1", "client_id": "c1", "active_power_kw": 0.45,
      "devices": {"heater": {"on": False}}, "active": [],
      "actuations": [{"type": "actuation", "at": AT - i / 10, "device": f"d{i}", "on": False, "request_id": "q",
                      "reason": "x"} for i in range(7)]},  # newest first, as the gateway sends them
     ["12:00:01.234  connected to gateway gw-1 (client c1)", "12:00:01.234  power 0.45 kW | heater off",
      "              latest actuations:",  # the five latest, oldest first, as they would have scrolled by
      "12:00:00.834  d4            OFF  x  [request q]", "12:00:00.934  d3            OFF  x  [request q]",
      "12:00:01.034  d2            OFF  x  [request q]", "12:00:01.134  d1            OFF  x  [request q]",
      "12:00:01.234  d0            OFF  x  [request q]"]),
    ({"type": "dropped", "count": 3}, ["              ! 3 event(s) lost: this watcher fell behind"]),
    ({"type": "something-new"}, []),
])
def test_lines(event: dict[str, Any], lines: list[str]) -> None:
    assert LineFormatter(tz=UTC).lines(event) == lines


def test_state_lines_at_most_once_a_second() -> None:
    now = [100.0]
    fmt = LineFormatter(tz=UTC, clock=lambda: now[0])
    printed = []
    for _ in range(12):  # 5 polls a second for 2.4 s
        printed += fmt.lines(STATE)
        now[0] += 0.2
    assert len(printed) == 3
    assert fmt.lines({"type": "actuation", "at": AT, "device": "x", "on": True, "reason": ""}), "never throttled"


def test_sse_parser() -> None:
    parser = SseParser()
    lines = [": keep-alive", "", "retry: 2000", 'data: {"a":', "data: 1}", "", "event: x", "data:2", "", "", "id: 7"]
    assert [d for line in lines if (d := parser.feed(line)) is not None] == ['{"a":\n1}', "2"]
    assert parser.retry_ms == 2000


def test_a_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="not an http"):
        Watcher("ftp://gw/")
    assert Watcher("127.0.0.1:8080/").path == "/events"
    assert Watcher("http://gw.local:8080/gw1/").path == "/gw1/events"


@pytest.fixture
async def rig(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[WebRig]:
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    async with running_gateway(tmp_path, broker) as r:
        yield r


async def read_until(stream: asyncio.StreamReader, needle: str, timeout: float = 4.0) -> list[str]:
    """Lines of ``stream`` up to and including the first one containing ``needle``."""
    got: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            assert line, f"the watcher ended; it printed {got}"
            got.append(line.rstrip("\n"))
            if needle in line:
                return got


def _as_in_a_terminal() -> None:
    """The child's Ctrl-C as in a terminal's foreground: SIGINT not ignored, whatever this test process inherited
    (a shell starts background jobs with SIGINT ignored, and a child inherits an ignored signal)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _proc_status(pid: int) -> str:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError as exc:
        return f"no status ({exc})"
    return "; ".join(line for line in lines if line.startswith(("State", "SigIgn", "SigCgt", "SigBlk", "SigPnd")))


def _ignores_sigint(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


async def test_watch_follows_a_gateway_through_a_restart_and_stops_on_ctrl_c(rig: WebRig) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hems_firmware.cli", "watch", "--url", rig.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "TZ": "UTC"},
        preexec_fn=_as_in_a_terminal)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        await read_until(proc.stdout, "connected to gateway gw-1 (client c1)")
        power = await read_until(proc.stdout, "power ")
        assert "heater on  ev on  fridge on" in power[-1]
        with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
            await send(rig, bridge, emergency("q-watch", limit_kw=1.0))
            lines = await read_until(proc.stdout, "[request q-watch]")
        printed = time.time()
        heater = lines[-1]
        assert "  heater        OFF  emergency: limit 1.0 kW  [request q-watch]" in heater
        assert printed - rig.gateway.actuations[0].at < 1.0
        assert (await read_until(proc.stdout, "  ev  "))[-1].endswith("OFF  emergency: limit 1.0 kW  [request q-watch]")
        await read_until(proc.stdout, "emergency q-watch <=1.00 kW until")

        await rig.restart()  # the gateway goes away and comes back on the same port
        await read_until(proc.stderr, "retrying in 0.5 s")
        await read_until(proc.stdout, "connected to gateway gw-1", timeout=6)
        resumed = await read_until(proc.stdout, "power ")
        assert "heater off  ev off  fridge on | emergency q-watch <=1.00 kW" in resumed[-1], "the emergency resumed"

        assert not _ignores_sigint(proc.pid), "the watcher was started with SIGINT ignored"
        proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(10):  # a guard against a hang, not a speed check: a loaded machine is slow
                assert await proc.wait() == 0
        except TimeoutError:
            raise AssertionError(f"the watcher did not stop on SIGINT: {_proc_status(proc.pid)}") from None
        rest = (await proc.stderr.read()).decode()
        assert "Traceback" not in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
