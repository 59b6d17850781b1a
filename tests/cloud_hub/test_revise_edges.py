"""Edges of ``POST /v1/requests/{id}/revise`` and cancel over real HTTP against a hub with its real broker (retailers
played by MQTT parties): a load reduction revised after its clients were chosen keeps each home's own target, a
revision never follows a supplier switch to the wrong retailer, and a client whose message is already at the broker
but not yet recorded as sent still gets the cancel or the removal."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from cloud_hub.book import OutboxItem
from cloud_hub.relay import HubRelay
from mhp_wire import topics
from mhp_wire.messages import Ack, Cancel, ClientState, Outcome, Request
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties


def soon(seconds: float = 60) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def create(hub: HubHandle, path: str, body: dict[str, Any]) -> str:
    r = await hub.http.post(path, json=body, headers=hub.auth("dso"))
    assert r.status_code == 202, r.text
    request_id: str = r.json()["request_id"]
    return request_id


async def revise(hub: HubHandle, request_id: str, body: dict[str, Any]) -> Any:
    return await hub.http.post(f"/v1/requests/{request_id}/revise", json=body, headers=hub.auth("dso"))


async def get(hub: HubHandle, request_id: str) -> dict[str, Any]:
    r = await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def requests_of(party: Party, revision: int, timeout: float = 10) -> dict[float, list[str]]:
    """The ``load_reduction`` requests of ``revision`` one retailer gets: target_kw -> client ids (until one of each
    target was seen and nothing more comes within half a second; re-sends of one message count once)."""
    got: dict[float, list[str]] = {}
    seen: set[str] = set()
    while True:
        try:
            msg = await party.next("request", timeout=timeout if not got else 0.5)
        except TimeoutError:
            return got
        assert isinstance(msg, Request)
        if msg.revision != revision or msg.params.kind != "load_reduction" or msg.msg_id in seen:
            continue
        seen.add(msg.msg_id)
        assert msg.params.target_kw is not None
        got.setdefault(msg.params.target_kw, []).extend(msg.client_ids)


# -- a load reduction revised after its clients were chosen (finding 2) ------------------------------------------

async def test_a_dispatched_load_reduction_revised_keeps_each_homes_target(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r1", "c3": "r2"})
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1")),
                 Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (r1, r2):
        request_id = await create(hub, "/v1/load-reductions", {
            "client_ids": ["c1", "c2", "c3"], "reduction_kw": 10.0, "start": soon(60), "duration_s": 600,
            "respond_within_s": 60})
        for party, rid, answers in ((r1, "r1", (("c1", 4.0), ("c2", 4.0))), (r2, "r2", (("c3", 2.0),))):
            asked = await party.next("request")
            assert isinstance(asked, Request) and asked.kind.value == "availability"
            for cid, kw in answers:
                await party.publish(topics.up("retailers", rid), Outcome(
                    request_id=request_id, client_id=cid, state=ClientState.AVAILABLE, detail={"available_kw": kw}))
        # Every client answered: the phase ends at once and the three homes are chosen, each with its own target.
        assert await requests_of(r1, 1) == {4.0: ["c1", "c2"]}
        assert await requests_of(r2, 1) == {2.0: ["c3"]}
        assert (await get(hub, request_id))["selection"]["chosen"] == ["c1", "c2", "c3"]

        later = soon(120)
        r = await revise(hub, request_id, {"start": later})
        assert r.status_code == 202, r.text
        assert r.json()["revision"] == 2
        # Revision 2 moves the window only: each home is still asked for what it said it could shed, not 10 kW.
        assert await requests_of(r1, 2) == {4.0: ["c1", "c2"]}
        assert await requests_of(r2, 2) == {2.0: ["c3"]}
    req = await get(hub, request_id)
    assert req["revision"] == 2 and req["selection"]["chosen"] == ["c1", "c2", "c3"]
    assert datetime.fromisoformat(req["request"]["start"]) == datetime.fromisoformat(later)


# -- a revision across a supplier switch (finding 3) ---------------------------------------------------------------

async def test_a_revision_that_moves_a_client_past_a_supplier_switch_is_409(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    switch_at = datetime.now(UTC) + timedelta(hours=1)
    r = await hub.http.put("/v1/clients/c1", headers=hub.auth("dso"), json={
        "retailer_id": "r2", "contracted_power_kw": 6.9, "feeder_id": "f1", "valid_from": switch_at.isoformat()})
    assert r.status_code in (200, 201), r.text
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1")),
                 Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (r1, r2):
        request_id = await create(hub, "/v1/emergencies", {
            "client_ids": ["c1", "c2"], "start": soon(60), "duration_s": 600, "power_limit_kw": 3.0})
        first = await r1.next("request")
        assert isinstance(first, Request) and sorted(first.client_ids) == ["c1", "c2"]
        await r1.publish(topics.up("retailers", "r1"), Ack(ack_ids=[first.msg_id]))

        after_switch = (switch_at + timedelta(minutes=30)).isoformat()
        r = await revise(hub, request_id, {"start": after_switch})
        assert r.status_code == 409, r.text
        message = r.json()["message"]
        assert re.search(r"\bc1\b", message) and "r2" in message and not re.search(r"\bc2\b", message), message
        # Neither retailer hears of a revision: r1 no longer supplies c1 then, r2 never had the request.
        await r1.nothing("request", 0.5)
        await r2.nothing("request", 0.1)
        req = await get(hub, request_id)
        assert req["revision"] == 1 and req["clients"]["c1"]["retailer_id"] == "r1"

        # A revision that stays before the switch is delivered as before, to the supplier of that time.
        r = await revise(hub, request_id, {"start": soon(120)})
        assert r.status_code == 202, r.text
        second = await r1.next("request")
        assert isinstance(second, Request) and second.revision == 2 and sorted(second.client_ids) == ["c1", "c2"]
        await r2.nothing("request", 0.3)


# -- the window between publishing a message and recording it as sent (finding 7) ------------------------------------

@asynccontextmanager
async def held_after_publish(relay: HubRelay, kind: str | Callable[[OutboxItem], bool]
                             ) -> AsyncIterator[asyncio.Event]:
    """Hold the hub's dispatch after it has published a round with a ``kind`` message (or one the function
    ``kind`` selects) and before it records the round as sent; the event is set once a round is held, and the
    round goes on when the block ends."""
    held, release = asyncio.Event(), asyncio.Event()
    selects = kind if callable(kind) else (lambda i: i.kind == kind)

    async def hold(items: list[OutboxItem]) -> None:
        if any(selects(i) for i in items) and not release.is_set():
            held.set()
            await release.wait()

    relay.on_published = hold
    try:
        yield held
    finally:
        release.set()
        relay.on_published = None


async def test_a_cancel_reaches_a_retailer_whose_request_is_published_but_not_yet_recorded(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    relay: HubRelay = hub.app.state.relay
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):  # it never acknowledges
        async with held_after_publish(relay, "request") as held:
            request_id = await create(hub, "/v1/emergencies", {
                "client_ids": ["c1"], "start": soon(60), "duration_s": 600, "power_limit_kw": 3.0})
            await asyncio.wait_for(held.wait(), 10)
            sent = await r1.next("request")  # at the retailer already, while the hub still reads c1 as pending
            assert isinstance(sent, Request) and sent.request_id == request_id
            assert (await get(hub, request_id))["clients"]["c1"]["state"] == "pending"
            r = await hub.http.post(f"/v1/requests/{request_id}/cancel", headers=hub.auth("dso"))
            assert r.status_code == 200, r.text
            assert r.json()["cancel_sent_to"] == ["r1"]
        cancel = await r1.next("cancel", timeout=10)
        assert isinstance(cancel, Cancel) and cancel.request_id == request_id and cancel.client_ids == ["c1"]
        assert cancel.revision is None, "a cancel of the whole request, not a removal"
    assert (await get(hub, request_id))["state"] == "cancelled"


async def test_a_removal_reaches_a_retailer_whose_request_is_published_but_not_yet_recorded(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    relay: HubRelay = hub.app.state.relay
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        async with held_after_publish(relay, "request") as held:
            request_id = await create(hub, "/v1/emergencies", {
                "client_ids": ["c1", "c2"], "start": soon(60), "duration_s": 600, "power_limit_kw": 3.0})
            await asyncio.wait_for(held.wait(), 10)
            sent = await r1.next("request")
            assert isinstance(sent, Request) and sorted(sent.client_ids) == ["c1", "c2"]
            r = await revise(hub, request_id, {"client_ids": ["c2"]})
            assert r.status_code == 202, r.text
        got: dict[str, Any] = {}
        while set(got) != {"request", "cancel"}:
            msg = await r1.next(timeout=10)
            if isinstance(msg, Request | Cancel):
                got[msg.type] = msg
        removal, second = got["cancel"], got["request"]
        assert isinstance(removal, Cancel) and removal.client_ids == ["c1"] and removal.revision == 2
        assert isinstance(second, Request) and second.client_ids == ["c2"] and second.revision == 2
    req = await get(hub, request_id)
    assert req["clients"]["c1"]["state"] == "cancelled"
    assert req["clients"]["c1"]["detail"]["reason"] == "removed from the request by revision 2"


async def test_the_older_revisions_send_being_recorded_never_marks_the_newer_one_sent(hub: HubHandle) -> None:
    """Revision 1 published, then the request revised before the hub recorded that send: recording it must not mark
    the clients' revision-2 entries ``sent`` (they are ``pending`` until revision 2 itself goes out)."""
    await hub.setup_registry({"c1": "r1"})
    relay: HubRelay = hub.app.state.relay
    first_held, second_held, go_on, finish = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def hold(items: list[OutboxItem]) -> None:
        if not any(i.kind == "request" for i in items):
            return
        if not first_held.is_set():
            first_held.set()
            await go_on.wait()
        else:
            second_held.set()
            await finish.wait()

    relay.on_published = hold
    try:
        with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))):
            request_id = await create(hub, "/v1/emergencies", {
                "client_ids": ["c1"], "start": soon(60), "duration_s": 600, "power_limit_kw": 3.0})
            await asyncio.wait_for(first_held.wait(), 10)
            r = await revise(hub, request_id, {"power_limit_kw": 1.5})
            assert r.status_code == 202 and r.json()["revision"] == 2, r.text
            go_on.set()  # revision 1's send is recorded now; revision 2 is published next and held
            await asyncio.wait_for(second_held.wait(), 10)
            entry = (await get(hub, request_id))["clients"]["c1"]
            assert (entry["revision"], entry["state"]) == (2, "pending"), entry
    finally:
        finish.set()
        relay.on_published = None
