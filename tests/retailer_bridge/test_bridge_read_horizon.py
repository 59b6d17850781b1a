"""A gateway's silence is counted only up to what the bridge has read (issue 14, eighth round): real Mosquitto
brokers from broker_config/, the bridge's own service, the gateway and the hub played by MQTT test clients, real
SQLite.

A bridge behind on its gateways' answers (at 100,000 gateways on a saturated machine: thousands of outcomes queued at
the broker, in its socket, or waiting for a commit) used to take "not read yet" for "not answered": it re-sent
commands whose outcomes were in its own backlog, and past the ack timeout reported them ``unreachable``. Here the
bridge's commit of its gateways' reports is held for longer than both the first re-send delay (0.5 s) and the ack
timeout (1.5 s) while the gateway's outcome waits in it. On ``6a690e8`` the gateway got the command again at ~0.5 s
and the hub an ``unreachable`` at ~1.5 s; now the bridge's read marker (:class:`mhp_wire.outbox.ReadHorizon`) waits
behind the held commit, so the silence known stays under a re-send delay, and the executed outcome is the only one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mhp_wire import topics
from mhp_wire.messages import ClientState, Command, Outcome
from tests.mqtt_party import Party, parties
from tests.retailer_bridge.test_bridge import Rig, request, rig  # noqa: F401  (rig: the fixture)

HELD_S = 2.0
"""How long the bridge's report commit is held: above the first re-send delay and the ack timeout (``rig``'s 1.5 s)."""


async def test_an_answer_waiting_in_the_bridges_own_backlog_is_not_taken_for_silence(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    store = rig.bridge.relay.store
    release = asyncio.Event()
    real = store.apply_reports

    async def held(*args: Any, **kwargs: Any) -> Any:  # the bridge behind on its gateways' answers
        await release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "apply_reports", held)
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers")),
                 Party(rig.local, "gw-1", topics.down("gateways", "gw-1"))) as (hub, gw1):
        await hub.publish(topics.down("retailers", "r1"), request(["c1"], "q-held", lead_s=0))
        await hub.next("ack")
        cmd = await gw1.next("command")
        assert isinstance(cmd, Command) and cmd.client_id == "c1"
        await gw1.publish(topics.up("gateways", "gw-1"), Outcome(
            request_id=cmd.request_id, client_id="c1", state=ClientState.EXECUTED, revision=cmd.revision))
        await gw1.nothing("command", within=HELD_S)  # 6a690e8: the same command again at ~0.5 s
        release.set()
        out = await hub.next("outcome", timeout=5)  # 6a690e8: UNREACHABLE first, at ~1.5 s
        assert isinstance(out, Outcome) and out.client_id == "c1" and out.state is ClientState.EXECUTED, out
    rows = await store.commands_of("q-held")
    assert [(r["attempts"], r["state"]) for r in rows] == [(1, "closed")]
    assert rig.bridge.relay.read_horizon.probes >= 1, "the re-send was considered, and waited for the marker"


async def test_a_silent_gateway_is_still_sent_the_command_again_once_the_bridge_has_read_past_its_silence(
        rig: Rig) -> None:  # noqa: F811
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers")),
                 Party(rig.local, "gw-1", topics.down("gateways", "gw-1"))) as (hub, gw1):
        await hub.publish(topics.down("retailers", "r1"), request(["c1"], "q-silent", lead_s=0))
        await hub.next("ack")
        first = await gw1.next("command")
        again = await gw1.next("command", timeout=1.4)  # before the ack timeout: re-sent, not yet unreachable
        assert isinstance(first, Command) and isinstance(again, Command) and again.msg_id == first.msg_id
        out = await hub.next("outcome", timeout=5)
        assert isinstance(out, Outcome) and out.state is ClientState.UNREACHABLE
    assert rig.bridge.relay.read_horizon.at > 0, "markers came back"
