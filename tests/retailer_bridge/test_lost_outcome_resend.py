"""An outcome the hub lost is re-sent while the hub keeps acknowledging newer ones. The hub acknowledges in the
order it received, so while it acknowledges, what the bridge sent *after* its last acknowledgement may still be
queued there and waits; but one sent *before* an acknowledged one was not stored (a storage outage at the hub:
nothing of that commit was acknowledged) and must go again on its back-off, not wait for the hub to fall quiet,
which under steady traffic it never does."""

from __future__ import annotations

from pathlib import Path

from mhp_wire import topics
from mhp_wire.messages import Ack
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import Party, parties
from tests.retailer_bridge.test_bridge_batching import emergency, r1_bridge, running


async def test_a_lost_outcome_is_re_sent_while_the_hub_acknowledges_newer_ones(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    hub_broker = mosquitto_factory("hub", ["r1"], "hub")
    local = mosquitto_factory("retailer", ["gw-1"], "bridge")
    bridge = r1_bridge(hub_broker, local, tmp_path / "bridge.db", {"c1": "gw-1"})
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
