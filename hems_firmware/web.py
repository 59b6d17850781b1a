"""The field testers' live page, served by the gateway itself (Starlette on uvicorn, in the gateway's event loop).

``GET /`` is one self-contained HTML page (no external assets); ``GET /api/state`` the current snapshot as JSON;
``GET /events`` a server-sent event stream: first the snapshot, then every event of the gateway's
:class:`~hems_firmware.events.EventFeed` (``state`` after each poll, with the loads waiting to be restored added;
``actuation`` on each switching; ``dropped`` when this client fell behind), each as one ``data:`` line of JSON
carrying its ``type``, and a comment line every :data:`KEEPALIVE_S` seconds. Everything is read-only: no
endpoint changes the gateway.

The page is an aid for people standing next to the home: it never stops the gateway. A port that cannot be bound
is logged and the gateway runs on without its page.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import re
import time
import weakref
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from hems_firmware.events import EventFeed
from mhp_wire.webserver import EmbeddedServer, bind

if TYPE_CHECKING:
    from hems_firmware.daemon import ActiveAction, Actuation, Gateway

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0
"""Seconds between keep-alive comments on an idle event stream."""
LOG_SIZE = 200
"""How many of the latest actuations a snapshot carries."""
MAX_QUEUED = 1000
"""Events held for one slow client before its oldest are dropped."""
RETRY_MS = 2000
"""How soon a browser reconnects after the stream breaks (the SSE ``retry:`` field)."""

_bound: weakref.WeakKeyDictionary[Gateway, tuple[str, int]] = weakref.WeakKeyDictionary()


def bound_address(gw: Gateway) -> tuple[str, int] | None:
    """``(host, port)`` the gateway's page listens on (the real port when configured with 0), or ``None``."""
    return _bound.get(gw)


# -- the snapshot ---------------------------------------------------------------------------------------------


def snapshot(gw: Gateway, log_size: int = LOG_SIZE) -> dict[str, Any]:
    """Everything the page shows, now: devices, the home's power, active actions, the latest actuations."""
    info = {d.name: {"kind": "meter" if d.name in gw.meters else "switch", "driver": d.driver,
                     "rated_power_kw": d.rated_power_kw, "priority": d.priority, "sheddable": d.sheddable}
            for d in gw.cfg.devices}
    return jsonable({
        "type": "snapshot", "at": time.time(), "gateway_id": gw.id, "client_id": gw.client_id,
        "devices": gw.state, "device_info": info, "active_power_kw": gw.measured_kw(),
        "active": [action_dict(a) for a in gw.active.values()],
        "to_restore": restore_list(gw),
        "failsafe": failsafe_view(gw),
        "actuations": [actuation_dict(gw, a) for a in reversed(gw.actuations[-log_size:])],
    })


def failsafe_view(gw: Gateway) -> dict[str, Any] | None:
    """The configured failsafe and its latest episode (``report``: in force, or ended and not yet reported)."""
    fs = gw.cfg.gateway.failsafe
    if fs is None:
        return None
    report = gw.failsafe_report
    return {"after_s": fs.after_s, "limit_kw": max(fs.limit_kw, fs.floor_kw), "duration_s": fs.duration_s,
            "floor_kw": fs.floor_kw, "uplink_connected": gw.link is not None and gw.link.connected,
            "report": None if report is None else report.model_dump(mode="json")}


def restore_list(gw: Gateway) -> list[dict[str, Any]]:
    """Loads an ended action shed that are waiting to come back (one per restore interval), with that request."""
    return [{"device": name, "request_id": rid} for name, rid in gw.to_restore.items()]


def action_dict(a: ActiveAction) -> dict[str, Any]:
    """An active action as the ``state`` events of the feed carry it."""
    return {"request_id": a.request_id, "kind": a.kind, "limit_kw": a.limit_kw, "end": a.end, "shed": list(a.shed)}


def actuation_dict(gw: Gateway, a: Actuation) -> dict[str, Any]:
    """A past actuation as the ``actuation`` events of the feed carry it."""
    return {"type": "actuation", "at": a.at, "gateway_id": gw.id, "device": a.device, "on": a.on,
            "request_id": a.request_id, "reason": a.reason}


