"""Group commit of outcomes against a real Mosquitto, on both storage backends: retailers (gmqtt links, which
publish without waiting for each PUBACK) send bursts of outcomes; every one is stored, each is acknowledged once
after its commit, and acknowledgements are gathered (one ``ack`` per retailer names many outcomes)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest

from cloud_hub.service import REQUEST_CLIENTS_PER_MESSAGE
from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, ErrorReply, Outcome, Request, decode, encode
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.test_relay import metric, post_emergency, wait_state
from tests.hub_fixtures import HubHandle, start_hub


class Retailer:
    """A retailer on the hub broker that records every message the hub sends it."""

    def __init__(self, hub: HubHandle, retailer_id: str) -> None:
        self.retailer_id = retailer_id
        self.requests: list[Request] = []
        self.acks: list[Ack] = []
        self.errors: list[ErrorReply] = []
        ident = hub.broker.identities[retailer_id]
        self.link = MqttLink(MqttEndpoint(hub.broker.host, hub.broker.port, retailer_id, ident.password),
                             client_id=retailer_id, subscriptions=[topics.down("retailers", retailer_id)],
                             handler=self._on_message, clean_start=True, session_expiry_s=0)

    async def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        msg = decode(payload)
        if isinstance(msg, Request):
            self.requests.append(msg)
            await self.send(Ack(ack_ids=[msg.msg_id]))
        elif isinstance(msg, Ack):
            self.acks.append(msg)
        elif isinstance(msg, ErrorReply):
            self.errors.append(msg)

    async def send(self, msg: Ack | Outcome) -> None:
        await self.link.publish(topics.up("retailers", self.retailer_id), encode(msg), wait_s=10.0)

    async def burst(self, outcomes: list[Outcome]) -> None:
        """Publish all at once (concurrently, never waiting for an answer in between)."""
        await asyncio.gather(*(self.send(o) for o in outcomes))

    def acked(self) -> Counter[str]:
        return Counter(mid for a in self.acks for mid in a.ack_ids)

    async def request_for(self, request_id: str, timeout: float = 5.0) -> Request:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            for r in self.requests:
                if r.request_id == request_id:
                    return r
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{self.retailer_id} got no request {request_id}")

    async def wait_acked(self, msg_ids: list[str], timeout: float = 15.0) -> None:
        for _ in range(int(timeout / 0.05)):
            if set(msg_ids) <= set(self.acked()):
                return
            await asyncio.sleep(0.05)


@asynccontextmanager
async def retailers(hub: HubHandle, *ids: str) -> AsyncIterator[tuple[Retailer, ...]]:
    made = tuple(Retailer(hub, r) for r in ids)
    async with AsyncExitStack() as stack:
        for r in made:
            await stack.enter_async_context(r.link)
        await asyncio.sleep(0.2)  # subscriptions in place
        yield made


def executed(request_id: str, client_id: str) -> Outcome:
    return Outcome(request_id=request_id, client_id=client_id, state=ClientState.EXECUTED,
                   trace={"retailer_ms": 1.0})


async def test_a_burst_over_several_requests_and_retailers_is_stored_and_each_outcome_acked_once(
        hub_any: HubHandle) -> None:
    hub = hub_any
    clients = {f"c{i:03d}": ("r1" if i % 3 else "r2") for i in range(150)}
    await hub.setup_registry(clients)
    async with retailers(hub, "r1", "r2") as (r1, r2):
        first = await post_emergency(hub, list(clients)[:100])
        second = await post_emergency(hub, list(clients)[100:])
        sent: dict[str, list[Outcome]] = {"r1": [], "r2": []}
        for rid in (first, second):
            for party in (r1, r2):
                req = await party.request_for(rid)
                sent[party.retailer_id] += [executed(rid, c) for c in req.client_ids]
        # Both retailers acknowledged both requests at once (group-committed acks): nothing is sent again, although
        # the first re-send would be due after 0.5 s.
        await asyncio.sleep(1.5)
        assert sorted(m.request_id for m in r1.requests) == sorted(m.request_id for m in r2.requests) == sorted(
            [first, second])
        # The same message twice and a later, different outcome for a client already executed, in the same burst.
        dup = sent["r1"][0]
        late = Outcome(request_id=first, client_id=dup.client_id, state=ClientState.REFUSED)
        await asyncio.gather(r1.burst([*sent["r1"], dup, late]), r2.burst(sent["r2"]))
        for party in (r1, r2):
            await party.wait_acked([o.msg_id for o in sent[party.retailer_id]])
        await r1.wait_acked([late.msg_id])
        assert r1.errors == [] and r2.errors == []
        for party in (r1, r2):
            got = party.acked()
            assert set(got) == {o.msg_id for o in sent[party.retailer_id]} | ({late.msg_id} if party is r1 else set())
            once = {m: n for m, n in got.items() if m != dup.msg_id}
            assert set(once.values()) == {1}, "every outcome is acknowledged once"
            if party is r1:
                assert got[dup.msg_id] == 2, "a duplicate is acknowledged again, so its sender stops re-sending it"
            # Acknowledgements are gathered: fewer ack messages than outcomes.
            assert len(party.acks) < len(sent[party.retailer_id])
        a = await wait_state(hub, first, "completed")
        b = await wait_state(hub, second, "completed")
        assert a["state"] == b["state"] == "completed"
        assert {c["state"] for c in [*a["clients"].values(), *b["clients"].values()]} == {"executed"}
        assert a["clients"][dup.client_id]["state"] == "executed", "a terminal state never changes"
        assert sum(r["clients"] for r in a["retailers"].values()) == 100
        assert {rid: r["states"] for rid, r in b["retailers"].items()} == {
            rid: {"executed": n} for rid, n in Counter(clients[c] for c in list(clients)[100:]).items()}
        text = (await hub.http.get("/metrics")).text
        n_outcomes = len(sent["r1"]) + len(sent["r2"]) + 2
        assert metric(text, "mhp_outcome_batch_size_sum") == n_outcomes
        assert metric(text, "mhp_outcome_batch_size_count") < n_outcomes, "outcomes were committed in groups"


async def test_refused_outcomes_in_a_burst_get_errors_and_the_rest_is_stored(hub_any: HubHandle) -> None:
    hub = hub_any
    await hub.setup_registry({"c1": "r1", "c2": "r1", "c3": "r2"})
    async with retailers(hub, "r1", "r2") as (r1, r2):
        request_id = await post_emergency(hub, ["c1", "c2", "c3"])
        await r1.request_for(request_id)
        good = [executed(request_id, "c1"), executed(request_id, "c2")]
        foreign = executed(request_id, "c3")  # r2's client
        ghost = executed(request_id, "nobody")
        await r1.burst([good[0], foreign, ghost, good[1]])
        await r1.wait_acked([o.msg_id for o in good])
        for _ in range(100):
            if len(r1.errors) >= 2:
                break
            await asyncio.sleep(0.05)
        assert {e.ref_msg_id: e.code for e in r1.errors} == {foreign.msg_id: "forbidden",
                                                             ghost.msg_id: "forbidden"}
        assert set(r1.acked()) == {o.msg_id for o in good}
        req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
        assert req["clients"]["c1"]["state"] == req["clients"]["c2"]["state"] == "executed"
        assert req["clients"]["c3"]["state"] in ("pending", "sent")
        await r2.request_for(request_id)
        await r2.burst([executed(request_id, "c3")])
        assert (await wait_state(hub, request_id, "completed"))["state"] == "completed"


@pytest.fixture
async def roomy_hub(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[HubHandle]:
    """A hub whose per-retailer MQTT rate limit (200 messages/s by default) is lifted, like the experiment's."""
    broker = mosquitto_factory("hub", ["r1", "r2"], "hub")
    server, task, tokens, url = await start_hub(tmp_path, broker, mqtt_rate_limit_per_s=1e6,
                                                mqtt_rate_limit_burst=1_000_000)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for _ in range(200):
            if (await http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.02)
        yield HubHandle(url, tokens, broker, http, server.config.app)
    server.should_exit = True
    await task


