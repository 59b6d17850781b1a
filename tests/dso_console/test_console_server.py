"""The DSO's console server (``dso_console/app.py``; moved here from ``tests/sim/test_dso_web.py`` with the console
out of ``sim/``) against a real hub over real HTTP: each request type reaches the hub
with the exact body, bad forms post nothing, the hub's errors pass through, the event stream follows a request to its
end, cancelling works, the DSO's token never reaches the browser, and sign-in is enforced when configured; and, in a
real headless Chromium driven over the DevTools protocol, an operator signs in, posts an emergency and sees it complete
live, with no console error or CSP violation."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from dso_console.app import ConsoleSettings, DsoConsole
from dso_console.forms import FormProblems, build_request
from mhp_wire.mqtt import MqttEndpoint
from mhp_wire.passwords import ScryptCost, hash_password, verify_password
from sim.experiment.rp_sim import RpSimulator, run
from sim.stack.stack import Stack
from tests.broker_fixtures import MosquittoFactory
from tests.browser import Browser, needs_chromium
from tests.browser_tab import open_tab
from tests.hub_fixtures import HubHandle, start_hub

CLIENTS = {"c1": "r1", "c2": "r2", "c3": "r1"}
PASSWORD = "correct horse battery"
BILLING = {"kind": "billing", "client_ids": "c1", "period_start": "2026-01-01T00:00", "period_end": "2026-01-02T00:00"}


class Page:
    """The browser's side of the page server: an HTTP client that checks no answer carries the DSO's token."""

    def __init__(self, web: DsoConsole, token: str) -> None:
        self.web = web
        self.token = token
        self.seen = 0
        self.http = httpx.AsyncClient(base_url=web.url, timeout=10, follow_redirects=False,
                                      event_hooks={"response": [self._no_token]})
        self.csrf = ""

    async def _no_token(self, response: httpx.Response) -> None:
        await response.aread()
        self.seen += 1
        assert self.token not in response.text, f"the DSO's token in {response.request.url}"
        assert all(self.token not in v for v in response.headers.values())

    async def start(self) -> None:
        r = await self.http.get("/api/session")
        assert r.status_code == 200, r.text
        self.csrf = r.json()["csrf"]

    async def post(self, form: dict[str, Any]) -> httpx.Response:
        return await self.http.post("/api/requests", json=form, headers={"X-CSRF-Token": self.csrf})

    async def events(self, request_id: str) -> list[dict[str, Any]]:
        """Every event of the request's stream, until it ends."""
        out = []
        async with self.http.stream("GET", f"/api/requests/{request_id}/events") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    out.append(json.loads(line[6:]))
        return out


@contextlib.asynccontextmanager
async def serving(hub: HubHandle, **settings: Any) -> AsyncIterator[Page]:
    web = DsoConsole(ConsoleSettings(hub.url, hub.tokens["dso"], port=0, poll_s=0.05, settle_s=0.3, **settings))
    async with web.serving():
        page = Page(web, hub.tokens["dso"])
        try:
            yield page
        finally:
            await page.http.aclose()


@contextlib.asynccontextmanager
async def retailers(hub: HubHandle, *ids: str) -> AsyncIterator[list[RpSimulator]]:
    """RP simulators (gmqtt retailers answering every client after 5-10 ms) for ``ids`` on the hub broker."""
    stop = asyncio.Event()
    sims = [RpSimulator(rid, MqttEndpoint(hub.broker.host, hub.broker.port, rid, hub.broker.identities[rid].password),
                        delay_min_ms=5, delay_max_ms=10, seed=1) for rid in ids]
    tasks = [asyncio.create_task(run(sims, None, stop))]
    try:
        for s in sims:
            await s.link.wait_connected(10)
        yield sims
    finally:
        stop.set()
        await asyncio.gather(*tasks)


@pytest.fixture
async def page(hub: HubHandle) -> AsyncIterator[Page]:
    await hub.setup_registry(CLIENTS)
    async with serving(hub) as p:
        await p.start()
        yield p
        assert p.seen > 0


