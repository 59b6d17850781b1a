"""A load reduction's availability window (``respond_within_s``) opens when the hub accepts the request, not when
its use case began: a POST whose write waited out a storage outage longer than the window is accepted with the whole
window still ahead, so the retailer's answer counts and phase two disconnects the client. (Before, the window was
counted from the start of the use case: such a request was accepted already over and failed at once, its client
"unreachable" though the retailer was never given time to answer; the faults experiment's storage fault under load
showed it.) Real hub on SQLite, a real Mosquitto, a scripted retailer, the database locked from another
connection as in ``test_storage_faults.py``."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Outcome, Request, RequestKind
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.test_api_usecases import soon
from tests.cloud_hub.test_relay_usecases import retailer
from tests.hub_fixtures import HubHandle, running_hub
from tests.mqtt_party import parties

WINDOW_S = 1.5
OUTAGE_S = 2.0
"""Longer than the window: counted from the POST, the window would be over before the request is stored."""


@pytest.fixture
async def patient_hub(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
                      ) -> AsyncIterator[HubHandle]:
    """A hub whose writes wait out a lock of a few seconds (instead of failing with 503 after 2 s)."""
    async for h in running_hub(request, tmp_path, mosquitto_factory, "sqlite", sqlite_busy_timeout_ms=20_000):
        yield h


async def test_a_load_reduction_stored_after_an_outage_keeps_its_whole_window(patient_hub: HubHandle,
                                                                              tmp_path: Path) -> None:
    hub = patient_hub
    await hub.setup_registry({"c1": "r1"})
    with parties(retailer(hub, "r1")) as (r1,):
        lock = sqlite3.connect(tmp_path / "hub.db", isolation_level=None, check_same_thread=False)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            post = asyncio.create_task(hub.http.post("/v1/load-reductions", headers=hub.auth("dso"), json={
                "client_ids": ["c1"], "reduction_kw": 1.0, "start": soon(120), "duration_s": 900,
                "respond_within_s": WINDOW_S}, timeout=30))
            await asyncio.sleep(OUTAGE_S)  # the outage itself
            assert not post.done(), "the request's write waits for the storage"
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        r = await post
        assert r.status_code == 202, r.text
        request_id = r.json()["request_id"]
        question = await r1.next("request")
        assert isinstance(question, Request) and question.kind is RequestKind.AVAILABILITY
        await r1.publish(topics.up("retailers", "r1"), Ack(ack_ids=[question.msg_id]))
        await r1.publish(topics.up("retailers", "r1"), Outcome(
            request_id=request_id, client_id="c1", state=ClientState.AVAILABLE, detail={"available_kw": 2.0}))
        # Phase two: the available client is disconnected.
        try:
            order = await r1.next("request", timeout=10)
        except TimeoutError:
            req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
            raise AssertionError(f"no phase two: the request is {req['state']}, c1 {req['clients']['c1']}") from None
        assert isinstance(order, Request) and order.kind is RequestKind.LOAD_REDUCTION
        assert order.client_ids == ["c1"]
        req = (await hub.http.get(f"/v1/requests/{request_id}", headers=hub.auth("dso"))).json()
        assert req["selection"]["chosen"] == ["c1"] and req["state"] not in ("failed", "expired")
