"""A running bridge exports its customers' telemetry (from a paho test gateway on a real broker) to its SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mhp_wire import topics
from mhp_wire.messages import Telemetry
from retailer_bridge.telemetry import HOME_DEVICE
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import Party, parties
from tests.retailer_bridge.test_bridge import Rig, running_bridge
from tests.waiting import eventually


@pytest.fixture
async def rig(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[Rig]:
    hub_broker = mosquitto_factory("hub", ["r1"], "hub")
    local = mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")
    async with running_bridge(tmp_path, hub_broker, local, {"c1": "gw-1", "c2": "gw-2"},
                              telemetry_db_path=tmp_path / "telemetry.db", telemetry_flush_interval_s=0.1) as bridge:
        yield Rig(hub_broker, local, bridge)

async def test_gateway_telemetry_ends_up_in_the_bridge_telemetry_store(rig: Rig) -> None:
    t0 = datetime.now(UTC).replace(microsecond=0)
    exporter = rig.bridge.telemetry
    with parties(Party(rig.local, "gw-1", topics.down("gateways", "gw-1")), Party(rig.local, "gw-2")) as (gw1, gw2):
        sent = []
        for seq in range(1, 4):
            msg = Telemetry(gateway_id="gw-1", client_id="c1", seq=seq, at=t0 + timedelta(seconds=seq),
                            devices={"boiler": {"power_kw": 2.0 * seq, "on": True}}, active_power_kw=3.5,
                            sheddable_kw=2.0)
            await gw1.publish(topics.telemetry("gw-1"), msg)
            assert (await gw1.next("ack")).ack_ids == [msg.msg_id]  # type: ignore[union-attr]
            sent.append(msg)
        await gw1.publish(topics.telemetry("gw-1"), sent[0])  # a re-sent copy (its ack was lost): stored once
        await gw1.next("ack")
        # gw-2 reporting for c1 is refused by the relay and never exported
        await gw2.publish(topics.telemetry("gw-2"), Telemetry(
            gateway_id="gw-2", client_id="c1", seq=1, at=t0, devices={}, active_power_kw=9.0))
        await eventually(lambda: exporter.written == 12 and exporter.duplicates == 1)
        await eventually(lambda: rig.bridge.relay.rejected["gateway_foreign_client"] == 1, "gw-2's refusal counted")
    rows = await exporter.query("c1", t0, t0 + timedelta(minutes=1))
    assert len(rows) == 12
    assert {(p.time, p.device, p.field): p.value for p in rows if p.time == t0 + timedelta(seconds=2)} == {
        (t0 + timedelta(seconds=2), "boiler", "power_kw"): 4.0, (t0 + timedelta(seconds=2), "boiler", "on"): 1.0,
        (t0 + timedelta(seconds=2), HOME_DEVICE, "active_power_kw"): 3.5,
        (t0 + timedelta(seconds=2), HOME_DEVICE, "sheddable_kw"): 2.0}
    assert {p.gateway_id for p in rows} == {"gw-1"}
    assert rig.bridge.telemetry.db_path.exists()
