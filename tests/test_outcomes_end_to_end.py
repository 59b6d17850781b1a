"""Outcomes say what was achieved, through the real chain (issue 13, item 1).

A home whose never-sheddable load keeps it over an emergency's limit ends ``limit_not_met`` at the hub, and the
request does not complete: hub (uvicorn) -> hub broker -> retailer bridge -> retailer broker -> gateway -> Modbus
TCP on simulated homes, every part its own process. At the hub: a load reduction sends each home the target it
said it could shed, counts a home that fell short, and one whose available answers cover nothing fails."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, LoadReductionParams, Outcome, Request, RequestKind
from sim.stack.stack import BASE_LOAD_KW, Stack
from tests.cloud_hub.test_api_usecases import soon
from tests.cloud_hub.test_relay import wait_state
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties
from tests.test_use_cases_end_to_end import follow


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path / "stack", retailers=2, homes=2, log_level="WARNING")
    try:
        await s.start(timeout_s=60)
        yield s
    finally:
        await s.stop()


async def test_a_never_sheddable_load_over_the_limit_ends_limit_not_met_and_the_request_fails(stack: Stack) -> None:
    """Each stack home keeps its fridge (0.15 kW, never sheddable) and its 0.3 kW base load: under a 0.3 kW limit
    every home sheds all it may and still draws 0.45 kW."""
    dso = {"Authorization": f"Bearer {stack.tokens['dso']}"}
    clients = [h.client_id for h in stack.homes]
    async with httpx.AsyncClient(base_url=stack.hub_url, timeout=10) as http:
        r = await http.post("/v1/emergencies", headers=dso, json={
            "client_ids": clients, "start": (datetime.now(UTC) + timedelta(seconds=1)).isoformat(),
            "duration_s": 30, "power_limit_kw": BASE_LOAD_KW})
        assert r.status_code == 202, r.text
        req = await follow(http, dso, r.json()["request_id"], timeout_s=30)
    assert req["state"] == "failed", req
    for cid in clients:
        c = req["clients"][cid]
        assert c["state"] == "limit_not_met", c
        d = c["detail"]
        assert d["limit_kw"] == BASE_LOAD_KW
        assert d["measured_kw"] == pytest.approx(0.45, abs=0.01), "read from the SDM630 after shedding"
        assert d["shed"] == ["water-heater", "ev-charger", "washing-machine"]
        assert "not sheddable: fridge" in d["reason"]


def retailer(hub: HubHandle, rid: str) -> Party:
    return Party(hub.broker, rid, topics.down("retailers", rid))


async def test_each_home_gets_its_own_target_and_a_home_short_of_it_makes_the_reduction_partial(hub: HubHandle
                                                                                             ) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    with parties(retailer(hub, "r1")) as (r1,):
        r = await hub.http.post("/v1/load-reductions", headers=hub.auth("dso"), json={
            "client_ids": ["c1", "c2"], "reduction_kw": 4.0, "start": soon(30), "duration_s": 600,
            "respond_within_s": 2})
        request_id = r.json()["request_id"]
        ask = await r1.next("request")
        assert isinstance(ask, Request) and ask.kind is RequestKind.AVAILABILITY
        await r1.publish(topics.up("retailers", "r1"), Ack(ack_ids=[ask.msg_id]))
        for cid, kw in (("c1", 3.0), ("c2", 2.0)):
            await r1.publish(topics.up("retailers", "r1"), Outcome(
                request_id=request_id, client_id=cid, state=ClientState.AVAILABLE, detail={"available_kw": kw}))
        targets: dict[str, float | None] = {}
        while set(targets) != {"c1", "c2"}:
            msg = await r1.next("request")
            assert isinstance(msg, Request) and msg.kind is RequestKind.LOAD_REDUCTION
            assert isinstance(msg.params, LoadReductionParams)
            targets.update(dict.fromkeys(msg.client_ids, msg.params.target_kw))
            await r1.publish(topics.up("retailers", "r1"), Ack(ack_ids=[msg.msg_id]))
        assert targets == {"c1": 3.0, "c2": 1.0}, "each home is asked for what it said it could shed, the last the rest"
        await r1.publish(topics.up("retailers", "r1"), Outcome(
            request_id=request_id, client_id="c1", state=ClientState.EXECUTED, detail={"shed_kw": 3.0}))
        await r1.publish(topics.up("retailers", "r1"), Outcome(
            request_id=request_id, client_id="c2", state=ClientState.LIMIT_NOT_MET,
            detail={"target_kw": 1.0, "shed_kw": 0.6, "reason": "shed 0.6 kW of the 1 kW target"}))
        req = await wait_state(hub, request_id, "partially_completed")
    assert req["state"] == "partially_completed", req
    assert req["clients"]["c2"]["state"] == "limit_not_met"
    assert req["clients"]["c2"]["detail"]["shed_kw"] == 0.6


async def test_a_load_reduction_whose_available_answers_cover_nothing_fails(hub: HubHandle) -> None:
    await hub.setup_registry({"c1": "r1"})
    with parties(retailer(hub, "r1")) as (r1,):
        r = await hub.http.post("/v1/load-reductions", headers=hub.auth("dso"), json={
            "client_ids": ["c1"], "reduction_kw": 4.0, "start": soon(30), "duration_s": 600,
            "respond_within_s": 1})
        request_id = r.json()["request_id"]
        ask = await r1.next("request")
        await r1.publish(topics.up("retailers", "r1"), Ack(ack_ids=[ask.msg_id]))
        await r1.publish(topics.up("retailers", "r1"), Outcome(
            request_id=request_id, client_id="c1", state=ClientState.AVAILABLE, detail={"available_kw": 0.0}))
        req = await wait_state(hub, request_id, "failed", timeout=8)
        await r1.nothing("request", within=0.5)  # no disconnect is sent
    assert req["state"] == "failed", req
    assert req["selection"]["covered"] is False and req["selection"]["chosen"] == []
