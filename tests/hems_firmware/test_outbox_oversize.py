"""An outbox holding a message too large for the broker's packet parks it instead of sending it for ever, and what
is queued behind it still goes: the gateway's uplink with its real SQLite outbox on a real retailer broker from
broker_config, the bridge played by a paho party, the outbox's rounds driven by the test on an injected clock.

The oversize outcome stands for one stored by an older gateway, before outcomes were sized (``put_outcome`` with its
payload as stored). Before, the link wrote it: Mosquitto cut the gateway's connection, the session sent the packet
again at each reconnection (cut again), and the outcome queued behind it never arrived. Now ``MqttLink.publish``
refuses it before writing anything (``PacketTooLarge``) and the outbox parks it (``Outbox.park_s``), logged and
counted."""

from __future__ import annotations

import time
from pathlib import Path

from hems_firmware.config import Uplink as UplinkSettings
from hems_firmware.store import GatewayStore
from hems_firmware.uplink import Uplink
from mhp_wire import topics
from mhp_wire.messages import MAX_PACKET_BYTES, ClientState, Outcome, decode, encode
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import Party, parties
from tests.waiting import eventually


async def test_an_outbox_parks_an_oversize_message_and_sends_what_follows(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    store = GatewayStore(tmp_path / "gw.db", "gw-1")
    await store.open()
    uplink = Uplink(UplinkSettings(host=broker.host, port=broker.port, password=broker.identities["gw-1"].password),
                    "gw-1", store, {}, lambda _: None, lambda: 0)
    now = [time.time()]
    uplink.outbox.clock = lambda: now[0]
    big = Outcome(request_id="q-1", client_id="c1", state=ClientState.EXECUTED)
    small = Outcome(request_id="q-2", client_id="c1", state=ClientState.EXECUTED)
    try:
        with parties(Party(broker, "bridge", topics.up("gateways", "gw-1"))) as (bridge_party,):
            async with uplink.connect() as link:
                await eventually(lambda: link.connected, "the gateway is connected")
                await store.put_outcome(big, b'{"pad":"' + b"x" * MAX_PACKET_BYTES + b'"}')  # first in the outbox
                await store.put_outcome(small)
                await uplink.outbox.send_due()
                got = await bridge_party.raw(timeout=5)  # before: nothing, the gateway's link was cut
                assert decode(got.payload).msg_id == small.msg_id and got.payload == encode(small)
                for _ in range(10):  # the back-off's delays pass many times over: the big one is not tried again
                    now[0] += 60
                    await uplink.outbox.send_due()
                assert link.stats.connects == 1 and link.connected, "the gateway's link was never cut"
                assert getattr(link, "refused_too_large", None) == 1 and uplink.outbox.parked == 1
                due = await store.due_outcomes(now[0] + 60, 10)
                assert [m for m, _, _ in due] == [small.msg_id]  # unacknowledged: re-sent; the big one is parked
                parked = await store.due_outcomes(now[0] + uplink.outbox.park_s, 10)
                assert [m for m, _, _ in parked] == [big.msg_id, small.msg_id]  # it comes back after the park
                assert parked[0][2] == 0, "parked, not sent: no attempt counted"
    finally:
        await store.close()
