"""Neutrality leaks at the hub, attacked by a retailer: over HTTP (a real hub served by uvicorn) and over MQTT (a
real Mosquitto started from broker_config/, the hub's relay, the retailer as a paho client).

A retailer must not learn another retailer's part of a client's history, nor whether a client it does not supply
exists: for it, another retailer's client (or one it supplied only at another time) answers byte for byte as an
unknown client; the DSO keeps the distinction, and every attempt is in the data access log with its refusal.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from mhp_wire import topics
from mhp_wire.messages import ClientState, ErrorReply, Measurement, Measurements, Message, Outcome, Request
from tests.cloud_hub.test_relay import metric, post_emergency
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties

# Ids of one length, so that two answers differing only by the id have the same length too.
THEIRS, FORMER, GHOST = "theirs-01", "former-01", "ghost--01"
"""r2's client; a client r1 supplied until ten days ago (r2 since); a client nobody registered."""
ANSWER_HEADERS = ("content-type", "content-length", "www-authenticate", "retry-after")


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


async def put_client(hub: HubHandle, client_id: str, retailer_id: str, valid_from: datetime) -> None:
    r = await hub.http.put(f"/v1/clients/{client_id}", headers=hub.auth("dso"), json={
        "retailer_id": retailer_id, "contracted_power_kw": 6.9, "feeder_id": "f1",
        "valid_from": valid_from.isoformat()})
    assert r.status_code in (200, 201), r.text


async def registry(hub: HubHandle) -> datetime:
    """r1, r2; THEIRS: r2's for thirty days; FORMER: r1's from thirty to ten days ago, r2's since. Returns now."""
    t = now()
    await hub.setup_registry({})
    await put_client(hub, THEIRS, "r2", t - timedelta(days=30))
    await put_client(hub, FORMER, "r1", t - timedelta(days=30))
    await put_client(hub, FORMER, "r2", t - timedelta(days=10))
    return t


def answer(r: httpx.Response, client_id: str) -> tuple[int, dict[str, str], bytes]:
    """What a caller sees of an HTTP answer, with the one id that legitimately differs replaced."""
    return (r.status_code, {h: r.headers[h] for h in ANSWER_HEADERS if h in r.headers},
            r.content.replace(client_id.encode(), b"<client>"))


async def audit(hub: HubHandle, client_id: str, since: datetime) -> list[dict[str, Any]]:
    """The data access log of ``client_id`` from ``since`` on, as the DSO reads it."""
    r = await hub.http.get("/v1/audit", headers=hub.auth("dso"), params={
        "client_id": client_id, "from": since.isoformat(), "to": (now() + timedelta(minutes=1)).isoformat()})
    assert r.status_code == 200, r.text
    return list(r.json()["entries"])


def refusals(entries: list[dict[str, Any]], principal: str, action: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["principal"] == principal and e["action"] == action and not e["allowed"]]


# -- HTTP ---------------------------------------------------------------------------------------------------------

