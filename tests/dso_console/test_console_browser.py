"""The DSO's console in a real headless Chromium, on the whole chain of ``mhp-stack``: the ``dso-console`` process,
the hub and its broker, a retailer bridge and its broker, gateway processes polling simulated Modbus meters and
relays. An operator posts an emergency for a feeder from the page and sees its clients turn ``executed`` without
reloading (pushed from the hub's change feed), the feeder's plot shows the load drop under the emergency's band,
and every screen leaves a screenshot in ``build/screenshots/`` (or ``$MHP_SCREENSHOTS``) for a reviewer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sim.stack.stack import Stack
from tests.browser import Browser, needs_chromium
from tests.browser_tab import Tab, open_tab, screenshot

FEEDER = "feeder-1"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    # 4 homes: feeder-1 holds homes 1 and 4, feeder-2 and feeder-3 one each (sim/stack: feeder-{i % 3 + 1}).
    s = Stack(tmp_path / "stack", retailers=1, homes=4, log_level="WARNING")
    try:
        await s.start(timeout_s=90)
        yield s
    finally:
        await s.stop()


async def go(tab: Tab, screen: str, loaded: str) -> None:
    """Show a screen by its link and wait until it has drawn (``loaded``: a JavaScript condition)."""
    await tab.evaluate(f'document.querySelector("#nav a[data-screen={screen}]").click()')
    await tab.until(f'!document.querySelector("main[data-screen={screen}]").hidden && ({loaded})', 30)


@needs_chromium
@pytest.mark.timeout(240)
async def test_an_emergency_posted_from_the_console_executes_live_and_the_feeder_plot_shows_the_drop(
        stack: Stack, chromium: Browser) -> None:
    feeder_clients = sorted(h.client_id for h in stack.homes if h.feeder_id == FEEDER)
    assert len(feeder_clients) == 2
    async with open_tab(chromium, stack.console_url) as tab:
        await tab.until('document.body.dataset.ready === "yes"', 20)
        await tab.evaluate("window.notReloaded = true")

        # Plots first: the feeder's measured power before the emergency (every plug on: about 7.35 kW a home).
        await go(tab, "plots", "document.body.dataset.plots")
        await tab.evaluate('(() => { const s = document.getElementById("step"); s.value = "5"; '
                           'const h = document.getElementById("hours"); h.value = "0.25"; '
                           's.dispatchEvent(new Event("change")); })()')
        await tab.until('consoleState.power && consoleState.power.step_s === 5 && '
                        'consoleState.power.kw.filter((v) => v !== null).length >= 2', 60)
        before = await tab.evaluate("Math.max(...consoleState.power.kw.filter((v) => v !== null))")
        assert before > 10, f"two homes with every plug on draw about 14.7 kW, the plot holds {before}"

        # The emergency, for every client of the feeder, starting in 2 s, posted from the form.
        await go(tab, "requests", "true")
        await tab.evaluate('document.querySelector("input[name=target][value=feeder]").click()')
        await tab.type_into('input[name="feeder_id"]', FEEDER)
        await tab.evaluate('document.querySelector("input[name=start]").value = '
                           'local(new Date(Date.now() + 2000))')
        await tab.type_into('input[name="duration_s"]', "300")
        await tab.type_into('input[name="power_limit_kw"]', "1")
        await tab.evaluate('document.getElementById("submit").click()')
        await tab.until('[...document.querySelectorAll("#clients tbody tr")].length === 2 && '
                        '[...document.querySelectorAll("#clients tbody tr")].every('
                        '(r) => r.cells[2].textContent === "executed")', 60)
        assert await tab.evaluate("window.notReloaded") is True, "the page was not reloaded"
        rows = await tab.evaluate('[...document.querySelectorAll("#clients tbody tr")].map('
                                  '(r) => [r.dataset.clientId, r.cells[2].textContent])')
        assert sorted(rows) == [[c, "executed"] for c in feeder_clients]
        rid = await tab.evaluate('document.getElementById("req-id").textContent')
        trace = await tab.evaluate('[...document.querySelectorAll("#trace tbody tr")].map((r) => r.dataset.key)')
        assert {"hub_ms", "retailer_ms", "gateway_ms", "total_ms"} <= set(trace)
        assert await tab.evaluate('document.getElementById("conn").dataset.conn') in ("live", "ended")
        await tab.until('document.getElementById("state").dataset.state === "completed"', 30)
        # The hub's change feed reached the page through the console's relay (the platform refreshes on it).
        assert await tab.evaluate("consoleState.feedEvents") >= 2
        assert await tab.evaluate('document.getElementById("feed").dataset.feed') == "· live"
        assert stack.tokens["dso"] not in await tab.evaluate("document.documentElement.outerHTML")
        await screenshot(tab, "console-request")

        # The plot: the emergency is a band on the time axis, and the measured power under it has dropped.
        await go(tab, "plots", "consoleState.power && consoleState.power.bands.some((b) => b.request_id === "
                 f"{json.dumps(rid)})")
        await tab.until(f'''(() => {{
            const p = consoleState.power, band = p.bands.find((b) => b.request_id === {json.dumps(rid)});
            const under = p.x.map((x, i) => [x, p.kw[i]]).filter(([x, v]) => v !== null && x >= band.start + 5);
            return under.length >= 1 && under[under.length - 1][1] < 2.5; }})()''', 60)
        plotted = await tab.evaluate("JSON.stringify(consoleState.power)")
        power = json.loads(plotted)
        band = next(b for b in power["bands"] if b["request_id"] == rid)
        assert band["type"] == "emergency" and band["end"] - band["start"] == 300
        after = [v for x, v in zip(power["x"], power["kw"], strict=True) if v is not None and x >= band["start"] + 5]
        assert after[-1] < before / 4, (before, after)
        canvas = await tab.evaluate('(() => { const c = document.querySelector("#power-plot canvas"); '
                                    'return c ? [c.width, c.height] : null; })()')
        assert canvas is not None and canvas[0] > 0 and canvas[1] > 0
        assert await tab.evaluate('document.getElementById("power-plot").dataset.points') == str(len(power["x"]))
        latency = await tab.evaluate("consoleState.latency.requests.map((r) => r.request_id)")
        assert rid in latency
        assert await tab.evaluate('document.querySelector("#latency-plot canvas") !== null') is True
        await screenshot(tab, "console-plots")

        # The platform: the retailer online, the request among the hub's recent requests.
        await go(tab, "platform", 'document.querySelector("#retailers-status tbody tr") && '
                 f'document.querySelector("#hub-requests tbody tr[data-request-id=\'{rid}\']")')
        assert await tab.evaluate('[...document.querySelectorAll("#retailers-status tbody tr")].map('
                                  '(r) => [r.dataset.retailer, r.dataset.state])') == [["r1", "online"]]
        assert await tab.evaluate('document.getElementById("ready").dataset.state') == "ready"
        await screenshot(tab, "console-platform")

        # The registry with supplier history, and a client's data access log (the emergency triggered for it).
        await go(tab, "clients", 'document.querySelectorAll("#registry tbody tr").length === 4')
        first = feeder_clients[0]
        await tab.evaluate(f'document.querySelector("#registry tbody tr[data-client-id=\'{first}\']").click()')
        await tab.until(f"document.body.dataset.audit === {json.dumps(feeder_clients[0])} && "
                        'document.querySelectorAll("#audit tbody tr").length > 0', 20)
        actions = await tab.evaluate('[...document.querySelectorAll("#audit tbody tr")].map((r) => r.dataset.action)')
        assert "trigger_emergency" in actions
        history = await tab.evaluate(f'document.querySelector("#registry tbody tr[data-client-id=\'{first}\']")'
                                     ".cells[4].textContent")
        assert history.startswith("r1 from ")
        await screenshot(tab, "console-clients")
        problems = tab.problems()
        assert problems == [], problems
