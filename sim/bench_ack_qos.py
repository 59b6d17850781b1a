"""Acks at QoS 1 against QoS 0, alone (issue 14, sixth round: acks at QoS 0).

    python -m sim.bench_ack_qos --acks 20000 --runs 3

A real Mosquitto rendered from ``broker_config/`` (a retailer broker). In this process the bridge's link publishes N
``ack`` payloads to a gateway's ``down/msg`` as the bridge's ``_ack_gateway`` does (``wait_s`` for room in the
in-flight window), 500 per turn of the loop, and the gateway's link (subscribed at QoS 1, no batch handler, as the
gateway's) receives and reads each. Two ways, alternating: ``qos1`` (before) and ``qos0``
(``mhp_wire.messages.ACK_QOS``). Printed per ack: this process's CPU (``time.process_time``: both links) and the
broker's (from ``/proc/<pid>/stat``), from the first publish until the gateway has read every ack and, at QoS 1,
the bridge has every PUBACK back.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from broker_config import BrokerSpec, Identity, MosquittoProcess, generate_password
from mhp_wire import topics
from mhp_wire.fastwire import ack_payload
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from mhp_wire.ports import free_port

PER_TURN = 500


async def _nothing(topic: str, payload: bytes, retained: bool) -> None:
    """The bridge reads nothing here."""


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(qos: int, n: int, work: Path) -> tuple[float, float]:
    """CPU seconds of this process and of the broker for ``n`` acks published at ``qos``."""
    spec = BrokerSpec(kind="retailer", port=free_port(), data_dir=work / f"q{qos}",
                      privileged=Identity("bridge", generate_password()),
                      parties=[Identity("gw-1", generate_password())])
    with MosquittoProcess(spec) as broker:
        pid = broker.pid
        assert pid is not None
        bridge = MqttEndpoint("127.0.0.1", spec.port, "bridge", spec.privileged.password)
        gateway = MqttEndpoint("127.0.0.1", spec.port, "gw-1", spec.parties[0].password)
        read = 0

        async def on_gateway(topic: str, payload: bytes, retained: bool) -> None:
            nonlocal read
            read += 1

        down = topics.down("gateways", "gw-1")
        async with (MqttLink(gateway, client_id="gw-1", subscriptions=[down], handler=on_gateway,
                             clean_start=True, session_expiry_s=0),
                    MqttLink(bridge, client_id="bridge", subscriptions=[], handler=_nothing, clean_start=True,
                             session_expiry_s=0) as link):
            payloads = [ack_payload([f"{k:032x}"]) for k in range(n)]
            cpu0, broker0 = time.process_time(), _proc_cpu_s(pid)
            for k in range(0, n, PER_TURN):
                for p in payloads[k:k + PER_TURN]:
                    await link.publish(down, p, qos=qos, wait_s=30)
                await asyncio.sleep(0)
            deadline = time.monotonic() + 120
            while read < n or not link._client._persistent_storage.is_empty:  # every PUBACK back (QoS 1)
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: {read} of {n} read in 120 s")
                await asyncio.sleep(0.005)
            return time.process_time() - cpu0, _proc_cpu_s(pid) - broker0


def main(argv: list[str] | None = None) -> int:
    """Run both ways, alternating, and print CPU per ack."""
    parser = argparse.ArgumentParser(prog="python -m sim.bench_ack_qos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--acks", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.runs):
            for qos in ((1, 0) if r % 2 == 0 else (0, 1)):
                cpu, broker_cpu = asyncio.run(run(qos, args.acks, Path(d) / f"r{r}"))
                print(f"run {r + 1} qos{qos}: {cpu / args.acks * 1e6:.1f} µs CPU per ack in the two links, "
                      f"{broker_cpu / args.acks * 1e6:.1f} µs in the broker "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
