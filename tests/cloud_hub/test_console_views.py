"""What the DSO's console reads, against a real hub over HTTP with real MQTT retailers on a real hub broker (issue 16):
``GET /v1/status``, ``GET /v1/clients``, ``GET /v1/feeders/{id}/measurements`` and ``GET /v1/requests``, with who
may read them (a table of authorization cases, and every endpoint's 401 and 403 over HTTP)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cloud_hub.authz import Action, Principal, decide
from cloud_hub.metrics import RecentCounts
from cloud_hub.views import bucket_means, feeder_sum
from mhp_wire import topics
from mhp_wire.messages import Ack, Measurement, Measurements
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties

DSO, ADMIN, R1 = Principal("dso"), Principal("admin"), Principal("retailer", "r1")
VIEWS = (Action.READ_STATUS, Action.LIST_CLIENTS, Action.READ_FEEDER_MEASUREMENTS, Action.LIST_REQUESTS)


@pytest.mark.parametrize(("who", "allowed"), [(DSO, True), (ADMIN, False), (R1, False)])
@pytest.mark.parametrize("action", VIEWS)
def test_only_the_dso_reads_the_console_views(who: Principal, action: Action, allowed: bool) -> None:
    verdict = decide(who, action)
    assert verdict.allowed is allowed
    assert verdict.right == (f"dso:{action.value}" if allowed else "none")
    assert allowed or "only the DSO" in verdict.reason


@pytest.mark.parametrize(("points", "means"), [
    ([], {}),
    ([(0, 1.0), (30, 3.0), (60, 4.0)], {0: 2.0, 1: 4.0}),
    ([(-0.001, 9.0), (180, 9.0), (179.999, 5.0)], {2: 5.0}),  # outside [start, start + 3 buckets) is ignored
    ([(10, -2.0), (20, 1.0)], {0: -0.5}),  # export (negative power) counts as it is
])
def test_a_clients_mean_per_bucket(points: list[tuple[float, float]], means: dict[int, float]) -> None:
    assert bucket_means(points, 0, 60, 3) == means


def test_a_feeder_sums_the_means_and_says_who_reported() -> None:
    assert feeder_sum([{0: 2.0, 1: 4.0}, {0: 0.5, 2: 6.0}], 4) == [(2.5, 2), (4.0, 1), (6.0, 1), (None, 0)]


def test_the_rolling_window_forgets_what_is_an_hour_old() -> None:
    clock = Clock()
    clock.now = 3600.0 * 24  # on a bucket boundary
    recent = RecentCounts(window_s=3600, bucket_s=60, clock=clock)
    recent.add("http_rejected", ("403",))
    clock.now += 59 * 60 + 59
    recent.add("http_rejected", ("403",), 2)
    recent.add("mqtt_rejected", ("invalid",))
    assert recent.counts("http_rejected") == {("403",): 3} and recent.counts("mqtt_rejected") == {("invalid",): 1}
    clock.now += 1  # the first minute's bucket is an hour old
    assert recent.counts("http_rejected") == {("403",): 2}
    clock.now += 3600
    assert recent.counts("http_rejected") == {} and recent.counts("nothing") == {}
    clock.now -= 7200  # a clock set back forgets what it had counted "later"
    assert recent.counts("mqtt_rejected") == {}


def now_iso(delta_s: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=delta_s)).isoformat()


def retailer(hub: HubHandle, rid: str) -> Party:
    return Party(hub.broker, rid, topics.down("retailers", rid))


class Clock:
    """An injected wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def status(hub: HubHandle) -> dict[str, Any]:
    r = await hub.http.get("/v1/status", headers=hub.auth("dso"))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def status_until(hub: HubHandle, rid: str, state: str) -> dict[str, Any]:
    for _ in range(250):
        body = await status(hub)
        if body["retailers"][rid]["state"] == state:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"{rid} never shown {state}: {body['retailers']}")


