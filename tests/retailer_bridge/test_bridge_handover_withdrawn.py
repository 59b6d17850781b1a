"""A command withdrawn after its commit but before its hand-over is not sent from the commit's copy (review of the
seventh round's "a request's commands go to the gateways straight from the commit that stored them").

The hand-over (``BridgeRelay.fresh_commands``, sent by ``Outbox.send_stored``) sends the copy of each command made at
its commit. On main nothing took a copy back when a later commit closed or replaced its command: a cancel's notice
went out, then the command, which the gateway held no earlier copy of, so the cancel changed nothing and the command
executed (a home shed load for a cancelled emergency). The same for a revision removing clients, a supplier change,
and a newer revision committed before the hand-over (both revisions were sent; an old copy past its deadline closed
the newer revision's command as expired). Now each of those commits first takes the commands it closes or replaces
off the hand-over (``BridgeRelay._withdraw_fresh``), and the hand-over skips one withdrawn while it is going out.

Also here: a hand-over that fails or finds the link down leaves its commands due in the store, sent from there.

Real SQLite, a real Mosquitto retailer broker from broker_config/, gateways played by MQTT test clients; no loop runs
beside the test (each round is called by it). Whether a message was NOT sent is read without waiting: after the
round, the relay publishes a marker on the same link and topic, and everything the gateway got before the marker is
what the round sent (one publisher, one topic, QoS 1: in order).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mhp_wire import topics
from mhp_wire.messages import Ack, Cancel, Command, CustomerChange, Customers, Message, SupplyPeriod, encode
from mhp_wire.mqtt import MqttError
from mhp_wire.outbox import Publish
from retailer_bridge.relay import BridgeRelay
from tests.broker_fixtures import BrokerHandle
from tests.mqtt_party import Party
from tests.retailer_bridge.conftest import gateway_parties
from tests.retailer_bridge.test_bridge import request


async def round_sent(relay: BridgeRelay, gw: Party, gid: str) -> list[Message]:
    """What the gateway ``gid`` got up to a marker the relay publishes after the rounds just run."""
    marker = Ack(ack_ids=["end-of-round"])
    assert relay.local is not None
    await relay.local.publish(topics.down("gateways", gid), encode(marker))
    got: list[Message] = []
    while (msg := await gw.next(timeout=10)).msg_id != marker.msg_id:
        got.append(msg)
    return got


async def command_rows(relay: BridgeRelay) -> list[tuple[str, str, int, int]]:
    """``(client_id, state, revision, attempts)`` of every stored command, by client."""
    return [tuple(r) for r in await relay.store.sql.read(lambda db: db.execute(
        "SELECT client_id, state, revision, attempts FROM commands ORDER BY client_id").fetchall())]


async def test_a_cancel_before_the_handover_sends_only_its_notice(
        relay_and_broker: tuple[BridgeRelay, BrokerHandle, list[str]]) -> None:
    """On main the gateway got the cancel and the command (``[command, cancel]`` in one round, ``[cancel, command]``
    when a round in progress sent the notices first): the command executed."""
    relay, local, _ = relay_and_broker
    with gateway_parties(local, "gw-1") as (gw1,):
        await relay._on_request(request(["c1"], lead_s=60))
        await relay._on_cancel(Cancel(request_id="q1"))
        await relay.notices_out.send_due(relay._notice_due)  # a round in progress sends the notice first
        await relay.dispatch_gateways()  # the next round: the hand-over
        got = await round_sent(relay, gw1, "gw-1")
        assert [m.type for m in got] == ["cancel"], got
        assert await command_rows(relay) == [("c1", "closed", 1, 0)]  # never sent
        assert not relay.fresh_commands and not relay.held_commands


async def test_a_revision_removing_a_client_before_the_handover_sends_its_notice_not_its_command(
        relay_and_broker: tuple[BridgeRelay, BrokerHandle, list[str]]) -> None:
    """Only the removed client's command is withdrawn; the other's goes from the hand-over as before."""
    relay, local, read_back = relay_and_broker
    with gateway_parties(local, "gw-1", "gw-2") as (gw1, gw2):
        await relay._on_request(request(["c1", "c2"], lead_s=60))
        await relay._on_cancel(Cancel(request_id="q1", client_ids=["c1"], revision=2))
        read_back.clear()
        await relay.dispatch_gateways()
        removed, kept = await round_sent(relay, gw1, "gw-1"), await round_sent(relay, gw2, "gw-2")
        assert [m.type for m in removed] == ["cancel"], removed
        assert [m.type for m in kept] == ["command"] and kept[0].msg_id not in read_back
        assert await command_rows(relay) == [("c1", "closed", 1, 0), ("c2", "sending", 1, 1)]


async def test_a_supplier_change_before_the_handover_sends_its_notice_not_the_command(
        relay_and_broker: tuple[BridgeRelay, BrokerHandle, list[str]]) -> None:
    """The client moved to another supplier before the request starts: ``refused`` to the hub, a ``cancel`` to the
    gateway, and no command."""
    relay, local, _ = relay_and_broker
    with gateway_parties(local, "gw-1") as (gw1,):
        await relay._on_request(request(["c1"], lead_s=60))
        now = datetime.now(UTC)
        await relay._on_customers(Customers(items=[CustomerChange(client_id="c1", revision=2, periods=[
            SupplyPeriod(valid_from=now - timedelta(days=30), valid_until=now - timedelta(minutes=1))])]))
        await relay.dispatch_gateways()
        got = await round_sent(relay, gw1, "gw-1")
        assert [m.type for m in got] == ["cancel"], got
        assert await command_rows(relay) == [("c1", "closed", 1, 0)]


async def test_a_newer_revision_before_the_handover_sends_only_the_newer_command(
        relay_and_broker: tuple[BridgeRelay, BrokerHandle, list[str]]) -> None:
    """On main both revisions went out (``[rev 1, rev 2]``) from the one row the newer had replaced."""
    relay, local, _ = relay_and_broker
    with gateway_parties(local, "gw-1") as (gw1,):
        first = request(["c1"], lead_s=60)
        await relay._on_request(first)
        await relay._on_request(first.model_copy(update={"revision": 2, "msg_id": "rev-2"}))
        await relay.dispatch_gateways()
        got = await round_sent(relay, gw1, "gw-1")
        assert [(m.type, getattr(m, "revision", None)) for m in got] == [("command", 2)], got
        assert await command_rows(relay) == [("c1", "sending", 2, 1)]


async def test_an_older_revisions_copy_past_its_deadline_does_not_close_the_newer_command(
        relay_and_broker: tuple[BridgeRelay, BrokerHandle, list[str]]) -> None:
    """The old copy would be judged expired, and its ``expired`` (matched on request and client only) closed the
    newer revision's command, still due until much later. The round's clock is set an hour ahead (injected)."""
    relay, local, _ = relay_and_broker
    with gateway_parties(local, "gw-1") as (gw1,):
        first = request(["c1"], lead_s=60)  # ends 6 minutes from now
        later = request(["c1"], lead_s=7200)  # the revision moved it two hours ahead
        await relay._on_request(first)
        await relay._on_request(later.model_copy(update={"revision": 2}))
        relay.commands_out.clock = lambda: time.time() + 3600
        await relay.dispatch_gateways()
        got = await round_sent(relay, gw1, "gw-1")
        assert [(m.type, getattr(m, "revision", None)) for m in got] == [("command", 2)], got
        assert await command_rows(relay) == [("c1", "sending", 2, 1)]
        hub_outbox = await relay.store.sql.read(lambda db: db.execute("SELECT COUNT(*) FROM hub_outbox").fetchone())
        assert hub_outbox[0] == 0, "an outcome was queued for the hub"


async def test_a_command_withdrawn_while_its_handover_is_going_out_is_skipped(
        relay_and_broker: tuple[BridgeRelay, BrokerHandle, list[str]]) -> None:
    """The loop took the list before the revision's commit: a command of it not yet published when that commit
    starts is not published (``BridgeRelay._handover_due``); one published already went before its notice."""
    relay, local, _ = relay_and_broker
    publish = relay.commands_out.publish
    removed_during: list[str] = []

    async def removing_c2_at_the_first_publish(topic: str, payload: bytes, retain: bool) -> None:
        if not removed_during:
            removed_during.append(topic)
            await relay._on_cancel(Cancel(request_id="q1", client_ids=["c2"], revision=2))
        await publish(topic, payload, retain)

    relay.commands_out.publish = removing_c2_at_the_first_publish
    with gateway_parties(local, "gw-1", "gw-2") as (gw1, gw2):
        await relay._on_request(request(["c1", "c2"], lead_s=60))
        await relay.dispatch_gateways()
        assert removed_during == [topics.down("gateways", "gw-1")]
        first, withdrawn = await round_sent(relay, gw1, "gw-1"), await round_sent(relay, gw2, "gw-2")
        assert [m.type for m in first] == ["command"], first
        assert [m.type for m in withdrawn] == ["cancel"], withdrawn
        assert await command_rows(relay) == [("c1", "sending", 1, 1), ("c2", "closed", 1, 0)]
        assert not relay.fresh_commands and not relay.held_commands


async def test_a_handover_with_the_link_down_leaves_its_commands_due_in_the_store(
        relay_and_broker: tuple[BridgeRelay, BrokerHandle, list[str]]) -> None:
    """The ids are released, and the next round with the link up reads the command from the store and sends it."""
    relay, local, read_back = relay_and_broker
    link = relay.local
    with gateway_parties(local, "gw-1") as (gw1,):
        await relay._on_request(request(["c1"], lead_s=60))
        relay.local = None
        await relay.dispatch_gateways()
        assert not relay.fresh_commands and not relay.held_commands
        assert await command_rows(relay) == [("c1", "sending", 1, 0)]
        relay.local = link
        read_back.clear()
        await relay.dispatch_gateways()
        got = await round_sent(relay, gw1, "gw-1")
        assert [m.type for m in got] == ["command"] and got[0].msg_id in read_back, (got, read_back)
        assert await command_rows(relay) == [("c1", "sending", 1, 1)]


async def test_a_failed_handover_leaves_its_commands_due_in_the_store(
        relay_and_broker: tuple[BridgeRelay, BrokerHandle, list[str]]) -> None:
    """A publish that fails ends the hand-over: nothing is recorded as sent, the ids are released, and the command
    goes from the store in the next round, once."""
    relay, local, read_back = relay_and_broker
    publish: Publish = relay.commands_out.publish
    failures: list[str] = []

    async def failing_once(topic: str, payload: bytes, retain: bool) -> None:
        if not failures:
            failures.append(topic)
            raise MqttError("the retailer broker's in-flight window stayed full")
        await publish(topic, payload, retain)

    relay.commands_out.publish = failing_once
    with gateway_parties(local, "gw-1") as (gw1,):
        await relay._on_request(request(["c1"], lead_s=60))
        read_back.clear()
        await relay.dispatch_gateways()  # the hand-over fails; the same round's read finds the command due
        got = await round_sent(relay, gw1, "gw-1")
        assert failures and [m.type for m in got] == ["command"], got
        assert isinstance(got[0], Command) and got[0].msg_id in read_back
        assert not relay.fresh_commands and not relay.held_commands
        assert await command_rows(relay) == [("c1", "sending", 1, 1)]


async def test_a_cancel_handled_beside_its_request_leaves_no_command_without_its_notice(
        relay_and_broker: tuple[BridgeRelay, BrokerHandle, list[str]]) -> None:
    """Found in review: the hub's messages are handled concurrently, so a cancel can run while its request's commit
    is under way. It withdrew nothing (the commands were held, not yet handed over), its read found no command for a
    notice, it closed them; the request's task then handed them over, and the gateway got a command alone."""
    relay, local, _ = relay_and_broker
    with gateway_parties(local, "gw-1") as (gw1,):
        await asyncio.gather(relay._on_request(request(["c1"], lead_s=60)), relay._on_cancel(Cancel(request_id="q1")))
        assert await command_rows(relay) == [("c1", "closed", 1, 0)]  # cancelled in the store, never sent
        await relay.dispatch_gateways()
        got = await round_sent(relay, gw1, "gw-1")
        assert [m.type for m in got] in ([], ["command", "cancel"]), got
        assert not relay.held_commands and not relay.fresh_commands


async def test_a_cancel_committed_between_the_requests_check_and_its_commit_stores_no_command(
        relay_and_broker: tuple[BridgeRelay, BrokerHandle, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review (on main before the hand-over too): the request checked ``is_cancelled``, the cancel then
    committed (its read found no command, so no notice), and the request's commit stored the command anyway: the
    gateway got a cancelled emergency's command alone. The request's commit now checks the cancellation itself."""
    relay, local, _ = relay_and_broker
    real = relay.store.accept_request

    async def after_the_cancel(*args: Any) -> int:
        await relay._on_cancel(Cancel(request_id="q1"))
        return await real(*args)

    monkeypatch.setattr(relay.store, "accept_request", after_the_cancel)
    with gateway_parties(local, "gw-1") as (gw1,):
        await relay._on_request(request(["c1"], lead_s=60))
        assert await command_rows(relay) == []
        await relay.dispatch_gateways()
        assert await round_sent(relay, gw1, "gw-1") == []
        assert not relay.held_commands and not relay.fresh_commands
