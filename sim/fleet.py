"""A fleet of simulated gateways over real MQTT (gmqtt through ``mhp_wire.mqtt``, asyncio), thousands per process.

Each simulated gateway has its own MQTT identity, subscribes to its own command topic, publishes its presence,
and answers every command at once (``executed`` for actions, ``acknowledged`` for a load shift) with its outcome
alone: an outcome ready at once stands for the command's ``ack``, as on a real gateway within its ``ack_hold_s``
(docs/protocol.md, "An outcome acknowledges its command") — no devices behind it. It is the load generator for
bridge and fan-out benchmarks, not a gateway.

    python -m sim.fleet --host 127.0.0.1 --port 1884 --credentials creds.json [--ready-file F] [--stats-file F]
        [--go-file F] [--connect-concurrency N] [--connect-timeout-s S]

``creds.json`` maps gateway id to ``{"client_id": ..., "password": ...}``. On SIGTERM the fleet writes, to
``--stats-file``, every command it got per request and gateway: ``{"gateways": n, "connect_s": s, "commands":
{request_id: {gateway_id: [times received, first received at (epoch s)]}}, "answered": {request_id: {gateway_id:
first outcome sent at (epoch s)}}}`` — what the fan-out experiment counts missing and duplicate commands from, and
``--timeline`` the gateways' stage from.

The ready file says how many gateways, how long they took to connect, and when that began and ended
(``connect_started_at``, ``connected_at``, epoch seconds). ``--go-file`` makes the process wait, started and
idle, until that file exists before it connects: the fan-out experiment starts every fleet process at once and
gives them their turn a few at a time, so that the CONNECTs in flight across the fleet stay bounded
(``--connect-concurrency`` per process) however many gateways it has.
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
from typing import Any

from mhp_wire import topics
from mhp_wire.messages import ClientState, Command, Outcome, RequestKind, WireError, decode, encode
from mhp_wire.mqtt import MqttEndpoint, MqttLink

log = logging.getLogger(__name__)

GO_POLL_S = 0.05
"""How often a fleet process waiting for its turn (``--go-file``) looks for it."""
FLOOR_PREFIX = b"floor:"
"""A payload starting with this is the MQTT floor's bare command (``mhp-sim experiment fanout --floor``): the
gateway publishes it back, unchanged, as its one QoS 1 acknowledgement, with no decoding and no application."""


class FleetGateway:
    """One simulated gateway."""

    def __init__(self, gateway_id: str, client_id: str, endpoint: MqttEndpoint,
                 connect_timeout_s: float = 60.0) -> None:
        self.id = gateway_id
        self.client_id = client_id
        self.commands = 0
        self.received: dict[str, list[float]] = {}
        """Per request id: ``[times received, first received at]`` (a duplicate is a second receipt)."""
        self.answered: dict[str, float] = {}
        """Per request id: when (epoch s) this gateway's first outcome to it was handed to its MQTT link (``mhp-sim
        experiment fanout --timeline``: the gateways' stage of the critical path)."""
        self.link = MqttLink(endpoint, client_id=gateway_id, subscriptions=[topics.down("gateways", gateway_id)],
                             handler=self.on_message, status_topic=topics.status("gateways", gateway_id),
                             clean_start=True, session_expiry_s=0,
                             connect_timeout_s=connect_timeout_s)

    async def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """Answer a command at once with its outcome, which stands for its ack (a floor command: echo it back,
        nothing else)."""
        if payload.startswith(FLOOR_PREFIX):
            await self.link.publish(topics.up("gateways", self.id), payload)
            return
        try:
            msg = decode(payload)
        except WireError:
            return
        if isinstance(msg, Command):
            self.commands += 1
            t0 = time.perf_counter()
            seen = self.received.get(msg.request_id)
            if seen is None:
                self.received[msg.request_id] = [1, time.time()]
            else:
                seen[0] += 1
            state = ClientState.ACKNOWLEDGED if msg.kind is RequestKind.LOAD_SHIFT else ClientState.EXECUTED
            out = Outcome(request_id=msg.request_id, client_id=self.client_id, state=state, revision=msg.revision,
                          trace={"gateway_ms": round((time.perf_counter() - t0) * 1000, 3)})
            await self.link.publish(topics.up("gateways", self.id), encode(out))
            self.answered.setdefault(msg.request_id, time.time())