async def test_status_follows_a_retailer_going_offline_and_back(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    first = await status(hub)
    assert first["ready"] is True and first["checks"]["mqtt"] == "ok"
    assert first["retailers"]["r1"] == {"state": "offline", "online": False, "since": None, "heard": False}
    # The retailer's side as a bridge runs it: a link that publishes its retained presence ``online`` when it
    # connects and ``offline`` when it leaves (its last will says the same when it dies).
    endpoint = MqttEndpoint(hub.broker.host, hub.broker.port, "r1", hub.broker.identities["r1"].password)

    async def ignore(topic: str, payload: bytes, retained: bool) -> None:
        return None

    def link() -> MqttLink:
        return MqttLink(endpoint, client_id="r1", subscriptions=[topics.down("retailers", "r1")], handler=ignore,
                        status_topic=topics.status("retailers", "r1"), clean_start=True)

    async with link():
        online = (await status_until(hub, "r1", "online"))["retailers"]["r1"]
        assert online["online"] is True and online["heard"] is True
        assert abs(datetime.fromisoformat(online["since"]).timestamp() - time.time()) < 60
    offline = (await status_until(hub, "r1", "offline"))["retailers"]["r1"]
    assert offline["online"] is False and offline["since"] >= online["since"]
    async with link():
        back = (await status_until(hub, "r1", "online"))["retailers"]["r1"]
        assert back["since"] >= offline["since"]
    assert (await status(hub))["retailers"]["r2"]["heard"] is False, "r2 never spoke: offline, since unknown"


async def test_status_counts_open_requests_by_type_and_state(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    before = (await status(hub))["open_requests"]["by_type"].get("emergency", {})
    assert before == {}
    for _ in range(2):
        r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json={
            "client_ids": ["c1", "c2"], "start": now_iso(600), "duration_s": 60, "power_limit_kw": 1})
        assert r.status_code == 202
    shift = await hub.http.post("/v1/load-shifts", headers=hub.auth("dso"), json={
        "client_ids": ["c1"], "window_start": now_iso(600), "window_end": now_iso(1200)})
    await hub.http.post(f"/v1/requests/{shift.json()['request_id']}/cancel", headers=hub.auth("dso"))
    opened = (await status(hub))["open_requests"]
    assert sum(opened["by_type"]["emergency"].values()) == 2
    assert set(opened["by_type"]["emergency"]) <= {"accepted", "dispatching"}
    assert "load_shift" not in opened["by_type"], "a cancelled request is not open"
    assert opened["total"] == sum(sum(v.values()) for v in opened["by_type"].values())


async def test_refusals_and_errors_are_counted_for_an_hour_and_then_age_out(hub: HubHandle) -> None:
    clock = Clock()
    hub.app.state.metrics.recent.clock = clock  # the rolling window's clock, driven by the test
    await hub.setup_registry({"c1": "r1"})
    quiet = (await status(hub))["last_hour"]
    assert quiet["window_s"] == 3600 and quiet["refusals"]["total"] == 0 and quiet["errors"]["total"] == 0
    assert (await hub.http.get("/v1/status", headers=hub.auth("r1"))).status_code == 403
    assert (await hub.http.get("/v1/status")).status_code == 401
    with parties(retailer(hub, "r1")) as (r1,):
        await r1.publish(topics.up("retailers", "r1"), b"{not json")
        await r1.next("error")
    clock.now += 30 * 60
    counted = (await status(hub))["last_hour"]["refusals"]
    assert counted["http"] == {"401": 1, "403": 1} and counted["mqtt"] == {"invalid": 1}
    assert counted["total"] == 3
    clock.now += 31 * 60  # the refusals are more than an hour old now
    assert (await hub.http.get("/v1/status", headers=hub.auth("admin"))).status_code == 403
    aged = (await status(hub))["last_hour"]["refusals"]
    assert aged == {"total": 1, "http": {"403": 1}, "mqtt": {}}, "only the refusal of the last minute is left"


async def test_the_client_list_pages_through_2500_clients(hub_any: HubHandle) -> None:
    hub = hub_any
    await hub.setup_registry({})
    since = now_iso(-2 * 86400)
    clients = [{"client_id": f"k{i:05d}", "retailer_id": "r1" if i % 2 else "r2", "contracted_power_kw": 3 + i % 5,
                "feeder_id": "fa" if i % 3 else "fb", "valid_from": since} for i in range(2500)]
    r = await hub.http.put("/v1/clients", headers=hub.auth("dso"), json={"clients": clients})
    assert r.status_code == 200, r.text
    switched = await hub.http.put("/v1/clients/k00001", headers=hub.auth("dso"), json={
        "retailer_id": "r2", "contracted_power_kw": 4, "feeder_id": "fa", "valid_from": now_iso(-3600)})
    assert switched.status_code == 200, switched.text

    async def pages(**params: Any) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        after = None
        for _ in range(20):
            q = {**params, **({"after": after} if after else {})}
            r = await hub.http.get("/v1/clients", params=q, headers=hub.auth("dso"))
            assert r.status_code == 200, r.text
            page = r.json()
            assert page["count"] == len(page["clients"]) <= params.get("limit", 100)
            got += page["clients"]
            after = page["next_after"]
            if after is None:
                return got
        raise AssertionError("the pages never ended")

    everyone = await pages(limit=1000)
    assert [c["client_id"] for c in everyone] == [c["client_id"] for c in clients], "each once, in id order"
    k1 = everyone[1]
    assert k1["retailer_id"] == "r2" and k1["contracted_power_kw"] == 4 and k1["feeder_id"] == "fa"
    assert [s["retailer_id"] for s in k1["suppliers"]] == ["r1", "r2"], "the supplier history"
    assert everyone[2]["suppliers"] == [{"retailer_id": "r2", "valid_from": everyone[2]["suppliers"][0]["valid_from"]}]
    r2 = await pages(limit=1000, retailer_id="r2")
    assert [c["client_id"] for c in r2] == [c["client_id"] for c in clients
                                            if c["retailer_id"] == "r2" or c["client_id"] == "k00001"]
    fb = await pages(limit=300, feeder_id="fb")
    assert [c["client_id"] for c in fb] == [f"k{i:05d}" for i in range(0, 2500, 3)]
    r = await hub.http.get("/v1/clients", params={"limit": 2, "after": "k02497"}, headers=hub.auth("dso"))
    assert [c["client_id"] for c in r.json()["clients"]] == ["k02498", "k02499"]
    assert r.json()["next_after"] is None, "the last page says so"
    for bad in ({"limit": 0}, {"limit": 1001}, {"after": "a|b"}, {"feeder_id": ""}):
        r = await hub.http.get("/v1/clients", params=bad, headers=hub.auth("dso"))
        assert r.status_code == 422 and r.json()["message"], bad
    audit = await hub.http.get("/v1/audit", headers=hub.auth("dso"), params={
        "client_id": "k00002", "from": now_iso(-60), "to": now_iso(60)})
    assert "list_clients" in [e["action"] for e in audit.json()["entries"]], "a registry read is in the access log"


async def send(party: Party, rid: str, items: list[tuple[str, datetime, float]]) -> None:
    batch = Measurements(items=[Measurement(client_id=c, at=at, active_power_kw=kw) for c, at, kw in items])
    await party.publish(topics.up("retailers", rid), batch)
    ack = await party.next("ack")
    assert isinstance(ack, Ack) and ack.ack_ids == [batch.msg_id]


async def test_a_feeder_series_sums_its_clients_means_per_bucket(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r2"})  # both on feeder f1
    r = await hub.http.put("/v1/clients/c3", headers=hub.auth("dso"), json={
        "retailer_id": "r1", "contracted_power_kw": 6.9, "feeder_id": "north 2", "valid_from": now_iso(-86400)})
    assert r.status_code == 201
    base = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)

    def at(s: float) -> datetime:
        return base + timedelta(seconds=s)

    with parties(retailer(hub, "r1"), retailer(hub, "r2")) as (r1, r2):
        await send(r1, "r1", [("c1", at(0), 1.0), ("c1", at(30), 3.0), ("c1", at(60), 4.0), ("c1", at(240), 9.0),
                              ("c3", at(5), 100.0)])
        await send(r2, "r2", [("c2", at(10), 0.5), ("c2", at(130), 6.0), ("c2", at(-1), 50.0)])
    r = await hub.http.get("/v1/feeders/f1/measurements", headers=hub.auth("dso"), params={
        "from": base.isoformat(), "to": at(240).isoformat(), "step_s": 60})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["clients"] == 2 and got["step_s"] == 60
    assert [(p["active_power_kw"], p["clients_reporting"]) for p in got["series"]] == [
        (2.5, 2),   # c1's mean of 1 and 3, plus c2's 0.5
        (4.0, 1),
        (6.0, 1),
        (None, 0),  # nobody reported: no data, not 0 kW (c1's 9 kW is at the end, outside the range)
    ]
    assert [datetime.fromisoformat(p["start"]) for p in got["series"]] == [at(60 * i) for i in range(4)]
    r = await hub.http.get("/v1/feeders/north%202/measurements", headers=hub.auth("dso"), params={
        "from": base.isoformat(), "to": at(240).isoformat(), "step_s": 240})
    assert [(p["active_power_kw"], p["clients_reporting"]) for p in r.json()["series"]] == [(100.0, 1)]
    window = {"from": base.isoformat(), "to": at(240).isoformat()}
    r = await hub.http.get("/v1/feeders/nowhere/measurements", headers=hub.auth("dso"), params=window)
    assert r.status_code == 404 and "nowhere" in r.json()["message"]
    r = await hub.http.get("/v1/feeders/f1/measurements", headers=hub.auth("dso"),
                           params={"from": base.isoformat(), "to": (base + timedelta(days=1)).isoformat(),
                                   "step_s": 1})
    assert r.status_code == 422 and "buckets" in r.json()["message"]
    r = await hub.http.get("/v1/feeders/f1/measurements", headers=hub.auth("dso"),
                           params={"from": at(60).isoformat(), "to": base.isoformat()})
    assert r.status_code == 422 and "after" in r.json()["message"]
    audit = await hub.http.get("/v1/audit", headers=hub.auth("dso"), params={
        "client_id": "c2", "from": now_iso(-60), "to": now_iso(60)})
    assert ("read_feeder_measurements", "feeder:f1") in [(e["action"], e["ref"]) for e in audit.json()["entries"]]


async def test_the_request_list_is_newest_first_filtered_and_paged(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    mine = []
    for i in range(5):
        if i % 2:
            r = await hub.http.post("/v1/load-shifts", headers=hub.auth("dso"), json={
                "client_ids": ["c1"], "window_start": now_iso(600), "window_end": now_iso(1200)})
        else:
            r = await hub.http.post("/v1/emergencies", headers=hub.auth("dso"), json={
                "client_ids": ["c1"], "start": now_iso(600), "duration_s": 60, "power_limit_kw": 1})
        assert r.status_code == 202
        mine.append(r.json()["request_id"])
    cancelled = await hub.http.post(f"/v1/requests/{mine[2]}/cancel", headers=hub.auth("dso"))
    assert cancelled.status_code == 200

    async def listing(**params: Any) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        after = None
        for _ in range(50):
            q = {**params, **({"after": after} if after else {})}
            r = await hub.http.get("/v1/requests", params=q, headers=hub.auth("dso"))
            assert r.status_code == 200, r.text
            got += r.json()["requests"]
            after = r.json()["next_after"]
            if after is None:
                return got
        raise AssertionError("the pages never ended")

    everything = await listing(limit=2)
    ids = [r["request_id"] for r in everything]
    assert len(ids) == len(set(ids)) and ids[:5] == mine[::-1], "newest first, each once"
    assert {r["type"] for r in everything[5:]} == {"customers"}, "then the registration's announcements"
    assert [r["request_id"] for r in await listing(type="emergency")] == [mine[4], mine[2], mine[0]]
    one = await listing(state="cancelled")
    assert [(r["request_id"], r["type"], r["state"], r["targets"]) for r in one] == [(mine[2], "emergency",
                                                                                     "cancelled", 1)]
    assert [r["request_id"] for r in await listing(type="load_shift", limit=1)] == [mine[3], mine[1]]
    since = next(r["created_at"] for r in everything if r["request_id"] == mine[2])
    assert [r["request_id"] for r in await listing(since=since)] == mine[:1:-1]
    assert [r["request_id"] for r in await listing(since=now_iso(3600))] == [], "nothing created in the future"
    for bad in ({"state": "asleep"}, {"type": "party"}, {"limit": 1001}, {"since": "yesterday"}, {"after": "c1"}):
        r = await hub.http.get("/v1/requests", params=bad, headers=hub.auth("dso"))
        assert r.status_code == 422 and r.json()["message"], bad


@pytest.mark.parametrize("path", ["/v1/status", "/v1/clients", "/v1/feeders/f1/measurements", "/v1/requests"])
async def test_every_view_is_for_the_dso_only(hub: HubHandle, path: str) -> None:
    await hub.setup_registry({"c1": "r1"})
    params = {"from": now_iso(-600), "to": now_iso()} if "feeders" in path else {}
    assert (await hub.http.get(path, params=params)).status_code == 401
    bad = await hub.http.get(path, params=params, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    for who in ("admin", "r1", "r2"):
        r = await hub.http.get(path, params=params, headers=hub.auth(who))
        assert r.status_code == 403 and "only the DSO" in r.json()["message"], (who, r.text)
    assert (await hub.http.get(path, params=params, headers=hub.auth("dso"))).status_code == 200
