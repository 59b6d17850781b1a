"""The hub's MQTT side against a real Mosquitto, with test retailers as paho clients: neutral fan-out, the stored
outbox re-sending until an application-level ack, outcomes, and hostile or malformed messages."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

from cloud_hub.usecases.flexibility import reduction_items
from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, ErrorReply, Outcome, Request, decode
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties


async def post_emergency(hub: HubHandle, clients: list[str], lead_s: float = 30) -> str:
    start = datetime.now(UTC) + timedelta(seconds=lead_s)
    r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json={
        "client_ids": clients, "start": start.isoformat(), "duration_s": 300, "power_limit_kw": 1.0})
    assert r.status_code == 202, r.text
    return str(r.json()["request_id"])


async def wait_state(hub: HubHandle, request_id: str, state: str, timeout: float = 5.0) -> dict:  # type: ignore[type-arg]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
        if req["state"] == state or asyncio.get_running_loop().time() > deadline:
            return req  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)


def metric(text: str, name: str, **labels: str) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}{{{re.escape(sel)}}} ([0-9.e+]+)$" if labels else rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_each_retailer_gets_only_its_clients_and_outcomes_complete_the_request(hub_any: HubHandle) -> None:
    hub = hub_any
    await hub.setup_registry({"c1": "r1", "c2": "r2", "c3": "r1"})
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1")),
                 Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (r1, r2):
        request_id = await post_emergency(hub, ["c1", "c2", "c3"])
        got1, got2 = await r1.next("request"), await r2.next("request")
        assert isinstance(got1, Request) and isinstance(got2, Request)
        assert sorted(got1.client_ids) == ["c1", "c3"]
        assert got2.client_ids == ["c2"]
        assert got1.request_id == got2.request_id == request_id
        assert got1.params.power_limit_kw == 1.0
        for party, msg, rid in ((r1, got1, "r1"), (r2, got2, "r2")):
            await party.publish(topics.up("retailers", rid), Ack(ack_ids=[msg.msg_id]))
            for cid in msg.client_ids:
                out = Outcome(request_id=request_id, client_id=cid, state=ClientState.EXECUTED,
                              detail={"shed": ["heater"]}, trace={"retailer_ms": 1.5, "gateway_ms": 4.0})
                await party.publish(topics.up("retailers", rid), out)
                ack = await party.next("ack")
                assert isinstance(ack, Ack) and ack.ack_ids == [out.msg_id]
        req = await wait_state(hub, request_id, "completed")
        assert req["state"] == "completed"
        assert {c["state"] for c in req["clients"].values()} == {"executed"}
        assert req["retailers"] == {"r1": {"clients": 2, "states": {"executed": 2}},
                                    "r2": {"clients": 1, "states": {"executed": 1}}}
        assert req["trace"]["retailer_ms"] == 1.5 and req["trace"]["gateway_ms"] == 4.0
        assert req["completed_at"] is not None
        # A redelivered outcome changes nothing but is acknowledged again, so the bridge stops re-sending it.
        dup = Outcome(request_id=request_id, client_id="c2", state=ClientState.REFUSED)
        await r2.publish(topics.up("retailers", "r2"), dup)
        assert (await r2.next("ack")).ack_ids == [dup.msg_id]  # type: ignore[union-attr]
        req = await wait_state(hub, request_id, "completed")
        assert req["clients"]["c2"]["state"] == "executed"


async def test_unacknowledged_request_is_sent_again_until_acked(hub_any: HubHandle) -> None:
    hub = hub_any
    await hub.setup_registry({"c1": "r1"})
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        await post_emergency(hub, ["c1"])
        first = await r1.next("request")
        again = await r1.next("request", timeout=3)
        assert again.msg_id == first.msg_id, "a re-send carries the same message id, so receivers can dedupe"
        await r1.publish(topics.up("retailers", "r1"), Ack(ack_ids=[first.msg_id]))
        await asyncio.sleep(0.2)
        while not r1.client.messages.empty():
            r1.client.messages.get_nowait()
        await r1.nothing("request", within=2.5)


async def test_malformed_and_hostile_messages_are_refused_counted_and_the_hub_keeps_serving(hub_any: HubHandle) -> None:
    hub = hub_any
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1")),
                 Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (r1, r2):
        request_id = await post_emergency(hub, ["c1", "c2"])
        await r1.next("request")
        # Garbage, then a well-formed message the hub does not take from a retailer.
        await r1.publish(topics.up("retailers", "r1"), b"\x00garbage{")
        err = await r1.next("error")
        assert isinstance(err, ErrorReply) and err.code == "invalid"
        # r1 claims an outcome for r2's client: refused, and c2 is untouched.
        hostile = Outcome(request_id=request_id, client_id="c2", state=ClientState.REFUSED)
        await r1.publish(topics.up("retailers", "r1"), hostile)
        err = await r1.next("error")
        assert isinstance(err, ErrorReply) and err.code == "forbidden" and err.ref_msg_id == hostile.msg_id
        # An outcome for a request that does not exist: answered as the one above (neutrality).
        ghost = Outcome(request_id="nope", client_id="c1", state=ClientState.EXECUTED)
        await r1.publish(topics.up("retailers", "r1"), ghost)
        err2 = await r1.next("error")
        assert isinstance(err2, ErrorReply) and (err2.code, err2.message) == (err.code, err.message)
        text = (await hub.http.get("/metrics")).text
        assert metric(text, "mhp_mqtt_rejected_total", reason="invalid") == 1
        assert metric(text, "mhp_mqtt_rejected_total", reason="forbidden") == 2
        req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
        assert req["clients"]["c2"]["state"] in ("sent", "pending")
        # Everyone else is still served: r2 completes its client normally.
        await r2.next("request")
        await r2.publish(topics.up("retailers", "r2"),
                         Outcome(request_id=request_id, client_id="c2", state=ClientState.EXECUTED))
        await r2.next("ack")
        await r1.publish(topics.up("retailers", "r1"),
                         Outcome(request_id=request_id, client_id="c1", state=ClientState.EXECUTED))
        req = await wait_state(hub, request_id, "completed")
        assert req["state"] == "completed"


async def test_deadline_closes_a_request_nobody_answered(hub_any: HubHandle) -> None:
    hub = hub_any
    await hub.setup_registry({"c1": "r1"})
    start = datetime.now(UTC) - timedelta(seconds=1)
    r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json={
        "client_ids": ["c1"], "start": start.isoformat(), "duration_s": 2, "power_limit_kw": 1.0})
    request_id = r.json()["request_id"]
    req = await wait_state(hub, request_id, "failed", timeout=5)
    assert req["state"] == "failed"
    assert req["clients"]["c1"]["state"] == "unreachable"
    assert "deadline" in req["clients"]["c1"]["detail"]["reason"]


async def test_a_retailer_gets_its_clients_in_id_order_whatever_order_the_dso_listed_them(hub_any: HubHandle) -> None:
    """On bf0a42e the request message listed them as the POST did: the homes then answered in that order and each
    outcome commit wrote entries spread over the whole request row (docs/performance.md, "Clients in id order")."""
    hub = hub_any
    await hub.setup_registry({"c1": "r1", "c2": "r1", "c3": "r1", "c4": "r2"})
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1")),
                 Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (r1, r2):
        await post_emergency(hub, ["c3", "c4", "c1", "c2"])
        got1, got2 = await r1.next("request"), await r2.next("request")
        assert isinstance(got1, Request) and isinstance(got2, Request)
        assert got1.client_ids == ["c1", "c2", "c3"] and got2.client_ids == ["c4"]


def test_a_load_reductions_messages_list_their_clients_in_id_order_whatever_order_they_come_in() -> None:
    """Phase two builds its messages from the request row's entries, which storage gives "in no promised order":
    on 078fb95 ``reduction_items`` kept that order."""
    start = datetime.now(UTC) + timedelta(hours=1)
    items = reduction_items("req-1", {"r1": ["c3", "c1", "c2"], "r2": ["c9", "c4"]},
                            {"c1": 1.0, "c2": 2.0, "c3": 1.0, "c4": 0.5, "c9": 0.5}, start,
                            (start + timedelta(hours=1)).timestamp(), 1)
    listed = [(i.retailer_id, decode(i.payload).client_ids) for i in items]  # type: ignore[union-attr]
    assert listed == [("r1", ["c1", "c3"]), ("r1", ["c2"]), ("r2", ["c4", "c9"])]


def test_outcome_commits_are_paced_only_after_a_fan_outs_worth_of_one_requests_reports() -> None:
    """A batch carrying OUTCOME_PACE_MIN_REPORTS reports of one request (a fan-out's) paces the next outcome commit;
    the same number spread over requests of 100 clients (12,000 requests/min) does not."""
    from cloud_hub.relay import OUTCOME_PACE_MIN_REPORTS, OUTCOME_PACE_S, _Reported, fanout_sized
    from mhp_wire.messages import OutcomeReport, Outcomes

    def message(request_id: str, clients: int) -> _Reported:
        return _Reported.of("r1", Outcomes(request_id=request_id, reports=[
            OutcomeReport(client_id=f"c{k}", state=ClientState.EXECUTED) for k in range(clients)]))

    half = OUTCOME_PACE_MIN_REPORTS // 2
    assert fanout_sized([message("big", half), message("other", 100), message("big", half)])
    assert not fanout_sized([message(f"req-{k}", 100) for k in range(3 * OUTCOME_PACE_MIN_REPORTS // 100)])
    assert not fanout_sized([message("big", half), message("other", half)])
    assert 0 < OUTCOME_PACE_S <= 0.25
