"""The gateway's live page under hostile use, against a real gateway (real Mosquitto, a simulated home over real
Modbus TCP) serving its page on 127.0.0.1: a foreign ``Host`` (DNS rebinding) is refused, event streams are capped,
and the streams are served off the gateway's control loop, so a stuck page never delays a command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hems_firmware import web
from mhp_wire import topics
from mhp_wire.messages import ClientState, Outcome
from tests.broker_fixtures import MosquittoFactory
from tests.hems_firmware.web_rig import WebRig, emergency, running_gateway, send
from tests.mqtt_party import Party, parties

DEFAULT_MAX_STREAMS = 8
"""``[gateway] web_max_streams`` when not configured."""


@pytest.fixture
async def rig(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[WebRig]:
    """A gateway with its page on the default settings."""
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    async with running_gateway(tmp_path, broker) as r:
        yield r


@pytest.fixture
async def named_rig(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[WebRig]:
    """A gateway whose page is also reached as ``gw-1.home.arpa`` and serves two streams at most."""
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    async with running_gateway(tmp_path, broker, web_hosts=["gw-1.home.arpa"], web_max_streams=2) as r:
        yield r


async def data_events(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in resp.aiter_lines():
        if line.startswith("data: "):
            yield json.loads(line[6:])


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example",
                                  "gw-1.home.arpa.evil", ""])
async def test_a_request_for_a_foreign_host_name_is_refused(rig: WebRig, host: str) -> None:
    """DNS rebinding: a hostile site's name, pointed at the gateway, reaches the page with that name as ``Host``."""
    async with httpx.AsyncClient(base_url=rig.url, timeout=5) as http:
        for path in ("/", "/api/state", "/events"):
            resp = await http.get(path, headers={"Host": host.format(port=rig.port)})
            assert resp.status_code == 403, (host, path, resp.status_code)
            assert "host" in resp.json()["message"]
    assert rig.gateway.events.subscribers == 0, "no stream was opened"


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "192.168.1.50",
                                  "gw-1.home.arpa", "GW-1.Home.Arpa:{port}"])
async def test_its_own_names_and_addresses_are_served(named_rig: WebRig, host: str) -> None:
    async with httpx.AsyncClient(base_url=named_rig.url, timeout=5) as http:
        resp = await http.get("/api/state", headers={"Host": host.format(port=named_rig.port)})
        assert resp.status_code == 200 and resp.json()["gateway_id"] == "gw-1"


async def test_event_streams_past_the_cap_are_refused_with_503(rig: WebRig) -> None:
    async with httpx.AsyncClient(base_url=rig.url, timeout=5) as http, contextlib.AsyncExitStack() as streams:
        held = []  # each stream's reader is kept: a reader that is collected closes its stream
        for _ in range(DEFAULT_MAX_STREAMS):
            held.append(data_events(await streams.enter_async_context(http.stream("GET", "/events"))))
            assert (await anext(held[-1]))["type"] == "snapshot"
        assert rig.gateway.events.subscribers == DEFAULT_MAX_STREAMS
        async with http.stream("GET", "/events") as extra:
            assert extra.status_code == 503, "one stream too many is served"
            assert f"{DEFAULT_MAX_STREAMS} event streams" in json.loads(await extra.aread())["message"]
            assert "retry-after" in extra.headers
        assert (await http.get("/api/state")).status_code == 200, "the rest of the page is served"


async def test_the_stream_cap_is_configured_and_slots_come_back(named_rig: WebRig) -> None:
    async with httpx.AsyncClient(base_url=named_rig.url, timeout=5) as http:
        async with http.stream("GET", "/events") as one, http.stream("GET", "/events") as two:
            first, second = data_events(one), data_events(two)  # kept: a collected reader closes its stream
            await anext(first)
            await anext(second)
            async with http.stream("GET", "/events") as extra:
                assert extra.status_code == 503
        for _ in range(250):  # the slots come back when the streams end
            if named_rig.gateway.events.subscribers == 0:
                break
            await asyncio.sleep(0.02)
        async with http.stream("GET", "/events") as again:
            assert again.status_code == 200
            assert (await anext(data_events(again)))["type"] == "snapshot"


def http_tasks(loop: asyncio.AbstractEventLoop) -> list[str]:
    """The HTTP request tasks (uvicorn's request-response cycles) running on ``loop``."""
    return [repr(t.get_coro()) for t in asyncio.all_tasks(loop) if "run_asgi" in repr(t.get_coro())]


async def test_streams_are_served_off_the_control_loop_and_a_stuck_page_never_delays_a_command(rig: WebRig) -> None:
    control = asyncio.get_running_loop()  # the gateway runs in this loop
    async with httpx.AsyncClient(base_url=rig.url, timeout=10) as http, http.stream("GET", "/events") as resp:
        events = data_events(resp)
        assert (await anext(events))["type"] == "snapshot"
        assert http_tasks(control) == [], "the page's requests run on the gateway's control loop"

        page = web.page_of(rig.gateway)
        assert page is not None and page.loop is not None and page.loop is not control
        stuck = threading.Event()
        page.loop.call_soon_threadsafe(stuck.wait)  # the page's loop hangs (a slow client, a bug, anything)
        try:
            with parties(Party(rig.broker, "bridge", topics.all_up("gateways"))) as (bridge,):
                await send(rig, bridge, emergency("q-stuck", limit_kw=1.0))
                out = await bridge.next("outcome")
            assert isinstance(out, Outcome) and out.state is ClientState.EXECUTED
            assert not rig.home.coil_state(0) and not rig.home.coil_state(1), "heater and EV shed"
        finally:
            stuck.set()
        async with asyncio.timeout(5):  # the page catches up: the stream gets what happened meanwhile
            got = [e async for e in _until_actuation(events)]
        assert (got[-1]["device"], got[-1]["request_id"]) == ("heater", "q-stuck")


async def _until_actuation(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    async for event in events:
        yield event
        if event["type"] == "actuation":
            return