async def test_a_request_too_big_for_one_message_is_split_and_completes(roomy_hub: HubHandle) -> None:
    hub = roomy_hub
    await hub.setup_registry({})
    clients = [f"client-{i:05d}" for i in range(REQUEST_CLIENTS_PER_MESSAGE + 500)]
    r = await hub.http.put("/v1/clients", headers=hub.auth("dso"), json={"clients": [
        {"client_id": c, "retailer_id": "r1", "contracted_power_kw": 6.9} for c in clients]})
    assert r.status_code == 200, r.text
    async with retailers(hub, "r1") as (r1,):
        request_id = await post_emergency(hub, clients)
        for _ in range(200):
            if sum(len(m.client_ids) for m in r1.requests) >= len(clients):
                break
            await asyncio.sleep(0.05)
        assert [len(m.client_ids) for m in r1.requests] == [REQUEST_CLIENTS_PER_MESSAGE, 500]
        assert sorted(c for m in r1.requests for c in m.client_ids) == clients
        outcomes = [executed(request_id, c) for c in clients]
        await r1.burst(outcomes)
        await r1.wait_acked([o.msg_id for o in outcomes], timeout=60)
        assert set(r1.acked()) == {o.msg_id for o in outcomes} and r1.errors == []
        req = await wait_state(hub, request_id, "completed", timeout=10)
        assert req["state"] == "completed" and req["retailers"]["r1"]["states"] == {"executed": len(clients)}
