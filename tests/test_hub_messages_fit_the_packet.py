"""The hub's own messages fit the brokers' packet: billing data goes in as many messages as it needs (a client's
readings in parts of its period when they alone do not fit), and a tariff that cannot fit is refused with its
reason (issue 14, "loses nothing"; docs/decisions.md, "A message that fits the brokers' packet").

The brokers take a PUBLISH packet of at most 256 KiB and cut the link of a client that sends a larger one; its
session sends the QoS 1 packet again at each reconnection. Before, the hub encoded a billing delivery of up to 100
clients in one message whatever its size (a month of quarter-hour readings is ~17 KB a client) and a tariff of up
to 10,000 periods in one (a year of hourly prices is ~800 KB): either cut the hub's own link for good, and no
retailer heard from the hub again. Through real parts: the hub (uvicorn, real SQLite) and its Mosquitto, retailer
r1's bridge and its Mosquitto, or r1 played by a paho party that acknowledges what the test says."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mhp_wire import messages, topics
from mhp_wire.messages import Ack, BillingClient, BillingData, ReadingBlock, encode
from retailer_bridge.service import Bridge
from tests.broker_fixtures import BrokerHandle, MosquittoFactory
from tests.cloud_hub.test_relay import post_emergency, wait_state
from tests.hub_fixtures import HubHandle, served_hub
from tests.mqtt_party import Party, parties
from tests.test_late_outcome_after_unreachable import bridge  # noqa: F401  (the fixture, used by name below)
from tests.waiting import eventually

VALUES_PER_BLOCK = 10_000


def _values(n: int, seed: int) -> list[float]:
    return [round(((i * 7 + seed) % 1000) / 1000, 3) for i in range(n)]


async def _upload(hub: HubHandle, client_id: str, start: datetime, resolution_s: int, values: list[float], *,
                  gaps: bool = True) -> None:
    """``values`` as blocks of at most 10,000 readings from ``start``, a few blocks per upload (the body limit); with
    ``gaps``, one interval without a reading after each block (the hub keeps such blocks apart; consecutive ones it
    stores as one)."""
    blocks = [{"client_id": client_id, "resolution_s": resolution_s, "values_kwh": values[i:i + VALUES_PER_BLOCK],
               "start": (start + timedelta(seconds=(i + (i // VALUES_PER_BLOCK if gaps else 0)) * resolution_s)
                         ).isoformat()}
              for i in range(0, len(values), VALUES_PER_BLOCK)]
    for k in range(0, len(blocks), 3):
        r = await hub.http.post("/v1/meter-readings", headers=hub.auth("dso"), json={"readings": blocks[k:k + 3]})
        assert r.status_code == 200, r.text


def _period() -> tuple[datetime, datetime]:
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=400)
    return start, start + timedelta(days=320)


async def test_billing_data_larger_than_a_packet_reaches_the_retailer_whole_in_messages_that_fit(
        hub: HubHandle, bridge: tuple[Bridge, BrokerHandle]) -> None:  # noqa: F811  (the fixture)
    """c1's readings (~140 KB) and c2's (~540 KB, more than one message alone) for one billing request: before, one
    ~680 KB message, which the hub broker refused by cutting the hub's link at every reconnection (the request
    stayed ``dispatching``); now every reading reaches r1's bridge and both clients are acknowledged."""
    b, _ = bridge
    start, end = _period()
    c1, c2 = _values(24_000, 1), _values(90_000, 2)
    await _upload(hub, "c1", start, 900, c1)
    await _upload(hub, "c2", start, 300, c2)
    r = await hub.http.post("/v1/billing-data", headers=hub.auth("dso"), json={
        "client_ids": ["c1", "c2"], "period_start": start.isoformat(), "period_end": end.isoformat()})
    assert r.status_code == 202, r.text
    req = await wait_state(hub, r.json()["request_id"], "completed", timeout=30)
    assert req["state"] == "completed", req  # before: "dispatching" for ever, the hub's link cut again and again
    assert {c["state"] for c in req["clients"].values()} == {"acknowledged"}
    for client, values in (("c1", c1), ("c2", c2)):
        rows = await b.store.billing_of(client)
        got = [v for row in rows for block in json.loads(row["readings"]) for v in block["values_kwh"]]
        assert got == values, f"{client}: every reading, in order"
        periods = [(row["period_start"], row["period_end"]) for row in rows]
        assert periods[0][0] == start.isoformat() and periods[-1][1] == end.isoformat()
        assert all(a[1] == b_[0] for a, b_ in itertools.pairwise(periods)), "consecutive parts"
    assert len(await b.store.billing_of("c2")) > 1, "c2's readings went in parts"
    assert "oversize packet" not in hub.broker.process.log_tail()


