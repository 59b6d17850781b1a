"""The CPU of publishing through one MQTT link, with and without its coalesced writes (issue 14, fifth round).

``python -m sim.bench_mqtt_writes --messages 50000 --per-turn 200 --runs 2``: a real Mosquitto rendered from
``broker_config/`` and one :class:`mhp_wire.mqtt.MqttLink` that publishes ``--messages`` QoS 1 messages of 200 bytes,
``--per-turn`` of them per turn of the event loop (as the bridge's rounds of commands and acknowledgements do), then
waits until every PUBACK is in. It prints the process's CPU seconds, alternating runs with the link's writes
coalesced (:class:`mhp_wire.mqtt.CoalescedWrites`, one socket write per turn) and without (gmqtt's own write per
packet), and the socket writes the coalesced runs made.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from broker_config import GENERATED_PASSWORD_ITERATIONS, BrokerSpec, Identity, MosquittoProcess, generate_password
from mhp_wire import mqtt, topics
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from mhp_wire.ports import free_port


async def _ignore(topic: str, payload: bytes, retained: bool) -> None:
    return None


async def one_run(messages: int, per_turn: int, coalesce: bool) -> tuple[float, float, int | None]:
    """CPU and wall seconds of publishing ``messages`` (until every PUBACK is in), and the socket writes made."""
    real = mqtt.coalesce_writes
    if not coalesce:
        mqtt.coalesce_writes = lambda client: None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-writes-") as data_dir:
            return await _publish_all(Path(data_dir), messages, per_turn)
    finally:
        mqtt.coalesce_writes = real


@contextlib.asynccontextmanager
async def bench_link(data_dir: Path) -> AsyncIterator[MqttLink]:
    """A real Mosquitto (the retailer broker as ``broker_config`` renders it, without an in-flight bound, so that the
    publisher's window never decides) and the bridge's :class:`MqttLink` to it, connected; stopped on the way out.
    The MQTT benchmarks' common set-up (``sim.bench_mqtt_publish`` uses it too)."""
    spec = BrokerSpec(kind="retailer", port=free_port(), data_dir=data_dir,
                      privileged=Identity("bridge", generate_password()),
                      parties=[Identity("gw-1", generate_password())],
                      password_iterations=GENERATED_PASSWORD_ITERATIONS, max_inflight_messages=0)
    broker = MosquittoProcess(spec)
    broker.start()
    try:
        endpoint = MqttEndpoint(spec.host, spec.port, "bridge", spec.identities["bridge"].password)
        async with MqttLink(endpoint, client_id="bridge", subscriptions=[], handler=_ignore, clean_start=True,
                            session_expiry_s=0) as link:
            yield link
    finally:
        broker.stop()


async def _publish_all(data_dir: Path, messages: int, per_turn: int) -> tuple[float, float, int | None]:
    async with bench_link(data_dir) as link:
        topic = topics.down("gateways", "gw-1")
        payload = b"x" * 200
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(0, messages, per_turn):
            for _ in range(per_turn):
                await link.publish(topic, payload, wait_s=10.0)
            await asyncio.sleep(0)
        # Every PUBACK read: gmqtt keeps each QoS 1 publish until its PUBACK (its persistent storage).
        await asyncio.wait_for(link._client._persistent_storage.wait_empty(), 60)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        return cpu, wall, (link.writes.flushes if link.writes is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--per-turn", type=int, default=200)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    for run in range(1, args.runs + 1):
        for coalesce in (True, False):
            cpu, wall, writes = asyncio.run(one_run(args.messages, args.per_turn, coalesce))
            print(f"run {run} coalesced={coalesce}: {cpu:.2f} s CPU ({cpu / args.messages * 1e6:.1f} µs a message), "
                  f"{wall:.2f} s wall, socket writes {writes if writes is not None else 'one a packet'}")


if __name__ == "__main__":
    main()
