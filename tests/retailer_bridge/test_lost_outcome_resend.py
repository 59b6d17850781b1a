"""An outcome the hub lost is re-sent while the hub keeps acknowledging newer ones. The hub acknowledges in the
order it received, so while it acknowledges, what the bridge sent *after* its last acknowledgement may still be
queued there and waits; but one sent *before* an acknowledged one was not stored (a storage outage at the hub:
nothing of that commit was acknowledged) and must go again on its back-off, not wait for the hub to fall quiet,
which under steady traffic it never does."""

from __future__ import annotations

from pathlib import Path

from mhp_wire import topics
from mhp_wire.messages import Ack
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import Party, parties
from tests.retailer_bridge.test_bridge_batching import emergency, running


async def test_a_lost_outcome_is_re_sent_while_the_hub_acknowledges_newer_ones(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    hub_broker = mosquitto_factory("hub", ["r1"], "hub")
    local = mosquitto_factory("retailer", ["gw-1"], "bridge")
    bridge = Bridge(BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub_broker.host, hub_mqtt_port=hub_broker.port,
        hub_mqtt_password=hub_broker.identities["r1"].password, local_mqtt_host=local.host, local_mqtt_port=local.port,
        local_mqtt_password=local.identities["bridge"].password, db_path=tmp_path / "bridge.db",
        telemetry_store="none", customers={"c1": "gw-1"}))
    bridge.relay.hub_retry_s = 1.0
    with parties(Party(hub_broker, "hub", topics.all_up("retailers"), topics.status("retailers", "r1"))) as (hub,):
        async with running(bridge, hub):
            await hub.publish(topics.down("retailers", "r1"), emergency(["c9"], "q-lost"))
            lost = await hub.next("outcome")  # never acknowledged: the hub could not store it
            await hub.publish(topics.down("retailers", "r1"), emergency(["c9"], "q-later"))
            later = await hub.next("outcome")
            assert later.request_id == "q-later"
            await hub.publish(topics.down("retailers", "r1"), Ack(ack_ids=[later.msg_id]))
            # The hub stays busy: it acknowledges something every 0.3 s for as long as the test lasts.
            again = None
            for _ in range(20):
                await hub.publish(topics.down("retailers", "r1"), Ack(ack_ids=["another-message"]))
                try:
                    again = await hub.next("outcome", timeout=0.3)
                except TimeoutError:
                    continue
                break
            assert again is not None, "the lost outcome waited for the hub to fall quiet"
            assert again.msg_id == lost.msg_id and again.request_id == "q-lost"