async def test_a_client_in_parts_is_acknowledged_once_every_part_is(hub: HubHandle) -> None:
    """r1 acknowledges c1's parts one by one: c1 reads ``acknowledged`` (and the request ends) only after the last."""
    await hub.setup_registry({"c1": "r1"})
    start, end = _period()
    await _upload(hub, "c1", start, 300, _values(90_000, 3))
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        r = await hub.http.post("/v1/billing-data", headers=hub.auth("dso"), json={
            "client_ids": ["c1"], "period_start": start.isoformat(), "period_end": end.isoformat()})
        request_id = r.json()["request_id"]
        parts: dict[str, BillingData] = {}
        while len(parts) < 3:  # 90,000 readings (~540 KB) are three parts; re-sends repeat their ids
            msg = await r1.next("billing_data", timeout=10)
            assert isinstance(msg, BillingData)
            parts[msg.msg_id] = msg
        assert [len(m.clients) for m in parts.values()] == [1, 1, 1]
        up = topics.up("retailers", "r1")
        book = hub.app.state.service.book
        ids = list(parts)
        for k, mid in enumerate([ids[-1], ids[0]]):  # the last part first, then the first
            await r1.publish(up, Ack(ack_ids=[mid]))
            await eventually(lambda mid=mid: book.outbox.get(mid) is None, "the hub took the ack")
            req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
            assert req["clients"]["c1"]["state"] != "acknowledged", f"after {k + 1} of {len(ids)} parts"
            assert req["state"] != "completed"
        await r1.publish(up, Ack(ack_ids=ids[1:-1]))
        req = await wait_state(hub, request_id, "completed", timeout=10)
    assert req["state"] == "completed" and req["clients"]["c1"]["state"] == "acknowledged"


async def test_a_year_of_quarter_hour_readings_is_billed(
        hub: HubHandle, bridge: tuple[Bridge, BrokerHandle]) -> None:  # noqa: F811  (the fixture)
    """35,040 consecutive readings, which the hub stores as one block: before, the billing request was refused with
    the wire model's own error (a block of at most 10,000 readings); now they go as blocks of 10,000 in parts."""
    b, _ = bridge
    start, _ = _period()
    end = start + timedelta(days=365)
    year = _values(35_040, 4)
    await _upload(hub, "c1", start, 900, year, gaps=False)
    r = await hub.http.post("/v1/billing-data", headers=hub.auth("dso"), json={
        "client_ids": ["c1"], "period_start": start.isoformat(), "period_end": end.isoformat()})
    assert r.status_code == 202, r.text  # before: 422, "List should have at most 10000 items after validation"
    req = await wait_state(hub, r.json()["request_id"], "completed", timeout=30)
    assert req["state"] == "completed" and req["clients"]["c1"]["state"] == "acknowledged", req
    rows = await b.store.billing_of("c1")
    blocks = [block for row in rows for block in json.loads(row["readings"])]
    assert [v for block in blocks for v in block["values_kwh"]] == year
    assert max(len(block["values_kwh"]) for block in blocks) == VALUES_PER_BLOCK


