"""The gateway's live page over real HTTP: a real gateway (real Mosquitto, simulated home over real Modbus TCP)
serving its page on a free port, read with httpx; commands come from a paho test bridge as in test_gateway.py."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hems_firmware.daemon import Gateway
from hems_firmware.web import KEEPALIVE, LivePage, bound_address
from mhp_wire import topics
from mhp_wire.messages import ClientState, Outcome
from tests.broker_fixtures import MosquittoFactory
from tests.hems_firmware.web_rig import WebRig, emergency, running_gateway, send
from tests.mqtt_party import Party, parties
from tests.waiting import eventually


@pytest.fixture
async def rig(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[WebRig]:
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    async with running_gateway(tmp_path, broker) as r:
        yield r


async def sse_events(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The decoded ``data:`` events of an open event stream (comments and ``retry:`` skipped)."""
    async for line in resp.aiter_lines():
        if line.startswith("data: "):
            yield json.loads(line[6:])


async def next_of(events: AsyncIterator[dict[str, Any]], match: Any, timeout: float = 3.0) -> dict[str, Any]:
    """The next event for which ``match(event)`` holds."""
    async with asyncio.timeout(timeout):
        async for event in events:
            if match(event):
                return event
    raise AssertionError("the stream ended")



async def test_api_state_is_the_current_snapshot(rig: WebRig) -> None:
    async with httpx.AsyncClient(base_url=rig.url) as http:
        resp = await http.get("/api/state")
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
        snap = resp.json()
        assert snap["type"] == "snapshot" and snap["gateway_id"] == "gw-1" and snap["client_id"] == "c1"
        assert snap["active_power_kw"] == pytest.approx(6.15, abs=0.01)
        assert snap["devices"]["meter"]["active_power_kw"] == pytest.approx(6.15, abs=0.01)
        assert {n: d["on"] for n, d in snap["devices"].items() if n != "meter"} == {
            "heater": True, "ev": True, "fridge": True}
        assert snap["device_info"]["meter"]["kind"] == "meter"
        assert snap["device_info"]["ev"] == {"kind": "switch", "driver": "modbus_relay", "rated_power_kw": 3.7,
                                             "priority": 2, "sheddable": True}
        assert snap["active"] == [] and snap["actuations"] == [] and snap["to_restore"] == []

        with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
            await send(rig, bridge, emergency("q-state", limit_kw=1.0))
            await bridge.next("outcome")
        snap = (await http.get("/api/state")).json()
        (action,) = snap["active"]
        assert action["request_id"] == "q-state" and action["kind"] == "emergency" and action["limit_kw"] == 1.0
        assert action["shed"] == ["heater", "ev"] and action["end"] > time.time() + 20
        assert [(a["device"], a["on"], a["request_id"]) for a in snap["actuations"]] == [
            ("ev", False, "q-state"), ("heater", False, "q-state")], "newest first"
        assert snap["actuations"][0]["reason"] == "emergency: limit 1.0 kW"


async def test_events_deliver_the_snapshot_then_the_actuation_with_its_request_id(rig: WebRig) -> None:
    async with httpx.AsyncClient(base_url=rig.url, timeout=5) as http, http.stream("GET", "/events") as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-store"
        events = sse_events(resp)
        first = await anext(events)
        assert first["type"] == "snapshot" and first["gateway_id"] == "gw-1" and first["actuations"] == []
        state = await next_of(events, lambda e: e["type"] == "state")
        assert state["devices"]["heater"] == {"on": True} and state["to_restore"] == []

        with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
            await send(rig, bridge, emergency("q-live", limit_kw=1.0))
            got = await next_of(events, lambda e: e["type"] == "actuation")
            received = time.time()
        assert (got["device"], got["on"], got["request_id"]) == ("heater", False, "q-live")
        assert got["reason"] == "emergency: limit 1.0 kW" and got["gateway_id"] == "gw-1"
        assert received - got["at"] < 0.5, "pushed as it happens"
        second = await next_of(events, lambda e: e["type"] == "actuation")
        assert (second["device"], second["on"], second["request_id"]) == ("ev", False, "q-live")
        state = await next_of(events, lambda e: e["type"] == "state" and e["active"])
        assert state["active"][0]["request_id"] == "q-live" and state["active"][0]["shed"] == ["heater", "ev"]


