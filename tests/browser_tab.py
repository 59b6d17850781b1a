"""A browser tab driven over the DevTools protocol, for the browser tests of the console, the personal area and
consent (headless Chromium of :mod:`tests.browser`)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.browser import Browser, Cdp

SCREENSHOTS = Path(os.environ.get("MHP_SCREENSHOTS", Path(__file__).resolve().parents[1] / "build" / "screenshots"))
"""Where the browser tests leave a screenshot of each screen for a reviewer (kept after the run; gitignored)."""


class Tab(Cdp):
    """One browser tab driven over the shared DevTools client (one websocket, a flat session)."""

    def __init__(self, ws: ClientConnection) -> None:
        super().__init__(ws)
        self.session = ""

    async def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 5.0,
                   *, browser: bool = False) -> dict[str, Any]:
        """Send one command to the tab (or to the browser); its ``result``."""
        return await self.send(method, params, None if browser else self.session or None, timeout)

    async def evaluate(self, expression: str, timeout: float = 5.0) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                      "returnByValue": True}, timeout)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def loads(self, action: str) -> None:
        """Run the JavaScript ``action`` and wait until the page it leads to has loaded."""
        mark = len(self.events)
        await self.evaluate(action)
        await self.wait_event("Page.loadEventFired", after=mark)

    async def type_into(self, selector: str, text: str) -> None:
        """Focus a field, clear it, and type ``text`` as keyboard input."""
        await self.evaluate(f"(() => {{ const f = document.querySelector({json.dumps(selector)}); f.focus(); "
                            "f.select(); })()")
        if text:
            await self.call("Input.insertText", {"text": text})
        else:
            await self.call("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Delete", "code": "Delete",
                                                       "windowsVirtualKeyCode": 46})

    async def until(self, condition: str, timeout_s: float = 10.0) -> None:
        """Wait until the JavaScript ``condition`` holds in the page."""
        await self.evaluate(f"""new Promise((resolve, reject) => {{ const t0 = Date.now(); (function poll() {{
            if ({condition}) resolve(true);
            else if (Date.now() - t0 > {timeout_s * 1000}) reject(new Error({json.dumps("never: " + condition)}));
            else setTimeout(poll, 20); }})(); }})""", timeout_s + 2)


@contextlib.asynccontextmanager
async def open_tab(browser: Browser, url: str, *, width: int = 1280, height: int = 1100) -> AsyncIterator[Tab]:
    """A new tab of ``browser`` showing ``url`` (loaded), ``width`` x ``height`` CSS pixels."""
    tab = Tab(await connect(browser.ws_url, max_size=None))
    try:
        target = (await tab.call("Target.createTarget", {"url": "about:blank"}, browser=True))["targetId"]
        tab.session = (await tab.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                      browser=True))["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            await tab.call(method)
        await tab.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                              "mobile": False})
        mark = len(tab.events)
        await tab.call("Page.navigate", {"url": url})
        await tab.wait_event("Page.loadEventFired", after=mark)
        yield tab
    finally:
        await tab.close()


async def screenshot(tab: Tab, name: str) -> Path:
    """A PNG of the whole page in :data:`SCREENSHOTS` (``name``.png)."""
    shot = await tab.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, 15)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
