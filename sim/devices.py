"""Simulated homes' devices in one process: per home an SDM630 meter and a relay board, each on its own Modbus
TCP port, the meter following the relays. Coil changes are appended to an events file (JSON lines), so a demo
can show when each plug really switched.

    python -m sim.devices --spec homes.json --ports ports.json --events events.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from device_drivers.sim.home import Plug, SimulatedHome
from device_drivers.sim.server import ModbusSimServer

log = logging.getLogger(__name__)


def build_home(spec: dict[str, Any]) -> SimulatedHome:
    """A simulated home from its spec: ``base_load_kw`` and ``plugs`` (coil, name, rated_kw, priority, sheddable)."""
    plugs = [Plug(p["coil"], p["rated_kw"], p["name"], p.get("priority", 100), p.get("sheddable", True))
             for p in spec["plugs"]]
    return SimulatedHome(spec["base_load_kw"], plugs)


def _watch(home: SimulatedHome, gateway_id: str, names: dict[int, str], events: TextIO) -> None:
    inner = home.relays.on_change

    def on_change(coil: int, on: bool) -> None:
        if inner is not None:
            inner(coil, on)
        events.write(json.dumps({"at": time.time(), "gateway_id": gateway_id, "coil": coil,
                                 "plug": names.get(coil, f"coil{coil}"), "on": on,
                                 "home_kw": round(home.total_power_kw(), 3)}) + "\n")
        events.flush()

    home.relays.on_change = on_change


async def serve(spec_path: Path, ports_path: Path, events_path: Path, host: str = "127.0.0.1") -> None:
    """Serve every home of the spec until cancelled; write the ports they listen on to ``ports_path``."""
    spec = json.loads(spec_path.read_text())
    async with contextlib.AsyncExitStack() as stack:
        events = stack.enter_context(open(events_path, "a"))
        ports: dict[str, dict[str, int]] = {}
        for h in spec["homes"]:
            home = build_home(h)
            _watch(home, h["gateway_id"], {p["coil"]: p["name"] for p in h["plugs"]}, events)
            meter = await stack.enter_async_context(ModbusSimServer({1: home.meter}, host=host, port=0))
            relay = await stack.enter_async_context(ModbusSimServer({1: home.relays}, host=host, port=0))
            ports[h["gateway_id"]] = {"meter_port": meter.port, "relay_port": relay.port}
        tmp = ports_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ports, indent=1))
        os.replace(tmp, ports_path)
        log.info("serving %d simulated homes", len(ports))
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m sim.devices", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--ports", type=Path, required=True)
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        asyncio.run(serve(args.spec, args.ports, args.events, args.host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
