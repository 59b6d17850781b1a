"""The first sends' ``sent`` marks, settled before they are written (issue 14, tenth round; docs/decisions.md,
"The first sends' marks settle").

A real hub (uvicorn, SQLite in ``tmp_path``, its real Mosquitto), retailers played by MQTT parties. The relay's
injected clock (``HubRelay.clock``, which times dispatch, the marks' settling and deadlines) is shifted forward
to let the marks settle, instead of waiting for :data:`~cloud_hub.book.SENT_SETTLE_S`. What is checked: a target
answered before its mark settled gets no ``sent`` rewrite and no change-feed entry for it; a silent target shows
``sent`` once settled, with its send time; a revision, a cancel and a deadline between the send and the settle;
a hub stopped (gracefully) meanwhile writes its waiting marks and, started again, carries the request on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import cloud_hub.book
from cloud_hub import feed as feed_module
from cloud_hub.authz import Principal
from cloud_hub.book import SENT_SETTLE_S, ReportedOutcome, RequestBook
from cloud_hub.codec import loads
from cloud_hub.relay import HubRelay
from cloud_hub.settings import HubSettings
from mhp_wire import topics
from mhp_wire.messages import Ack, Cancel, ClientState, Outcome, Request
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.embedded_hub import embedded_hub
from tests.cloud_hub.test_revise_edges import held_after_publish
from tests.hub_fixtures import HubHandle, running_hub, served_hub
from tests.mqtt_party import Party, parties
from tests.waiting import eventually

UP = topics.up("retailers", "r1")


class ShiftedClock:
    """The wall clock, shifted forward by :attr:`shift` seconds (the relay's injected clock in these tests)."""

    def __init__(self) -> None:
        self.shift = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift


HELD_S = 3_600.0
"""The settle time of these tests' hubs: no mark settles by real time passing (a test on a loaded machine may take
more than :data:`SENT_SETTLE_S` between a send and its answer), only when :func:`settle` moves the clock."""


def shifted(hub: HubHandle) -> tuple[HubRelay, ShiftedClock]:
    relay: HubRelay = hub.app.state.relay
    clock = ShiftedClock()
    relay.clock = clock
    hub.app.state.service.book.sent_settle_s = HELD_S
    return relay, clock


def settle(relay: HubRelay, clock: ShiftedClock) -> None:
    """Let every waiting mark settle: the clock moves past the settle time, the dispatcher wakes."""
    clock.shift += HELD_S + 1.0
    relay.kick()


def soon(seconds: float = 60) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


async def emergency(hub: HubHandle, clients: list[str], **body: Any) -> str:
    r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json={
        "client_ids": clients, "start": soon(60), "duration_s": 600, "power_limit_kw": 2.0, **body})
    assert r.status_code == 202, r.text
    request_id: str = r.json()["request_id"]
    return request_id


async def view(hub: HubHandle, request_id: str) -> dict[str, Any]:
    r = await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def client_is(hub: HubHandle, request_id: str, client_id: str, state: str) -> Callable[[], Any]:
    async def check() -> bool:
        return bool((await view(hub, request_id))["clients"][client_id]["state"] == state)
    return check


async def stored_events(hub: HubHandle, request_id: str) -> list[dict[str, Any]]:
    """The change feed's stored events of one request, in order (what SSE and webhooks replay)."""
    rows = await hub.app.state.store.kv.scan(feed_module.TABLE, start=feed_module.event_key(0),
                                             stop=feed_module.LAST_ROW)
    events = [loads(cells["e:d"]) for _, cells in rows]
    return [e for e in events if e["request_id"] == request_id]


def marked_sent(events: list[dict[str, Any]]) -> list[str]:
    """The clients the events show becoming ``sent``, in order."""
    return [c for e in events for c, entry in e["clients"].items() if entry["state"] == ClientState.SENT.value]