async def created(hub: HubHandle) -> float:
    """How many requests the hub has accepted (its ``/metrics``)."""
    text = (await hub.http.get("/metrics")).text
    return sum(float(m[1]) for m in re.finditer(r'^mhp_requests_created_total\{[^}]*\} ([0-9.e+]+)$', text, re.M))


def same_instants(a: Any, b: Any) -> bool:
    """Equal, with every RFC 3339 time compared as an instant."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_instants(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_instants(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, str) and isinstance(b, str) and re.match(r"\d{4}-\d\d-\d\d[T ]\d", a):
        return datetime.fromisoformat(a) == datetime.fromisoformat(b)
    return bool(a == b)


def soon(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def whole_hour(hours: int) -> str:
    """The whole hour ``hours`` from now, in the form the page echoes back (``…:00:00+00:00``)."""
    return (datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=hours)).isoformat()


# -- the form (pure) -----------------------------------------------------------------------------------------


def test_the_form_becomes_the_hubs_body_with_times_read_in_the_browsers_zone() -> None:
    kind, path, body = build_request({"kind": "load_shift", "tz": "Europe/Lisbon", "target": "feeder",
                                      "feeder_id": " f1 ", "client_ids": "ignored", "window_start": "2026-07-01T18:00",
                                      "window_end": "2026-07-01 21:30:00+00:00", "reason": ""})
    assert (kind, path) == ("load_shift", "/v1/load-shifts")
    assert body == {"feeder_id": "f1", "window_start": "2026-07-01T18:00:00+01:00",
                    "window_end": "2026-07-01T21:30:00+00:00"}
    _, _, body = build_request({"kind": "tariff", "tz": "UTC", "tariff_id": "t", "valid_from": "2026-01-01T00:00",
                                "valid_to": "2026-01-02T00:00",
                                "periods": "2026-01-01T00:00, 2026-01-01T07:00, 0.08\n\n2026-01-01 07:00; "
                                           "2026-01-02 00:00; 0,5"})
    assert body["periods"] == [
        {"start": "2026-01-01T00:00:00+00:00", "end": "2026-01-01T07:00:00+00:00", "price_eur_per_kwh": 0.08},
        {"start": "2026-01-01T07:00:00+00:00", "end": "2026-01-02T00:00:00+00:00", "price_eur_per_kwh": 0.5}]


@pytest.mark.parametrize(("form", "problems"), [
    ({"kind": "shutdown"}, {"kind"}),
    ({"kind": "emergency", "tz": "Mars/Olympus"}, {"tz"}),
    ({"kind": "emergency", "client_ids": "c1, bad id!", "start": "tomorrow", "duration_s": "1.5",
      "power_limit_kw": "lots"}, {"client_ids", "start", "duration_s", "power_limit_kw"}),
    ({"kind": "load_reduction", "target": "feeder", "feeder_id": "", "reduction_kw": "nan", "start": "",
      "duration_s": "60", "respond_within_s": "3"}, {"feeder_id", "reduction_kw", "start"}),
    ({"kind": "emergency", "target": "everyone"}, {"target", "start", "duration_s", "power_limit_kw"}),
    ({"kind": "tariff", "tariff_id": "t", "valid_from": "2026-01-01T00:00", "valid_to": "2026-01-02T00:00",
      "periods": "2026-01-01T00:00, 0.08"}, {"periods"}),
    ({"kind": "billing", "client_ids": ["c1"], "period_start": "2026-01-01T00:00", "period_end": 5}, {"client_ids",
                                                                                                     "period_end"}),
])
def test_every_problem_of_a_form_is_named_by_its_field(form: dict[str, Any], problems: set[str]) -> None:
    with pytest.raises(FormProblems) as caught:
        build_request(form)
    assert {p["field"] for p in caught.value.problems} == problems
    assert all(p["message"] for p in caught.value.problems)


def test_without_sign_in_the_page_only_listens_on_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        ConsoleSettings("http://127.0.0.1:1", "token", host="0.0.0.0")
    with pytest.raises(ValueError, match="scrypt"):
        ConsoleSettings("http://127.0.0.1:1", "token", host="0.0.0.0", password_hash="plain")
    assert ConsoleSettings("http://127.0.0.1:1", "token", host="::1").password_hash is None
    assert "token" not in repr(ConsoleSettings("http://127.0.0.1:1", "token"))


# -- against the hub -------------------------------------------------------------------------------------------


async def test_each_request_type_reaches_the_hub_with_the_exact_body(hub: HubHandle, page: Page) -> None:
    # A window relative to now: the hub refuses a load shift that is already over (a fixed date expired once).
    start, end = whole_hour(hours=24), whole_hour(hours=26)
    cases = [
        ({"kind": "emergency", "target": "clients", "client_ids": "c1 c2\nc1", "start": soon(30), "duration_s": "600",
          "power_limit_kw": "1.5"},
         {"client_ids": ["c1", "c2"], "duration_s": 600, "power_limit_kw": 1.5}),
        ({"kind": "load_shift", "target": "feeder", "feeder_id": "f1", "window_start": start, "window_end": end,
          "reason": "evening peak"},
         {"feeder_id": "f1", "window_start": start, "window_end": end, "reason": "evening peak"}),
        ({"kind": "load_reduction", "target": "clients", "client_ids": "c1,c3", "reduction_kw": "2,5",
          "start": soon(60), "duration_s": "900", "respond_within_s": "3"},
         {"client_ids": ["c1", "c3"], "reduction_kw": 2.5, "duration_s": 900, "respond_within_s": 3.0}),
        ({"kind": "billing", "client_ids": "c2", "period_start": "2026-11-01T00:00", "period_end": "2026-11-02T00:00",
          "tz": "UTC"},
         {"client_ids": ["c2"], "period_start": "2026-11-01T00:00:00+00:00",
          "period_end": "2026-11-02T00:00:00+00:00"}),
        ({"kind": "tariff", "tariff_id": "tou-web", "valid_from": "2026-01-01T00:00:00+00:00",
          "valid_to": "2026-01-02T00:00:00+00:00",
          "periods": "2026-01-01T00:00:00+00:00, 2026-01-01T07:00:00+00:00, 0.08\n"
                     "2026-01-01T07:00:00+00:00, 2026-01-02T00:00:00+00:00, 0.21"},
         {"tariff_id": "tou-web", "valid_from": "2026-01-01T00:00:00+00:00", "valid_to": "2026-01-02T00:00:00+00:00",
          "periods": [{"start": "2026-01-01T00:00:00+00:00", "end": "2026-01-01T07:00:00+00:00",
                       "price_eur_per_kwh": 0.08},
                      {"start": "2026-01-01T07:00:00+00:00", "end": "2026-01-02T00:00:00+00:00",
                       "price_eur_per_kwh": 0.21}]}),
    ]
    ids = []
    for form, expected in cases:
        r = await page.post(form)
        assert r.status_code == 202, r.text
        answer = r.json()
        assert answer["state"] == "accepted" and answer["kind"] == form["kind"]
        for k in ("start",):
            if k in form:
                expected[k] = form[k]
        stored = (await hub.http.get(f"/v1/requests/{answer['request_id']}", headers=hub.auth("dso"))).json()
        assert same_instants(stored["request"], expected), (stored["request"], expected)
        assert same_instants(answer["body"], expected)
        ids.append(answer["request_id"])
    recent = (await page.http.get("/api/requests")).json()["requests"]
    assert [r["request_id"] for r in recent] == ids[::-1]
    assert [r["kind"] for r in recent] == ["tariff", "billing", "load_reduction", "load_shift", "emergency"]
    assert recent[-1]["targets"] == "c1, c2" and recent[-2]["targets"] == "feeder f1"
    # The same form posted again with its idempotency key is the same request.
    form = {**cases[0][0], "idempotency_key": "k-0123456789"}
    first, again = (await page.post(form)).json(), (await page.post(form)).json()
    assert first["request_id"] == again["request_id"] and first["request_id"] not in ids
    assert len((await page.http.get("/api/requests")).json()["requests"]) == 6


async def test_a_bad_form_gets_its_problems_and_nothing_is_posted(hub: HubHandle, page: Page) -> None:
    before = await created(hub)
    r = await page.post({"kind": "emergency", "client_ids": "c1", "start": "next week", "duration_s": "10 min",
                         "power_limit_kw": "1"})
    assert r.status_code == 400
    answer = r.json()
    assert answer["error"] == "invalid_form" and answer["message"].startswith("nothing was posted")
    assert {p["field"] for p in answer["problems"]} == {"start", "duration_s"}
    # The hub's own model says what is wrong (the console has no validator of its own), naming what was typed.
    assert "start: “next week”: Input should be a valid datetime" in answer["message"]
    assert "duration_s: “10 min”: Input should be a valid integer" in answer["message"]
    assert (await page.http.post("/api/requests", content=b"{", headers={
        "X-CSRF-Token": page.csrf, "Content-Type": "application/json"})).status_code == 400
    assert (await page.http.post("/api/requests", data={"kind": "emergency"},
                                 headers={"X-CSRF-Token": page.csrf})).status_code == 415
    assert (await page.http.post("/api/requests", content=b"[1]" + b" " * 300_000, headers={
        "X-CSRF-Token": page.csrf, "Content-Type": "application/json"})).status_code == 413
    r = await page.post({"kind": "emergency", "client_ids": "c1", "start": soon(30), "duration_s": "60",
                         "power_limit_kw": "1", "idempotency_key": "short"})
    assert r.status_code == 400 and r.json()["problems"][0]["field"] == "idempotency_key"
    assert await created(hub) == before
    assert (await page.http.get("/api/requests")).json()["requests"] == []


async def test_the_hubs_refusals_pass_through_with_field_and_reason(hub: HubHandle, page: Page) -> None:
    before = await created(hub)
    # A range the hub's model refuses is refused by the console with the same model, before anything is posted.
    r = await page.post({"kind": "emergency", "client_ids": "c1", "start": soon(30), "duration_s": "600",
                         "power_limit_kw": "-1"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_form"
    assert [p["field"] for p in r.json()["problems"]] == ["power_limit_kw"]
    assert "greater than or equal to 0" in r.json()["problems"][0]["message"]
    # A rule beyond the body's model (the hub's service checks a window's order) comes back as the hub's 422.
    r = await page.post({"kind": "load_shift", "target": "clients", "client_ids": "c1", "window_start": soon(600),
                         "window_end": soon(60)})
    assert r.status_code == 422
    assert r.json()["hub_status"] == 422 and r.json()["error"] == "invalid"
    assert "window_end must be after window_start" in r.json()["message"]
    r = await page.post({"kind": "emergency", "client_ids": "c1 nobody-7", "start": soon(30), "duration_s": "600",
                         "power_limit_kw": "1"})
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert "nobody-7" in r.json()["message"]
    r = await page.post({"kind": "load_shift", "target": "feeder", "feeder_id": "no-such-feeder",
                         "window_start": soon(60), "window_end": soon(600)})
    assert r.status_code == 404 and "no-such-feeder" in r.json()["message"]
    assert (await page.http.get("/api/requests/nope")).status_code == 404
    assert await created(hub) == before


async def test_the_stream_follows_a_request_to_its_end_pushing_only_changes(hub: HubHandle, page: Page) -> None:
    async with retailers(hub, "r1", "r2"):
        r = await page.post({"kind": "emergency", "client_ids": "c1, c2, c3", "start": soon(20), "duration_s": "60",
                             "power_limit_kw": "1"})
        assert r.status_code == 202, r.text
        rid = r.json()["request_id"]
        events = await page.events(rid)
    views = [e["request"] for e in events if e["type"] == "request"]
    assert events[-1] == {"type": "end", "state": "completed"}
    assert views[-1]["state"] == "completed" and views[-1]["request_id"] == rid
    assert all(a != b for a, b in itertools.pairwise(views)), "a view was pushed twice"
    order = ["accepted", "dispatching", "completed"]
    assert [order.index(v["state"]) for v in views] == sorted(order.index(v["state"]) for v in views)
    last = views[-1]
    assert last["client_counts"] == {"executed": 3} and last["clients_total"] == 3
    assert {c["state"] for c in last["clients"].values()} == {"executed"}
    assert last["retailers"]["r1"]["states"] == {"executed": 2} and last["retailers"]["r2"]["clients"] == 1
    assert {"hub_ms", "storage_ms", "dispatch_ms", "retailer_ms", "total_ms", "completion_ms"} <= set(last["trace"])
    recent = (await page.http.get("/api/requests")).json()["requests"]
    assert recent[0]["state"] == "completed"
    one = (await page.http.get(f"/api/requests/{rid}")).json()
    assert one["state"] == "completed" and one["client_counts"] == {"executed": 3}


async def test_cancel_reaches_the_hub_and_the_stream_shows_it(hub: HubHandle, page: Page) -> None:
    r = await page.post({"kind": "emergency", "client_ids": "c1", "start": soon(120), "duration_s": "600",
                         "power_limit_kw": "1"})
    rid = r.json()["request_id"]
    refused = await page.http.post(f"/api/requests/{rid}/cancel")  # no CSRF token
    assert refused.status_code == 403
    refused = await page.http.post(f"/api/requests/{rid}/cancel", headers={
        "X-CSRF-Token": page.csrf, "Origin": "http://evil.example"})
    assert refused.status_code == 403
    stream = asyncio.create_task(page.events(rid))
    await asyncio.sleep(0.3)
    assert not stream.done()
    r = await page.http.post(f"/api/requests/{rid}/cancel", headers={"X-CSRF-Token": page.csrf,
                                                                     "Origin": page.web.url})
    assert r.status_code == 200, r.text
    events = await asyncio.wait_for(stream, 10)
    assert events[-1] == {"type": "end", "state": "cancelled"}
    assert [e["request"]["state"] for e in events if e["type"] == "request"][-1] == "cancelled"
    at_hub = (await hub.http.get(f"/v1/requests/{rid}", headers=hub.auth("dso"))).json()
    assert at_hub["state"] == "cancelled" and "cancel" in at_hub
    again = await page.http.post(f"/api/requests/{rid}/cancel", headers={"X-CSRF-Token": page.csrf})
    assert again.status_code == 409 and "already ended" in again.json()["message"]
    unknown = await page.events("no-such-request")
    assert unknown[0]["type"] == "error" and unknown[0]["status"] == 404 and unknown[-1]["type"] == "end"




async def test_the_hubs_rate_limit_passes_through_with_its_retry_after(tmp_path: Path,
                                                                       mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory("hub", ["r1", "r2"], "hub")
    server, task, tokens, url = await start_hub(tmp_path, broker, rate_limit_per_s=0.01, rate_limit_burst=2)
    try:
        web = DsoConsole(ConsoleSettings(url, tokens["dso"], port=0))
        async with web.serving(), httpx.AsyncClient(base_url=web.url) as http:
            csrf = (await http.get("/api/session")).json()["csrf"]
            answers = [await http.post("/api/requests", headers={"X-CSRF-Token": csrf}, json=BILLING)
                       for _ in range(3)]
        assert [a.status_code for a in answers] == [404, 404, 429]
        assert answers[2].json()["error"] == "rate_limited" and int(answers[2].headers["retry-after"]) >= 1
    finally:
        server.should_exit = True
        await task

async def test_a_browser_that_goes_away_stops_its_stream(hub: HubHandle, page: Page) -> None:
    r = await page.post({"kind": "emergency", "client_ids": "c1", "start": soon(120), "duration_s": "600",
                         "power_limit_kw": "1"})
    async with httpx.AsyncClient(base_url=page.web.url) as http, \
            http.stream("GET", f"/api/requests/{r.json()['request_id']}/events") as events:
        async for line in events.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["request"]["state"] == "dispatching":
                break  # no retailer answers: nothing changes any more, nothing more is written
        assert page.web.streams == 1
    for _ in range(500):  # the hub is no longer asked for a page nobody reads
        if page.web.streams == 0:
            break
        await asyncio.sleep(0.01)
    assert page.web.streams == 0

async def test_a_hub_that_refuses_the_token_or_is_away_is_a_502(hub: HubHandle) -> None:
    web = DsoConsole(ConsoleSettings(hub.url, "not-the-token", port=0))
    async with web.serving(), httpx.AsyncClient(base_url=web.url) as http:
        csrf = (await http.get("/api/session")).json()["csrf"]
        r = await http.post("/api/requests", headers={"X-CSRF-Token": csrf}, json=BILLING)
        assert r.status_code == 502 and r.json()["error"] == "hub_refused"
        assert "not-the-token" not in r.text
    web = DsoConsole(ConsoleSettings("http://127.0.0.1:9", "token", port=0))
    async with web.serving(), httpx.AsyncClient(base_url=web.url) as http:
        csrf = (await http.get("/api/session")).json()["csrf"]
        r = await http.post("/api/requests", headers={"X-CSRF-Token": csrf}, json=BILLING)
        assert r.status_code == 502 and r.json()["error"] == "hub_unreachable"


async def test_without_sign_in_only_loopback_host_names_are_answered(hub: HubHandle, page: Page) -> None:
    r = await page.http.get("/", headers={"Host": "rebound.example:80"})
    assert r.status_code == 403
    r = await page.http.get("/api/session", headers={"Host": "rebound.example"})
    assert r.status_code == 403 and "csrf" not in r.text
    r = await page.http.get("/", headers={"Host": "localhost"})
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and r.headers["x-frame-options"] == "DENY"
    assert '<script src="/static/dso.js"' in r.text
    assert (await page.http.get("/static/dso.js")).headers["content-type"].startswith("text/javascript")


async def test_with_a_password_the_operator_must_sign_in(hub: HubHandle) -> None:
    await hub.setup_registry(CLIENTS)
    stored = hash_password(PASSWORD, ScryptCost(n=2**10))
    async with serving(hub, password_hash=stored) as page:
        http = page.http
        assert (await http.get("/")).headers["location"] == "/login"
        assert (await http.get("/api/session")).status_code == 401
        assert (await http.get("/api/requests")).status_code == 401
        assert (await http.get("/api/requests/x/events")).status_code == 401
        r = await http.post("/api/requests", json={"kind": "billing"}, headers={"X-CSRF-Token": "x"})
        assert r.status_code == 401
        form = await http.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]  # type: ignore[index]
        forged = await http.post("/login", data={"csrf": "forged", "password": PASSWORD})
        assert forged.status_code == 403 and "expired" in forged.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', forged.text)[1]  # type: ignore[index]
        wrong = await http.post("/login", data={"csrf": csrf, "password": "guess"})
        assert wrong.status_code == 401 and "Wrong password" in wrong.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', wrong.text)[1]  # type: ignore[index]
        ok = await http.post("/login", data={"csrf": csrf, "password": PASSWORD})
        assert ok.status_code == 303 and ok.headers["location"] == "/"
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert (await http.get("/")).status_code == 200
        await page.start()
        r = await page.post(BILLING)
        assert r.status_code == 202, r.text
        # Any host name is answered when sign-in protects the page.
        assert (await http.get("/api/requests", headers={"Host": "dso.example"})).status_code == 200
        assert (await http.post("/logout")).status_code == 403  # without the CSRF token
        assert (await http.post("/logout", headers={"X-CSRF-Token": page.csrf})).status_code == 200
        assert (await http.get("/api/requests")).status_code == 401


async def test_repeated_wrong_passwords_lock_the_address_out(hub: HubHandle) -> None:
    async with serving(hub, password_hash=hash_password(PASSWORD, ScryptCost(n=2**10))) as page:
        statuses = []
        for _ in range(6):
            form = await page.http.get("/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]  # type: ignore[index]
            statuses.append((await page.http.post("/login", data={"csrf": csrf, "password": "nope"})).status_code)
        assert statuses == [401] * 5 + [429]
        form = await page.http.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]  # type: ignore[index]
        locked = await page.http.post("/login", data={"csrf": csrf, "password": PASSWORD})
        assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0


@pytest.mark.parametrize(("module", "prog"), [(["dso_console"], "dso-console"),
                                             (["sim.cli", "dso-web"], "mhp-sim dso-web")],
                         ids=["dso-console", "alias-mhp-sim-dso-web"])
async def test_the_command_serves_the_page_as_its_own_process(hub: HubHandle, tmp_path: Path, module: list[str],
                                                              prog: str) -> None:
    await hub.setup_registry(CLIENTS)
    token_file = tmp_path / "dso-token"
    token_file.write_text(hub.tokens["dso"] + "\n")
    command = [sys.executable, "-m", *module, "--hub-url", hub.url, "--token-file", str(token_file)]
    refused = await asyncio.create_subprocess_exec(*command, "--host", "0.0.0.0", "--no-login",
                                                   stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(refused.communicate(), 30)
    assert refused.returncode == 2 and b"loopback" in err
    proc = await asyncio.create_subprocess_exec(*command, "--port", "0", "--no-login", "--log-level", "WARNING",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith(f"{prog}: http://127.0.0.1:"), line
        async with httpx.AsyncClient(base_url=line.split(": ", 1)[1].strip(), timeout=10) as http:
            csrf = (await http.get("/api/session")).json()["csrf"]
            r = await http.post("/api/requests", headers={"X-CSRF-Token": csrf}, json=BILLING)
            assert r.status_code == 202, r.text
            assert hub.tokens["dso"] not in r.text
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err
    assert hub.tokens["dso"].encode() not in err
    hasher = await asyncio.create_subprocess_exec(sys.executable, "-m", *module, "hash-password",
                                                  stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(hasher.communicate(PASSWORD.encode() + b"\n"), 30)
    assert hasher.returncode == 0 and verify_password(PASSWORD, out.decode().strip())
    assert not verify_password("something else", out.decode().strip())



@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_the_stacks_page_posts_an_emergency_that_real_gateways_execute(tmp_path: Path, tls: bool) -> None:
    """``mhp-stack``'s own ``dso-console`` process (no sign-in on loopback) -> hub (HTTPS checked with the stack's CA
    under ``--tls``) -> bridge -> gateways -> relays."""
    stack = Stack(tmp_path / "stack", retailers=1, homes=2, log_level="WARNING", tls=tls)
    try:
        await stack.start(timeout_s=60)
        info = json.loads((stack.dir / "stack.json").read_text())
        assert info["console_url"] == stack.console_url and info["console_password"] is None
        assert info["dso_web_url"] == stack.console_url, "the name of before, for scripts that read it"
        assert "dso-console" in info["processes"] and stack.hub_url.startswith("https://" if tls else "http://")
        assert (stack.dir / "dso-token").stat().st_mode & 0o077 == 0
        async with httpx.AsyncClient(base_url=stack.console_url, timeout=10) as http:
            csrf = (await http.get("/api/session")).json()["csrf"]
            clients = " ".join(h.client_id for h in stack.homes)
            r = await http.post("/api/requests", headers={"X-CSRF-Token": csrf}, json={
                "kind": "emergency", "client_ids": clients, "start": soon(1), "duration_s": "30",
                "power_limit_kw": "1"})
            assert r.status_code == 202, r.text
            assert stack.tokens["dso"] not in r.text
            views = []
            async with http.stream("GET", f"/api/requests/{r.json()['request_id']}/events", timeout=60) as events:
                async for line in events.aiter_lines():
                    if line.startswith("data: ") and json.loads(line[6:])["type"] == "request":
                        views.append(json.loads(line[6:])["request"])
    finally:
        await stack.stop()
    assert views[-1]["state"] == "completed" and views[-1]["client_counts"] == {"executed": 2}
    assert all(c["detail"]["shed"] for c in views[-1]["clients"].values()), "each gateway shed its plugs"
    assert "gateway_ms" in views[-1]["trace"]

# -- in a browser ------------------------------------------------------------------------------------------------


@needs_chromium
async def test_an_operator_posts_an_emergency_in_a_browser_and_sees_it_complete_live(
        hub: HubHandle, chromium: Browser, tmp_path: Path) -> None:
    await hub.setup_registry(CLIENTS)
    async with retailers(hub, "r1", "r2"), \
            serving(hub, password_hash=hash_password(PASSWORD, ScryptCost(n=2**10))) as page, \
            open_tab(chromium, page.web.url + "/") as tab:
        assert await tab.evaluate("location.pathname") == "/login"
        await tab.type_into('input[name="password"]', PASSWORD)
        await tab.loads('document.querySelector("form button").click()')
        assert await tab.evaluate("location.pathname") == "/"
        await tab.until('document.body.dataset.ready === "yes"')
        assert await tab.evaluate("document.cookie") == "", "the session cookie is HttpOnly"
        assert await tab.evaluate('document.getElementById("kind").value') == "emergency"
        assert await tab.evaluate('document.querySelector("input[name=feeder_id]").offsetParent') is None, \
            "listed clients chosen: the feeder field is hidden"
        await tab.type_into('fieldset:not([hidden]) textarea[name="client_ids"]', "c1, c2\nc3")
        await tab.type_into('input[name="power_limit_kw"]', "1.5")
        # A form the page server cannot read: its problems are shown next to nothing posted.
        await tab.type_into('input[name="duration_s"]', "")
        await tab.evaluate('document.getElementById("submit").click()')
        await tab.until('!document.getElementById("error").hidden')
        assert await tab.evaluate('[...document.querySelectorAll("#problems li")].map((li) => li.dataset.field)') \
            == ["duration_s"]
        assert await tab.evaluate('document.querySelector("input[name=duration_s]").getAttribute("aria-invalid")') \
            == "true"
        assert page.web.recent == []
        # Fixed and posted: the page follows it live to the end.
        await tab.type_into('input[name="duration_s"]', "120")
        await tab.evaluate('document.getElementById("submit").click()')
        await tab.until('document.getElementById("state").dataset.state === "completed"')
        assert await tab.evaluate('document.getElementById("error").hidden') is True
        rid = page.web.recent[0]["request_id"]
        assert await tab.evaluate('document.getElementById("req-id").textContent') == rid
        counts = await tab.evaluate('[...document.querySelectorAll("#counts tbody tr")].map('
                                    '(r) => [r.dataset.state, r.cells[1].textContent])')
        assert counts == [["executed", "3"]]
        clients = await tab.evaluate('[...document.querySelectorAll("#clients tbody tr")].map('
                                     '(r) => [r.dataset.clientId, r.cells[1].textContent, r.cells[2].textContent])')
        assert clients == [["c1", "r1", "executed"], ["c2", "r2", "executed"], ["c3", "r1", "executed"]]
        trace = await tab.evaluate('[...document.querySelectorAll("#trace tbody tr")].map((r) => r.dataset.key)')
        assert {"hub_ms", "storage_ms", "dispatch_ms", "retailer_ms", "total_ms"} <= set(trace)
        await tab.until('document.getElementById("conn").dataset.conn === "ended"')
        assert await tab.evaluate('document.querySelector("#recent tbody tr").cells[3].textContent') == "completed"
        assert await tab.evaluate('document.getElementById("cancel").disabled') is True
        at_hub = (await hub.http.get(f"/v1/requests/{rid}", headers=hub.auth("dso"))).json()
        assert at_hub["request"]["client_ids"] == ["c1", "c2", "c3"] and at_hub["request"]["duration_s"] == 120
        assert hub.tokens["dso"] not in await tab.evaluate("document.documentElement.outerHTML")
        shot = await tab.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        png = tmp_path / "dso-page.png"
        png.write_bytes(base64.b64decode(shot["data"]))
        print(f"screenshot: {png}")
        problems = tab.problems()
        # The one refused POST is logged by the browser as a failed resource; nothing else may be.
        assert [p for p in problems if "status of 400" not in p] == [], problems
        assert len(problems) == 1