@pytest.mark.parametrize("offset_s", [0.0, 0.5])
def test_parts_fit_any_limit_and_keep_every_reading_in_order(offset_s: float) -> None:
    """The packing itself, with limits from a few blocks to below one block (a block cut between its values); with
    readings starting on a fraction of a second, a part's period (from its first block) is written 7 characters
    longer than the client's (on whole seconds): before, a part measured with the client's period could come out
    over the limit by that much (the reviewer's case: a billing request refused with 422 at 262,043 bytes)."""
    from cloud_hub.usecases.data import _billing_messages

    start = datetime(2020, 1, 1, tzinfo=UTC)  # a form only: the packing compares instants with each other
    first = start + timedelta(seconds=offset_s)
    clients = [BillingClient(client_id=f"c{k}", period_start=start, period_end=start + timedelta(days=40),
                             readings=[ReadingBlock(start=first + timedelta(days=d), resolution_s=900,
                                                    values_kwh=_values(96 * (k + 1) - d, d)) for d in range(0, 40, 2)])
               for k in range(4)]
    body: dict[str, Any] = {"period_start": start.isoformat(), "period_end": (start + timedelta(days=40)).isoformat()}
    for limit in (messages.SEND_PAYLOAD_BYTES, 60_000, 9_000, *range(2_500, 2_800, 7)):
        out = _billing_messages("q-1", body, {"r1": clients}, limit)
        assert all(len(o.payload) <= limit for o in out), limit
        for c in clients:
            got = [(p, b) for o in out for p in BillingData.model_validate_json(o.payload).clients
                   if p.client_id == c.client_id for b in p.readings]
            flat = [(b.start + timedelta(seconds=i * b.resolution_s), v) for _, b in got
                    for i, v in enumerate(b.values_kwh)]
            assert flat == [(b.start + timedelta(seconds=i * b.resolution_s), v) for b in c.readings
                            for i, v in enumerate(b.values_kwh)], (limit, c.client_id)
            parts = list(dict.fromkeys((p.period_start, p.period_end) for p, _ in got))
            assert parts[0][0] == c.period_start and parts[-1][1] == c.period_end
            assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
            assert all(c.client_id in o.clients for o in out
                       if any(p.client_id == c.client_id
                              for p in BillingData.model_validate_json(o.payload).clients))
    assert len(_billing_messages("q-1", body, {"r1": clients})) == 1, "what fits goes in one message, as before"


async def test_a_tariff_too_big_for_a_packet_is_refused_with_its_reason_and_a_smaller_one_still_goes(
        hub: HubHandle, bridge: tuple[Bridge, BrokerHandle]) -> None:  # noqa: F811  (the fixture)
    """A year of hourly prices (8,760 periods, ~800 KB): before, accepted (202), published retained and queued to
    every retailer, and the hub broker cut the hub's link at every reconnection. Now 422 with the size and what fits,
    nothing stored; the next tariff, which fits, reaches r1's bridge."""
    b, _ = bridge
    t0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)

    def tariff(tariff_id: str, hours: int) -> dict[str, Any]:
        return {"tariff_id": tariff_id, "valid_from": t0.isoformat(),
                "valid_to": (t0 + timedelta(hours=hours)).isoformat(),
                "periods": [{"start": (t0 + timedelta(hours=h)).isoformat(),
                             "end": (t0 + timedelta(hours=h + 1)).isoformat(),
                             "price_eur_per_kwh": round(0.1 + (h % 24) / 100, 4)} for h in range(hours)]}

    year = tariff("hourly-year", 8_760)
    r = await hub.http.post("/v1/tariffs", headers=hub.auth("dso"), json=year)
    assert r.status_code == 422, r.text  # before: 202
    reason = r.json()["message"]
    assert f"over the {messages.SEND_PAYLOAD_BYTES} bytes" in reason and "8760 periods" in reason, reason
    assert (await hub.http.get("/v1/tariffs/current", headers=hub.auth("dso"))).status_code == 404
    month = tariff("hourly-month", 24 * 31)
    r = await hub.http.post("/v1/tariffs", headers=hub.auth("dso"), json=month)
    assert r.status_code == 202, r.text
    async def at_r1() -> bool:  # r2, registered without a bridge, never acknowledges
        stored = await b.store.current_tariff()
        return stored is not None and json.loads(stored)["tariff_id"] == "hourly-month"

    await eventually(at_r1, "r1's bridge stored the month's tariff", timeout_s=20)
    assert "oversize packet" not in hub.broker.process.log_tail()
    assert len(encode(messages.Tariff.model_validate({**month, "version": 1}))) < messages.SEND_PAYLOAD_BYTES
    assert b.relay.hub is not None and b.relay.hub.stats.connects == 1


