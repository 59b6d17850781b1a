"""The console's own routes beyond posting a request, against a real hub over real HTTP: revising a request (the
hub's revision model first), the hub's change feed relayed to the browser with its ids (``Last-Event-ID`` resumes at
the hub), the platform, the registry, a client's data access log, a feeder's plot with the requests as bands, and
the latency per component; bad input gets a clear error and the hub is not asked."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from tests.dso_console.test_console_server import CLIENTS, Page, created, retailers, soon
from tests.dso_console.test_console_server import page as page  # the fixture: a console on the hub
from tests.hub_fixtures import HubHandle


async def feed_events(console: Page, rid: asyncio.Future[str], opened: asyncio.Event | None = None
                      ) -> list[tuple[str, str, dict[str, Any]]]:
    """``(id, event, data)`` of the console's ``/api/events`` until an event of the request ``rid`` has come (the
    registry's customer-list requests come too: the DSO issued them); ``opened`` is set at the stream's first line,
    which the console writes once the hub's feed is open (a change from then on is relayed). The request's events
    may all come before its id is known (the hub writes the events queued for a stream in one chunk, and the POST's
    answer can reach the test after them): they are looked for both when an event comes and when the id does."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    found = asyncio.Event()

    def check(_: object = None) -> None:
        if rid.done() and any(d.get("request_id") == rid.result() for _, _, d in out):
            found.set()

    async def read() -> None:
        # Its own client: the page's checks every answer whole, and this one never ends.
        async with httpx.AsyncClient(base_url=console.web.url) as http, \
                http.stream("GET", "/api/events", timeout=30) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            event_id, event = "", "message"
            async for line in r.aiter_lines():
                assert console.token not in line
                if opened is not None and not opened.is_set():
                    assert line.startswith("retry: "), line
                    opened.set()
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    out.append((event_id, event, json.loads(line[6:])))
                    check()

    rid.add_done_callback(check)
    reader = asyncio.create_task(read())
    waiting = asyncio.create_task(found.wait())
    try:
        await asyncio.wait({reader, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not found.is_set():
            reader.result()  # the stream failed or ended: its error, else the events so far
    finally:
        reader.cancel()
        waiting.cancel()
    return out


async def test_a_request_is_revised_through_the_console_with_the_hubs_revision_model(hub: HubHandle,
                                                                                      page: Page) -> None:
    async with retailers(hub, "r1", "r2"):
        r = await page.post({"kind": "emergency", "client_ids": "c1 c2", "start": soon(120), "duration_s": "600",
                             "power_limit_kw": "1"})
        assert r.status_code == 202, r.text
        rid = r.json()["request_id"]
        post = {"X-CSRF-Token": page.csrf}
        assert (await page.http.post(f"/api/requests/{rid}/revise", json={"power_limit_kw": "2"})).status_code == 403
        bad = await page.http.post(f"/api/requests/{rid}/revise", headers=post,
                                   json={"power_limit_kw": "-1", "tariff_id": "t", "duration_s": "ten"})
        assert bad.status_code == 400 and bad.json()["message"].startswith("nothing was revised")
        assert {p["field"] for p in bad.json()["problems"]} == {"power_limit_kw", "tariff_id", "duration_s"}
        assert (await page.http.post(f"/api/requests/{rid}/revise", headers=post, json={})).status_code == 400
        ok = await page.http.post(f"/api/requests/{rid}/revise", headers=post,
                                  json={"power_limit_kw": "2,5", "idempotency_key": "rev-0123456789"})
        assert ok.status_code == 202, ok.text
        assert ok.json()["revision"] == 2 and ok.json()["body"] == {"power_limit_kw": 2.5}
        at_hub = (await hub.http.get(f"/v1/requests/{rid}", headers=hub.auth("dso"))).json()
        assert at_hub["revision"] == 2 and at_hub["request"]["power_limit_kw"] == 2.5
        # The hub's own refusals pass through: a billing request has no revisions (409).
        # A billing period in the past stays in the past: this fixed date cannot expire.
        billing = await page.post({"kind": "billing", "client_ids": "c1", "period_start": "2026-01-01T00:00",
                                   "period_end": "2026-01-02T00:00"})
        refused = await page.http.post(f"/api/requests/{billing.json()['request_id']}/revise", headers=post,
                                       json={"duration_s": "60"})
        assert refused.status_code == 409 and refused.json()["hub_status"] == 409


async def test_the_hubs_change_feed_is_relayed_with_its_ids_and_resumes_at_the_hub(hub: HubHandle,
                                                                                    page: Page) -> None:
    async with retailers(hub, "r1", "r2"):
        posted: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        opened = asyncio.Event()
        listening = asyncio.create_task(feed_events(page, posted, opened))
        await asyncio.wait_for(opened.wait(), 20)  # the relay is open: a change from now on is pushed
        r = await page.post({"kind": "emergency", "client_ids": "c1, c3", "start": soon(30), "duration_s": "60",
                             "power_limit_kw": "1"})
        rid = r.json()["request_id"]
        posted.set_result(rid)
        first = await asyncio.wait_for(listening, 20)
        event_id, event, data = next(e for e in first if e[2].get("request_id") == rid)
        assert event == "request" and data["request_id"] == rid and data["state"] == "accepted"
        assert event_id == str(data["event_id"])
        assert set(data["clients"]) == {"c1", "c3"}
        # Resumed after that event: the hub replays what came after it (the clients' outcomes), none twice.
        rest = await asyncio.wait_for(_until_completed(page, event_id, rid), 20)
        ids = [int(i) for i, e, _ in rest if e == "request"]
        assert ids == sorted(set(ids)) and all(i > int(event_id) for i in ids)
        assert [d for _, e, d in rest if e == "request"][-1]["state"] == "completed"
    bad = await page.http.get("/api/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 422


async def _until_completed(console: Page, last_id: str, rid: str) -> list[tuple[str, str, dict[str, Any]]]:
    """The console's ``/api/events`` resumed after ``last_id``, until ``rid`` has completed."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    async with httpx.AsyncClient(base_url=console.web.url) as http, \
            http.stream("GET", "/api/events", headers={"Last-Event-ID": last_id}, timeout=30) as r:
        event_id, event = "", "message"
        async for line in r.aiter_lines():
            assert console.token not in line
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                out.append((event_id, event, data))
                if data.get("request_id") == rid and data.get("state") == "completed":
                    return out
    return out


async def test_the_screens_reads_come_from_the_hub(hub: HubHandle, page: Page) -> None:
    async with retailers(hub, "r1", "r2"):
        r = await page.post({"kind": "emergency", "client_ids": "c1 c2", "start": soon(5), "duration_s": "900",
                             "power_limit_kw": "1"})
        rid = r.json()["request_id"]
        await page.events(rid)  # followed to its end
        status = (await page.http.get("/api/status")).json()
        assert status["ready"] is True and set(status["retailers"]) == {"r1", "r2"}
        listed = (await page.http.get("/api/hub-requests", params={"type": "emergency"})).json()
        assert [q["request_id"] for q in listed["requests"]] == [rid]
        assert (await page.http.get("/api/hub-requests", params={"state": "nonsense"})).status_code == 422
        clients = (await page.http.get("/api/clients")).json()["clients"]
        assert {c["client_id"]: c["retailer_id"] for c in clients} == CLIENTS
        assert clients[0]["suppliers"][0]["retailer_id"] == CLIENTS[clients[0]["client_id"]]
        assert (await page.http.get("/api/clients/c2")).json()["client_id"] == "c2"
        assert (await page.http.get("/api/clients/nobody")).status_code == 404
        audit = (await page.http.get("/api/audit", params={"client_id": "c1"})).json()
        assert "trigger_emergency" in {e["action"] for e in audit["entries"]}
        assert (await page.http.get("/api/audit", params={"client_id": "c1", "days": "0"})).status_code == 422
        assert (await page.http.get("/api/audit", params={"client_id": "bad id"})).status_code == 422
        plot = (await page.http.get("/api/feeders/f1/plot", params={"hours": "1", "step_s": "60"})).json()
        assert plot["feeder_id"] == "f1" and plot["clients"] == 3 and len(plot["x"]) == len(plot["kw"]) >= 60
        assert all(v is None for v in plot["kw"]), "no measurements were sent"
        [band] = plot["bands"]
        assert band["request_id"] == rid and band["type"] == "emergency" and band["end"] - band["start"] == 900
        assert (await page.http.get("/api/feeders/nowhere/plot")).status_code == 404
        assert (await page.http.get("/api/feeders/f1/plot", params={"hours": "100"})).status_code == 422
        latency = (await page.http.get("/api/latency", params={"limit": "5"})).json()
        newest = latency["requests"][-1]  # oldest first; the registry's customer lists came before
        assert len(latency["requests"]) == 4 and newest["request_id"] == rid  # 3 customer lists, then the emergency
        assert newest["trace"]["hub_ms"] > 0 and newest["trace"]["total_ms"] > 0
        assert "gateway_ms" in latency["components"]
        assert (await page.http.get("/api/latency", params={"limit": "0"})).status_code == 422
    before = await created(hub)
    async with httpx.AsyncClient(base_url=page.web.url) as other:  # a page of another origin cannot post
        refused = await other.post("/api/requests/x/revise", json={}, headers={"Origin": "http://evil.example",
                                                                               "X-CSRF-Token": page.csrf})
        assert refused.status_code == 403
    assert await created(hub) == before
