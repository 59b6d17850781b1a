"""A gateway's outcome over its limit goes with its state and its detail cut to a marker (issue 14 follow-up,
"loses nothing"; docs/decisions.md, "A message that fits the brokers' packet"): the gateway's uplink with its real
SQLite outbox on a real retailer broker, the bridge played by a paho party. Before, an outcome whose packet did not
fit the broker's ``max_packet_size`` made Mosquitto cut the gateway's link, and the session sent it again at each
reconnection: nothing of it arrived, for good. The limits are read as ``messages.X`` after the point the test failed
at before, so that it runs (and fails) on the commit before it."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from hems_firmware.config import Uplink as UplinkSettings
from hems_firmware.store import GatewayStore
from hems_firmware.uplink import Uplink
from mhp_wire import messages, topics
from mhp_wire.messages import Ack, ClientState, Outcome, decode, encode
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import Party, parties
from tests.waiting import eventually


async def test_a_gateways_outcome_over_its_limit_goes_with_its_state_and_its_detail_cut(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """A gateway's outcome whose packet would not fit its retailer broker (a detail of 300 KB) is sent with its state
    and a cut detail, within the gateway's limit; before, the broker cut the gateway's link at each re-send."""
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    store = GatewayStore(tmp_path / "gw.db", "gw-1")
    await store.open()
    uplink = Uplink(UplinkSettings(host=broker.host, port=broker.port, password=broker.identities["gw-1"].password),
                    "gw-1", store, {}, lambda _: None, lambda: 0)
    out = Outcome(request_id="q-1", client_id="c1", state=ClientState.LIMIT_NOT_MET,
                  detail={"limit_kw": 1.0, "measured_kw": 1.4, "shed": [f"plug-{i:06d}" for i in range(25_000)]})
    try:
        with parties(Party(broker, "bridge", topics.up("gateways", "gw-1"))) as (bridge_party,):
            async with uplink.connect() as link:
                await eventually(lambda: link.connected, "the gateway is connected")
                sending = asyncio.create_task(uplink.outbox_loop())
                try:
                    await uplink.put_outcome(out)
                    got = await bridge_party.raw(timeout=10)  # before: nothing, the gateway's link was cut
                    await bridge_party.publish(topics.down("gateways", "gw-1"), Ack(ack_ids=[out.msg_id]))
                    await eventually(lambda: _outbox_empty(store), "the gateway's outbox is empty")
                finally:
                    sending.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sending
                assert link.stats.connects == 1, "the gateway's link was never cut"
    finally:
        await store.close()
    sent = decode(got.payload)
    assert isinstance(sent, Outcome) and sent.msg_id == out.msg_id and sent.state is ClientState.LIMIT_NOT_MET
    assert len(got.payload) <= messages.GATEWAY_OUTCOME_BYTES
    marker = sent.detail.pop(messages.OVERSIZE_KEY)
    assert sent.detail == {"limit_kw": 1.0, "measured_kw": 1.4}
    assert marker == {"bytes": len(encode(out)), "limit": messages.GATEWAY_OUTCOME_BYTES, "by": "gateway",
                      "dropped": ["shed"]}
    assert uplink.oversize == 1


async def _outbox_empty(store: GatewayStore) -> bool:
    return not await store.due_outcomes(float("inf"), 10)
