"""The personal area in a real headless Chromium (Debian's ``chromium``), driven over the Chrome DevTools Protocol on
its websocket, against a real bridge: a customer signs in, changes an appliance's schedule through the form, and sees
it applied once the (paho test) gateway acknowledges it.

The browser driver follows tests/hems_firmware/test_web_browser.py (a copy, so that the two stay independent).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from mhp_wire import topics
from mhp_wire.messages import Ack, ApplianceSchedule, Schedule
from tests.broker_fixtures import MosquittoFactory
from tests.browser import Browser, Cdp, needs_chromium
from tests.mqtt_party import Party, parties
from tests.retailer_bridge.personal_area_rig import ALICE, AreaRig, running_area

pytestmark = needs_chromium


class Tab(Cdp):
    """One browser tab driven over the shared DevTools client (one websocket, a flat session)."""

    def __init__(self, ws: ClientConnection) -> None:
        super().__init__(ws)
        self.session = ""

    async def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 5.0,
                   *, browser: bool = False) -> dict[str, Any]:
        """Send one command to the tab (or to the browser); its ``result``."""
        return await self.send(method, params, None if browser else self.session or None, timeout)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                      "returnByValue": True})
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def loads(self, action: str) -> None:
        """Run the JavaScript ``action`` (a click, a reload) and wait until the page it leads to has loaded."""
        mark = len(self.events)
        await self.evaluate(action)
        await self.wait_event("Page.loadEventFired", after=mark)

    async def type_into(self, selector: str, text: str) -> None:
        """Focus a field, clear it, and type ``text`` as keyboard input."""
        await self.evaluate(f"(() => {{ const f = document.querySelector({json.dumps(selector)}); f.focus(); "
                            "f.select(); })()")
        await self.call("Input.insertText", {"text": text})


@contextlib.asynccontextmanager
async def open_tab(browser: Browser, url: str) -> AsyncIterator[Tab]:
    """A new tab of ``browser`` showing ``url`` (loaded)."""
    tab = Tab(await connect(browser.ws_url, max_size=None))
    try:
        target = (await tab.call("Target.createTarget", {"url": "about:blank"}))["targetId"]
        tab.session = (await tab.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                      browser=True))["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            await tab.call(method)
        await tab.call("Emulation.setDeviceMetricsOverride", {"width": 1100, "height": 900, "deviceScaleFactor": 1,
                                                              "mobile": False})
        mark = len(tab.events)
        await tab.call("Page.navigate", {"url": url})
        await tab.wait_event("Page.loadEventFired", after=mark)
        yield tab
    finally:
        await tab.close()


HEATER = 'section[data-device="heater"]'
STATUS = 'document.getElementById("schedule-status").dataset.status'


@pytest.fixture
async def rig(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> AsyncIterator[AreaRig]:
    async with running_area(tmp_path, mosquitto_factory) as r:
        yield r


async def test_a_customer_signs_in_changes_a_schedule_and_sees_it_applied(
        rig: AreaRig, chromium: Browser, tmp_path: Path) -> None:
    with parties(Party(rig.local, "gw-1", topics.down("gateways", "gw-1"))) as (gw1,):
        async with open_tab(chromium, rig.url + "/") as tab:
            assert await tab.evaluate("location.pathname") == "/login", "no session: the sign-in form"
            await tab.type_into('input[name="email"]', ALICE[1])
            await tab.type_into('input[name="password"]', ALICE[2])
            await tab.loads('document.querySelector("form[action=\\"/login\\"] button").click()')
            assert await tab.evaluate("location.pathname") == "/"
            assert await tab.evaluate('document.getElementById("client-id").textContent') == "c1"
            assert await tab.evaluate("document.cookie") == "", "the session cookie is HttpOnly"
            devices = await tab.evaluate('[...document.querySelectorAll("section.appliance")].map('
                                         '(s) => [s.dataset.device, s.querySelector(".state").textContent])')
            assert devices == [["heater", "on"], ["ev", "off"]]

            await tab.type_into(f'{HEATER} input[name="windows"]', "21:30-06:30, 12:00-14:00")
            await tab.type_into(f'{HEATER} input[name="hours"]', "3")
            await tab.type_into(f'{HEATER} input[name="max_interruption_min"]', "20")
            await tab.type_into(f'{HEATER} input[name="priority"]', "1")
            await tab.loads(f'document.querySelector({json.dumps(HEATER + " button")}).click()')
            assert await tab.evaluate("location.pathname + location.search") == "/?saved=heater"
            assert await tab.evaluate(STATUS) == "sent"

            schedule = await gw1.next("schedule")
            assert isinstance(schedule, Schedule) and schedule.client_id == "c1" and schedule.version == 1
            assert schedule.appliances == [ApplianceSchedule(
                device="heater", allowed=[("21:30", "06:30"), ("12:00", "14:00")], run_s=3 * 3600,
                max_interruption_s=20 * 60, priority=1)]
            await gw1.publish(topics.up("gateways", "gw-1"), Ack(ack_ids=[schedule.msg_id]))
            for _ in range(50):
                await tab.loads("location.reload()")
                if await tab.evaluate(STATUS) == "applied":
                    break
                await asyncio.sleep(0.05)
            assert await tab.evaluate(STATUS) == "applied"
            status = await tab.evaluate(f"document.querySelector({json.dumps(HEATER + ' .status')}).textContent")
            current = await tab.evaluate(f"document.querySelector({json.dumps(HEATER + ' .current')}).textContent")
            assert status == "applied by your gateway"
            assert current.startswith("May run 21:30\u201306:30, 12:00\u201314:00; needs 3 h a day")
            shot = await tab.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
            png = tmp_path / "personal-area.png"
            png.write_bytes(base64.b64decode(shot["data"]))
            print(f"screenshot: {png}")
            assert png.stat().st_size > 10_000
            assert await tab.evaluate("getComputedStyle(document.querySelector('header')).display") == "flex", \
                "the stylesheet is served and allowed by the CSP"
            assert tab.problems() == []

            await tab.loads('document.querySelector("form.signout button").click()')
            assert await tab.evaluate("location.pathname") == "/login"
            await tab.loads("location.assign('/')")
            assert await tab.evaluate("location.pathname") == "/login", "signed out for good"