async def test_a_retailer_reading_a_client_sees_only_its_own_supplier_periods(hub: HubHandle) -> None:
    t = now()
    await hub.setup_registry({})
    # The previous and the next supplier of r1's client are r2; a second client went r1 -> r2 -> r1.
    await put_client(hub, "c1", "r2", t - timedelta(days=30))
    await put_client(hub, "c1", "r1", t - timedelta(days=10))
    await put_client(hub, "c1", "r2", t + timedelta(days=10))
    await put_client(hub, "c2", "r1", t - timedelta(days=30))
    await put_client(hub, "c2", "r2", t - timedelta(days=20))
    await put_client(hub, "c2", "r1", t - timedelta(days=10))

    def periods(body: dict[str, Any]) -> list[tuple[str, datetime]]:
        return [(p["retailer_id"], datetime.fromisoformat(p["valid_from"])) for p in body["suppliers"]]

    r = await hub.http.get("/v1/clients/c1", headers=hub.auth("r1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"client_id", "retailer_id", "contracted_power_kw", "feeder_id", "suppliers"}
    assert body["retailer_id"] == "r1"
    assert periods(body) == [("r1", t - timedelta(days=10))], "r1 saw another supplier's period"
    r = await hub.http.get("/v1/clients/c2", headers=hub.auth("r1"))
    assert periods(r.json()) == [("r1", t - timedelta(days=30)), ("r1", t - timedelta(days=10))]
    # The DSO still sees the whole history.
    r = await hub.http.get("/v1/clients/c1", headers=hub.auth("dso"))
    assert periods(r.json()) == [("r2", t - timedelta(days=30)), ("r1", t - timedelta(days=10)),
                                 ("r2", t + timedelta(days=10))]


async def test_reading_a_client_not_its_own_answers_a_retailer_as_an_unknown_client(hub: HubHandle) -> None:
    t = await registry(hub)
    got = {cid: answer(await hub.http.get(f"/v1/clients/{cid}", headers=hub.auth("r1")), cid)
           for cid in (THEIRS, FORMER, GHOST)}
    assert got[THEIRS] == got[GHOST], "r1 can tell r2's client from no client"
    assert got[FORMER] == got[GHOST], "r1 can tell a client it no longer supplies from no client"
    status, _, content = got[GHOST]
    assert status == 404 and json.loads(content) == {"error": "not_found", "message": "client '<client>' not found"}
    # The DSO keeps the distinction.
    assert (await hub.http.get(f"/v1/clients/{THEIRS}", headers=hub.auth("dso"))).status_code == 200
    assert (await hub.http.get(f"/v1/clients/{GHOST}", headers=hub.auth("dso"))).status_code == 404
    # Every attempt is in the data access log, with its refusal.
    for cid in (THEIRS, FORMER, GHOST):
        assert len(refusals(await audit(hub, cid, t - timedelta(minutes=1)), "retailer:r1", "read_client")) == 1, cid


async def test_a_consumption_profile_not_its_own_answers_a_retailer_as_an_unknown_client(hub: HubHandle) -> None:
    t = await registry(hub)

    async def profile(cid: str, start: datetime, end: datetime, who: str = "r1") -> httpx.Response:
        return await hub.http.get(f"/v1/clients/{cid}/consumption-profile", headers=hub.auth(who), params={
            "from": start.isoformat(), "to": end.isoformat(), "resolution_s": 3600})

    recent = (t - timedelta(days=5), t - timedelta(days=4))  # r2 supplied THEIRS and FORMER then
    got = {cid: answer(await profile(cid, *recent), cid) for cid in (THEIRS, FORMER, GHOST)}
    assert got[THEIRS] == got[GHOST], "r1 can tell r2's client from no client"
    assert got[FORMER] == got[GHOST], "r1 can tell a client it supplied at another time from no client"
    assert got[GHOST][0] == 404 and json.loads(got[GHOST][2])["error"] == "not_found"
    # r1's own period of FORMER is still served, and a range it supplied in part is refused with the reason (r1
    # knows that client: it supplied it).
    r = await profile(FORMER, t - timedelta(days=20), t - timedelta(days=19))
    assert r.status_code == 200, r.text
    r = await profile(FORMER, t - timedelta(days=12), t - timedelta(days=8))
    assert r.status_code == 403 and "supplied" in r.json()["message"]
    # The DSO keeps the distinction.
    assert (await profile(THEIRS, *recent, who="dso")).status_code == 200
    assert (await profile(GHOST, *recent, who="dso")).status_code == 404
    for cid, n in ((THEIRS, 1), (FORMER, 2), (GHOST, 1)):
        entries = refusals(await audit(hub, cid, t - timedelta(minutes=1)), "retailer:r1", "read_consumption")
        assert len(entries) == n, (cid, entries)


# -- MQTT ---------------------------------------------------------------------------------------------------------

async def errors_for(party: Party, sent: list[Message]) -> dict[str, ErrorReply]:
    """The hub's error answer to each of ``sent``, by the sent message's id."""
    wanted = {m.msg_id for m in sent}
    got: dict[str, ErrorReply] = {}
    while set(got) != wanted:
        err = await party.next("error")
        assert isinstance(err, ErrorReply) and err.ref_msg_id in wanted, err
        got[err.ref_msg_id] = err
    return got


def wire(err: ErrorReply, *ids: str) -> str:
    """An error answer as its receiver reads it, without the ids that legitimately differ (its own message id and
    time, the id of the message it answers, and the ids that message named)."""
    body = json.loads(err.model_dump_json())
    for k in ("msg_id", "sent_at", "ref_msg_id"):
        body.pop(k)
    text = json.dumps(body, sort_keys=True)
    for i in ids:
        text = text.replace(i, "<id>")
    return text


async def test_outcomes_for_clients_not_addressed_to_it_answer_a_retailer_as_unknown_ones(hub: HubHandle) -> None:
    t = await registry(hub)
    await put_client(hub, "c1", "r1", t - timedelta(days=30))
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        request_id = await post_emergency(hub, ["c1", THEIRS])
        assert isinstance(await r1.next("request"), Request)
        theirs = Outcome(request_id=request_id, client_id=THEIRS, state=ClientState.REFUSED)  # addressed to r2
        ghost = Outcome(request_id=request_id, client_id=GHOST, state=ClientState.REFUSED)  # not in the request
        nowhere = Outcome(request_id="no-such-request", client_id=THEIRS, state=ClientState.REFUSED)
        for msg in (theirs, ghost, nowhere):
            await r1.publish(topics.up("retailers", "r1"), msg)
        errors = await errors_for(r1, [theirs, ghost, nowhere])
    seen = {m.msg_id: wire(errors[m.msg_id], m.request_id, m.client_id) for m in (theirs, ghost, nowhere)}
    assert seen[theirs.msg_id] == seen[ghost.msg_id] == seen[nowhere.msg_id], seen
    # Nor do the public metrics tell them apart.
    text = (await hub.http.get("/metrics")).text
    assert metric(text, "mhp_mqtt_rejected_total", reason="forbidden") == 3
    assert metric(text, "mhp_mqtt_rejected_total", reason="unknown_client") == 0
    # Nothing changed, and every attempt is in the data access log with its refusal and request.
    req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
    assert req["clients"][THEIRS]["state"] in ("pending", "sent")
    entries = refusals(await audit(hub, THEIRS, t - timedelta(minutes=1)), "retailer:r1", "report_outcome")
    assert sorted(e["ref"] for e in entries) == sorted([request_id, "no-such-request"])
    entries = refusals(await audit(hub, GHOST, t - timedelta(minutes=1)), "retailer:r1", "report_outcome")
    assert [e["ref"] for e in entries] == [request_id]


async def test_measurements_for_clients_not_its_own_answer_a_retailer_as_unknown_ones(hub: HubHandle) -> None:
    t = await registry(hub)
    await put_client(hub, "c1", "r1", t - timedelta(days=30))
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        sent = {cid: Measurements(items=[Measurement(client_id="c1", at=now(), active_power_kw=1.0),
                                         Measurement(client_id=cid, at=now(), active_power_kw=2.0)])
                for cid in (THEIRS, FORMER, GHOST)}
        for msg in sent.values():
            await r1.publish(topics.up("retailers", "r1"), msg)
        errors = await errors_for(r1, list(sent.values()))
    seen = {cid: wire(errors[msg.msg_id], cid) for cid, msg in sent.items()}
    assert seen[THEIRS] == seen[GHOST] and seen[FORMER] == seen[GHOST], seen
    # r1's own client's measurements were stored; each refused registered one is in the data access log, and an id
    # that names no client is counted in the message's summary line (client "*"), not given a line of its own.
    r = await hub.http.get("/v1/measurements", headers=hub.auth("dso"), params={
        "client_id": "c1", "from": (t - timedelta(minutes=1)).isoformat(),
        "to": (now() + timedelta(minutes=1)).isoformat()})
    assert len(r.json()["series"]) >= 1
    for cid, msg in sent.items():
        entries = refusals(await audit(hub, cid, t - timedelta(minutes=1)), "retailer:r1", "send_measurement")
        assert [e["ref"] for e in entries] == ([] if cid == GHOST else [msg.msg_id]), cid
    summary = refusals(await audit(hub, "*", t - timedelta(minutes=1)), "retailer:r1", "send_measurement")
    assert [(e["ref"], e["detail"]) for e in summary] == [
        (sent[GHOST].msg_id, "1 id(s) that name no registered client")]
