"""Nothing of a partition's share is lost when that partition is down and the hub broker is killed (issue 14).

The real chain in one event loop: a real hub (HTTP, SQLite) on a real hub broker, retailer r1's bridge as two
partitions (``Bridge`` with ``partitions = 2``, each its own store and logins: ``r1`` and the delegate ``r1.p1`` at
the hub broker, ``bridge`` and ``bridge.p1`` at the retailer broker) and simulated gateways (real MQTT connections).
The hub broker saves no snapshot during the test (``autosave_interval`` of an hour), so ``kill -9`` deterministically
loses everything it held in memory: the sessions and the request queued for the partition that was down. Only the
hub's re-sending until every partition has acknowledged (``Ack.partition``) gets that partition its share.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from broker_config import Identity, generate_password
from broker_config.render import Delegate
from mhp_wire import topics
from mhp_wire.messages import Ack, AckPartition
from mhp_wire.mqtt import MqttEndpoint
from retailer_bridge.partition import Partition, partition_logins
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from sim.fleet import FleetGateway
from sim.hub_process import wait_ready
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.cloud_hub.test_relay import post_emergency
from tests.hub_fixtures import HubHandle, start_hub
from tests.mqtt_party import Party, parties
from tests.retailer_bridge.test_bridge_batching import emergency

GATEWAYS = [f"gw-{i:02d}" for i in range(10)]
CUSTOMERS = {f"c-{g}": g for g in GATEWAYS}
LOGINS = [partition_logins("r1", k) for k in range(2)]
"""Partition k's login at the hub broker and at the retailer broker."""


def partition_settings(k: int, hub_broker: BrokerHandle, local: BrokerHandle, state: Path,
                       customers: dict[str, str] | None = None) -> BridgeSettings:
    hub_user, local_user = LOGINS[k]
    return BridgeSettings(
        retailer_id="r1", partitions=2, partition=k, hub_mqtt_host=hub_broker.host, hub_mqtt_port=hub_broker.port,
        hub_mqtt_username=hub_user if k else None, hub_mqtt_password=hub_broker.identities[hub_user].password,
        local_mqtt_host=local.host, local_mqtt_port=local.port, local_mqtt_username=local_user,
        local_mqtt_password=local.identities[local_user].password, db_path=state / f"bridge-p{k}.db",
        telemetry_store="none", customers=CUSTOMERS if customers is None else customers)


@contextlib.asynccontextmanager
async def running(bridge: Bridge) -> AsyncIterator[Bridge]:
    """Run ``bridge`` until the block ends (then stopped as a process would be), once its hub link is up."""
    task = asyncio.create_task(bridge.run(), name="test-bridge")
    try:
        await until(lambda: bridge.relay.hub is not None and bridge.relay.hub.connected, task)
        yield bridge
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: Callable[[], bool], task: asyncio.Task[Any] | None = None, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if task is not None and task.done():
            task.result()
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def client_states(hub: HubHandle, request_id: str) -> dict[str, str]:
    req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
    return {c: v["state"] for c, v in req["clients"].items()}


async def wait_states(hub: HubHandle, request_id: str, clients: list[str], state: str,
                      timeout: float) -> dict[str, str]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        states = await client_states(hub, request_id)
        if all(states.get(c) == state for c in clients) or asyncio.get_running_loop().time() > deadline:
            return states
        await asyncio.sleep(0.05)