def fleet_stats(fleet: list[FleetGateway], connect_s: float | None) -> dict[str, Any]:
    """What the fleet received, per request and gateway (the shape ``--stats-file`` documents)."""
    commands: dict[str, dict[str, list[float]]] = {}
    answered: dict[str, dict[str, float]] = {}
    for g in fleet:
        for request_id, seen in g.received.items():
            commands.setdefault(request_id, {})[g.id] = seen
        for request_id, at in g.answered.items():
            answered.setdefault(request_id, {})[g.id] = at
    return {"gateways": len(fleet), "connect_s": connect_s, "commands": commands, "answered": answered}


async def run_fleet(host: str, port: int, credentials: dict[str, dict[str, str]],
                    ready_file: Path | None, connect_concurrency: int = 200, stats_file: Path | None = None,
                    go_file: Path | None = None, connect_timeout_s: float = 60.0) -> None:
    """Connect every gateway (once ``go_file`` exists, if given), then serve until SIGTERM (or cancelled); then
    write ``stats_file``."""
    fleet = [FleetGateway(gid, c["client_id"], MqttEndpoint(host, port, gid, c["password"]), connect_timeout_s)
             for gid, c in credentials.items()]
    sem = asyncio.Semaphore(connect_concurrency)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    connect_s: float | None = None
    connected: list[FleetGateway] = []

    async def connect(g: FleetGateway) -> None:
        async with sem:
            await g.link.__aenter__()
            connected.append(g)

    try:
        if go_file is not None:
            await wait_for_turn(go_file, stop)
        if stop.is_set():  # stopped before its turn came: nothing connected, nothing received
            return
        t0, started_at = time.monotonic(), time.time()
        await asyncio.gather(*(connect(g) for g in fleet))
        connect_s = round(time.monotonic() - t0, 3)
        log.info("%d simulated gateways connected in %.2f s", len(fleet), connect_s)
        if ready_file is not None:
            _write_atomically(ready_file, {"gateways": len(fleet), "connect_s": connect_s,
                                           "connect_started_at": started_at, "connected_at": time.time()})
        await stop.wait()
    finally:
        if stats_file is not None:  # before the links close
            _write_atomically(stats_file, fleet_stats(fleet, connect_s))
        # All at once: one after the other, thousands of clean disconnects take longer than a supervisor waits.
        await asyncio.gather(*(g.link.__aexit__(None, None, None) for g in connected))


async def wait_for_turn(go_file: Path, stop: asyncio.Event) -> None:
    """Return when ``go_file`` exists (this process's turn to connect) or ``stop`` is set."""
    while not go_file.exists():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), GO_POLL_S)
            return


def _write_atomically(path: Path, content: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m sim.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--credentials", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument("--stats-file", type=Path, help="written on SIGTERM: the commands received")
    parser.add_argument("--go-file", type=Path, help="wait until this file exists before connecting")
    parser.add_argument("--connect-concurrency", type=int, default=200, help="CONNECTs in flight at most")
    parser.add_argument("--connect-timeout-s", type=float, default=60.0,
                        help="how long each gateway keeps trying to connect before the process gives up")
    args = parser.parse_args(argv)
    if args.connect_concurrency < 1 or args.connect_timeout_s <= 0:
        parser.error("--connect-concurrency and --connect-timeout-s must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    creds: dict[str, Any] = json.loads(args.credentials.read_text())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_fleet(args.host, args.port, creds, args.ready_file, args.connect_concurrency,
                              stats_file=args.stats_file, go_file=args.go_file,
                              connect_timeout_s=args.connect_timeout_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
