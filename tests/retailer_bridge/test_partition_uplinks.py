"""Each bridge partition receives only its own gateways' uplinks (issue 14, fifth round).

The real chain: real Mosquitto brokers rendered from ``broker_config/`` (the hub broker with ``r1.p1``, a delegate
of ``r1``; the retailer broker with ``bridge`` and ``bridge.p1``), retailer r1's bridge as two partitions
(``Bridge`` with ``partitions = 2``, each its own store and logins) in this event loop, gateways as real MQTT
clients (``Party``: paho, each publish waits for the broker's PUBACK; ``FleetGateway``: answers commands), and, for
the gateway added at run time, a real hub (HTTP, SQLite).

What is counted is what each partition's MQTT client was delivered by the broker (``MqttLink.stats.received``,
counted before any handler or gate), not what ``PartitionGate`` kept. The broker delivers one client's messages in
the order it routed them, so once a partition has handled a message published after some others were PUBACKed, any
of those others it was to be delivered has been delivered before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import tomli_w

from broker_config import Identity, generate_password
from broker_config.render import Delegate
from mhp_wire import topics
from mhp_wire.messages import Ack, Telemetry
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from retailer_bridge.partition import Partition, foreign_filters, partition_of, uplink_filters
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from sim.fleet import FleetGateway
from sim.hub_process import wait_ready
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.cloud_hub.test_relay import post_emergency
from tests.hub_fixtures import HubHandle, start_hub
from tests.mqtt_party import Party, ignore_messages, parties
from tests.retailer_bridge.test_bridge_partition_acks import partition_settings, running, until, wait_states

GATEWAYS = [f"gw-{i:02d}" for i in range(10)]
CUSTOMERS = {f"c-{g}": g for g in GATEWAYS}
OWNED = [[g for g in GATEWAYS if partition_of(g, 2) == k] for k in range(2)]
LATE = next(f"gw-late-{i}" for i in range(100) if partition_of(f"gw-late-{i}", 2) == 1)
"""A gateway of partition 1 that is installed while the bridge runs (not in ``CUSTOMERS`` at start)."""


def brokers(factory: MosquittoFactory) -> tuple[BrokerHandle, BrokerHandle]:
    hub_broker = factory("hub", ["r1", "r2"], "hub", delegates=[Delegate(Identity("r1.p1", generate_password()), "r1")])
    local = factory("retailer", [*GATEWAYS, LATE], "bridge", extra_privileged=["bridge.p1"])
    return hub_broker, local


def received(bridge: Bridge) -> int:
    """Messages the broker delivered to the partition's client at the retailer broker."""
    assert bridge.relay.local is not None
    return bridge.relay.local.stats.received


class Telemeter:
    """Publishes numbered telemetry as each gateway (waiting for each PUBACK)."""

    def __init__(self, gateways: dict[str, Party]) -> None:
        self.gateways = gateways
        self.seq = dict.fromkeys(gateways, 0)

    async def send(self, gids: list[str]) -> None:
        for gid in gids:
            self.seq[gid] += 1
            at = datetime.now(UTC) - timedelta(seconds=1)
            await self.gateways[gid].publish(topics.telemetry(gid), Telemetry(
                gateway_id=gid, client_id=f"c-{gid}", seq=self.seq[gid], at=at, devices={}, active_power_kw=1.0))

    def handled(self, bridge: Bridge, gids: list[str]) -> bool:
        """Whether ``bridge`` has handled each of ``gids``' latest telemetry."""
        latest = bridge.relay.latest_telemetry
        return all(g in latest and latest[g].seq == self.seq[g] for g in gids)


def test_the_filters_of_a_partition_are_its_own_gateways_and_an_unpartitioned_bridge_keeps_one() -> None:
    assert uplink_filters(Partition(), CUSTOMERS) == [topics.all_up("gateways")]
    assert foreign_filters(Partition(), CUSTOMERS) == []
    for k in range(2):
        assert uplink_filters(Partition(k, 2), CUSTOMERS) == sorted(topics.party_up("gateways", g) for g in OWNED[k])
        assert foreign_filters(Partition(k, 2), CUSTOMERS) == [
            topics.all_up("gateways"), *sorted(topics.party_up("gateways", g) for g in OWNED[1 - k])]
    assert topics.party_up("gateways", "gw-01") == "mhp/v1/gateways/gw-01/up/#"


