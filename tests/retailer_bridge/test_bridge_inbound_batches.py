"""The bridge reads its gateways' messages a turn of the loop at a time (issue 14, sixth round), through the real
chain: real Mosquitto brokers from broker_config/, the bridge's own process code, real SQLite, gateways played by MQTT
clients. A gateway's burst, published back to back (read together when they arrive together), mixing its
acknowledgement and outcome of one command with a malformed message, a duplicate outcome and an outcome for another
home's client: each is answered by the bridge's rules as before, the good ones are stored and reach the hub once,
the bad ones lose nothing of the others, and the bridge keeps serving."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from mhp_wire import topics
from mhp_wire.fastwire import OutcomeIn
from mhp_wire.messages import Ack, ClientState, Command, ErrorReply, Message, Outcome, decode, encode
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.store import CLOSED, DELIVERED, BridgeStore, NewCommand
from tests.mqtt_party import Party, parties
from tests.outcome_views import client_outcomes, no_outcomes
from tests.retailer_bridge.test_bridge import Rig, request, rig  # noqa: F401  (the rig fixture)
from tests.retailer_bridge.test_bridge_report_batches import command


async def answers(party: Party, n: int) -> list[Message]:
    """The next ``n`` acknowledgements and errors a gateway gets (commands and others skipped)."""
    got: list[Message] = []
    while len(got) < n:
        msg = await party.next(timeout=10)
        if msg.type in ("ack", "error"):
            got.append(msg)
    return got


async def test_a_burst_of_good_and_bad_reports_is_answered_each_by_the_rules(rig: Rig) -> None:  # noqa: F811
    with parties(Party(rig.hub_broker, "hub", topics.all_up("retailers")),
                 Party(rig.local, "gw-1", topics.down("gateways", "gw-1")),
                 Party(rig.local, "gw-2", topics.down("gateways", "gw-2"))) as (hub, gw1, gw2):
        req = request(["c1", "c2"])
        await hub.publish(topics.down("retailers", "r1"), req)
        assert (await hub.next("ack")).ack_ids == [req.msg_id]  # type: ignore[union-attr]
        cmd1, cmd2 = await gw1.next("command"), await gw2.next("command")
        assert isinstance(cmd1, Command) and isinstance(cmd2, Command)

        out1 = Outcome(request_id="q1", client_id="c1", state=ClientState.EXECUTED, trace={"gateway_ms": 3.0})
        again = Outcome(request_id="q1", client_id="c1", state=ClientState.EXECUTED, trace={"gateway_ms": 4.0})
        foreign = Outcome(request_id="q1", client_id="c2", state=ClientState.LIMIT_NOT_MET)
        burst = [encode(Ack(ack_ids=[cmd1.msg_id])), encode(out1), b'{"v":1,"type":"outcome","state":', encode(again),
                 encode(foreign)]
        # The gateway's own connection publishes them back to back, without waiting for a PUBACK in between (the
        # broker ties the client id to the username: a second connection of gw-1 would replace the first).
        sent = [gw1.client._client.publish(topics.up("gateways", "gw-1"), payload, qos=1) for payload in burst]
        await asyncio.to_thread(lambda: [info.wait_for_publish(5) for info in sent])
        got = await answers(gw1, 4)
        acked = {m for a in got if isinstance(a, Ack) for m in a.ack_ids}
        errors = {(e.code, e.ref_msg_id) for e in got if isinstance(e, ErrorReply)}
        assert acked == {out1.msg_id, again.msg_id}  # the duplicate is acknowledged, not forwarded again
        assert errors == {("invalid", None), ("forbidden", foreign.msg_id)}

        # The other gateway, meanwhile, is served as before.
        await gw2.publish(topics.up("gateways", "gw-2"), Ack(ack_ids=[cmd2.msg_id]))
        out2 = Outcome(request_id="q1", client_id="c2", state=ClientState.EXECUTED)
        await gw2.publish(topics.up("gateways", "gw-2"), out2)
        assert [a.ack_ids for a in await answers(gw2, 1)] == [[out2.msg_id]]  # type: ignore[attr-defined]

        terminal: dict[str, list[ClientState]] = {}
        while len(terminal) < 2:
            for o in client_outcomes(await hub.next(timeout=10)):
                if o.state is not ClientState.DELIVERED:
                    terminal.setdefault(o.client_id, []).append(o.state)
                    await hub.publish(topics.down("retailers", "r1"), Ack(ack_ids=[o.msg_id]))
        assert terminal == {"c1": [ClientState.EXECUTED], "c2": [ClientState.EXECUTED]}
        await no_outcomes(hub, 1.0)  # nothing forwarded twice (the hub acknowledged each)
        states = {c["client_id"]: c["state"] for c in await rig.bridge.relay.store.commands_of("q1")}
        assert states == {"c1": CLOSED, "c2": CLOSED}
        assert rig.bridge.relay.rejected["gateway_invalid"] == 1
        assert rig.bridge.relay.rejected["gateway_foreign_client"] == 1
        assert rig.bridge.relay.received["gateway_outcome"] == 4  # the three of gw-1's burst and gw-2's
        link = rig.bridge._local_link
        assert link is not None and link.stats.extra["inbound_batches"] >= 1  # read by the batch handler


async def test_one_message_failing_in_a_batch_loses_none_of_the_others(tmp_path: Path) -> None:
    """The relay's batch handler itself (real SQLite, no links: nothing is published): the start of one gateway's
    outcome fails (a fault injected into its handler), a malformed payload sits among the good ones, and every other
    report of the same batch is applied, in its order, in one store write."""
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        cmds = [command(f"c{i}") for i in range(4)]
        await store.accept_request([NewCommand("q", c.client_id, f"gw-{i}", c.msg_id, encode(c), 0.0, 1e12)
                                    for i, c in enumerate(cmds)], [])
        relay = BridgeRelay("r1", {f"c{i}": f"gw-{i}" for i in range(4)}, store)
        start = relay._reports_started[OutcomeIn]

        def faulty(gid: str, msg: Any) -> Any:
            if gid == "gw-1":
                raise RuntimeError("injected fault")
            return start(gid, msg)

        relay._reports_started[OutcomeIn] = faulty
        batch: list[tuple[str, bytes, bool]] = []
        for i, c in enumerate(cmds):
            up = topics.up("gateways", f"gw-{i}")
            batch.append((up, encode(Ack(ack_ids=[c.msg_id])), False))
            if i == 2:
                batch.append((up, b"not json", False))
            batch.append((up, encode(Outcome(request_id="q", client_id=c.client_id, state=ClientState.EXECUTED)),
                          False))
        writes = store.group.writes
        await relay.on_local_batch(batch)
        assert store.group.writes - writes == 1  # the whole turn's reports in one store write
        states = {c["client_id"]: c["state"] for c in await store.commands_of("q")}
        assert states == {"c0": CLOSED, "c1": DELIVERED, "c2": CLOSED, "c3": CLOSED}
        assert relay.rejected["gateway_invalid"] == 1
        messages = await store.sql.read(lambda db: [decode(p) for (p,) in db.execute(
            "SELECT payload FROM hub_outbox")])
        queued = Counter((o.client_id, o.state) for m in messages for o in client_outcomes(m))
        assert queued == {("c0", ClientState.EXECUTED): 1, ("c1", ClientState.DELIVERED): 1,
                          ("c2", ClientState.EXECUTED): 1, ("c3", ClientState.EXECUTED): 1}
    finally:
        await store.close()