async def test_a_tariff_stored_too_big_before_is_neither_republished_nor_sent_to_a_new_retailer(hub: HubHandle) -> None:
    """A tariff stored before tariffs were sized (put in storage here as such a hub did): before, the hub published it
    retained at every connection and queued it to every retailer registered later, and the hub broker cut the hub's
    link each time. Now it is logged and left: a retailer registers without it, and requests still reach r1."""
    await hub.setup_registry({"c1": "r1"})
    t0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    book = hub.app.state.service.book
    await book.store.put_tariff({
        "tariff_id": "old-year", "valid_from": t0.isoformat(), "valid_to": (t0 + timedelta(hours=8_760)).isoformat(),
        "periods": [{"start": (t0 + timedelta(hours=h)).isoformat(), "end": (t0 + timedelta(hours=h + 1)).isoformat(),
                     "price_eur_per_kwh": 0.1234} for h in range(8_760)]})
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        assert await hub.app.state.relay.republish_tariff()  # what the hub does at each connection
        r = await hub.http.put("/v1/retailers/r3", json={"name": "R3"}, headers=hub.auth("admin"))
        assert r.status_code in (200, 201) and "tariff_request_id" not in r.json(), r.text
        request_id = await post_emergency(hub, ["c1"])
        msg = await r1.next("request", timeout=10)  # before: never (the link cut at each reconnection)
        assert msg.request_id == request_id  # type: ignore[union-attr]
    assert "oversize packet" not in hub.broker.process.log_tail()


async def test_a_message_queued_too_big_by_an_older_hub_is_not_sent_after_a_restart(
        tmp_path: Path, mosquitto_factory: MosquittoFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tariff of a year of hourly prices queued to r1 by a hub from before messages were sized (played here by a
    hub whose size checks are lifted): before, the restarted hub loaded it from the request's row and sent it, and
    the hub broker cut its link at every reconnection. Now it is logged and left (its target ends at the deadline);
    the hub's link stays up and r1 gets the next request."""
    broker = mosquitto_factory("hub", ["r1", "r2"], "hub")
    monkeypatch.setattr("cloud_hub.book.SEND_PAYLOAD_BYTES", 10**9)
    monkeypatch.setattr("cloud_hub.usecases.tariffs.SEND_PAYLOAD_BYTES", 10**9)
    monkeypatch.setattr("cloud_hub.relay.SEND_PAYLOAD_BYTES", 10**9)
    async with served_hub(tmp_path, broker) as old:
        await old.setup_registry({"c1": "r1"})
        t0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        r = await old.http.post("/v1/tariffs", headers=old.auth("dso"), json={
            "tariff_id": "year", "valid_from": t0.isoformat(), "valid_to": (t0 + timedelta(hours=8_760)).isoformat(),
            "periods": [{"start": (t0 + timedelta(hours=h)).isoformat(),
                         "end": (t0 + timedelta(hours=h + 1)).isoformat(), "price_eur_per_kwh": 0.1234}
                        for h in range(8_760)]})
        assert r.status_code == 202, r.text  # stored and queued (the old hub's link is cut for it: it stops now)
    monkeypatch.undo()
    cuts = broker.process.log_path.read_text().count("oversize packet")  # the old hub's, if any
    async with served_hub(tmp_path, broker) as hub:
        with parties(Party(broker, "r1", topics.down("retailers", "r1"))) as (r1,):
            request_id = await post_emergency(hub, ["c1"])
            msg = await r1.next("request", timeout=10)  # before: never (the link cut at each reconnection)
            assert msg.request_id == request_id  # type: ignore[union-attr]
            assert hub.app.state.relay.link.stats.connects == 1
    assert broker.process.log_path.read_text().count("oversize packet") == cuts, "the restarted hub's link: never cut"

