"""The ``outcomes`` message (many clients of one request in one message) against a real Mosquitto and a real hub,
on both storage backends: its reports go through the same group commit and authorization as single outcomes, the
message gets one ``ack`` once its batch is durable, and each bad entry gets its own refusal while the rest is
applied (docs/protocol.md, "outcomes")."""

from __future__ import annotations

import asyncio
from typing import Any

from mhp_wire import topics
from mhp_wire.messages import ClientState, Outcome, OutcomeReport, Outcomes, encode
from tests.cloud_hub.test_relay import metric, post_emergency, wait_state
from tests.cloud_hub.test_relay_batching import Retailer, retailers
from tests.hub_fixtures import HubHandle


async def send(party: Retailer, msg: Outcomes | Outcome) -> None:
    await party.link.publish(topics.up("retailers", party.retailer_id), encode(msg), wait_s=10.0)


async def answered(party: Retailer, msg_id: str, errors: int, timeout: float = 15.0) -> None:
    """Wait until ``msg_id`` is acknowledged and ``errors`` refusals have come."""
    for _ in range(int(timeout / 0.05)):
        if msg_id in party.acked() and len(party.errors) >= errors:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"acked {dict(party.acked())}, errors {party.errors}")


def executed(client_id: str) -> OutcomeReport:
    return OutcomeReport(client_id=client_id, state=ClientState.EXECUTED, trace={"retailer_ms": 1.0})


async def test_an_outcomes_message_is_applied_in_one_commit_acked_once_and_its_bad_entries_refused_alone(
        hub_any: HubHandle) -> None:
    hub = hub_any
    mine = [f"c{i:03d}" for i in range(60)]
    await hub.setup_registry({**dict.fromkeys(mine, "r1"), "other": "r2"})
    async with retailers(hub, "r1", "r2") as (r1, r2):
        request_id = await post_emergency(hub, [*mine, "other"])
        await r1.request_for(request_id)
        await r2.request_for(request_id)
        before = metric((await hub.http.get("/metrics")).text, "mhp_outcome_batch_size_count")
        bad: list[Any] = [{"client_id": mine[0], "state": "bogus"}]
        msg = Outcomes(request_id=request_id, reports=[
            *(executed(c) for c in mine[1:]), executed("other"), *bad, executed("nobody")])
        await send(r1, msg)
        await answered(r1, msg.msg_id, errors=3)
        await asyncio.sleep(0.3)  # nothing more comes: one ack, three refusals
        assert r1.acked() == {msg.msg_id: 1} and len(r1.acks) == 1
        refusals = sorted((e.code, e.ref_msg_id, e.message) for e in r1.errors)
        assert [(code, ref) for code, ref, _ in refusals] == [
            ("forbidden", msg.msg_id), ("forbidden", msg.msg_id), ("invalid", msg.msg_id)]
        assert refusals[0][2].startswith(f"outcomes entry {len(mine) - 1} (client other): ")
        assert refusals[1][2].startswith(f"outcomes entry {len(mine) + 1} (client nobody): ")
        assert refusals[0][2].split(": ", 1)[1] == refusals[1][2].split(": ", 1)[1], "neutral: the same reason"
        assert refusals[2][2].startswith(f"outcomes entry {len(mine)}: state: ")
        req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
        assert {c: req["clients"][c]["state"] for c in mine[1:]} == dict.fromkeys(mine[1:], "executed")
        assert req["clients"][mine[0]]["state"] != "executed", "the invalid entry changed nothing"
        assert req["clients"]["other"]["state"] != "executed", "another retailer's client is not r1's to report"
        text = (await hub.http.get("/metrics")).text
        assert metric(text, "mhp_outcome_batch_size_count") == before + 1, "the whole message in one commit"
        assert metric(text, "mhp_mqtt_rejected_total", reason="forbidden") == 2
        # The same message again (a bridge that missed the ack): acknowledged again, nothing changes.
        await send(r1, msg)
        for _ in range(200):
            if r1.acked()[msg.msg_id] == 2:
                break
            await asyncio.sleep(0.05)
        assert r1.acked()[msg.msg_id] == 2
        # The rest completes the request: the first client by a single outcome, r2's client by an outcomes message.
        last = Outcome(request_id=request_id, client_id=mine[0], state=ClientState.EXECUTED)
        await send(r1, last)
        theirs = Outcomes(request_id=request_id, reports=[executed("other")])
        await send(r2, theirs)
        await answered(r2, theirs.msg_id, errors=0)
        await answered(r1, last.msg_id, errors=0)
        assert r2.errors == []
        done = await wait_state(hub, request_id, "completed")
        assert done["state"] == "completed"
        assert {c["state"] for c in done["clients"].values()} == {"executed"}


async def test_outcomes_of_several_messages_share_one_commit_without_splitting_a_message(hub: HubHandle) -> None:
    clients = [f"k{i:04d}" for i in range(1_500)]
    await hub.setup_registry(dict.fromkeys(clients, "r1"))
    async with retailers(hub, "r1") as (r1,):
        request_id = await post_emergency(hub, clients)
        for _ in range(200):
            if sum(len(m.client_ids) for m in r1.requests if m.request_id == request_id) >= len(clients):
                break
            await asyncio.sleep(0.05)
        before = metric((await hub.http.get("/metrics")).text, "mhp_outcome_batch_size_count")
        msgs = [Outcomes(request_id=request_id, reports=[executed(c) for c in clients[i:i + 500]])
                for i in range(0, len(clients), 500)]
        await asyncio.gather(*(send(r1, m) for m in msgs))
        for m in msgs:
            await answered(r1, m.msg_id, errors=0)
        assert r1.errors == [] and r1.acked() == dict.fromkeys((m.msg_id for m in msgs), 1)
        done = await wait_state(hub, request_id, "completed", timeout=10)
        assert done["retailers"]["r1"]["states"] == {"executed": len(clients)}
        text = (await hub.http.get("/metrics")).text
        commits = metric(text, "mhp_outcome_batch_size_count") - before
        assert 1 <= commits <= len(msgs)
