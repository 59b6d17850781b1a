"""What each partition of a retailer's bridge is delivered by its retailer broker (issue 14, fifth round).

``python -m sim.bench_partition_uplinks --gateways 1000 --messages 10``: real Mosquitto brokers rendered from
``broker_config/`` (a hub broker with ``r1.p1``, a retailer broker with ``bridge`` and ``bridge.p1``), retailer r1's
bridge as two partitions (``retailer_bridge.service.Bridge``, in this process) and N gateways (one MQTT connection
each, gmqtt) that each publish M telemetry messages. It prints, per partition, the messages its MQTT client at the
retailer broker was delivered (``MqttLink.stats.received``, counted before any handler), those ``PartitionGate``
dropped as another partition's, and the telemetry it handled. It uses only what main had before this round, so the
same command measures both (run it from a checkout of each).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from broker_config import (
    GENERATED_PASSWORD_ITERATIONS,
    BrokerSpec,
    Identity,
    MosquittoProcess,
    generate_password,
)
from broker_config.render import Delegate
from mhp_wire import topics
from mhp_wire.messages import Telemetry, encode
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from mhp_wire.ports import free_port
from retailer_bridge.partition import partition_of
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings

LOGINS = [("r1", "bridge"), ("r1.p1", "bridge.p1")]


async def _nothing(topic: str, payload: bytes, retained: bool) -> None:
    """A gateway reads nothing here."""


async def _until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} not reached within {timeout_s:g} s")
        await asyncio.sleep(0.05)


async def bench(gateways: int, messages: int, work: Path) -> dict[str, Any]:
    """Run the measurement; returns its figures."""
    gids = [f"gw-{i:05d}" for i in range(gateways)]
    customers = {f"c-{g}": g for g in gids}
    hub = BrokerSpec(kind="hub", port=free_port(), data_dir=work / "hub-broker",
                     privileged=Identity("hub", generate_password()), parties=[Identity("r1", generate_password())],
                     delegates=[Delegate(Identity("r1.p1", generate_password()), "r1")],
                     password_iterations=GENERATED_PASSWORD_ITERATIONS)
    local = BrokerSpec(kind="retailer", port=free_port(), data_dir=work / "retailer-broker",
                       privileged=Identity("bridge", generate_password()),
                       parties=[Identity(g, generate_password()) for g in gids],
                       extra_privileged=[Identity("bridge.p1", generate_password())],
                       password_iterations=GENERATED_PASSWORD_ITERATIONS)
    brokers = [MosquittoProcess(hub), MosquittoProcess(local)]
    for b in brokers:
        b.start()
    try:
        return await _measure(gids, customers, hub, local, messages, work)
    finally:
        for b in reversed(brokers):
            b.stop()


async def _measure(gids: list[str], customers: dict[str, str], hub: BrokerSpec, local: BrokerSpec, messages: int,
                   work: Path) -> dict[str, Any]:
    ids = {i.username: i for i in [*hub.parties, *hub.delegate_identities, hub.privileged]}
    lids = {i.username: i for i in [*local.parties, *local.extra_privileged, local.privileged]}
    bridges = [Bridge(BridgeSettings.model_validate({
        "retailer_id": "r1", "partitions": 2, "partition": k, "hub_mqtt_host": hub.host, "hub_mqtt_port": hub.port,
        "hub_mqtt_username": LOGINS[k][0] if k else None, "hub_mqtt_password": ids[LOGINS[k][0]].password,
        "local_mqtt_host": local.host, "local_mqtt_port": local.port, "local_mqtt_username": LOGINS[k][1],
        "local_mqtt_password": lids[LOGINS[k][1]].password, "db_path": work / f"bridge-p{k}.db",
        "telemetry_store": "none", "customers": customers})) for k in range(2)]
    owned = [[g for g in gids if partition_of(g, 2) == k] for k in range(2)]
    links = [MqttLink(MqttEndpoint(local.host, local.port, g, lids[g].password), client_id=g, subscriptions=[],
                      handler=_nothing, clean_start=True, session_expiry_s=0) for g in gids]
    tasks = [asyncio.create_task(b.run(), name=f"bench-bridge-p{k}") for k, b in enumerate(bridges)]
    async with contextlib.AsyncExitStack() as stack:
        try:
            await _until(lambda: all(b.relay.hub is not None and b.relay.hub.connected for b in bridges), 60,
                         "both partitions connected")
            sem = asyncio.Semaphore(100)

            async def connect(link: MqttLink) -> None:
                async with sem:
                    await stack.enter_async_context(link)

            await asyncio.gather(*(connect(link) for link in links))
            base = [b.relay.local.stats.received if b.relay.local else 0 for b in bridges]
            t0, cpu0 = time.perf_counter(), time.process_time()
            at = datetime.now(UTC) - timedelta(seconds=1)
            for seq in range(1, messages + 1):
                for g, link in zip(gids, links, strict=True):
                    await link.publish(topics.telemetry(g), encode(Telemetry(
                        gateway_id=g, client_id=f"c-{g}", seq=seq, at=at, devices={}, active_power_kw=1.0)),
                        wait_s=10)

            def handled(k: int) -> bool:
                latest = bridges[k].relay.latest_telemetry
                return all(g in latest and latest[g].seq == messages for g in owned[k])

            await _until(lambda: handled(0) and handled(1), 120, "every partition handled its gateways' telemetry")
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            out: dict[str, Any] = {"gateways": len(gids), "messages_per_gateway": messages,
                                   "published": len(gids) * messages, "wall_s": round(wall, 2),
                                   "process_cpu_s": round(cpu, 2), "partitions": {}}
            for k, b in enumerate(bridges):
                assert b.relay.local is not None
                out["partitions"][f"p{k}"] = {
                    "own_gateways": len(owned[k]), "delivered": b.relay.local.stats.received - base[k],
                    "gate_dropped": b.gate.dropped["gateway_messages"],
                    "telemetry_handled": b.relay.received["gateway_telemetry"]}
            return out
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=10, help="telemetry messages per gateway")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-partition-") as tmp:
        print(json.dumps(asyncio.run(bench(args.gateways, args.messages, Path(tmp))), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
