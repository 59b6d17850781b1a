"""Rate limits per identity against the real thing: the hub's HTTP API per principal, the hub's MQTT side per
retailer (real Mosquitto), the bridge per gateway (two real Mosquittos)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from mhp_wire import topics
from mhp_wire.messages import ClientState, ErrorReply, Outcome, Telemetry, utcnow
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from tests.broker_fixtures import MosquittoFactory
from tests.cloud_hub.test_relay import metric, post_emergency, wait_state
from tests.hub_fixtures import HubHandle, start_hub
from tests.mqtt_party import Party, parties


@pytest.fixture
async def tight_hub(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[HubHandle]:
    """A hub whose limits are low enough to hit in a test: HTTP 2/s burst 6, MQTT 5/s burst 10 per identity."""
    broker = mosquitto_factory("hub", ["r1", "r2"], "hub")
    server, task, tokens, url = await start_hub(tmp_path, broker, rate_limit_per_s=2, rate_limit_burst=6,
                                                mqtt_rate_limit_per_s=5, mqtt_rate_limit_burst=10)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(200):
            if (await http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.02)
        yield HubHandle(url, tokens, broker, http, server.config.app)
    server.should_exit = True
    await task


async def test_http_flood_from_one_principal_gets_429_others_and_health_are_served(tight_hub: HubHandle) -> None:
    hub = tight_hub
    codes = [(await hub.http.get("/v1/clients/nobody", headers=hub.auth("r1"))) for _ in range(10)]
    assert [r.status_code for r in codes[:6]] == [404] * 6
    limited = [r for r in codes if r.status_code == 429]
    assert len(limited) >= 3
    body = limited[0].json()
    assert body["error"] == "rate_limited" and "rate limit" in body["message"] and body["retry_after_s"] > 0
    assert int(limited[0].headers["Retry-After"]) >= 1
    # Another principal, and the health endpoints, are not touched by r1's flood.
    assert (await hub.http.get("/v1/clients/nobody", headers=hub.auth("dso"))).status_code == 404
    for _ in range(20):
        assert (await hub.http.get("/healthz")).status_code == 200
    assert (await hub.http.get("/readyz")).status_code == 200
    text = (await hub.http.get("/metrics")).text
    assert metric(text, "mhp_http_rejected_total", status="429") == len(limited)
    await asyncio.sleep(1.0)  # the bucket refills at the sustained rate
    assert (await hub.http.get("/v1/clients/nobody", headers=hub.auth("r1"))).status_code == 404


async def test_mqtt_flood_from_one_retailer_is_limited_others_are_served(tight_hub: HubHandle) -> None:
    hub = tight_hub
    await hub.setup_registry({"c1": "r1", "c2": "r2"})
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1")),
                 Party(hub.broker, "r2", topics.down("retailers", "r2"))) as (r1, r2):
        request_id = await post_emergency(hub, ["c1", "c2"])
        await r1.next("request")
        got = await r2.next("request")
        sent, t0 = 60, time.monotonic()
        for _ in range(sent):  # harmless messages, but far beyond r2's burst
            await r2.publish(topics.up("retailers", "r2"), ErrorReply(code="internal", message="flood"))
        elapsed = time.monotonic() - t0
        # r1 is served normally while r2 floods.
        await r1.publish(topics.up("retailers", "r1"),
                         Outcome(request_id=request_id, client_id="c1", state=ClientState.EXECUTED))
        assert (await r1.next("ack")).type == "ack"
        err = await r2.next("error")
        assert isinstance(err, ErrorReply) and err.code == "invalid" and "rate limit" in err.message
        text = (await hub.http.get("/metrics")).text
        limited = metric(text, "mhp_mqtt_rejected_total", reason="rate_limited")
        assert sent - 10 - 5 * (elapsed + 1) <= limited <= sent - 10
        assert metric(text, "mhp_mqtt_rejected_total", reason="invalid") == 0
        # Once its bucket refills, r2's own outcome goes through (its bridge would re-send it until acked).
        await asyncio.sleep(1.0)
        out = Outcome(request_id=got.request_id, client_id="c2", state=ClientState.EXECUTED)  # type: ignore[union-attr]
        for _ in range(50):
            await r2.publish(topics.up("retailers", "r2"), out)
            try:
                ack = await r2.next("ack", timeout=0.5)
                break
            except TimeoutError:
                continue
        assert ack.ack_ids == [out.msg_id]  # type: ignore[union-attr]
        assert (await wait_state(hub, request_id, "completed"))["state"] == "completed"


async def test_bridge_limits_a_flooding_gateway_and_serves_the_others(
        tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    hub_broker = mosquitto_factory("hub", ["r1"], "hub")
    local = mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")
    bridge = Bridge(BridgeSettings(
        retailer_id="r1", hub_mqtt_host=hub_broker.host, hub_mqtt_port=hub_broker.port,
        hub_mqtt_password=hub_broker.identities["r1"].password, local_mqtt_host=local.host,
        local_mqtt_port=local.port, local_mqtt_password=local.identities["bridge"].password,
        db_path=tmp_path / "bridge.db", customers={"c1": "gw-1", "c2": "gw-2"}, telemetry_store="none",
        gateway_rate_limit_per_s=2, gateway_rate_limit_burst=5))
    task = asyncio.create_task(bridge.run())
    try:
        with parties(Party(local, "gw-1", topics.down("gateways", "gw-1")),
                     Party(local, "gw-2", topics.down("gateways", "gw-2"))) as (gw1, gw2):
            await asyncio.sleep(0.5)
            for _ in range(30):
                await gw1.publish(topics.up("gateways", "gw-1"), ErrorReply(code="internal", message="flood"))
            err = await gw1.next("error")
            assert isinstance(err, ErrorReply) and "rate limit" in err.message
            tel = Telemetry(gateway_id="gw-2", client_id="c2", seq=1, at=utcnow(), devices={},
                            active_power_kw=1.0)
            await gw2.publish(topics.up("gateways", "gw-2"), tel)
            assert (await gw2.next("ack")).ack_ids == [tel.msg_id]  # type: ignore[union-attr]
            assert 30 - 5 - 2 * 5 <= bridge.relay.rejected["gateway_rate_limited"] <= 25
            assert bridge.relay.latest_telemetry["gw-2"].msg_id == tel.msg_id
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