async def test_a_partition_down_and_the_hub_broker_killed_loses_nothing(tmp_path: Path,
                                                                       mosquitto_factory: MosquittoFactory) -> None:
    shares = [[c for c, g in CUSTOMERS.items() if Partition(k, 2).owns_gateway(g)] for k in range(2)]
    assert shares[0] and shares[1], "both partitions own some of the gateways"
    hub_broker = mosquitto_factory("hub", ["r1", "r2"], "hub", autosave_interval=3600,
                                   delegates=[Delegate(Identity("r1.p1", generate_password()), "r1")])
    local = mosquitto_factory("retailer", GATEWAYS, "bridge", extra_privileged=["bridge.p1"])
    server, hub_task, tokens, url = await start_hub(tmp_path / "hub", hub_broker)
    (tmp_path / "bridges").mkdir()
    fleet = [FleetGateway(g, c, MqttEndpoint(local.host, local.port, g, local.identities[g].password))
             for c, g in CUSTOMERS.items()]
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http, contextlib.AsyncExitStack() as stack:
            hub = HubHandle(url, tokens, hub_broker, http, server.config.app)
            await wait_ready(http)
            await hub.setup_registry(dict.fromkeys(CUSTOMERS, "r1"))
            for g in fleet:
                await stack.enter_async_context(g.link)
            p0 = await stack.enter_async_context(running(Bridge(partition_settings(0, hub_broker, local,
                                                                                    tmp_path / "bridges"))))
            # Partition 1 has run (its persistent session at the hub broker exists) and is down now.
            async with running(Bridge(partition_settings(1, hub_broker, local, tmp_path / "bridges"))):
                pass
            request_id = await post_emergency(hub, list(CUSTOMERS))
            # Partition 0 stores and acknowledges; its gateways execute.
            states = await wait_states(hub, request_id, shares[0], "executed", timeout=15)
            assert all(states[c] == "executed" for c in shares[0]), states
            assert not any(g.received.get(request_id) for g in fleet if g.client_id in shares[1])
            # The hub broker crashes before any snapshot: the request it queued for partition 1 is gone.
            hub_broker.process.kill()
            hub_broker.process.start()
            await until(lambda: p0.relay.hub is not None and p0.relay.hub.connected)
            # Partition 1 comes back on its store and logins: it still gets its share, from the hub.
            p1 = await stack.enter_async_context(running(Bridge(partition_settings(1, hub_broker, local,
                                                                                    tmp_path / "bridges"))))
            states = await wait_states(hub, request_id, list(CUSTOMERS), "executed", timeout=20)
            assert states == dict.fromkeys(CUSTOMERS, "executed")
            assert all(g.received.get(request_id) for g in fleet), "every gateway got its command"
            # Partition 0 was sent the request again until partition 1 acknowledged it, and deduplicated it.
            assert p0.relay.received["hub_request"] >= 2
            # Once: each partition stored exactly one command per client of its own, none of the other's.
            for bridge, share in ((p0, shares[0]), (p1, shares[1])):
                stored = sorted(cmd["client_id"] for cmd in await bridge.store.commands_of(request_id))
                assert stored == sorted(share)
    finally:
        server.should_exit = True
        await hub_task


async def test_each_partition_acks_naming_itself_and_acks_a_redelivery_again_storing_it_once(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """The hub re-sends a request until every partition acks: a partition that stored it acks the re-send again
    (with its partition) and adds nothing to its store. An unpartitioned bridge's ack names no partition."""
    hub_broker = mosquitto_factory("hub", ["r1", "r2"], "hub",
                                   delegates=[Delegate(Identity("r1.p1", generate_password()), "r1")])
    local = mosquitto_factory("retailer", GATEWAYS, "bridge", extra_privileged=["bridge.p1"])
    request = emergency(list(CUSTOMERS), "req-1")
    with parties(Party(hub_broker, "hub", topics.all_up("retailers"))) as (hub,):
        async with running(Bridge(partition_settings(1, hub_broker, local, tmp_path))) as p1:
            for _ in range(2):  # the first delivery, then the hub's re-send of the same message
                await hub.publish(topics.down("retailers", "r1"), request)
                got = await hub.next("ack")
                assert isinstance(got, Ack) and got.ack_ids == [request.msg_id]
                assert got.partition == AckPartition(index=1, of=2)
            stored = [cmd["client_id"] for cmd in await p1.store.commands_of("req-1")]
            assert sorted(stored) == sorted(c for c, g in CUSTOMERS.items() if Partition(1, 2).owns_gateway(g))
        plain = BridgeSettings(**{**partition_settings(0, hub_broker, local, tmp_path).model_dump(),
                                  "partitions": 1, "partition": 0, "db_path": tmp_path / "whole.db"})
        async with running(Bridge(plain)):
            await hub.publish(topics.down("retailers", "r1"), emergency(list(CUSTOMERS), "req-2"))
            got = await hub.next("ack")
            assert isinstance(got, Ack) and got.partition is None
