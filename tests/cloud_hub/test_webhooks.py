"""Webhooks of the hub's change feed, against a real HTTP receiver on 127.0.0.1 (Starlette served by uvicorn): the
HMAC signature, retries with back-off until delivered once, refused targets, and a retailer's subscription showing
only its own clients. The hub is a real uvicorn hub with a real Mosquitto; retailers answer over MQTT."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cloud_hub.webhooks import TargetRefused, check_target, refused_address
from mhp_wire import ports, topics
from mhp_wire.messages import ClientState
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.test_change_feed import post_emergency, report, take_request
from tests.cloud_hub.test_relay import metric
from tests.hub_fixtures import HubHandle, running_hub
from tests.mqtt_party import Party, parties

SECRET = "s3cret-of-the-receiver-0123456789"


@dataclass
class Receiver:
    """A webhook receiver: answers 503 to the first ``fail_first`` POSTs, then 204; records everything."""

    url: str
    fail_first: int = 0
    attempts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    delivered: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.attempts.append((headers, body))
        if len(self.attempts) <= self.fail_first:
            return Response(status_code=503)
        self.delivered.append((headers, body))
        self.arrived.set()
        return Response(status_code=204)

    async def events(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        """The bodies of the first ``count`` deliveries, once they have arrived."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.delivered) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), max(0.01, deadline - loop.time()))
        return [json.loads(b) for _, b in self.delivered[:count]]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    port = ports.free_port()
    rec = Receiver(f"http://127.0.0.1:{port}/hook")
    app = Starlette(routes=[Route("/hook", rec.handle, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(), name="test-webhook-receiver")
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield rec
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def hub(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
              ) -> AsyncIterator[HubHandle]:
    """A hub that may call its receiver on 127.0.0.1, retrying after 0.05 s, 0.1 s, ..."""
    async for h in running_hub(request, tmp_path, mosquitto_factory, "sqlite", webhook_allow_private=True,
                               webhook_retry_initial_s=0.05, webhook_retry_max_s=0.2):
        yield h


async def test_deliveries_are_signed_and_retried_until_delivered_once(hub: HubHandle, receiver: Receiver) -> None:
    receiver.fail_first = 2
    await hub.setup_registry({"c1": "r1"})
    r = await hub.http.post("/v1/subscriptions", headers=hub.auth("dso"),
                            json={"url": receiver.url, "secret": SECRET})
    assert r.status_code == 201, r.text
    sub = r.json()
    assert set(sub) == {"subscription_id", "url", "events", "created_at"} and sub["events"] == ["request"]
    assert SECRET not in r.text
    got = await hub.http.get(f"/v1/subscriptions/{sub['subscription_id']}", headers=hub.auth("dso"))
    assert got.status_code == 200 and got.json() == sub and SECRET not in got.text
    request_id = await post_emergency(hub.http, hub.auth("dso"), ["c1"])
    first = (await receiver.events(1))[0]
    assert first["request_id"] == request_id and first["state"] == "accepted"
    assert len(receiver.attempts) >= 3, "two failures, then the delivery"
    failed_ids = {h["x-mhp-event-id"] for h, _ in receiver.attempts[:2]}
    assert failed_ids == {str(first["event_id"])}, "the same event was retried"
    headers, body = receiver.delivered[0]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-mhp-signature"], expected)
    assert headers["x-mhp-event-id"] == str(first["event_id"]) and headers["x-mhp-timestamp"]
    assert headers["content-type"] == "application/json"
    await asyncio.sleep(0.3)  # any late re-send would have arrived by now
    delivered_ids = [h["x-mhp-event-id"] for h, _ in receiver.delivered]
    assert len(delivered_ids) == len(set(delivered_ids)), "each event delivered once"
    text = (await hub.http.get("/metrics")).text
    assert metric(text, "mhp_webhook_deliveries_total", result="status_5xx") == 2
    assert metric(text, "mhp_webhook_deliveries_total", result="delivered") == len(receiver.delivered)
    # A tampered body does not verify.
    assert not hmac.compare_digest(headers["x-mhp-signature"], "sha256=" + hmac.new(
        SECRET.encode(), body.replace(b"accepted", b"completed"), hashlib.sha256).hexdigest())


async def test_a_retailer_subscription_gets_only_its_own_clients(hub: HubHandle, receiver: Receiver) -> None:
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    r = await hub.http.post("/v1/subscriptions", headers=hub.auth("r1"),
                            json={"url": receiver.url, "secret": SECRET, "events": ["request"]})
    assert r.status_code == 201, r.text
    sid = r.json()["subscription_id"]
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1")),
                 Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (p1, p2):
        request_id = await post_emergency(hub.http, hub.auth("dso"), ["c1", "c2"])
        await take_request(p1, "r1")
        await take_request(p2, "r2")
        await report(p2, "r2", request_id, "c2", ClientState.EXECUTED)
        await report(p1, "r1", request_id, "c1", ClientState.EXECUTED)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not any(json.loads(b)["state"] == "completed" for _, b in receiver.delivered):
            assert loop.time() < deadline, receiver.delivered
            await asyncio.sleep(0.05)
    bodies = [json.loads(b) for _, b in receiver.delivered]
    assert {b["request_id"] for b in bodies} == {request_id}
    assert {c for b in bodies for c in b["clients"]} == {"c1"}
    assert b'"c2"' not in b"".join(b for _, b in receiver.delivered), "nothing of r2's client"
    # Only its owner reads or deletes a subscription; to anyone else it does not exist.
    for who in ("r2", "dso"):
        assert (await hub.http.get(f"/v1/subscriptions/{sid}", headers=hub.auth(who))).status_code == 404
        assert (await hub.http.delete(f"/v1/subscriptions/{sid}", headers=hub.auth(who))).status_code == 404
    assert (await hub.http.post("/v1/subscriptions", headers=hub.auth("admin"),
                                json={"url": receiver.url, "secret": SECRET})).status_code == 403
    assert (await hub.http.delete(f"/v1/subscriptions/{sid}", headers=hub.auth("r1"))).status_code == 204
    assert (await hub.http.get(f"/v1/subscriptions/{sid}", headers=hub.auth("r1"))).status_code == 404
    # A retailer may not subscribe to a request that does not concern it.
    other = await post_emergency(hub.http, hub.auth("dso"), ["c2"])
    r = await hub.http.post("/v1/subscriptions", headers=hub.auth("r1"),
                            json={"url": receiver.url, "secret": SECRET, "request_id": other})
    assert r.status_code == 404


REFUSED = ["http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest/meta-data",
           "http://[::1]:8080/hook", "http://localhost:8080/hook", "http://192.168.1.10/hook",
           "http://[::ffff:127.0.0.1]/hook", "http://224.0.0.1/hook", "http://0.0.0.0/hook"]


@pytest.mark.parametrize("url", REFUSED)
async def test_private_targets_are_refused_unless_allowed(mosquitto_factory: MosquittoFactory, tmp_path: Path,
                                                          request: pytest.FixtureRequest, url: str) -> None:
    async for hub in running_hub(request, tmp_path, mosquitto_factory, "sqlite"):
        r = await hub.http.post("/v1/subscriptions", headers=hub.auth("dso"), json={"url": url, "secret": SECRET})
        assert r.status_code == 422, r.text
        assert "webhook_allow_private" in r.json()["message"]
        stored = await hub.app.state.store.subscriptions()
        assert stored == [], "nothing stored"


@pytest.mark.parametrize(("url", "production", "why"), [
    ("ftp://example.org/hook", False, "http:// or https://"),
    ("http://example.org/hook", True, "https://"),
    ("https://user:pw@example.org/hook", False, "credentials"),
    ("https:///hook", False, "no host"),
])
async def test_malformed_or_plain_targets_are_refused(url: str, production: bool, why: str) -> None:
    async def public_resolver(host: str, port: int) -> list[str]:
        return ["93.184.215.14"]

    with pytest.raises(TargetRefused, match=why):
        await check_target(url, production=production, allow_private=False, resolver=public_resolver)


async def test_a_name_that_now_resolves_privately_is_refused_at_delivery() -> None:
    answers = {"hooks.example.org": ["93.184.215.14"]}

    async def resolver(host: str, port: int) -> list[str]:
        return answers[host]

    await check_target("https://hooks.example.org/x", production=True, allow_private=False, resolver=resolver)
    answers["hooks.example.org"] = ["93.184.215.14", "10.0.0.7"]  # DNS rebinding: one private address is enough
    with pytest.raises(TargetRefused, match=r"10\.0\.0\.7"):
        await check_target("https://hooks.example.org/x", production=True, allow_private=False, resolver=resolver)
    assert refused_address("8.8.8.8") is None
    assert refused_address("fe80::1%eth0") is not None
