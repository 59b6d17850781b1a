"""``outcomes`` messages with two hub replicas (real processes, one store, one Mosquitto with a shared
subscription): a message taken by the replica that does not own its request is forwarded whole to the owner,
which applies and acknowledges it (docs/protocol.md, "outcomes")."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx

from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Customers, ErrorReply, OutcomeReport, Outcomes, Request
from tests.broker_fixtures import BrokerHandle
from tests.cloud_hub.test_replicas import (
    CLIENTS,
    Replica,
    cluster,  # noqa: F401  (the fixture, used by name below)
    emergency,
    metric,
    started,
    wait_states,
)
from tests.mqtt_party import Party, parties
from tests.waiting import eventually


async def answer_in_batches(party: Party, acked: dict[str, int], errors: list[ErrorReply]) -> None:
    """A bridge that answers each request with ``outcomes`` messages for its clients, re-sent every 0.5 s until
    acknowledged."""
    pending: dict[str, Outcomes] = {}
    answered: set[str] = set()
    last = time.monotonic()
    while True:
        try:
            msg = await party.next(timeout=0.2)
        except TimeoutError:
            msg = None
        if isinstance(msg, Request):
            if msg.request_id not in answered:
                answered.add(msg.request_id)
                # Two messages and an ack per request: the shared subscription's round robin gives each replica
                # some of the outcomes messages, whatever its phase.
                for part in (msg.client_ids[:1], msg.client_ids[1:]):
                    out = Outcomes(request_id=msg.request_id, reports=[
                        OutcomeReport(client_id=c, state=ClientState.EXECUTED) for c in part])
                    pending[out.msg_id] = out
                    await party.publish(topics.up("retailers", "r1"), out)
            await party.publish(topics.up("retailers", "r1"), Ack(ack_ids=[msg.msg_id]))
        elif isinstance(msg, Customers):
            await party.publish(topics.up("retailers", "r1"), Ack(ack_ids=[msg.msg_id]))
        elif isinstance(msg, Ack):
            for mid in msg.ack_ids:
                if pending.pop(mid, None) is not None:
                    acked[mid] = acked.get(mid, 0) + 1
        elif isinstance(msg, ErrorReply):
            errors.append(msg)
        if time.monotonic() - last > 0.5:
            last = time.monotonic()
            for out in list(pending.values()):
                await party.publish(topics.up("retailers", "r1"), out)


async def test_outcomes_messages_reach_the_owning_replica_and_complete_its_requests(
        cluster: tuple[Replica, Replica, BrokerHandle, dict[str, str]]) -> None:  # noqa: F811
    a, b, broker, tokens = await started(cluster)
    dso = {"Authorization": f"Bearer {tokens['dso']}"}
    acked: dict[str, int] = {}
    errors: list[ErrorReply] = []
    with parties(Party(broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        worker = asyncio.create_task(answer_in_batches(r1, acked, errors))
        try:
            async with httpx.AsyncClient(base_url=a.url, timeout=10) as ha, \
                    httpx.AsyncClient(base_url=b.url, timeout=10) as hb:
                ids = []
                for _ in range(12):  # all owned by replica a
                    r = await ha.post("/v1/emergencies", headers=dso, json=emergency(CLIENTS))
                    assert r.status_code == 202, r.text
                    ids.append(r.json()["request_id"])
                states = await wait_states(hb, dso, ids)  # read on the replica that owns none of them
                assert set(states.values()) == {"completed"}, states
                for rid in ids:
                    req = (await hb.get(f"/v1/requests/{rid}", headers=dso)).json()
                    assert {c: v["state"] for c, v in req["clients"].items()} == dict.fromkeys(CLIENTS, "executed")
                # A request completes once its outcomes are applied; their acknowledgements come right after
                # (the owner's, or the forwarding replica's): wait for them while the bridge still reads.
                await eventually(lambda: len(acked) == 24, "every outcomes message acknowledged", timeout_s=15)
                mb = (await hb.get("/metrics")).text
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
    assert errors == []
    assert len(acked) == 24, "every outcomes message acknowledged"
    # b took some of the messages (the shared subscription) and forwarded them to a, their requests' owner.
    assert 'mhp_mqtt_received_total{type="outcomes"}' in mb
    assert 'mhp_replica_forwarded_total{kind="outcome"}' in mb and metric(mb, "mhp_replica_forwarded_total") > 0
