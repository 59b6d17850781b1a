"""The MQTT link's inbound path, a task per message against a batch per turn (issue 14, sixth round).

    python -m sim.bench_mqtt_inbound --messages 20000 --runs 3

A real Mosquitto rendered from ``broker_config/`` (a retailer broker); in this process a gateway's link publishes N
QoS 1 messages, 500 per turn of the loop, and the bridge's link receives them, each handled as the bridge handles a
gateway's report: queued for a group commit (a commit that writes nothing, so that only the MQTT and asyncio side
is measured), answered after it, and acknowledged (PUBACK) after that. Two ways, alternating:

- ``task``: the link's per-message handler, which gmqtt runs in a task of its own per message (``await submit``);
- ``batch``: the link's ``batch_handler``, one task per turn's messages (``submit_nowait`` each, then await).

Printed: the process's CPU (``time.process_time``: both links, the same publisher work in both ways) per message,
from the first publish until every message is handled and acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from broker_config import BrokerSpec, Identity, MosquittoProcess, generate_password
from mhp_wire import topics
from mhp_wire.groupcommit import GroupCommit
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from mhp_wire.ports import free_port

PER_TURN = 500


async def _nothing(topic: str, payload: bytes, retained: bool) -> None:
    """The gateway reads nothing here."""


async def _commit(items: list[bytes]) -> list[None]:
    return [None] * len(items)


async def run(way: str, n: int, work: Path) -> float:
    """CPU seconds of the process for ``n`` messages received the ``way`` given."""
    spec = BrokerSpec(kind="retailer", port=free_port(), data_dir=work / way,
                      privileged=Identity("bridge", generate_password()),
                      parties=[Identity("gw-1", generate_password())])
    with MosquittoProcess(spec):
        bridge = MqttEndpoint("127.0.0.1", spec.port, "bridge", spec.privileged.password)
        gateway = MqttEndpoint("127.0.0.1", spec.port, "gw-1", spec.parties[0].password)
        commit: GroupCommit[bytes, None] = GroupCommit(_commit, name="bench-commit")
        handled = 0

        async def per_message(topic: str, payload: bytes, retained: bool) -> None:
            nonlocal handled
            await commit.submit(payload)
            handled += 1

        async def per_batch(messages: list[tuple[str, bytes, bool]]) -> None:
            nonlocal handled
            stored = [commit.submit_nowait(payload) for _, payload, _ in messages]
            for s in stored:
                await s
                handled += 1

        async with (MqttLink(bridge, client_id="bridge", subscriptions=[topics.all_up("gateways")],
                             handler=per_message, batch_handler=per_batch if way == "batch" else None,
                             clean_start=True, session_expiry_s=0) as link,
                    MqttLink(gateway, client_id="gw-1", subscriptions=[], handler=_nothing, clean_start=True,
                             session_expiry_s=0) as gw):
            up = topics.up("gateways", "gw-1")
            payload = b'{"v":1,"type":"ack","ack_ids":["0123456789abcdef0123456789abcdef"]}'
            cpu0 = time.process_time()
            for k in range(0, n, PER_TURN):
                for _ in range(min(PER_TURN, n - k)):
                    await gw.publish(up, payload, wait_s=30)
                await asyncio.sleep(0)
            deadline = time.monotonic() + 120
            while handled < n or link.stats.received < n:
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: {handled} of {n} handled in 120 s")
                await asyncio.sleep(0.01)
            return time.process_time() - cpu0


def main(argv: list[str] | None = None) -> int:
    """Run both ways, alternating, and print CPU per message."""
    parser = argparse.ArgumentParser(prog="python -m sim.bench_mqtt_inbound", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.runs):
            ways = ("task", "batch") if r % 2 == 0 else ("batch", "task")
            for way in ways:
                cpu = asyncio.run(run(way, args.messages, Path(d) / f"r{r}"))
                print(f"run {r + 1} {way:5s}: {cpu:.2f} s CPU, {cpu / args.messages * 1e6:.1f} µs a message",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
