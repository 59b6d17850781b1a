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

import pytest

from mhp_wire import topics
from mhp_wire.messages import Ack, ApplianceSchedule, Schedule
from tests import browser_tab
from tests.broker_fixtures import MosquittoFactory
from tests.browser import Browser, needs_chromium
from tests.browser_tab import Tab
from tests.mqtt_party import Party, parties
from tests.retailer_bridge.personal_area_rig import ALICE, AreaRig, running_area

pytestmark = needs_chromium


@contextlib.asynccontextmanager
async def open_tab(browser: Browser, url: str) -> AsyncIterator[Tab]:
    """A tab of the personal area's size (1100 x 900)."""
    async with browser_tab.open_tab(browser, url, width=1100, height=900) as tab:
        yield tab


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