async def test_a_partition_is_not_delivered_the_other_partitions_uplinks(tmp_path: Path,
                                                                         mosquitto_factory: MosquittoFactory) -> None:
    assert OWNED[0] and OWNED[1], "both partitions own some of the gateways"
    hub_broker, local = brokers(mosquitto_factory)
    (tmp_path / "bridges").mkdir()
    # An earlier run under partition 1's login subscribed to every gateway's uplink (as every partition did before
    # this change); its persistent session at the retailer broker still holds that filter.
    earlier = MqttLink(MqttEndpoint(local.host, local.port, "bridge.p1", local.identities["bridge.p1"].password),
                       client_id="bridge.p1", subscriptions=[topics.all_up("gateways")], handler=ignore_messages)
    async with earlier:
        await earlier.subscribe([topics.all_up("gateways")])  # held already: not sent again
        assert earlier.subscriptions == [topics.all_up("gateways")]
    with parties(*(Party(local, g) for g in GATEWAYS)) as made:
        tele = Telemeter(dict(zip(GATEWAYS, made, strict=True)))
        async with contextlib.AsyncExitStack() as stack:
            bridges = [await stack.enter_async_context(running(Bridge(partition_settings(
                k, hub_broker, local, tmp_path / "bridges", CUSTOMERS)))) for k in range(2)]
            p0, p1 = bridges
            base = [received(b) for b in bridges]
            # Partition 0's gateways, then partition 1's, then partition 0's again: each partition has then been
            # delivered everything of the others' that it would ever be.
            await tele.send(OWNED[0])
            await tele.send(OWNED[1])
            await tele.send(OWNED[0])
            await until(lambda: tele.handled(p0, OWNED[0]) and tele.handled(p1, OWNED[1]))
            await tele.send(OWNED[1][:1])  # published after the second round of partition 0's was PUBACKed
            await until(lambda: tele.handled(p1, OWNED[1]))
            assert received(p1) - base[1] == len(OWNED[1]) + 1, "partition 1 was delivered only its own gateways'"
            assert received(p0) - base[0] == 2 * len(OWNED[0])
            assert not p0.gate.dropped and not p1.gate.dropped, "nothing foreign reached either gate"
            assert not any(g in p1.relay.latest_telemetry for g in OWNED[0])
            assert p1.relay.local is not None
            assert p1.relay.local.subscriptions == [*(topics.party_up("gateways", g) for g in sorted(OWNED[1])),
                                                    topics.bridge_probe("bridge.p1")]  # and its own read marker

            # Partition 1 restarts; what its gateways send meanwhile waits in its session, the others' does not.
            await stack.aclose()
        await tele.send(OWNED[1])
        await tele.send(OWNED[0])
        async with running(Bridge(partition_settings(1, hub_broker, local, tmp_path / "bridges", CUSTOMERS))) as p1:
            await until(lambda: tele.handled(p1, OWNED[1]))
            await tele.send(OWNED[1][:1])
            await until(lambda: tele.handled(p1, OWNED[1]))
            assert received(p1) == len(OWNED[1]) + 1, "after its restart: its own gateways' only, none lost"
            assert not p1.gate.dropped


