"""The CPU of one publish through an MQTT link: gmqtt's own packet build against the link's (issue 14, seventh round).

``python -m sim.bench_mqtt_publish --messages 50000 --per-turn 200 --runs 3``: a real Mosquitto rendered from
``broker_config/`` and one :class:`mhp_wire.mqtt.MqttLink` that publishes ``--messages`` messages of 120 bytes (a
command's size) to 1,000 gateway topics in turn, ``--per-turn`` of them per turn of the event loop (as the bridge's
rounds of commands and acknowledgements do), at QoS 1 (then waits until every PUBACK is in) and at QoS 0. Each run
alternates the two ways of building the packets on the same link: ``gmqtt`` (``Client.publish``: a ``Message``, then
``PublishPacket.build_package``) and ``link`` (:class:`mhp_wire.mqtt.PublishBuilder`, the link's own), and prints the
CPU microseconds per publish of the publishing calls alone (``time.thread_time`` around them: the event loop's
thread, the socket writes at the end of each turn left out as they are the same both ways) and of the whole process
until the last PUBACK.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import gmqtt

from broker_config import GENERATED_PASSWORD_ITERATIONS, BrokerSpec, Identity, MosquittoProcess, generate_password
from mhp_wire import topics
from mhp_wire.mqtt import MqttEndpoint, MqttLink, PublishBuilder
from mhp_wire.ports import free_port


class GmqttBuild(PublishBuilder):
    """The way before this round: gmqtt's ``Client.publish`` builds the packet."""

    def publish(self, client: gmqtt.Client, topic: str, payload: bytes | bytearray, qos: int, retain: bool) -> None:
        client.publish(topic, payload, qos=qos, retain=retain)


async def _ignore(topic: str, payload: bytes, retained: bool) -> None:
    return None


async def _round(link: MqttLink, names: list[str], messages: int, per_turn: int, qos: int) -> tuple[float, float]:
    """CPU seconds of the publish calls alone, and of the process until every PUBACK is in."""
    payload = b"x" * 120
    spent = 0.0
    proc0 = time.process_time()
    sent = 0
    while sent < messages:
        t0 = time.thread_time()
        for i in range(sent, sent + per_turn):
            await link.publish(names[i % len(names)], payload, qos=qos, wait_s=10.0)
        spent += time.thread_time() - t0
        sent += per_turn
        await asyncio.sleep(0)
    await asyncio.wait_for(link._client._persistent_storage.wait_empty(), 60)
    return spent, time.process_time() - proc0


async def run(messages: int, per_turn: int, runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as data_dir:
        spec = BrokerSpec(kind="retailer", port=free_port(), data_dir=Path(data_dir),
                          privileged=Identity("bridge", generate_password()),
                          parties=[Identity("gw-1", generate_password())],
                          password_iterations=GENERATED_PASSWORD_ITERATIONS, max_inflight_messages=0)
        broker = MosquittoProcess(spec)
        broker.start()
        try:
            endpoint = MqttEndpoint(spec.host, spec.port, "bridge", spec.identities["bridge"].password)
            async with MqttLink(endpoint, client_id="bridge", subscriptions=[], handler=_ignore, clean_start=True,
                                session_expiry_s=0) as link:
                names = [topics.down("gateways", f"gw-{i:05d}") for i in range(1000)]
                link._builder = PublishBuilder()
                await _round(link, names, per_turn * 10, per_turn, 1)  # warm-up: the topics' cache, the sockets
                for n in range(1, runs + 1):
                    for qos in (1, 0):
                        for way in ("gmqtt", "link") if n % 2 else ("link", "gmqtt"):
                            link._builder = GmqttBuild() if way == "gmqtt" else PublishBuilder()
                            await _round(link, names, per_turn, per_turn, qos)  # the link's topics cached
                            calls, whole = await _round(link, names, messages, per_turn, qos)
                            print(f"run {n} QoS {qos} {way:>5}: publish calls {calls / messages * 1e6:5.2f} µs, "
                                  f"process until the last PUBACK {whole / messages * 1e6:5.2f} µs a message")
        finally:
            broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--per-turn", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    asyncio.run(run(args.messages, args.per_turn, args.runs))


if __name__ == "__main__":
    main()
