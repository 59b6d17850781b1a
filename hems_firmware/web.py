"""The field testers' live page, served by the gateway itself (Starlette on uvicorn, in a thread of its own).

``GET /`` is one self-contained HTML page (no external assets); ``GET /api/state`` the current snapshot as JSON;
``GET /events`` a server-sent event stream: first the snapshot, then every event of the gateway's
:class:`~hems_firmware.events.EventFeed` (``state`` after each poll, with the loads waiting to be restored added;
``actuation`` on each switching; ``dropped`` when this client fell behind), each as one ``data:`` line of JSON
carrying its ``type``, and a comment line every :data:`KEEPALIVE_S` seconds. Everything is read-only: no
endpoint changes the gateway.

The page is an aid for people standing next to the home: it never stops or slows the gateway. It runs its own event
loop in a thread of its own: HTTP parsing, JSON encoding, keep-alives and socket writes of every stream happen
there, and the gateway's control loop (polling, commands, switching) only takes a snapshot when a stream opens and
hands each stream's events over (one subscription per stream, ``EventFeed``). At most ``[gateway] web_max_streams``
streams are served at once (503 beyond). It answers only to loopback names, IP addresses, its ``web_host`` and
``web_hosts`` (DNS rebinding), and takes no request body (413). A port that cannot be bound is logged and the
gateway runs on without its page.
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
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mhp_wire.webserver import BodyLimit, EmbeddedServer, HostGuard, bind

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
_pages: weakref.WeakKeyDictionary[Gateway, LivePage] = weakref.WeakKeyDictionary()


def page_of(gw: Gateway) -> LivePage | None:
    """The page ``gw`` is serving (its :attr:`LivePage.loop` is the page's own event loop), or ``None``."""
    return _pages.get(gw)


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
    """The Starlette app of one gateway's page, and the event streams it is serving.

    ``control`` is the gateway's event loop (where its state and its event feed live); ``loop`` the loop serving
    the page. They are the same loop when the page is not serving from its own thread (``_stream`` driven directly).
    """

    def __init__(self, gw: Gateway, keepalive_s: float = KEEPALIVE_S, max_streams: int | None = None,
                 hosts: tuple[str, ...] = ()) -> None:
        self.gw = gw
        self.keepalive_s = keepalive_s
        self.max_streams = gw.cfg.gateway.web_max_streams if max_streams is None else max_streams
        self.html, self.csp = _load_page()
        self._clients: set[_Client] = set()
        self.streams = 0
        """Event streams being served (reserved before the response starts, released when it ends)."""
        self.control: asyncio.AbstractEventLoop | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        section = gw.cfg.gateway
        self.app = Starlette(routes=[
            Route("/", self.page, methods=["GET"]),
            Route("/api/state", self.state, methods=["GET"]),
            Route("/events", self.events, methods=["GET"]),
        ], middleware=[Middleware(HostGuard, names=(section.web_host, *section.web_hosts, *hosts)),
                       Middleware(BodyLimit, max_bytes=0)])

    async def _on_control(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on the gateway's loop (its state is only read there), awaited from the page's loop."""
        control = self.control or asyncio.get_running_loop()

        async def call() -> Any:
            return fn()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), control))

    async def page(self, request: Request) -> Response:
        """``GET /``: the live page."""
        return HTMLResponse(self.html, headers={
            "Content-Security-Policy": self.csp, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    async def state(self, request: Request) -> Response:
        """``GET /api/state``: the snapshot the event stream starts with."""
        return JSONResponse(await self._on_control(lambda: snapshot(self.gw)), headers={"Cache-Control": "no-store"})

    async def events(self, request: Request) -> Response:
        """``GET /events``: the snapshot, then the gateway's events, as server-sent events (503 past the cap)."""
        if self.streams >= self.max_streams:
            return JSONResponse({"error": "busy", "message": f"already serving {self.max_streams} event streams; "
                                 "close a page"}, 503, headers={"Retry-After": "5", "Cache-Control": "no-store"})
        self.streams += 1
        return _Stream(self._stream(), self._release, media_type="text/event-stream",
                       headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def _release(self) -> None:
        self.streams -= 1

    async def _stream(self) -> AsyncIterator[str]:
        client = _Client()
        here = asyncio.get_running_loop()
        control = self.control or here

        def deliver(event: dict[str, Any] | None) -> None:  # on the gateway's loop
            with contextlib.suppress(RuntimeError):  # the page's loop has closed
                here.call_soon_threadsafe(client.put, event)

        async def start() -> tuple[asyncio.Task[None], dict[str, Any]]:  # on the gateway's loop
            pump = asyncio.create_task(_pump(self.gw, deliver), name=f"gw-{self.gw.id}-web-sse")
            await asyncio.sleep(0)  # the pump subscribes before the snapshot is taken: no event falls in between
            return pump, snapshot(self.gw)

        self._clients.add(client)
        pump: asyncio.Task[None] | None = None
        try:
            pump, first = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(start(), control))
            yield f"retry: {RETRY_MS}\n" + sse(first)
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
                yield sse(event)
        finally:
            # Cancelling the pump ends its subscription at once: the pump only ever waits inside the feed.
            if pump is not None:
                with contextlib.suppress(RuntimeError):  # the gateway's loop has closed
                    control.call_soon_threadsafe(pump.cancel)
            self._clients.discard(client)

    def close_streams(self) -> None:
        """End every open event stream (the server is stopping; browsers reconnect to the next gateway)."""

        def close() -> None:
            for client in self._clients:
                client.put(None)

        if self.loop is None:
            close()
        else:
            with contextlib.suppress(RuntimeError):  # the page's loop has already closed
                self.loop.call_soon_threadsafe(close)


class _Stream(StreamingResponse):
    """An event stream that gives its slot back when it ends, however it ends."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class _Client:
    """One connected event stream's queue; when the client falls behind its oldest events go, counted."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(MAX_QUEUED)
        self.dropped = 0

    def put(self, item: dict[str, Any] | None) -> None:
        if item is not None and item.get("type") == "dropped":  # the feed dropped some for this stream
            self.dropped += int(item.get("count", 1))
            return
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
                self.dropped += 1
        self.queue.put_nowait(item)


async def _pump(gw: Gateway, deliver: Callable[[dict[str, Any] | None], None]) -> None:
    """Hand the feed's events to one stream (runs on the gateway's loop, never waiting anywhere but inside the
    feed). Each event is copied there (the page's thread never touches the gateway's objects); ``state`` events get
    the loads waiting to be restored."""
    async for event in gw.events.subscribe():
        if event.get("type") == "state":
            event = {**event, "to_restore": restore_list(gw)}
        deliver(jsonable(event))


# -- serving ---------------------------------------------------------------------------------------------------



async def serve_web(gw: Gateway, keepalive_s: float = KEEPALIVE_S) -> None:
    """Serve ``gw``'s live page on ``[gateway] web_host:web_port`` until cancelled, from a thread of its own."""
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
    control = page.control = asyncio.get_running_loop()
    config = uvicorn.Config(page.app, log_config=None, access_log=False, lifespan="off", ws="none",
                            proxy_headers=False, server_header=False, timeout_graceful_shutdown=2)
    server = EmbeddedServer(config)
    stopped: asyncio.Future[None] = control.create_future()

    def set_stopped() -> None:
        if not stopped.done():
            stopped.set_result(None)

    def run() -> None:
        loop = asyncio.new_event_loop()
        page.loop = loop
        try:
            loop.run_until_complete(server.serve(sockets=[sock]))
        except Exception:
            log.exception("gateway %s: the field-tester page stopped", gw.id)
        finally:
            loop.close()
            with contextlib.suppress(RuntimeError):  # the gateway's loop has closed
                control.call_soon_threadsafe(set_stopped)

    host, port = sock.getsockname()[:2]
    thread = threading.Thread(target=run, name=f"gw-{gw.id}-web", daemon=True)
    _bound[gw] = (host, port)
    _pages[gw] = page
    log.info("gateway %s: field-tester page on http://%s:%d/", gw.id, host, port)
    thread.start()
    try:
        await asyncio.shield(stopped)
    except asyncio.CancelledError:
        # Stop in order: end the event streams, then let uvicorn close its connections and its socket.
        page.close_streams()
        server.should_exit = True
        await stopped
        raise
    finally:
        _bound.pop(gw, None)
        _pages.pop(gw, None)
        sock.close()
