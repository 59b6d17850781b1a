"""The CPU of one publish through an MQTT link: gmqtt's own packet build against the link's (issue 14, seventh round).

``python -m sim.bench_mqtt_publish --messages 50000 --per-turn 200 --runs 3``: a real Mosquitto rendered from
``broker_config/`` and one :class:`mhp_wire.mqtt.MqttLink` that publishes ``--messages`` messages of 120 bytes (a
command's size) to 1,000 gateway topics in turn, ``--per-turn`` of them per turn of the event loop (as the bridge's
rounds of commands and acknowledgements do), at QoS 1 (then waits until every PUBACK is in) and at QoS 0. Each run
alternates the two ways of building the packets on the same link: ``gmqtt`` (``Client.publish``: a ``Message``, then
``PublishPacket.build_package``) and ``link`` (:class:`mhp_wire.mqtt.PublishBuilder`, the link's own), and prints the
CPU microseconds per publish of the publishing calls alone (``time.thread_time`` around them: the event loop's
thread, the socket writes at the end of each turn left out as they are the same both ways) and of the whole process
until the last PUBACK. ``--bound`` adds ``bound``: the least a bulk entry point could cost (:class:`LoopBound`).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from mhp_wire import topics
from mhp_wire.mqtt import MqttLink, PublishBuilder, publish_packet
from sim.bench_mqtt_writes import bench_link

MQTT5 = 5
"""MQTT 5's protocol version (the links connect with it): this module does not import gmqtt, the adapter does."""


class LoopBound(PublishBuilder):
    """Not a way to publish: the least a bulk entry point (``publish_many``) could cost per message, for deciding
    whether one pays. The link's per-call work (the coroutine, its checks, the connection looked up) left out: the
    packet ids, the builds and the stores of a whole turn in one loop, one ``write_data`` at its end."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[tuple[str, bytes]] = []

    def publish(self, client: Any, topic: str, payload: bytes | bytearray, qos: int, retain: bool) -> None:
        self.kept.append((topic, bytes(payload)))

    def flush(self, client: Any, qos: int) -> None:
        protocol = client._connection._protocol
        ids, store, topic = protocol.id_generator, client._persistent_storage, self.topic
        mqtt5 = protocol.proto_ver >= MQTT5
        packets = []
        for name, payload in self.kept:
            if qos:
                mid = ids.next_id()
                packet = publish_packet(topic(name), payload, 1, False, mid, mqtt5)
                store.push_message(mid, packet)
            else:
                packet = publish_packet(topic(name), payload, 0, False, None, mqtt5)
            packets.append(packet)
        self.kept.clear()
        protocol.write_data(b"".join(packets))


class GmqttBuild(PublishBuilder):
    """The way before this round: gmqtt's ``Client.publish`` builds the packet."""

    def publish(self, client: Any, topic: str, payload: bytes | bytearray, qos: int, retain: bool) -> None:
        client.publish(topic, payload, qos=qos, retain=retain)


async def _round(link: MqttLink, names: list[str], messages: int, per_turn: int, qos: int) -> tuple[float, float]:
    """CPU seconds of the publish calls alone, and of the process until every PUBACK is in."""
    payload = b"x" * 120
    spent = 0.0
    proc0 = time.process_time()
    sent = 0
    while sent < messages:
        t0 = time.thread_time()
        if isinstance(link._builder, LoopBound):
            for i in range(sent, sent + per_turn):
                link._builder.publish(link._client, names[i % len(names)], payload, qos, False)
            link._builder.flush(link._client, qos)
        else:
            for i in range(sent, sent + per_turn):
                await link.publish(names[i % len(names)], payload, qos=qos, wait_s=10.0)
        spent += time.thread_time() - t0
        sent += per_turn
        await asyncio.sleep(0)
    await asyncio.wait_for(link._client._persistent_storage.wait_empty(), 60)
    return spent, time.process_time() - proc0


async def run(messages: int, per_turn: int, runs: int, bound: bool) -> list[tuple[int, int, str, float, float]]:
    """Per run, QoS and way: CPU µs per message of the publish calls and of the process until the last PUBACK."""
    ways = ("gmqtt", "link", "bound") if bound else ("gmqtt", "link")
    rows: list[tuple[int, int, str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as data_dir:
        async with bench_link(Path(data_dir)) as link:
            names = [topics.down("gateways", f"gw-{i:05d}") for i in range(1000)]
            link._builder = PublishBuilder()
            await _round(link, names, per_turn * 10, per_turn, 1)  # warm-up: the topics' cache, the sockets
            for n in range(1, runs + 1):
                for qos in (1, 0):
                    for way in ways if n % 2 else ways[::-1]:
                        link._builder = {"gmqtt": GmqttBuild, "link": PublishBuilder, "bound": LoopBound}[way]()
                        await _round(link, names, per_turn, per_turn, qos)  # the link's topics cached
                        calls, whole = await _round(link, names, messages, per_turn, qos)
                        rows.append((n, qos, way, calls / messages * 1e6, whole / messages * 1e6))
                        print(f"run {n} QoS {qos} {way:>5}: publish calls {rows[-1][3]:5.2f} µs, "
                              f"process until the last PUBACK {rows[-1][4]:5.2f} µs a message")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--per-turn", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bound", action="store_true", help="also the least a bulk publish could cost (LoopBound)")
    args = ap.parse_args()
    asyncio.run(run(args.messages, args.per_turn, args.runs, args.bound))


if __name__ == "__main__":
    main()