def jsonable(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN; browsers refuse it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def sse(event: dict[str, Any]) -> str:
    """One server-sent event: a single ``data:`` line of JSON (JSON text never contains a raw newline)."""
    return "data: " + json.dumps(jsonable(event), separators=(",", ":"), default=str) + "\n\n"


KEEPALIVE = ": keep-alive\n\n"


# -- the page ------------------------------------------------------------------------------------------------


def _load_page() -> tuple[str, str]:
    """The page's HTML and a Content-Security-Policy allowing exactly its inline script and style."""
    html = (resources.files("hems_firmware.static") / "index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
                        for b in blocks)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


class LivePage:
    """The Starlette app of one gateway's page, and the event streams it is serving."""

    def __init__(self, gw: Gateway, keepalive_s: float = KEEPALIVE_S) -> None:
        self.gw = gw
        self.keepalive_s = keepalive_s
        self.html, self.csp = _load_page()
        self._clients: set[_Client] = set()
        self.app = Starlette(routes=[
            Route("/", self.page, methods=["GET"]),
            Route("/api/state", self.state, methods=["GET"]),
            Route("/events", self.events, methods=["GET"]),
        ])

    async def page(self, request: Request) -> Response:
        """``GET /``: the live page."""
        return HTMLResponse(self.html, headers={
            "Content-Security-Policy": self.csp, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    async def state(self, request: Request) -> Response:
        """``GET /api/state``: the snapshot the event stream starts with."""
        return JSONResponse(snapshot(self.gw), headers={"Cache-Control": "no-store"})

    async def events(self, request: Request) -> Response:
        """``GET /events``: the snapshot, then the gateway's events, as server-sent events."""
        return StreamingResponse(self._stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def _stream(self) -> AsyncIterator[str]:
        client = _Client()
        pump = asyncio.create_task(_pump(self.gw.events, client), name=f"gw-{self.gw.id}-web-sse")
        self._clients.add(client)
        try:
            await asyncio.sleep(0)  # the pump subscribes before the snapshot is taken: no event falls in between
            yield f"retry: {RETRY_MS}\n" + sse(snapshot(self.gw))
            while True:
                try:
                    async with asyncio.timeout(self.keepalive_s):
                        event = await client.queue.get()
                except TimeoutError:
                    yield KEEPALIVE
                    continue
                if client.dropped:
                    yield sse({"type": "dropped", "count": client.dropped})
                    client.dropped = 0
                if event is None:  # the server is shutting down
                    return
                if event.get("type") == "state":
                    event = {**event, "to_restore": restore_list(self.gw)}
                yield sse(event)
        finally:
            # Cancelling the pump ends its subscription at once: the pump only ever waits inside the feed.
            pump.cancel()
            self._clients.discard(client)

    def close_streams(self) -> None:
        """End every open event stream (the server is stopping; browsers reconnect to the next gateway)."""
        for client in self._clients:
            client.put(None)


class _Client:
    """One connected event stream's queue; when the client falls behind its oldest events go, counted."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(MAX_QUEUED)
        self.dropped = 0

    def put(self, item: dict[str, Any] | None) -> None:
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
                self.dropped += 1
        self.queue.put_nowait(item)


async def _pump(feed: EventFeed, client: _Client) -> None:
    """Move the feed's events into one client's queue (never waiting anywhere but inside the feed)."""
    async for event in feed.subscribe():
        if event.get("type") == "dropped":
            client.dropped += int(event.get("count", 1))
        else:
            client.put(event)


# -- serving ---------------------------------------------------------------------------------------------------



async def serve_web(gw: Gateway, keepalive_s: float = KEEPALIVE_S) -> None:
    """Serve ``gw``'s live page on ``[gateway] web_host:web_port`` until cancelled."""
    section = gw.cfg.gateway
    if section.web_port is None:
        return
    try:
        sock = bind(section.web_host, section.web_port)
    except OSError as exc:
        log.error("gateway %s: no field-tester page, cannot listen on %s:%d: %s", gw.id, section.web_host,
                  section.web_port, exc)
        return
    page = LivePage(gw, keepalive_s)
    config = uvicorn.Config(page.app, log_config=None, access_log=False, lifespan="off", ws="none",
                            proxy_headers=False, server_header=False, timeout_graceful_shutdown=2)
    server = EmbeddedServer(config)
    host, port = sock.getsockname()[:2]
    _bound[gw] = (host, port)
    log.info("gateway %s: field-tester page on http://%s:%d/", gw.id, host, port)
    serving = asyncio.create_task(server.serve(sockets=[sock]), name=f"gw-{gw.id}-web")
    try:
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        # Stop in order: end the event streams, then let uvicorn close its connections and its socket.
        page.close_streams()
        server.should_exit = True
        try:
            await serving
        except asyncio.CancelledError:
            serving.cancel()
            raise
        raise
    except Exception:
        log.exception("gateway %s: the field-tester page stopped", gw.id)
    finally:
        _bound.pop(gw, None)
        sock.close()
