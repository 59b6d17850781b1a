"""A request's commands go to the gateways straight from the commit that stored them, not read back from the store
(issue 14, seventh round: the critical path of a fan-out; at 10,000 gateways the first round read 10,000 commands
before it sent the first one). Real SQLite, a real Mosquitto retailer broker from broker_config/, gateways played by
MQTT test clients.

Each command is still stored before it is sent (the request's ``ack`` to the hub follows the same commit), recorded
as sent, re-sent from the store until its gateway acknowledges it, and sent once: the loop's own reads of due
commands leave out those held for the hand-over, and a redelivered request sends nothing new.
"""

from __future__ import annotations

import json
import time

from mhp_wire.messages import Command
from retailer_bridge.relay import BridgeRelay
from tests.broker_fixtures import BrokerHandle
from tests.retailer_bridge.conftest import gateway_parties
from tests.retailer_bridge.test_bridge import request


async def test_a_requests_commands_are_sent_from_their_commit_not_read_back(
        relay_and_broker: tuple[BridgeRelay, BrokerHandle, list[str]]) -> None:
    relay, local, read_back = relay_and_broker
    with gateway_parties(local, "gw-1", "gw-2") as (gw1, gw2):
        await relay._on_request(request(["c1", "c2"], lead_s=60))
        # Stored, and held for the hand-over: a round reading due commands now (as one running beside the request
        # would) leaves them out.
        assert await relay.commands_out.storage.due(time.time(), 100) == []
        read_back.clear()  # that read was this test's own
        await relay.dispatch_gateways()
        got = [await gw1.next("command", timeout=10), await gw2.next("command", timeout=10)]
        assert all(isinstance(c, Command) for c in got)
        assert not {c.msg_id for c in got} & set(read_back), "read back from the store before its first send"
        rows = await relay.store.sql.read(lambda db: db.execute(
            "SELECT msg_id, attempts, first_sent_at FROM commands ORDER BY client_id").fetchall())
        assert [r[0] for r in rows] == [c.msg_id for c in got]  # exactly what was stored
        assert all(r[1] == 1 and r[2] is not None for r in rows)  # recorded as sent once: re-sent from the store
        assert not relay.held_commands and not relay.fresh_commands
        # Sent once: the next rounds find nothing due (their re-send is not due yet).
        await relay.dispatch_gateways()
        await gw1.nothing("command", within=0.3)


async def test_a_redelivered_request_sends_nothing_new(
        relay_and_broker: tuple[BridgeRelay, BrokerHandle, list[str]]) -> None:
    relay, local, _ = relay_and_broker
    with gateway_parties(local, "gw-1") as (gw1,):
        req = request(["c1"], lead_s=60)
        await relay._on_request(req)
        await relay.dispatch_gateways()
        first = await gw1.next("command", timeout=10)
        await relay._on_request(req)  # the hub sent it again (our ack was lost): its commands are stored already
        await relay.dispatch_gateways()
        await gw1.nothing("command", within=0.3)
        stored = await relay.store.sql.read(lambda db: db.execute("SELECT msg_id FROM commands").fetchall())
        assert [r[0] for r in stored] == [first.msg_id]


async def test_commands_handed_over_during_a_hand_over_go_before_its_re_sends(
        relay_and_broker: tuple[BridgeRelay, BrokerHandle, list[str]]) -> None:
    """The hub sends a large request to a bridge in several messages; one stored while the loop publishes an earlier
    one's commands is handed over then. Its commands go out before any re-send of the earlier ones, as they did when
    the loop read the store (ordered by next attempt): sent after the re-sends, each first send waited behind them,
    and at 20,000 gateways a bridge re-sent 1,781 commands before 4,000 others went out at all."""
    relay, local, _ = relay_and_broker
    relay.gateway_rtt.floor_s = 0.0  # a command's re-send is due as soon as its round is recorded
    published: list[tuple[str, str]] = []
    publish = relay.commands_out.publish
    second = request(["c2"], request_id="q2", lead_s=60)

    async def recording(topic: str, payload: bytes, retain: bool) -> None:
        await publish(topic, payload, retain)
        published.append((topic, json.loads(payload)["request_id"]))
        if len(published) == 1:  # the second message arrives while the first hand-over goes out
            await relay._on_request(second)

    relay.commands_out.publish = recording
    with gateway_parties(local, "gw-1", "gw-2") as (gw1, gw2):
        await relay._on_request(request(["c1"], request_id="q1", lead_s=60))
        await relay.dispatch_gateways()
        await relay.dispatch_gateways()
        assert [(topic.split("/")[3], rid) for topic, rid in published[:2]] == [("gw-1", "q1"), ("gw-2", "q2")], \
            published
        assert (await gw2.next("command", timeout=10)).request_id == "q2"  # type: ignore[union-attr]
        assert (await gw1.next("command", timeout=10)).request_id == "q1"  # type: ignore[union-attr]
