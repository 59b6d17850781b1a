"""A fleet of simulated gateways over real MQTT (gmqtt through ``mhp_wire.mqtt``, asyncio), thousands per process.

Each simulated gateway has its own MQTT identity, subscribes to its own command topic, publishes its presence,
acknowledges every command and answers it at once (``executed`` for actions, ``acknowledged`` for a load shift)
— no devices behind it. It is the load generator for bridge and fan-out benchmarks, not a gateway.

    python -m sim.fleet --host 127.0.0.1 --port 1884 --credentials creds.json [--ready-file F]

``creds.json`` maps gateway id to ``{"client_id": ..., "password": ...}``.
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
from mhp_wire.messages import Ack, ClientState, Command, Outcome, RequestKind, WireError, decode, encode
from mhp_wire.mqtt import MqttEndpoint, MqttLink

log = logging.getLogger(__name__)


class FleetGateway:
    """One simulated gateway."""

    def __init__(self, gateway_id: str, client_id: str, endpoint: MqttEndpoint) -> None:
        self.id = gateway_id
        self.client_id = client_id
        self.commands = 0
        self.link = MqttLink(endpoint, client_id=gateway_id, subscriptions=[topics.down("gateways", gateway_id)],
                             handler=self.on_message, status_topic=topics.status("gateways", gateway_id),
                             clean_start=True, session_expiry_s=0, connect_timeout_s=60)

    async def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """Acknowledge and answer a command at once."""
        try:
            msg = decode(payload)
        except WireError:
            return
        if isinstance(msg, Command):
            self.commands += 1
            t0 = time.perf_counter()
            state = ClientState.ACKNOWLEDGED if msg.kind is RequestKind.LOAD_SHIFT else ClientState.EXECUTED
            await self.link.publish(topics.up("gateways", self.id), encode(Ack(ack_ids=[msg.msg_id])))
            out = Outcome(request_id=msg.request_id, client_id=self.client_id, state=state,
                          trace={"gateway_ms": round((time.perf_counter() - t0) * 1000, 3)})
            await self.link.publish(topics.up("gateways", self.id), encode(out))


async def run_fleet(host: str, port: int, credentials: dict[str, dict[str, str]], ready_file: Path | None,
                    connect_concurrency: int = 200) -> None:
    """Connect every gateway, then serve until cancelled."""
    fleet = [FleetGateway(gid, c["client_id"], MqttEndpoint(host, port, gid, c["password"]))
             for gid, c in credentials.items()]
    sem = asyncio.Semaphore(connect_concurrency)
    async with contextlib.AsyncExitStack() as stack:

        async def connect(g: FleetGateway) -> None:
            async with sem:
                await stack.enter_async_context(g.link)

        t0 = time.monotonic()
        await asyncio.gather(*(connect(g) for g in fleet))
        log.info("%d simulated gateways connected in %.2f s", len(fleet), time.monotonic() - t0)
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"gateways": len(fleet), "connect_s": round(time.monotonic() - t0, 3)}))
            os.replace(tmp, ready_file)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m sim.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--credentials", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    creds: dict[str, Any] = json.loads(args.credentials.read_text())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        asyncio.run(run_fleet(args.host, args.port, creds, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