async def test_a_gateway_added_at_run_time_is_served_by_its_partition_and_a_removed_one_is_unsubscribed(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    hub_broker, local = brokers(mosquitto_factory)
    server, hub_task, tokens, url = await start_hub(tmp_path / "hub", hub_broker)
    (tmp_path / "bridges").mkdir()
    late_client = f"c-{LATE}"
    removed = OWNED[1][0]
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http, contextlib.AsyncExitStack() as stack:
            hub = HubHandle(url, tokens, hub_broker, http, server.config.app)
            await wait_ready(http)
            await hub.setup_registry(dict.fromkeys([*CUSTOMERS, late_client], "r1"))
            late = FleetGateway(LATE, late_client, MqttEndpoint(local.host, local.port, LATE,
                                                                local.identities[LATE].password))
            await stack.enter_async_context(late.link)
            bridges = [await stack.enter_async_context(running(Bridge(partition_settings(
                k, hub_broker, local, tmp_path / "bridges", CUSTOMERS)))) for k in range(2)]
            p0, p1 = bridges
            base0 = received(p0)
            # The installer records the new home (and takes one of partition 1's out); each process is given
            # the new record, as SIGHUP does (retailer-bridge run re-reads customers and customers_file).
            record = {**{c: g for c, g in CUSTOMERS.items() if g != removed}, late_client: LATE}
            assert await p0.update_installations(record) == ([], [])
            assert await p1.update_installations(record) == ([LATE], [removed])
            assert p1.relay.local is not None and p0.relay.local is not None
            assert topics.party_up("gateways", LATE) in p1.relay.local.subscriptions
            assert topics.party_up("gateways", removed) not in p1.relay.local.subscriptions
            assert topics.party_up("gateways", LATE) not in p0.relay.local.subscriptions
            # An emergency to the new home: partition 1 sends the command, reads the acknowledgement and the
            # outcome from the new gateway, and the hub has it executed.
            request_id = await post_emergency(hub, [late_client])
            states = await wait_states(hub, request_id, [late_client], "executed", timeout=20)
            assert states == {late_client: "executed"}
            assert late.received[request_id][0] >= 1
            assert received(p0) == base0 and not p0.gate.dropped["gateway_messages"], "p0 was delivered none of it"
            # Partition 0's share of the request is empty: it acknowledged it (the hub waits for both partitions)
            # instead of failing on it.
            assert p0.gate.dropped["request_clients"] == 1
            assert p0.relay.hub is not None and p0.relay.hub.stats.handler_errors == 0
            # The removed gateway's uplink is no longer delivered to partition 1.
            with parties(Party(local, removed), Party(local, OWNED[1][-1])) as (gone, kept):
                tele = Telemeter({removed: gone, OWNED[1][-1]: kept})
                before = received(p1)
                await tele.send([removed, OWNED[1][-1]])
                await until(lambda: tele.handled(p1, [OWNED[1][-1]]))
                assert received(p1) - before == 1 and removed not in p1.relay.latest_telemetry
                assert not p1.gate.dropped["gateway_messages"]
    finally:
        server.should_exit = True
        await hub_task


async def test_a_bad_installation_record_on_reload_keeps_the_one_the_bridge_has(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    hub_broker, local = brokers(mosquitto_factory)
    (tmp_path / "bridges").mkdir()
    async with running(Bridge(partition_settings(1, hub_broker, local, tmp_path / "bridges", CUSTOMERS))) as p1:
        filters = p1.relay.local.subscriptions if p1.relay.local is not None else []

        def broken() -> BridgeSettings:
            raise ValueError("customers_file: line 3: not JSON")

        reload = p1.reload_soon(broken)
        assert reload is not None
        await reload
        assert p1.relay.customers == {c: g for c, g in CUSTOMERS.items() if g in OWNED[1]}
        assert p1.relay.local is not None and p1.relay.local.subscriptions == filters
        # A good record is taken the same way.
        reload = p1.reload_soon(lambda: partition_settings(1, hub_broker, local, tmp_path / "bridges",
                                                 {**CUSTOMERS, f"c-{LATE}": LATE}))
        assert reload is not None
        await reload
        assert p1.relay.customers[f"c-{LATE}"] == LATE
        assert topics.party_up("gateways", LATE) in p1.relay.local.subscriptions


async def test_sighup_makes_retailer_bridge_run_take_a_gateway_added_to_its_customers_file(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """The real process: ``retailer-bridge run`` as partition 1 of 2 with a ``customers_file``; the installer adds
    a home of partition 1 to the file and sends SIGHUP; the new gateway's telemetry is then read (and acknowledged
    to it), which needs the partition's new subscription at the retailer broker."""
    hub_broker, local = brokers(mosquitto_factory)
    customers_file = tmp_path / "customers.json"
    customers_file.write_text(json.dumps(CUSTOMERS))
    cfg = tmp_path / "bridge-p1.toml"
    cfg.write_text(tomli_w.dumps({"bridge": {
        "retailer_id": "r1", "partitions": 2, "partition": 1, "hub_mqtt_host": hub_broker.host,
        "hub_mqtt_port": hub_broker.port, "hub_mqtt_username": "r1.p1",
        "hub_mqtt_password": hub_broker.identities["r1.p1"].password, "local_mqtt_host": local.host,
        "local_mqtt_port": local.port, "local_mqtt_username": "bridge.p1",
        "local_mqtt_password": local.identities["bridge.p1"].password, "db_path": str(tmp_path / "p1.db"),
        "telemetry_store": "none", "customers_file": str(customers_file)}}))
    log = (tmp_path / "bridge.log").open("w")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "retailer_bridge.cli", "run", "--config",
                                                str(cfg), stdout=log, stderr=subprocess.STDOUT)
    try:
        with parties(Party(local, LATE, topics.down("gateways", LATE))) as (late,):
            await _wait_log(tmp_path / "bridge.log", "running with partition 1 of 2")
            tele = Telemeter({LATE: late})
            customers_file.write_text(json.dumps({**CUSTOMERS, f"c-{LATE}": LATE}))
            proc.send_signal(signal.SIGHUP)
            await _wait_log(tmp_path / "bridge.log", "1 gateways added")
            await tele.send([LATE])
            ack = await late.next("ack", timeout=10)
            assert isinstance(ack, Ack)
    finally:
        proc.terminate()
        async with asyncio.timeout(15):
            await proc.wait()
        log.close()
    text = (tmp_path / "bridge.log").read_text()
    assert "installation record updated" in text and "Traceback" not in text, text[-3000:]


async def _wait_log(path: Path, line: str, timeout_s: float = 20.0) -> None:
    await until(lambda: line in path.read_text(), timeout=timeout_s)
