"""The bridge's two dispatch loops wake only for work of their own, and a loop woken during its round runs again at
once without asking the store when its next message is due (issue 14, seventh round: the critical path of a
fan-out). Real SQLite, real Mosquitto brokers from broker_config/ for the links the loops send on.

On main a gateway's acknowledgement or outcome woke both loops: the loop towards the gateways then read the store
for due commands after every batch of reports (nothing was due), and each such read held the one SQLite thread that
the next batch's commit waited for. And a round that was woken while it ran read ``next_due`` before running again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Outcome
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.store import BridgeStore, NewCommand
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import ignore_messages


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[BridgeRelay]:
    store = BridgeStore(tmp_path / "bridge.db")
    await store.open()
    try:
        yield BridgeRelay("r1", {"c1": "gw-1", "c2": "gw-2"}, store)
    finally:
        await store.close()


async def test_gateways_reports_wake_the_loop_towards_the_hub_only(relay: BridgeRelay) -> None:
    await relay.store.accept_request([NewCommand("q", f"c{i}", f"gw-{i}", f"cmd{i}", b"command", 0.0, 1e12)
                                      for i in (1, 2)], [])
    relay._wake_gateways.clear()
    relay._wake_hub.clear()
    await relay._on_gateway_ack("gw-1", Ack(ack_ids=["cmd1"]))
    assert relay._wake_hub.is_set()  # its ``delivered`` outcome is due for the hub
    assert not relay._wake_gateways.is_set()
    relay._wake_hub.clear()
    await relay._on_gateway_outcome("gw-2", Outcome(request_id="q", client_id="c2", state=ClientState.EXECUTED))
    assert relay._wake_hub.is_set()  # its outcome is due for the hub
    assert not relay._wake_gateways.is_set()
    outbox = await relay.store.sql.read(lambda db: db.execute("SELECT COUNT(*) FROM hub_outbox").fetchone()[0])
    assert outbox == 2  # both reports were stored for the hub: the hub's loop has them to send


async def test_a_round_woken_while_it_ran_starts_again_without_reading_when_next_is_due(
        relay: BridgeRelay, mosquitto_factory: MosquittoFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_broker = mosquitto_factory("hub", ["r1"], "hub")
    local = mosquitto_factory("retailer", ["gw-1"], "bridge")
    asked: list[str] = []
    next_hub_due, next_gateway_due = relay.store.next_hub_due, relay.store.next_gateway_due

    async def counted() -> float | None:
        asked.append("hub")
        return await next_hub_due()

    async def counted_gateways(now: float, horizon: float) -> tuple[float | None, bool]:
        asked.append("gateways")
        return await next_gateway_due(now, horizon)

    monkeypatch.setattr(relay.store, "next_hub_due", counted)
    monkeypatch.setattr(relay.store, "next_gateway_due", counted_gateways)
    hub = MqttLink(MqttEndpoint(hub_broker.host, hub_broker.port, "r1", hub_broker.identities["r1"].password),
                   client_id="r1", subscriptions=[], handler=ignore_messages)
    to_gateways = MqttLink(MqttEndpoint(local.host, local.port, "bridge", local.identities["bridge"].password),
                           client_id="bridge", subscriptions=[], handler=ignore_messages)
    async with hub, to_gateways:
        relay.hub, relay.local = hub, to_gateways
        # Idle, nothing woke it: each loop asks the store when its next message is due, as before.
        relay._wake_hub.clear()
        relay._wake_gateways.clear()
        assert await relay.dispatch_hub() == 1.0
        assert await relay.dispatch_gateways() == 1.0
        assert asked == ["hub", "gateways"]
        # Woken while the round ran (a report stored, a request accepted): the next round starts at once.
        relay._wake_hub.set()
        relay._wake_gateways.set()
        assert await relay.dispatch_hub() == 0.0
        assert await relay.dispatch_gateways() == 0.0
        assert asked == ["hub", "gateways"]
        # Kept busy like that, the gateways' loop still keeps a read marker going (one at a time), without the store's
        # answer: re-sends are judged at the read horizon, which must not wait for an idle round to move.
        relay.probe_topic = topics.bridge_probe("bridge")
        relay._wake_gateways.set()
        assert await relay.dispatch_gateways() == 0.0
        relay._wake_gateways.set()
        assert await relay.dispatch_gateways() == 0.0
        assert relay.read_horizon.probes == 1 and asked == ["hub", "gateways"]
        relay.hub = relay.local = None


async def test_one_wake_during_a_round_does_not_start_an_endless_chain_of_read_markers(
        relay: BridgeRelay, mosquitto_factory: MosquittoFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: a round woken while it ran sent a read marker whenever the horizon was in the past (always);
    the marker came back during the next round and woke it, which sent the next: 143 markers in 2 s with nothing
    due (5 ms rounds). A marker now goes from a woken round only when the horizon lags by more than MARKER_LAG_S."""
    local = mosquitto_factory("retailer", ["gw-1"], "bridge")
    relay.probe_topic = topics.bridge_probe("bridge")
    real, woke = relay.store.due_commands, []

    async def due(now: float, limit: int, horizon: float | None = None) -> list[dict[str, object]]:
        if not woke:  # once: something woke the loop during this round
            woke.append(1)
            relay._wake_gateways.set()
        rows = await real(now, limit, horizon)
        await asyncio.sleep(0.005)  # a round as long as a busy store's read
        return rows

    monkeypatch.setattr(relay.store, "due_commands", due)
    link = MqttLink(MqttEndpoint(local.host, local.port, "bridge", local.identities["bridge"].password),
                    client_id="bridge", subscriptions=[relay.probe_topic], handler=ignore_messages,
                    batch_handler=relay.on_local_batch)
    async with link:
        relay.local = link
        task = asyncio.create_task(relay._loop(relay._wake_gateways, relay.dispatch_gateways))
        await asyncio.sleep(2.0)
        task.cancel()
        relay.local = None
    assert relay.read_horizon.probes <= 2, f"{relay.read_horizon.probes} markers in 2 s with nothing due"
