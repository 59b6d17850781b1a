"""The hub's change feed over a real uvicorn hub, a real Mosquitto and test retailers answering over MQTT: following
a request to its end as Server-Sent Events, resuming with Last-Event-ID (after a disconnect, after a hub restart),
authorization, neutrality, and the reset beyond the replay window. The feed's own ordering and bounded queues are
checked on the real embedded store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud_hub.api.events import frame
from cloud_hub.authz import Principal
from cloud_hub.feed import ChangeFeed, FeedItem
from cloud_hub.storage.sqlite import SqliteKV
from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Outcome, Request
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.sse import Frame, sse
from tests.hub_fixtures import HubHandle, running_hub, start_hub
from tests.mqtt_party import Party, parties

TERMINAL = {"completed", "partially_completed", "failed", "expired", "cancelled"}


@pytest.fixture
async def hub(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
              ) -> AsyncIterator[HubHandle]:
    """A hub whose feed sends a keep-alive every 0.2 s."""
    async for h in running_hub(request, tmp_path, mosquitto_factory, "sqlite", feed_keepalive_s=0.2):
        yield h


async def post_emergency(http: httpx.AsyncClient, headers: dict[str, str], clients: list[str]) -> str:
    start = datetime.now(UTC) + timedelta(seconds=60)
    r = await http.post("/v1/emergencies", headers=headers, json={
        "client_ids": clients, "start": start.isoformat(), "duration_s": 300, "power_limit_kw": 1.0})
    assert r.status_code == 202, r.text
    return str(r.json()["request_id"])


async def take_request(party: Party, rid: str) -> Request:
    msg = await party.next("request")
    assert isinstance(msg, Request)
    await party.publish(topics.up("retailers", rid), Ack(ack_ids=[msg.msg_id]))
    return msg


async def report(party: Party, rid: str, request_id: str, client_id: str, state: ClientState) -> None:
    out = Outcome(request_id=request_id, client_id=client_id, state=state, detail={"by": rid})
    await party.publish(topics.up("retailers", rid), out)
    ack = await party.next("ack")
    assert isinstance(ack, Ack) and ack.ack_ids == [out.msg_id]


def ids(frames: list[Frame]) -> list[int]:
    return [int(f.id) for f in frames if f.id is not None]


def ended(f: Frame) -> bool:
    return f.event == "request" and f.data["state"] in TERMINAL


async def test_follow_a_request_to_its_end_and_each_retailer_sees_only_its_clients(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r2", "c3": "r1"})
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1")),
                 Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (p1, p2):
        async with sse(hub.http, "/v1/events", hub.auth("dso")) as dso, \
                sse(hub.http, "/v1/events", hub.auth("r1")) as r1, \
                sse(hub.http, "/v1/events", hub.auth("r2")) as r2:
            request_id = await post_emergency(hub.http, hub.auth("dso"), ["c1", "c2", "c3"])
            first = await dso.event()
            assert first.event == "request" and first.data["request_id"] == request_id
            assert first.data["type"] == "emergency" and first.data["state"] == "accepted"
            assert first.data["clients"] == {c: {"state": "pending", "detail": {}} for c in ("c1", "c2", "c3")}
            assert first.data["event_id"] == int(first.id or 0)
            m1 = await take_request(p1, "r1")
            await take_request(p2, "r2")
            for cid in m1.client_ids:
                await report(p1, "r1", request_id, cid, ClientState.EXECUTED)
            await report(p2, "r2", request_id, "c2", ClientState.EXECUTED)
            rest = await dso.until(ended)
            frames = [first, *rest]
            assert ids(frames) == sorted(set(ids(frames))), "ids increase"
            assert frames[-1].data["state"] == "completed"
            final: dict[str, str] = {}
            for f in frames:
                final.update({c: e["state"] for c, e in f.data["clients"].items()})
            assert final == {"c1": "executed", "c2": "executed", "c3": "executed"}
            # Neutrality: each retailer follows the same request, with its own clients only.
            seen1 = await r1.until(ended)
            seen2 = await r2.until(ended)
            for seen, own in ((seen1, {"c1", "c3"}), (seen2, {"c2"})):
                assert {f.data["request_id"] for f in seen} == {request_id}
                clients = {c for f in seen for c in f.data["clients"]}
                assert clients == own
                assert all(f.data["retailers"] == {} for f in seen), "no delivery entries in an emergency"
                assert set(ids(seen)) <= set(ids(frames)), "the same events, the same ids"
            assert '"c2"' not in json.dumps([f.data for f in seen1]), "nothing of r2's client reaches r1"
            shown2 = json.dumps([f.data for f in seen2])
            assert '"c1"' not in shown2 and '"c3"' not in shown2, "nothing of r1's clients reaches r2"
            assert seen1[-1].data["state"] == seen2[-1].data["state"] == "completed"


async def test_resume_after_a_disconnect_gets_exactly_the_missed_events(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (p1,):
        async with sse(hub.http, "/v1/events", hub.auth("dso")) as control:
            async with sse(hub.http, "/v1/events", hub.auth("dso")) as s:
                request_id = await post_emergency(hub.http, hub.auth("dso"), ["c1", "c2"])
                first = await s.event()
            # Disconnected: the request moves on meanwhile.
            await take_request(p1, "r1")
            await report(p1, "r1", request_id, "c1", ClientState.EXECUTED)
            await report(p1, "r1", request_id, "c2", ClientState.REFUSED)
            everything = await control.until(ended)
            missed = [f for f in everything if int(f.id or 0) > int(first.id or 0)]
            assert missed, "events happened while disconnected"
            path = f"/v1/requests/{request_id}/events"
            async with sse(hub.http, path, {**hub.auth("dso"), "Last-Event-ID": first.id or ""}) as again:
                resumed = await again.until(lambda f: f.id == everything[-1].id)
                assert [(f.id, f.data) for f in resumed] == [(f.id, f.data) for f in missed]
                assert await again.quiet(0.5) == [], "nothing twice, nothing more"
            async with sse(hub.http, "/v1/events", hub.auth("dso"), since=first.id) as by_query:
                assert [(f.id, f.data) for f in await by_query.until(lambda f: f.id == everything[-1].id)] == [
                    (f.id, f.data) for f in missed]


async def test_resume_after_a_hub_restart_gets_exactly_the_missed_events(tmp_path: Path,
                                                                         mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("hub", ["r1", "r2"], "hub")
    server, task, tokens, url = await start_hub(tmp_path, broker, feed_keepalive_s=0.2)
    dso = {"Authorization": f"Bearer {tokens['dso']}"}
    with parties(Party(broker, "r1", topics.down("retailers", "r1"))) as (p1,):
        try:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                handle = HubHandle(url, tokens, broker, http, None)
                await handle.setup_registry({"c1": "r1", "c2": "r1"})
                async with sse(http, "/v1/events", dso) as s:
                    request_id = await post_emergency(http, dso, ["c1", "c2"])
                    await take_request(p1, "r1")
                    await report(p1, "r1", request_id, "c1", ClientState.EXECUTED)
                    before = await s.until(lambda f: f.data["clients"].get("c1", {}).get("state") == "executed")
        finally:
            server.should_exit = True
            await task
        # A new hub process on the same store (new port): the resume point of a follower of the old one still holds.
        server, task, tokens2, url = await start_hub(tmp_path, broker, feed_keepalive_s=0.2)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                dso = {"Authorization": f"Bearer {tokens2['dso']}"}
                for _ in range(300):
                    if (await http.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.02)
                mid = before[0].id or ""
                async with sse(http, "/v1/events", {**dso, "Last-Event-ID": mid}) as again:
                    replayed = await again.until(lambda f: f.id == before[-1].id)
                    assert [(f.id, f.data) for f in replayed] == [(f.id, f.data) for f in before[1:]]
                    await report(p1, "r1", request_id, "c2", ClientState.EXECUTED)
                    live = await again.until(ended)
                    assert all(int(f.id or 0) > int(before[-1].id or 0) for f in live), "ids go on after a restart"
                    assert {"c2": {"state": "executed", "detail": {"by": "r1"}}} in [f.data["clients"] for f in live]
        finally:
            server.should_exit = True
            await task


async def test_who_may_follow_what(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    request_id = await post_emergency(hub.http, hub.auth("dso"), ["c1"])
    for path in ("/v1/events", f"/v1/requests/{request_id}/events"):
        r = await hub.http.get(path)
        assert r.status_code == 401, r.text
        r = await hub.http.get(path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await hub.http.get(path, headers=hub.auth("admin"))
        assert r.status_code == 403 and "administrator" in r.json()["message"]
    # A request that concerns none of r2's clients is, to r2, a request that does not exist.
    r2_view = await hub.http.get(f"/v1/requests/{request_id}/events", headers=hub.auth("r2"))
    unknown = await hub.http.get("/v1/requests/nope/events", headers=hub.auth("r2"))
    assert r2_view.status_code == unknown.status_code == 404
    assert r2_view.json()["message"] == f"request {request_id!r} does not exist"
    assert (await hub.http.get("/v1/requests/nope/events", headers=hub.auth("dso"))).status_code == 404
    bad = await hub.http.get("/v1/events", headers={**hub.auth("dso"), "Last-Event-ID": "yesterday"})
    assert bad.status_code == 422 and "event id" in bad.json()["message"]
    async with sse(hub.http, f"/v1/requests/{request_id}/events", hub.auth("r1"), since="0") as r1:
        assert (await r1.event()).event == "reset", "r1 may follow the request of its client"


async def test_a_resume_point_older_than_the_window_gets_a_reset_then_live_events(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    await post_emergency(hub.http, hub.auth("dso"), ["c1"])
    async with sse(hub.http, "/v1/events", {**hub.auth("dso"), "Last-Event-ID": "1"}) as s:
        reset = await s.event()
        assert reset.event == "reset" and "GET" in reset.data["reason"]
        assert int(reset.id or 0) == reset.data["event_id"] > 1
        while (quiet := await s.frame(5)).event is not None:  # the first request's dispatch, live
            assert int(quiet.id or 0) > int(reset.id or 0)
        assert quiet.comments == ["keep-alive"], "a comment line keeps a quiet stream open"
        request_id = await post_emergency(hub.http, hub.auth("dso"), ["c1"])
        live = await s.event()
        assert live.data["request_id"] == request_id and int(live.id or 0) > int(reset.id or 0)


# -- the feed on the real embedded store: ordering and bounded queues ----------------------------------------------


@pytest.fixture
async def feed(tmp_path: Path) -> AsyncIterator[ChangeFeed]:
    kv = SqliteKV(tmp_path / "feed.db")
    await kv.open()
    try:
        yield ChangeFeed(kv, queue_max=3)
    finally:
        await kv.close()


def write(client_id: str, state: str) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    return ("q1", {f"c:{client_id}": {"state": state, "retailers": {"r1": state}}}, None)


META = {"type": "emergency", "issuer": "dso", "state": "accepted"}


async def test_events_are_published_in_id_order_once_durable(feed: ChangeFeed) -> None:
    created = await feed.stage([("q1", {"c:c1": {"state": "pending", "retailers": {"r1": "pending"}}}, META)])
    await feed.kv.batch(created.mutations)
    feed.settle(created, durable=True)
    stream = feed.follow(Principal("dso"))
    pull = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    low = await feed.stage([write("c1", "sent")])
    high = await feed.stage([write("c1", "executed")])
    await feed.kv.batch(high.mutations)
    feed.settle(high, durable=True)
    assert feed.watermark == created.events[0]["event_id"], "a later id waits for the earlier one"
    await feed.kv.batch(low.mutations)
    feed.settle(low, durable=True)
    assert (await pull).event_id == low.events[0]["event_id"]
    assert (await anext(stream)).event_id == high.events[0]["event_id"] == feed.watermark
    failed = await feed.stage([write("c1", "refused")])
    feed.settle(failed, durable=False)
    after = await feed.stage([write("c1", "executed")])
    await feed.kv.batch(after.mutations)
    feed.settle(after, durable=True)
    assert (await anext(stream)).event_id == after.events[0]["event_id"], "a failed write's event is never shown"
    await stream.aclose()


async def test_a_follower_that_falls_behind_is_closed_and_resumes_from_its_last_id(feed: ChangeFeed) -> None:
    created = await feed.stage([("q1", {"c:c1": {"state": "pending", "retailers": {"r1": "pending"}}}, META)])
    await feed.kv.batch(created.mutations)
    feed.settle(created, durable=True)
    stream = feed.follow(Principal("retailer", "r1"), since=feed.watermark)
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    written = []
    for state in ("sent", "acknowledged", "executed", "sent", "executed", "acknowledged"):
        staged = await feed.stage([write("c1", state)])
        await feed.kv.batch(staged.mutations)
        feed.settle(staged, durable=True)
        written.append(staged.events[0]["event_id"])
    got = [(await first).event_id]
    got += [item.event_id async for item in stream]  # the queue (3) drained, then the stream ends
    assert got == written[: len(got)] and len(got) < len(written)
    resumed = feed.follow(Principal("retailer", "r1"), since=got[-1])
    rest = [(await anext(resumed)).event_id for _ in range(len(written) - len(got))]
    assert got + rest == written
    await resumed.aclose()


async def test_the_events_queued_for_a_follower_come_in_one_batch_in_order(tmp_path: Path) -> None:
    kv = SqliteKV(tmp_path / "feed.db")
    await kv.open()
    try:
        feed = ChangeFeed(kv, queue_max=100)
        batches = feed.follow_batches(Principal("dso"), keepalive_s=3600, announce=True)
        assert [i.kind for i in await anext(batches)] == ["open"]
        written = []
        writes = [("q1", {"c:c1": {"state": "pending", "retailers": {"r1": "pending"}}}, META),
                  *[write("c1", s) for s in ("sent", "acknowledged", "executed")]]
        for w in writes:  # all durable before the follower wakes: one batch
            staged = await feed.stage([w])
            await kv.batch(staged.mutations)
            feed.settle(staged, durable=True)
            written.append(staged.events[0]["event_id"])
        batch = await anext(batches)
        assert [i.event_id for i in batch] == written and {i.kind for i in batch} == {"request"}
        assert [i.data["clients"]["c1"]["state"] for i in batch] == ["pending", "sent", "acknowledged", "executed"]
        later = await feed.stage([write("c1", "refused")])
        await kv.batch(later.mutations)
        feed.settle(later, durable=True)
        assert [i.event_id for i in await anext(batches)] == [later.events[0]["event_id"]]
        await batches.aclose()
        assert not feed._followers, "a closed stream is no follower any more"
    finally:
        await kv.close()


async def test_a_streams_chunks_are_whole_frames_in_id_order(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    async with hub.http.stream("GET", "/v1/events", headers=hub.auth("dso"), timeout=30) as r:
        chunks = r.aiter_bytes()
        assert await anext(chunks) == b"retry: 1000\n\n"
        request_id = await post_emergency(hub.http, hub.auth("dso"), ["c1", "c2"])
        seen: list[dict[str, Any]] = []
        while not any(d["request_id"] == request_id for d in seen):
            # Each chunk is the events queued for the stream when it woke: whole frames, never a part of one.
            frames = (await asyncio.wait_for(anext(chunks), 10)).decode().split("\n\n")
            assert frames[-1] == ""
            for f in frames[:-1]:
                id_line, event_line, data_line = f.split("\n")
                data = json.loads(data_line.removeprefix("data: "))
                assert id_line == f"id: {data['event_id']}" and event_line == "event: request"
                seen.append(data)
        assert [d["event_id"] for d in seen] == sorted({d["event_id"] for d in seen})
        first = next(d for d in seen if d["request_id"] == request_id)
        assert first["state"] == "accepted" and set(first["clients"]) == {"c1", "c2"}


async def test_followers_of_one_principal_share_its_view_and_a_retailer_gets_its_own(feed: ChangeFeed) -> None:
    dso1 = feed.follow(Principal("dso"), keepalive_s=3600, announce=True)
    dso2 = feed.follow(Principal("dso"), keepalive_s=3600, announce=True)
    r2 = feed.follow(Principal("retailer", "r2"), keepalive_s=3600, announce=True)
    for s in (dso1, dso2, r2):
        assert (await anext(s)).kind == "open"
    staged = await feed.stage([("q1", {"c:c1": {"state": "pending", "retailers": {"r1": "pending"}},
                                       "c:c2": {"state": "pending", "retailers": {"r2": "pending"}}}, META)])
    await feed.kv.batch(staged.mutations)
    feed.settle(staged, durable=True)
    a, b, c = (await anext(dso1)), (await anext(dso2)), (await anext(r2))
    assert a.data == b.data and set(a.data["clients"]) == {"c1", "c2"}
    assert set(c.data["clients"]) == {"c2"} and c.event_id == a.event_id
    for s in (dso1, dso2, r2):
        await s.aclose()


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_a_line_separator_in_an_event_does_not_cut_its_data_line_for_a_python_reader(separator: str) -> None:
    """Found in review: orjson writes U+2028, U+2029 and U+0085 raw, and httpx's line reader (the DSO console's
    relay of this stream) splits at them as str.splitlines does: a retailer's ``detail`` text cut the DSO's event."""
    data = {"clients": {"c1": {"detail": {"why": f"relay{separator}stuck"}}}}
    lines = httpx._decoders.LineDecoder().decode(frame(FeedItem("request", 1, data)).decode())
    assert [json.loads(line[6:]) for line in lines if line.startswith("data: ")] == [data]


async def test_a_one_at_a_time_follower_overflows_at_queue_max_behind(feed: ChangeFeed) -> None:
    """Found in review: ``follow`` took up to BATCH_MAX events off the queue at once, so a slow webhook worker was
    queue_max + 499 events behind before it overflowed, not queue_max as documented."""
    created = await feed.stage([("q1", {"c:c1": {"state": "pending", "retailers": {"r1": "pending"}}}, META)])
    await feed.kv.batch(created.mutations)
    feed.settle(created, durable=True)
    stream = feed.follow(Principal("dso"), keepalive_s=3600)
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)

    async def settle_together(states: tuple[str, ...]) -> None:  # published in one turn of the loop
        staged = []
        for state in states:
            staged.append(await feed.stage([write("c1", state)]))
            await feed.kv.batch(staged[-1].mutations)
        for one in staged:
            feed.settle(one, durable=True)

    await settle_together(("sent", "acknowledged", "executed"))  # the first to the waiting follower, two queued
    await first  # the follower took one event; two are still queued for it
    await settle_together(("refused", "executed"))  # now four behind: more than queue_max (3)
    assert any(f.overflowed for f in feed._followers)
    await stream.aclose()