async def test_a_target_answered_before_the_settle_gets_no_sent_mark_and_a_silent_one_gets_its_send_time(
        hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    relay, clock = shifted(hub)
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        before = time.time()
        request_id = await emergency(hub, ["c1", "c2"])
        msg = await r1.next("request")
        assert isinstance(msg, Request) and sorted(msg.client_ids) == ["c1", "c2"]
        published_by = time.time()
        await r1.publish(UP, Ack(ack_ids=[msg.msg_id]))
        await r1.publish(UP, Outcome(request_id=request_id, client_id="c1", state=ClientState.EXECUTED))
        await eventually(client_is(hub, request_id, "c1", "executed"), "c1 executed")
        # Not settled yet: the silent client still reads pending (the trade), the request is dispatching all the
        # same (c1 moved it).
        body = await view(hub, request_id)
        assert body["clients"]["c2"]["state"] == "pending" and body["state"] == "dispatching"

        settle(relay, clock)
        await eventually(client_is(hub, request_id, "c2", "sent"), "c2 sent once settled")
    body = await view(hub, request_id)
    # Its send time, not the settle's (the clock was shifted past it since), and the request's first dispatch.
    assert before <= epoch(body["clients"]["c2"]["updated_at"]) <= published_by
    assert body["clients"]["c1"]["state"] == "executed"
    assert 0 <= body["trace"]["dispatch_ms"] <= (published_by - before) * 1000
    # The feed holds one `sent` for c2, none for c1: c1 went from pending to executed.
    assert marked_sent(await stored_events(hub, request_id)) == ["c2"]


async def test_a_request_every_home_answered_before_the_settle_has_its_first_dispatch_time_at_once(
        hub: HubHandle) -> None:
    """The trace's ``dispatch_ms`` is there as soon as the request has ended, before its marks settle (it is written
    with the first send, without a feed entry); the settle then writes nothing."""
    await hub.setup_registry({"c1": "r1"})
    relay, clock = shifted(hub)
    book: RequestBook = hub.app.state.service.book
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        before = time.time()
        request_id = await emergency(hub, ["c1"])
        msg = await r1.next("request")
        published_by = time.time()
        await r1.publish(UP, Ack(ack_ids=[msg.msg_id]))
        await r1.publish(UP, Outcome(request_id=request_id, client_id="c1", state=ClientState.EXECUTED))
        await eventually(client_is(hub, request_id, "c1", "executed"), "c1 executed")
        body = await view(hub, request_id)
        assert body["state"] == "completed" and book.next_settle() is not None  # its mark still waits
        assert 0 <= body["trace"]["dispatch_ms"] <= (published_by - before) * 1000
        events_before = await stored_events(hub, request_id)
        settle(relay, clock)
        await eventually(lambda: book.next_settle() is None, "the mark settled")
        assert (await view(hub, request_id))["trace"]["dispatch_ms"] == body["trace"]["dispatch_ms"]
    # Neither the first dispatch time nor the settle wrote a feed entry: no target changed, nor the request's state.
    assert await stored_events(hub, request_id) == events_before
    assert marked_sent(events_before) == []


async def test_a_revision_between_send_and_settle_is_not_marked_sent_by_the_older_revisions_mark(
        hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    relay, clock = shifted(hub)
    book: RequestBook = hub.app.state.service.book
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):  # it never acknowledges
        request_id = await emergency(hub, ["c1"])
        first = await r1.next("request")
        assert isinstance(first, Request) and first.revision == 1
        async with held_after_publish(relay, lambda i: i.revision == 2) as held:
            r = await hub.http.post(f"/v1/requests/{request_id}/revise", headers=hub.auth("dso"),
                                    json={"power_limit_kw": 1.0})
            assert r.status_code == 202, r.text
            await asyncio.wait_for(held.wait(), 10)  # revision 2 at the broker, its round not yet recorded
            # Revision 1's mark settles now (the dispatcher, held, cannot: written here as it would be).
            assert await book.settle_due(clock() + HELD_S + 1) >= 1
            body = await view(hub, request_id)
            assert body["clients"]["c1"]["state"] == "pending" and body["clients"]["c1"]["revision"] == 2
        settle(relay, clock)  # revision 2's own mark, recorded once released, settles
        await eventually(client_is(hub, request_id, "c1", "sent"), "c1 sent by revision 2's mark")
    assert (await view(hub, request_id))["clients"]["c1"]["revision"] == 2


async def test_a_cancel_between_send_and_settle_leaves_the_clients_cancelled(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    relay, clock = shifted(hub)
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):  # it never acknowledges
        request_id = await emergency(hub, ["c1", "c2"])
        await r1.next("request")
        r = await hub.http.post(f"/v1/requests/{request_id}/cancel", headers=hub.auth("dso"))
        assert r.status_code in (200, 202), r.text
        cancel = await r1.next("cancel")  # the cancel reaches the retailer whether its clients read sent or not
        assert isinstance(cancel, Cancel) and sorted(cancel.client_ids) == ["c1", "c2"]
        settle(relay, clock)
        await eventually(lambda: _dispatch_ms_written(hub, request_id), "the settled mark's first dispatch time")
    body = await view(hub, request_id)
    assert body["state"] == "cancelled"
    assert {c: e["state"] for c, e in body["clients"].items()} == {"c1": "cancelled", "c2": "cancelled"}
    assert marked_sent(await stored_events(hub, request_id)) == []


async def test_a_deadline_between_send_and_settle_ends_the_clients_unreachable(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    relay, clock = shifted(hub)
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):  # it never acknowledges
        request_id = await emergency(hub, ["c1"])
        await r1.next("request")
        # Past the request's deadline (start + duration) and the mark's settle at once: whichever the hub does
        # first, sent and pending end alike (`state_after_deadline`).
        clock.shift += 3_600
        relay.kick()
        await eventually(client_is(hub, request_id, "c1", "unreachable"), "c1 unreachable after the deadline")
        await eventually(lambda: _dispatch_ms_written(hub, request_id), "the settled mark's first dispatch time")
    body = await view(hub, request_id)
    assert body["state"] in ("failed", "expired") and body["clients"]["c1"]["state"] == "unreachable"


async def _dispatch_ms_written(hub: HubHandle, request_id: str) -> bool:
    return "dispatch_ms" in (await view(hub, request_id))["trace"]


async def test_a_hub_stopped_between_send_and_settle_writes_its_marks_and_carries_on_after_a_restart(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("hub", ["r1", "r2"], "hub")
    async with served_hub(tmp_path, broker) as hub:
        await hub.setup_registry({"c1": "r1", "c2": "r1"})
        book: RequestBook = hub.app.state.service.book
        book.sent_settle_s = HELD_S  # the marks wait until the hub stops
        with parties(Party(broker, "r1", topics.down("retailers", "r1"))) as (r1,):  # no ack before the stop
            request_id = await emergency(hub, ["c1", "c2"])
            await r1.next("request")
            await eventually(lambda: book.next_settle() is not None, "the round's marks wait")
            body = await view(hub, request_id)
            assert {c: e["state"] for c, e in body["clients"].items()} == {"c1": "pending", "c2": "pending"}

    async with served_hub(tmp_path, broker) as hub:
        with parties(Party(broker, "r1", topics.down("retailers", "r1"))) as (r1,):
            # Written at the stop: both read sent, nothing lost.
            body = await view(hub, request_id)
            assert {c: e["state"] for c, e in body["clients"].items()} == {"c1": "sent", "c2": "sent"}
            # The unacknowledged request is sent again by the restarted hub; the retailer carries it through.
            msg = await r1.next("request", timeout=30)
            assert isinstance(msg, Request) and msg.request_id == request_id
            await r1.publish(UP, Ack(ack_ids=[msg.msg_id]))
            for cid in ("c1", "c2"):
                await r1.publish(UP, Outcome(request_id=request_id, client_id=cid, state=ClientState.EXECUTED))

            async def completed() -> bool:
                return bool((await view(hub, request_id))["state"] == "completed")
            await eventually(completed, "the request completed after the restart")


async def test_the_settled_marks_read_only_the_targets_not_answered_meanwhile(tmp_path: Path) -> None:
    """The book's own store calls (real SQLite): the settle reads the cells of the silent clients only, and writes
    them alone; the answered ones are neither read nor written again."""
    async with embedded_hub(tmp_path / "hub.db") as hub:
        store, book = hub.store, hub.book
        await store.put_retailer("r1", "R1")
        ids = [f"c{i:02d}" for i in range(20)]
        await store.import_clients([(c, "r1", 5.0, None, time.time() - 86_400) for c in ids])
        accepted = await hub.service.flexibility.create_emergency(Principal.parse("dso"), {
            "client_ids": ids, "start": soon(300), "duration_s": 600, "power_limit_kw": 2.0}, None)
        request_id = accepted.request_id
        await book.expanded(request_id)
        sent_at = time.time()
        items = [i for i in book.due(sent_at) if i.request_id == request_id]
        await book.mark_sent(items, sent_at)
        answered, silent = ids[::2], ids[1::2]
        await book.apply([ReportedOutcome("r1", request_id, c, ClientState.EXECUTED) for c in answered])
        read: list[list[str]] = []
        written: list[dict[str, Any]] = []
        get_cells, update = store.get_requests_cells, store.update_requests

        async def reading(columns: dict[str, list[str]], **kw: Any) -> Any:
            read.extend(columns.values())
            return await get_cells(columns, **kw)

        async def writing(writes: list[Any], audit: Any = None) -> None:
            written.extend(put for _, put, _, _ in writes)
            await update(writes, audit)

        store.get_requests_cells = reading  # type: ignore[method-assign]
        store.update_requests = writing  # type: ignore[method-assign]
        assert await book.settle_due(sent_at + book.sent_settle_s - 0.01) == 0  # not settled yet
        assert await book.settle_due(sent_at + book.sent_settle_s) == len(items)
        assert book.next_settle() is None
        assert [sorted(c[2:] for c in cols if c.startswith("c:")) for cols in read] == [sorted(silent)]
        assert [sorted(c[2:] for c in put if c.startswith("c:")) for put in written] == [sorted(silent)]
        stored = await store.get_request(request_id)
        assert stored is not None
        states = {c: e["state"] for c, e in stored["clients"].items()}
        assert states == {c: "executed" if c in answered else "sent" for c in ids}
        assert {stored["clients"][c]["updated_at"] for c in silent} == {sent_at}


async def test_the_hubs_setting_reaches_the_book(
        request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """``sent_settle_s`` (``HubSettings``, by default :data:`SENT_SETTLE_S`) reaches the book: an operator who wants
    ``sent`` shown at once sets 0 (what 0 does: :func:`test_a_settle_of_zero_writes_the_marks_with_the_send`)."""
    assert HubSettings().sent_settle_s == SENT_SETTLE_S
    async with contextlib.asynccontextmanager(running_hub)(request, tmp_path, mosquitto_factory, "sqlite",
                                                             sent_settle_s=0) as hub:
        assert hub.app.state.service.book.sent_settle_s == 0


async def test_a_settle_of_zero_writes_the_marks_with_the_send(tmp_path: Path) -> None:
    """``sent_settle_s`` 0: the first send's marks are written by ``mark_sent`` itself, nothing waits to settle."""
    async with embedded_hub(tmp_path / "hub.db") as hub:
        store, book = hub.store, hub.book
        book.sent_settle_s = 0
        await store.put_retailer("r1", "R1")
        await store.import_clients([("c1", "r1", 5.0, None, time.time() - 86_400)])
        accepted = await hub.service.flexibility.create_emergency(Principal.parse("dso"), {
            "client_ids": ["c1"], "start": soon(300), "duration_s": 600, "power_limit_kw": 2.0}, None)
        sent_at = time.time()
        await book.mark_sent([i for i in book.due(sent_at) if i.request_id == accepted.request_id], sent_at)
        assert book.next_settle() is None
        stored = await store.get_request(accepted.request_id)
        assert stored is not None and stored["clients"]["c1"]["state"] == ClientState.SENT.value
        assert stored["clients"]["c1"]["updated_at"] == sent_at


async def test_marks_of_two_requests_cut_into_chunks_at_a_requests_first_mark_are_all_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Marks are written in chunks of about ``SENT_CHUNK_CLIENTS`` clients. When a request's first mark began a new
    chunk, the chunk before it held an empty list for that request, and its write raised ``ValueError`` (the
    earliest send of no mark): the dispatch loop died and every mark of the batch was lost (review of s11-sent).
    Here a chunk of 2 clients stands for 3,000, the request of 2 clients for one of 6,000."""
    monkeypatch.setattr(cloud_hub.book, "SENT_CHUNK_CLIENTS", 2)
    async with embedded_hub(tmp_path / "hub.db") as hub:
        store, book = hub.store, hub.book
        await store.put_retailer("r1", "R1")
        await store.import_clients([(c, "r1", 5.0, None, time.time() - 86_400) for c in ("c1", "c2", "c3")])
        ids = [(await hub.service.flexibility.create_emergency(Principal.parse("dso"), {
            "client_ids": clients, "start": soon(300), "duration_s": 600, "power_limit_kw": 2.0}, None)).request_id
            for clients in (["c1", "c2"], ["c3"])]
        sent_at = time.time()
        await book.mark_sent(book.due(sent_at), sent_at)
        assert await book.settle_due(sent_at + book.sent_settle_s) == 2
        for request_id in ids:
            stored = await store.get_request(request_id)
            assert stored is not None
            assert {e["state"] for e in stored["clients"].values()} == {ClientState.SENT.value}, request_id


async def test_an_availability_questions_mark_does_not_land_on_the_second_phases_pending_clients(
        tmp_path: Path) -> None:
    """A load reduction's question is sent, every home answers within the settle, and the phase ends: the chosen
    client is set ``pending`` again for its dispatch (same revision). The question's mark, settling after that,
    marked it ``sent`` with the question's send time, although its dispatch had not gone out (review of s11-sent).
    A target written after the send is left alone."""
    async with embedded_hub(tmp_path / "hub.db") as hub:
        store, book = hub.store, hub.book
        await store.put_retailer("r1", "R1")
        await store.import_clients([(c, "r1", 5.0, None, time.time() - 86_400) for c in ("c1", "c2")])
        request_id = (await hub.service.flexibility.create_load_reduction(Principal.parse("dso"), {
            "client_ids": ["c1", "c2"], "reduction_kw": 3.0, "start": soon(300), "duration_s": 600,
            "respond_within_s": 60}, None)).request_id
        await book.expanded(request_id)
        sent_at = time.time()
        await book.mark_sent([i for i in book.due(sent_at) if i.request_id == request_id], sent_at)
        await book.apply([ReportedOutcome("r1", request_id, "c1", ClientState.AVAILABLE, {"available_kw": 4.0}),
                          ReportedOutcome("r1", request_id, "c2", ClientState.UNAVAILABLE, {})])
        await hub.service.flexibility.finish_availability(request_id)  # c1 chosen: pending for its dispatch
        await book.settle_due(sent_at + book.sent_settle_s)  # the dispatch itself not sent (say, r1 is offline)
        stored = await store.get_request(request_id)
        assert stored is not None and stored["clients"]["c1"]["state"] == ClientState.PENDING.value


async def test_a_replica_whose_request_was_adopted_meanwhile_writes_no_mark(tmp_path: Path) -> None:
    """Only the owner writes a request's row (as for outcomes). A replica's marks wait ``sent_settle_s``; a replica
    that lost the broker in that time may have had the request adopted by another, and a settle already on its way
    wrote the row all the same (review of s11-sent). The settle reads the row's owner and leaves another's alone."""
    async with embedded_hub(tmp_path / "hub.db") as hub:
        store, book = hub.store, hub.book
        book.replica_id = "a"
        await store.put_retailer("r1", "R1")
        await store.import_clients([("c1", "r1", 5.0, None, time.time() - 86_400)])
        adopted, kept = [(await hub.service.flexibility.create_emergency(Principal.parse("dso"), {
            "client_ids": ["c1"], "start": soon(300), "duration_s": 600, "power_limit_kw": 2.0}, None)).request_id
            for _ in range(2)]
        sent_at = time.time()
        await book.mark_sent(book.due(sent_at), sent_at)
        await store.set_owner(adopted, "b")  # adopted by replica b while the marks waited
        assert await book.settle_due(sent_at + book.sent_settle_s) == 2
        for request_id, state in ((adopted, ClientState.PENDING), (kept, ClientState.SENT)):
            stored = await store.get_request(request_id)
            assert stored is not None and stored["clients"]["c1"]["state"] == state.value, request_id
