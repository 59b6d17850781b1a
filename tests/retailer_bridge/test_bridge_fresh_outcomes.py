"""A gateway's outcome goes to the hub straight from the commit that stored it, not read back from the outbox
(issue 14, seventh round: the critical path of a fan-out). Through the real chain: real Mosquitto brokers from
broker_config/, the bridge's own service, the hub and a gateway played by MQTT test clients, real SQLite.

On main the loop towards the hub found a batch's outcomes by reading its outbox (``BridgeStore.due_outbox``), and
that read waited on the one SQLite thread behind the next batch's commit. Now the batch hands what it committed to
the loop (``BridgeRelay.fresh_to_hub``, sent by ``Outbox.send_stored``): the outcome is stored before it is sent as
before, re-sent from the store until the hub acknowledges it, and sent once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Command, Message, Outcome, decode
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.service import Bridge
from retailer_bridge.store import BridgeStore, NewCommand
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.mqtt_party import Party, ignore_messages, parties
from tests.retailer_bridge.test_bridge import request, running_bridge
from tests.waiting import eventually


@pytest.fixture
async def bridge_between(tmp_path: Path, mosquitto_factory: MosquittoFactory
                         ) -> AsyncIterator[tuple[BrokerHandle, BrokerHandle, Bridge]]:
    hub_broker = mosquitto_factory("hub", ["r1"], "hub")
    local = mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")
    async with running_bridge(tmp_path, hub_broker, local, {"c1": "gw-1", "c2": "gw-2"},
                              gateway_ack_timeout_s=30) as bridge:
        yield hub_broker, local, bridge

async def test_outcomes_reach_the_hub_stored_first_and_once_and_stay_until_acknowledged(
        bridge_between: tuple[BrokerHandle, BrokerHandle, Bridge]) -> None:
    """The whole chain with both loops running: whichever path sends an outcome (the batch's hand-over, or a round
    that read the outbox just after the commit), it is stored when it is published, sent once, and kept until the
    hub acknowledges it.

    "Stored" is checked at the publish, not when the hub gets it (by then a commit that came after the send would
    have landed too): a second connection to the bridge's database (WAL: it sees only what is committed) looks for
    the message in the outbox as the relay hands it to the link. "Once": the first re-send of an unacknowledged
    outcome is set an hour out (``hub_retry_s``), so that a slow run (past ``HUB_FIRST_RETRY_S``, 5 s, on loaded
    cores) does not count a re-send as a second send."""
    hub_broker, local, bridge = bridge_between
    store = bridge.store
    relay = bridge.relay
    relay.hub_retry_s = 3600.0
    committed = sqlite3.connect(bridge.settings.db_path)
    unstored: list[str] = []
    publish = relay.hub_out.publish

    def terminal(msg: Message) -> bool:
        items = [msg] if isinstance(msg, Outcome) else list(getattr(msg, "reports", []))
        return any(o.state is ClientState.EXECUTED for o in items)

    async def checked(topic: str, payload: bytes, retain: bool) -> None:
        # A terminal outcome is in the store when it is sent (a ``delivered`` one may already be withdrawn from it:
        # the terminal outcome of the same command, stored since, says more).
        msg = decode(payload)
        if msg.type in ("outcome", "outcomes") and terminal(msg) and not committed.execute(
                "SELECT COUNT(*) FROM hub_outbox WHERE msg_id=?", (msg.msg_id,)).fetchone()[0]:
            unstored.append(msg.msg_id)
        await publish(topic, payload, retain)

    relay.hub_out.publish = checked

    with parties(Party(hub_broker, "hub", topics.all_up("retailers")),
                 Party(local, "gw-1", topics.down("gateways", "gw-1")),
                 Party(local, "gw-2", topics.down("gateways", "gw-2"))) as (hub, gw1, gw2):
        req = request(["c1", "c2"], lead_s=60)
        await hub.publish(topics.down("retailers", "r1"), req)
        assert (await hub.next("ack")).ack_ids == [req.msg_id]  # type: ignore[union-attr]
        for gw, gid, cid in ((gw1, "gw-1", "c1"), (gw2, "gw-2", "c2")):
            cmd = await gw.next("command", timeout=10)
            assert isinstance(cmd, Command) and cmd.client_id == cid
            await gw.publish(topics.up("gateways", gid), Ack(ack_ids=[cmd.msg_id]))
            await gw.publish(topics.up("gateways", gid), Outcome(request_id=req.request_id, client_id=cid,
                                                                 state=ClientState.EXECUTED))
        executed: set[str] = set()
        received: list[str] = []
        while executed != {"c1", "c2"}:
            msg = await hub.next(timeout=10)
            if msg.type not in ("outcome", "outcomes"):
                continue
            received.append(msg.msg_id)
            items = [msg] if isinstance(msg, Outcome) else list(msg.reports)  # type: ignore[attr-defined]
            executed |= {o.client_id for o in items if o.state is ClientState.EXECUTED}
        committed.close()
        assert not unstored, f"sent to the hub before it was stored: {unstored}"
        assert len(received) == len(set(received)), f"an outcome went to the hub twice: {received}"
        # Not acknowledged yet, so still held for a re-send; the hub's ack drops them.
        await hub.publish(topics.down("retailers", "r1"), Ack(ack_ids=received))

        async def outbox_empty() -> bool:
            return not await store.sql.read(lambda db: db.execute("SELECT COUNT(*) FROM hub_outbox").fetchone()[0])

        await eventually(outbox_empty, "the hub's acknowledgement dropped the outcomes from the bridge's outbox")


async def test_a_batchs_outcome_is_sent_from_its_commit_not_read_back(
        tmp_path: Path, mosquitto_factory: MosquittoFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mechanism, one step at a time (no loop running beside it): a batch of reports commits an outcome, and the
    next round towards the hub sends it without reading it back from the outbox; on main it could only be read."""
    hub_broker = mosquitto_factory("hub", ["r1"], "hub")
    store = BridgeStore(tmp_path / "bridge.db")
    await store.open()
    read_back: list[str] = []
    due_outbox = store.due_outbox

    async def spied(now: float, limit: int = 500) -> list[dict[str, Any]]:
        rows = await due_outbox(now, limit)
        read_back.extend(r["msg_id"] for r in rows)
        return rows

    monkeypatch.setattr(store, "due_outbox", spied)
    relay = BridgeRelay("r1", {"c1": "gw-1"}, store)
    link = MqttLink(MqttEndpoint(hub_broker.host, hub_broker.port, "r1", hub_broker.identities["r1"].password),
                    client_id="r1", subscriptions=[], handler=ignore_messages)
    try:
        with parties(Party(hub_broker, "hub", topics.all_up("retailers"))) as (hub,):
            async with link:
                relay.hub = link
                await store.accept_request([NewCommand("q", "c1", "gw-1", "cmd1", b"command", 0.0, 1e12)], [])
                await relay._gateway_ack_started("gw-1", Ack(ack_ids=["cmd1"]))
                await relay._gateway_outcome_started("gw-1", Outcome(request_id="q", client_id="c1",
                                                                     state=ClientState.EXECUTED))
                await relay.dispatch_hub()
                sent: set[str] = set()
                while True:
                    msg = await hub.next(timeout=10)
                    if msg.type in ("outcome", "outcomes"):
                        sent.add(msg.msg_id)
                    if isinstance(msg, Outcome) and msg.state is ClientState.EXECUTED:
                        break
                assert not sent & set(read_back), "read back from the outbox before its first send"
                # The ``delivered`` the second batch withdrew (its terminal outcome came) is not sent either.
                assert not any(m.startswith("dlv-") for m in sent), sent
                attempts = await store.sql.read(lambda db: [r[0] for r in db.execute(
                    "SELECT attempts FROM hub_outbox WHERE msg_id IN ({})".format(",".join("?" * len(sent))),
                    tuple(sent))])
                assert attempts and set(attempts) == {1}  # recorded as sent once: re-sent from the store when due
                relay.hub = None
    finally:
        await store.close()


