"""Fixtures shared by the bridge's tests of the commands' hand-over (``test_bridge_fresh_commands``,
``test_bridge_handover_withdrawn``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from mhp_wire import topics
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.store import BridgeStore
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.mqtt_party import Party, ignore_messages, parties


@pytest.fixture
async def relay_and_broker(tmp_path: Path, mosquitto_factory: MosquittoFactory, monkeypatch: pytest.MonkeyPatch
                           ) -> AsyncIterator[tuple[BridgeRelay, BrokerHandle, list[str]]]:
    """A relay on a real store whose due-command reads are recorded (``read_back``), its link to a real retailer
    broker open, and no loop running beside the test."""
    local = mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")
    store = BridgeStore(tmp_path / "bridge.db")
    await store.open()
    read_back: list[str] = []
    due_commands = store.due_commands

    async def spied(now: float, limit: int, horizon: float | None = None) -> list[dict[str, Any]]:
        rows = await due_commands(now, limit, horizon)
        read_back.extend(r["msg_id"] for r in rows)
        return rows

    monkeypatch.setattr(store, "due_commands", spied)
    relay = BridgeRelay("r1", {"c1": "gw-1", "c2": "gw-2"}, store)
    link = MqttLink(MqttEndpoint(local.host, local.port, "bridge", local.identities["bridge"].password),
                    client_id="bridge", subscriptions=[], handler=ignore_messages)
    try:
        async with link:
            relay.local = link
            yield relay, local, read_back
            relay.local = None
    finally:
        await store.close()



@contextlib.contextmanager
def gateway_parties(local: BrokerHandle, *gateway_ids: str) -> Iterator[tuple[Party, ...]]:
    """Test clients playing these gateways on the retailer broker, each subscribed to its own commands."""
    with parties(*(Party(local, g, topics.down("gateways", g)) for g in gateway_ids)) as made:
        yield made