async def test_a_client_that_disconnects_leaves_no_subscriber(rig: WebRig) -> None:
    feed = rig.gateway.events
    assert feed.subscribers == 0
    async with httpx.AsyncClient(base_url=rig.url, timeout=5) as http:
        async with http.stream("GET", "/events") as one, http.stream("GET", "/events") as two:
            # Each reader is kept until the streams are left: a reader dropped after its first event is collected,
            # and its finalizer closes the response (httpcore closes the connection), so the gateway would drop
            # that stream's subscription while the test still counts it (the flaky "1 == 2" under load).
            first, second = sse_events(one), sse_events(two)
            await anext(first)
            await anext(second)
            assert feed.subscribers == 2, "each stream subscribes before its snapshot is sent"
            await first.aclose()
            await second.aclose()
        await eventually(lambda: feed.subscribers == 0, timeout_s=2)
    # A browser that vanishes without reading: the TCP connection is simply closed.
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(b"GET /events HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n")
    await writer.drain()
    assert b"200" in await reader.readline()
    await eventually(lambda: feed.subscribers == 1, timeout_s=2)
    writer.transport.abort()
    await eventually(lambda: feed.subscribers == 0, timeout_s=2)


async def test_stopping_the_gateway_ends_open_streams_promptly(rig: WebRig) -> None:
    async with httpx.AsyncClient(base_url=rig.url, timeout=5) as http, http.stream("GET", "/events") as resp:
        events = sse_events(resp)
        await anext(events)
        port = rig.port
        t0 = time.monotonic()
        await rig.stop()
        assert time.monotonic() - t0 < 2.0, "the gateway does not wait for its browsers"
        with pytest.raises((StopAsyncIteration, httpx.HTTPError)):
            while True:
                await anext(events)
    assert bound_address(rig.gateway) is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


async def test_the_page_is_self_contained_and_locked_down(rig: WebRig) -> None:
    async with httpx.AsyncClient(base_url=rig.url) as http:
        resp = await http.get("/")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
        html = resp.text
        assert 'new EventSource("events")' in html
        assert not re.search(r"(?i)(https?:|wss?:|ftp:)?//[\w.-]+\.\w", html), "no external URL"
        linked = re.findall(r"(?i)\s(?:src|href|action)\s*=\s*[\"']?([^\"'\s>]*)", html)
        assert linked == ["data:,"], "nothing is fetched but the inline favicon"
        assert "@import" not in html and "url(" not in html
        assert ".innerHTML" not in html and "insertAdjacentHTML" not in html and "document.write" not in html
        csp = resp.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert "unsafe-inline" not in csp and "script-src 'sha256-" in csp
        assert resp.headers["x-content-type-options"] == "nosniff"
        for method, path in [("POST", "/"), ("PUT", "/api/state"), ("DELETE", "/events"), ("POST", "/api/state")]:
            assert (await http.request(method, path)).status_code == 405, "read-only"
        assert (await http.get("/nothing")).status_code == 404


async def test_a_busy_port_leaves_the_gateway_running_without_its_page(
        tmp_path: Path, mosquitto_factory: MosquittoFactory, caplog: pytest.LogCaptureFixture) -> None:
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        async with running_gateway(tmp_path, broker, web_port=port, require_page=False) as r:
            assert bound_address(r.gateway) is None
            with parties(Party(r.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
                await send(r, bridge, emergency("q-nopage"))
                out = await bridge.next("outcome")
                assert isinstance(out, Outcome) and out.state is ClientState.EXECUTED
    assert any("no field-tester page" in rec.getMessage() for rec in caplog.records)


async def test_an_idle_stream_gets_keep_alives_and_ends_when_the_server_stops(tmp_path: Path) -> None:
    """The stream generator on its own (a gateway that is not running: no polls, so the stream is idle)."""
    from hems_firmware.config import GatewayConfig

    gw = Gateway(GatewayConfig.model_validate({"gateway": {"id": "gw-9", "client_id": "c9",
                                                           "state_dir": str(tmp_path)}}))
    page = LivePage(gw, keepalive_s=0.05)
    stream = page._stream()
    first = await anext(stream)
    assert first.startswith("retry: 2000\ndata: {") and first.endswith("\n\n")
    assert json.loads(first.split("data: ", 1)[1])["gateway_id"] == "gw-9"
    assert gw.events.subscribers == 1
    assert await anext(stream) == KEEPALIVE
    gw.events.publish({"type": "actuation", "device": "x\n<b>", "on": True, "request_id": "r", "reason": "why",
                       "at": 1.0, "power": float("nan")})
    line = await anext(stream)
    assert line.count("\n") == 2 and line.startswith("data: "), "one data line per event"
    assert json.loads(line[6:])["power"] is None, "no NaN on the wire"
    page.close_streams()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    await eventually(lambda: gw.events.subscribers == 0, timeout_s=1)
