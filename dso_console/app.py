"""The DSO's console (``dso-console``): the platform, a request followed live, feeder plots and the client registry.

A small Starlette server (uvicorn) between an operator's browser and the hub's public HTTP API. It holds the DSO's
bearer token (read from a file; never sent to the browser, never logged) and acts with the DSO's authority, so:

* it binds 127.0.0.1 by default; anywhere else the operator must sign in with a password (its scrypt hash is given
  with ``--password-hash-file``; a session cookie, HttpOnly and SameSite=Strict, follows). Only on a loopback
  address may it run without sign-in, and only when started with ``--no-login`` (the local simulator), in which
  case requests naming any other host are refused (DNS rebinding);
* every POST of the page carries the session's CSRF token in ``X-CSRF-Token`` (a cross-site form cannot set a
  header) and, when the browser says where it comes from, an ``Origin`` of this page; the sign-in form carries a
  pre-session token bound to a SameSite=Strict cookie;
* the page is static (``dso_console/static/``: HTML, one script, one stylesheet and the vendored uPlot; no external
  asset) under a CSP allowing only this origin's script and style.

Routes: ``GET /`` the page; ``GET|POST /login``, ``POST /logout``; ``GET /api/session`` (the CSRF token);
``GET /api/requests`` the requests posted from this page (newest first, kept in memory); ``POST /api/requests``
one form, validated by the hub's own models (:mod:`dso_console.forms`) and posted; ``GET /api/requests/{id}``,
``POST /api/requests/{id}/cancel`` and ``POST /api/requests/{id}/revise`` passed to the hub;
``GET /api/requests/{id}/events`` the request's view pushed each time the hub's change feed
(``GET /v1/requests/{id}/events``) says it changed, until it has ended (and :attr:`ConsoleSettings.settle_s` more,
for late cancel acknowledgements); ``GET /api/events`` the hub's feed of every DSO request, relayed;
``GET /api/status``, ``/api/hub-requests``, ``/api/clients``, ``/api/clients/{id}``, ``/api/audit``,
``/api/feeders/{id}/plot``, ``/api/latency``: the hub's console reads, for the screens.

Errors are ``{"error", "message"}`` plus ``problems`` (one per form field) for an invalid form (400, nothing posted)
or an invalid body (the hub's 422); the hub's 404, 409, 413, 429 and 503 pass through as they are; a hub that cannot
be reached, or refuses the DSO's token, is a 502.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import math
import re
import secrets
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, quote

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dso_console.forms import FormProblems, build_request, build_revision
from mhp_wire.ids import ID_RE
from mhp_wire.passwords import hash_password, verify_password
from mhp_wire.production import production_error, production_problems
from mhp_wire.webserver import BodyLimit, EmbeddedServer, bind, with_security_headers

log = logging.getLogger(__name__)

TERMINAL = frozenset({"completed", "partially_completed", "failed", "expired", "cancelled"})
MAX_BODY = 256 * 1024
LOGIN_MAX_BODY = 4096
"""The sign-in form's limit (read before anyone has signed in)."""
MAX_RECENT = 50
MAX_STREAMS = 32
MAX_CLIENT_ROWS = 1000
"""Clients a pushed view lists (the counts cover all of them)."""
KEEPALIVE_S = 15.0
RETRY_MS = 2000
SESSION_S = 8 * 3600
FEED_RETRY_S = 1.0
"""How long to wait before following the hub's feed again after it broke."""
FEED_READ_TIMEOUT_S = 60.0
OPENED = " open"
"""What :meth:`DsoConsole._hub_stream` yields as the event once the hub's feed is open (no event name the hub sends
can start with a space: they are stripped)."""
"""The hub sends a keep-alive every 15 s: a feed silent for this long is dead."""
MAX_BANDS = 50
MAX_LATENCY = 100
TRACE_KEYS = ("hub_ms", "storage_ms", "dispatch_ms", "retailer_ms", "gateway_ms", "total_ms", "completion_ms")
WINDOWS = {"emergency": ("start", "duration_s"), "load_reduction": ("start", "duration_s"),
           "load_shift": ("window_start", "window_end")}
"""The request types drawn as bands and the fields of their window."""
LOCK_AFTER = 5
"""Failed sign-ins from one address before it is locked out for a while (doubling with each further failure)."""

CLIENT_ID = ID_RE
"""A client id is a platform id (``mhp_wire.ids``): the hub's own rule, not a copy of it."""
REQUEST_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_.:\-]{8,100}")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


# -- views (pure) ----------------------------------------------------------------------------------------------


def summarize(view: dict[str, Any], max_rows: int = MAX_CLIENT_ROWS) -> dict[str, Any]:
    """The hub's view of a request as the page gets it: client states counted, the client table capped."""
    clients = view.get("clients") or {}
    counts: dict[str, int] = {}
    for c in clients.values():
        counts[c["state"]] = counts.get(c["state"], 0) + 1
    shown = dict(list(clients.items())[:max_rows])
    return {**view, "clients": shown, "client_counts": counts, "clients_total": len(clients)}


def band_window(kind: str, body: Mapping[str, Any]) -> tuple[float, float] | None:
    """``(start, end)`` in epoch seconds of a flexibility request's window, from its body (``None`` without one)."""
    fields = WINDOWS.get(kind)
    if fields is None:
        return None
    try:
        start = datetime.fromisoformat(str(body[fields[0]])).timestamp()
        if fields[1] == "duration_s":
            return start, start + float(body["duration_s"])
        return start, datetime.fromisoformat(str(body[fields[1]])).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def target_summary(body: dict[str, Any]) -> str:
    """Who a request is for, in a few words."""
    if "feeder_id" in body:
        return f"feeder {body['feeder_id']}"
    if "client_ids" in body:
        ids = body["client_ids"]
        return ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
    return "every retailer" if "tariff_id" in body else ""


def sse(event: dict[str, Any]) -> str:
    """One server-sent event: a single ``data:`` line of JSON."""
    return "data: " + json.dumps(event, separators=(",", ":"), default=str) + "\n\n"


# -- settings ----------------------------------------------------------------------------------------------------


@dataclass
class ConsoleSettings:
    """How the page server runs. ``password_hash`` ``None`` means no sign-in (loopback only)."""

    hub_url: str
    token: str = field(repr=False)
    host: str = "127.0.0.1"
    port: int = 8090
    password_hash: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    """The CA the hub's HTTPS certificate is checked with (the system's CAs when ``None``)."""
    poll_s: float = 0.25
    settle_s: float = 2.0
    secure_cookies: bool = False
    """Cookies only over HTTPS (``__Host-`` names); implied by ``tls_certfile`` and ``behind_tls_proxy``."""
    environment: Literal["development", "production"] = "development"
    """``production`` refuses a plain listener (no certificate and no TLS proxy) and a plain ``http://`` hub."""
    tls_certfile: Path | None = None
    """With ``tls_keyfile``: the page is served over HTTPS only (certificate chain, PEM)."""
    tls_keyfile: Path | None = None
    behind_tls_proxy: bool = False
    """Served plain to a TLS-terminating proxy: Secure cookies, X-Forwarded-Proto/For honoured from
    ``forwarded_allow_ips`` only."""
    forwarded_allow_ips: list[str] = field(default_factory=lambda: ["127.0.0.1"])

    def __post_init__(self) -> None:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("HTTPS needs both a certificate and its key (--tls-certfile, --tls-keyfile)")
        if self.tls_certfile is not None or self.behind_tls_proxy:
            self.secure_cookies = True
        if self.environment == "production":
            problems = production_problems(
                secrets={"the DSO's bearer token": self.token.strip()},
                listeners={"DSO page (--tls-certfile and --tls-keyfile, or --behind-tls-proxy)":
                           self.tls_certfile is not None or self.behind_tls_proxy},
                https_urls={"the hub URL": self.hub_url})
            if problems:
                raise ValueError(production_error(problems))
        if not self.token.strip():
            raise ValueError("the DSO's bearer token is empty")
        if self.password_hash is None and not is_loopback(self.host):
            raise ValueError(f"without sign-in the page may only listen on a loopback address, not {self.host!r}: "
                             "give --password-hash-file")
        if self.password_hash is not None and not self.password_hash.startswith("scrypt$"):
            raise ValueError("the password hash is not an scrypt hash (make one with: dso-console hash-password)")
        if not self.hub_url.startswith(("http://", "https://")):
            raise ValueError(f"the hub URL must start with http:// or https://, not {self.hub_url!r}")


@dataclass
class _Session:
    csrf: str
    expires_at: float


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0


@dataclass
class _Followed:
    """What a follower of one request was last told: its view, the hub's error, when it ended, the feed's error."""

    last: dict[str, Any] | None = None
    last_error: str | None = None
    ended_at: float | None = None
    feed_error: str | None = None


async def _next_change(changes: asyncio.Queue[tuple[str, str]], wait_s: float) -> tuple[str, str] | None:
    """The last of the changes on ``changes`` once one comes within ``wait_s`` (many at once: one fetch); None when
    none came."""
    try:
        change = await asyncio.wait_for(changes.get(), wait_s)
    except TimeoutError:
        return None
    while not changes.empty():
        change = changes.get_nowait()
    return change


class _HubError(Exception):
    """The hub could not be reached."""


# -- the application ---------------------------------------------------------------------------------------------


class Guard:
    """ASGI middleware: security headers and no caching on every response; without sign-in, loopback hosts only."""

    def __init__(self, app: ASGIApp, loopback_only: bool) -> None:
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.loopback_only:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not is_loopback(name):
                response = JSONResponse({"error": "forbidden", "message": "this page answers only to a loopback "
                                         "host name (it runs without sign-in)"}, 403)
                await self._headers(response)(scope, receive, send)
                return

        await self.app(scope, receive, with_security_headers(send, SECURITY_HEADERS))

    @staticmethod
    def _headers(response: Response) -> Response:
        response.headers.update({**SECURITY_HEADERS, "cache-control": "no-store"})
        return response


ASSETS = {"dso.js": ("dso.js", "text/javascript"), "dso.css": ("dso.css", "text/css"),
          "uplot.js": ("vendor/uPlot.iife.min.js", "text/javascript"),
          "uplot.css": ("vendor/uPlot.min.css", "text/css")}
"""What ``/static/NAME`` serves: each name's file under ``dso_console/static/`` and its media type."""


def _static(name: str) -> str:
    return resources.files("dso_console.static").joinpath(*name.split("/")).read_text(encoding="utf-8")


class DsoConsole:
    """The page server; :meth:`serving` runs it."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.login_required = settings.password_hash is not None
        secure = settings.secure_cookies
        self.session_cookie = "__Host-dso_session" if secure else "dso_session"
        self.login_cookie = "__Host-dso_login" if secure else "dso_login"
        self._sessions: dict[str, _Session] = {}
        """Sessions by the SHA-256 of their token (the token itself is only in the operator's cookie)."""
        self._open_csrf = secrets.token_urlsafe(32)
        """The CSRF token of the page when it runs without sign-in."""
        self._failures: dict[str, _Failures] = {}
        self._login_lock = asyncio.Lock()
        self.recent: list[dict[str, Any]] = []
        """Requests posted from this page, newest first (at most :data:`MAX_RECENT`)."""
        self.streams = 0
        self._closing = asyncio.Event()
        self.http: httpx.AsyncClient | None = None
        self.address: tuple[str, int] | None = None
        self.page_html = _static("dso.html")
        self.assets = {name: (_static(path), media) for name, (path, media) in ASSETS.items()}
        self.app = Starlette(routes=[
            Route("/", self.page, methods=["GET"]),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"],  # read before sign-in: a smaller limit
                  middleware=[Middleware(BodyLimit, max_bytes=LOGIN_MAX_BODY)]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/static/{name:path}", self.static_asset, methods=["GET"]),
            Route("/api/session", self.session_info, methods=["GET"]),
            Route("/api/requests", self.list_requests, methods=["GET"]),
            Route("/api/requests", self.create, methods=["POST"]),
            Route("/api/requests/{request_id}", self.get_request, methods=["GET"]),
            Route("/api/requests/{request_id}/cancel", self.cancel, methods=["POST"]),
            Route("/api/requests/{request_id}/revise", self.revise, methods=["POST"]),
            Route("/api/requests/{request_id}/events", self.events, methods=["GET"]),
            Route("/api/events", self.all_events, methods=["GET"]),
            Route("/api/status", self.status, methods=["GET"]),
            Route("/api/hub-requests", self.hub_requests, methods=["GET"]),
            Route("/api/clients", self.clients, methods=["GET"]),
            Route("/api/clients/{client_id}", self.client, methods=["GET"]),
            Route("/api/audit", self.audit, methods=["GET"]),
            Route("/api/feeders/{feeder_id}/plot", self.feeder_plot, methods=["GET"]),
            Route("/api/latency", self.latency, methods=["GET"]),
        ], middleware=[Middleware(Guard, loopback_only=not self.login_required),
                       Middleware(BodyLimit, max_bytes=MAX_BODY)])

    @property
    def url(self) -> str:
        """``http://host:port`` (``https://`` with its own certificate) while serving."""
        assert self.address is not None, "the DSO page is not serving"
        host, port = self.address
        scheme = "https" if self.settings.tls_certfile is not None else "http"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"

    # -- sessions ---------------------------------------------------------------------------------------------

    def _session(self, request: Request) -> _Session | None:
        """The operator's session; without sign-in, the page's one implicit session."""
        if not self.login_required:
            return _Session(self._open_csrf, math.inf)
        token = request.cookies.get(self.session_cookie, "")
        if not token or len(token) > 100:
            return None
        key = hashlib.sha256(token.encode()).hexdigest()
        session = self._sessions.get(key)
        if session is None or session.expires_at < time.time():
            self._sessions.pop(key, None)
            return None
        return session

    def _set_cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict",
                            secure=self.settings.secure_cookies)

    def _login_page(self, status: int, message: str | None = None) -> Response:
        token = secrets.token_urlsafe(32)
        alert = f'<p class="alert" role="alert">{html.escape(message)}</p>' if message else ""
        body = ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
                '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
                '<title>DSO: sign in</title>'
                '<link rel="stylesheet" href="/static/dso.css"></head><body><main class="login"><h1>DSO requests</h1>'
                f'{alert}<form method="post" action="/login"><input type="hidden" name="csrf" value="{token}">'
                '<label>Operator password <input type="password" name="password" autocomplete="current-password" '
                'required autofocus></label><button type="submit">Sign in</button></form></main></body></html>')
        response = HTMLResponse(body, status)
        self._set_cookie(response, self.login_cookie, token, 3600)
        return response

    def _post_refusal(self, request: Request) -> Response | None:
        """A refusal unless the POST comes from a signed-in session (:meth:`_check_post`)."""
        session = self._session(request)
        if session is None:
            return _signed_out()
        return self._check_post(request, session)

    def _check_post(self, request: Request, session: _Session) -> Response | None:
        """A refusal unless the POST is JSON from this page carrying the session's CSRF token."""
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin is not None and origin != own:
            return _error(403, "forbidden", "the request did not come from this page")
        given = request.headers.get("x-csrf-token", "")
        if not given or not hmac.compare_digest(given.encode(), session.csrf.encode()):
            return _error(403, "forbidden", "missing or stale CSRF token: reload the page")
        return None

    # -- pages ------------------------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        """``GET /``: the page (the sign-in form first when needed)."""
        if self._session(request) is None:
            return RedirectResponse("/login", 303)
        return HTMLResponse(self.page_html)

    async def static_asset(self, request: Request) -> Response:
        """``GET /static/NAME``: the page's script and stylesheet and the vendored uPlot (nothing else)."""
        asset = self.assets.get(request.path_params["name"])
        if asset is None:
            return _error(404, "not_found", "no such file")
        return Response(asset[0], media_type=asset[1])

    async def login_form(self, request: Request) -> Response:
        """``GET /login``: the sign-in form (straight to the page when signed in or without sign-in)."""
        if self._session(request) is not None:
            return RedirectResponse("/", 303)
        return self._login_page(200)

    # Complexity (PLR0911): a form handler answers each refusal at the point it is found.
    async def login(self, request: Request) -> Response:  # noqa: PLR0911
        """``POST /login``: check the operator's password; a new session on success."""
        if not self.login_required:
            return RedirectResponse("/", 303)
        try:
            form = dict(parse_qsl((await _read_body(request, LOGIN_MAX_BODY)).decode(), max_num_fields=5))
        except _TooLarge:
            return self._login_page(413, "The form is too large.")
        except (ValueError, UnicodeDecodeError):
            return self._login_page(400, "The form could not be read.")
        expected = request.cookies.get(self.login_cookie, "")
        given = form.get("csrf", "")
        if not (given and expected and hmac.compare_digest(given.encode(), expected.encode())):
            return self._login_page(403, "The sign-in form had expired; please sign in again.")
        address = request.client.host if request.client else "unknown"
        async with self._login_lock:  # one check at a time: parallel guesses cannot slip past the lock-out
            failures = self._failures.setdefault(address, _Failures())
            wait_s = failures.locked_until - time.monotonic()
            if wait_s > 0:
                response = self._login_page(429, f"Too many failed sign-ins; try again in {math.ceil(wait_s)} s.")
                response.headers["retry-after"] = str(math.ceil(wait_s))
                return response
            assert self.settings.password_hash is not None
            ok = await asyncio.get_running_loop().run_in_executor(
                None, verify_password, form.get("password", "")[:1024], self.settings.password_hash)
            if not ok:
                failures.count += 1
                if failures.count >= LOCK_AFTER:
                    failures.locked_until = time.monotonic() + min(900, 30 * 2 ** (failures.count - LOCK_AFTER))
                log.warning("DSO page: failed sign-in from %s (%d in a row)", address, failures.count)
                return self._login_page(401, "Wrong password.")
            self._failures.pop(address, None)
        token = secrets.token_urlsafe(32)
        now = time.time()
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires_at > now}
        self._sessions[hashlib.sha256(token.encode()).hexdigest()] = _Session(secrets.token_urlsafe(32),
                                                                             now + SESSION_S)
        log.info("DSO page: operator signed in from %s", address)
        response = RedirectResponse("/", 303)
        self._set_cookie(response, self.session_cookie, token, SESSION_S)
        response.delete_cookie(self.login_cookie, path="/", httponly=True, samesite="strict",
                               secure=self.settings.secure_cookies)
        return response

    async def logout(self, request: Request) -> Response:
        """``POST /logout`` (with the CSRF token): the session ends."""
        session = self._session(request)
        if session is not None and self.login_required:
            refused = self._check_post(request, session)
            if refused is not None:
                return refused
            token = request.cookies.get(self.session_cookie, "")
            self._sessions.pop(hashlib.sha256(token.encode()).hexdigest(), None)
        response = JSONResponse({"signed_out": True})
        response.delete_cookie(self.session_cookie, path="/", httponly=True, samesite="strict",
                               secure=self.settings.secure_cookies)
        return response

    # -- the API the page uses --------------------------------------------------------------------------------

    async def session_info(self, request: Request) -> Response:
        """``GET /api/session``: the CSRF token for the page's POSTs (readable by this origin only)."""
        session = self._session(request)
        if session is None:
            return _signed_out()
        return JSONResponse({"csrf": session.csrf, "login": self.login_required, "hub_url": self.settings.hub_url})

    async def list_requests(self, request: Request) -> Response:
        """``GET /api/requests``: the requests posted from this page, newest first."""
        if self._session(request) is None:
            return _signed_out()
        return JSONResponse({"requests": self.recent})

    async def create(self, request: Request) -> Response:
        """``POST /api/requests``: one form, checked, turned into the hub's body and posted to the hub."""
        refused = self._post_refusal(request)
        if refused is not None:
            return refused
        form = await _json_form(request)
        if isinstance(form, Response):
            return form
        try:
            kind, path, body = build_request(form)
        except FormProblems as exc:
            return _error(400, "invalid_form", f"nothing was posted: {exc}", problems=exc.problems)
        headers = {}
        key = form.get("idempotency_key")
        if key is not None:
            if not isinstance(key, str) or not IDEMPOTENCY_KEY.fullmatch(key):
                return _error(400, "invalid_form", "nothing was posted: a bad idempotency key",
                              problems=[{"field": "idempotency_key", "message": "8 to 100 letters, digits, _ . : -"}])
            headers["Idempotency-Key"] = "dso-web-" + key
        return await self._post_request(kind, path, body, headers)

    async def _post_request(self, kind: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> Response:
        """Post a checked request to the hub, remember it among the recent ones, and pass on the hub's answer."""
        try:
            status, answer = await self._hub("POST", path, json=body, headers=headers)
        except _HubError as exc:
            return _error(502, "hub_unreachable", str(exc))
        if status >= 300:
            log.info("DSO page: the hub refused a %s: %d %s", kind, status, answer.get("message"))
            return _passed(status, answer)
        rid = str(answer.get("request_id", ""))
        if not any(r["request_id"] == rid for r in self.recent):
            self.recent.insert(0, {"request_id": rid, "kind": kind, "posted_at": time.time(),
                                   "targets": target_summary(body), "state": answer.get("state", "accepted")})
            del self.recent[MAX_RECENT:]
        log.info("DSO page: posted %s %s for %s", kind, rid, target_summary(body))
        return JSONResponse({**answer, "kind": kind, "body": body}, 202)

    async def get_request(self, request: Request) -> Response:
        """``GET /api/requests/{id}``: the hub's view of a request, once."""
        if self._session(request) is None:
            return _signed_out()
        asked = await self._ask_about_request(request, "GET", "")
        return asked if isinstance(asked, Response) else JSONResponse(summarize(asked))

    async def cancel(self, request: Request) -> Response:
        """``POST /api/requests/{id}/cancel``: cancel a request that has not ended."""
        session = self._session(request)
        if session is None:
            return _signed_out()
        refused = self._check_post(request, session)
        if refused is not None:
            return refused
        asked = await self._ask_about_request(request, "POST", "/cancel")
        if isinstance(asked, Response):
            return asked
        log.info("DSO page: cancelled %s", request.path_params["request_id"])
        return JSONResponse(asked)

    async def _ask_about_request(self, request: Request, method: str, suffix: str) -> Response | dict[str, Any]:
        """The hub's 200 answer about the request named in the path (``/v1/requests/{id}`` + `suffix`), noted in
        the recent list; the page's answer instead when the id is malformed, the hub unreachable or refusing."""
        rid = request.path_params["request_id"]
        if not REQUEST_ID.fullmatch(rid):
            return _error(404, "not_found", "not a request id")
        try:
            status, answer = await self._hub(method, f"/v1/requests/{quote(rid, safe='')}{suffix}")
        except _HubError as exc:
            return _error(502, "hub_unreachable", str(exc))
        if status != 200:
            return _passed(status, answer)
        self._note_state(rid, answer)
        return answer

    async def events(self, request: Request) -> Response:
        """``GET /api/requests/{id}/events``: the request's view as server-sent events, each time it changes."""
        if self._session(request) is None:
            return _signed_out()
        rid = request.path_params["request_id"]
        if not REQUEST_ID.fullmatch(rid):
            return _error(404, "not_found", "not a request id")
        if self.streams >= MAX_STREAMS:
            return _error(503, "busy", f"already following {MAX_STREAMS} requests; close a page")
        return StreamingResponse(self._follow(rid, request), media_type="text/event-stream",
                                 headers={"X-Accel-Buffering": "no"})

    async def _follow(self, rid: str, request: Request) -> AsyncIterator[str]:
        """The request's view, fetched once the hub's feed of it is open and again after each change it reports."""
        self.streams += 1
        changes: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        feed = asyncio.create_task(self._watch(f"/v1/requests/{quote(rid, safe='')}/events", changes),
                                   name=f"dso-console-feed-{rid}")
        try:
            yield f"retry: {RETRY_MS}\n\n"
            seen = _Followed()
            fetch = False
            while not self._closing.is_set() and not await request.is_disconnected():
                if fetch:
                    messages, over = await self._refresh(rid, seen)
                    for message in messages:
                        yield message
                    if over:
                        return
                wait_s = KEEPALIVE_S
                if seen.ended_at is not None:
                    wait_s = self.settings.settle_s - (time.monotonic() - seen.ended_at)
                    if wait_s <= 0:  # ended, and no late change (a cancel acknowledgement) for settle_s
                        yield sse({"type": "end", "state": seen.last.get("state") if seen.last else None})
                        return
                change = await _next_change(changes, wait_s)
                if change is None:
                    if seen.ended_at is None:
                        yield ": keep-alive\n\n"
                    fetch = False
                    continue
                fetch = True  # after a change, or once a second while the feed cannot be followed (the GET says why)
                kind, message = change
                if kind == "error" and message != seen.feed_error:
                    seen.feed_error = message
                    log.warning("DSO console: cannot follow the hub's feed of %s: %s", rid, message)
        finally:
            self.streams -= 1
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed

    async def _refresh(self, rid: str, seen: _Followed) -> tuple[list[str], bool]:
        """Fetch the request's view for its follower: the events to send it (the view when it changed; the hub's
        error, once while it lasts), and whether the stream is over (the request cannot be followed)."""
        try:
            status, answer = await self._hub("GET", f"/v1/requests/{quote(rid, safe='')}")
        except _HubError as exc:
            status, answer = 502, {"error": "hub_unreachable", "message": str(exc)}
        if status == 200:
            seen.last_error = None
            messages = []
            if answer != seen.last:
                seen.last = answer
                self._note_state(rid, answer)
                messages.append(sse({"type": "request", "request": summarize(answer)}))
            if answer.get("state") in TERMINAL:
                seen.ended_at = seen.ended_at or time.monotonic()
            return messages, False
        if status in (404, 403) or (status == 502 and answer.get("error") == "hub_refused"):
            return [sse({"type": "error", "status": status, **answer}), sse({"type": "end", "state": None})], True
        if answer.get("message") != seen.last_error:  # the hub is away or busy: say so once
            seen.last_error = answer.get("message")
            return [sse({"type": "error", "status": status, **answer, "retrying": True})], False
        return [], False

    async def _watch(self, path: str, changes: asyncio.Queue[tuple[str, str]]) -> None:
        """Follow the hub's feed at ``path``, putting ``("change", "")`` on ``changes`` when it opens and after each
        event; when it cannot be followed, ``("error", why)`` once a second (the follower then fetches anyway)."""
        last_id: str | None = None
        while True:
            try:
                async for kind, event_id, _ in self._hub_stream(path, last_id, announce=True):
                    if event_id:
                        last_id = event_id
                    await changes.put((kind, ""))
            except _HubError as exc:
                await changes.put(("error", str(exc)))
            await asyncio.sleep(FEED_RETRY_S)

    async def _hub_stream(self, path: str, last_id: str | None,
                          announce: bool = False) -> AsyncIterator[tuple[str, str, str]]:
        """``(event, id, data)`` of the hub's server-sent events at ``path`` (with ``announce``, ``(OPENED, "", "")``
        first, once open: the hub's first line has come, which it writes once it follows, so every change it stores
        after that is in the stream); :class:`_HubError` when it cannot be reached or does not answer 200."""
        assert self.http is not None, "the console is not serving"
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        try:
            async with self.http.stream("GET", path, headers=headers,
                                        timeout=httpx.Timeout(10, read=FEED_READ_TIMEOUT_S)) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise _HubError(f"the hub's feed answered {r.status_code}: {r.text[:200]}")
                event, event_id, data = "message", "", list[str]()
                async for line in r.aiter_lines():
                    if announce:
                        announce = False
                        yield OPENED, "", ""
                    if not line:
                        if data:
                            yield event, event_id, "\n".join(data)
                        event, data = "message", []
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip(" "))
                    elif line.startswith("id:"):
                        event_id = line[3:].strip()
                    elif line.startswith("event:"):
                        event = line[6:].strip()
        except httpx.HTTPError as exc:
            raise _HubError(f"the hub's feed at {self.settings.hub_url} broke: {type(exc).__name__}: {exc}") from None

    async def all_events(self, request: Request) -> Response:
        """``GET /api/events``: the hub's feed of the DSO's requests (``GET /v1/events``), relayed as it comes, with
        its event ids (a reconnecting browser's ``Last-Event-ID`` resumes at the hub)."""
        if self._session(request) is None:
            return _signed_out()
        last_id = request.headers.get("last-event-id")
        if last_id is not None and not last_id.isdigit():
            return _error(422, "invalid", "Last-Event-ID is not an event id")
        if self.streams >= MAX_STREAMS:
            return _error(503, "busy", f"already relaying {MAX_STREAMS} streams; close a page")
        return StreamingResponse(self._relay(last_id, request), media_type="text/event-stream",
                                 headers={"X-Accel-Buffering": "no"})

    async def _relay(self, last_id: str | None, request: Request) -> AsyncIterator[str]:
        """The relayed feed. Its first line (``retry:``) is written once the hub's feed is open (or could not be
        opened): the hub's feed without ``Last-Event-ID`` starts from when it opens, so a change the browser makes
        after that line is relayed, and one made before it may not be."""
        self.streams += 1
        started = False
        try:
            while not self._closing.is_set() and not await request.is_disconnected():
                try:
                    async for event, event_id, data in self._hub_stream("/v1/events", last_id, announce=True):
                        if event == OPENED:
                            if not started:
                                started = True
                                yield f"retry: {RETRY_MS}\n\n"
                            continue
                        if event_id:
                            last_id = event_id
                        yield (f"id: {event_id}\n" if event_id else "") + f"event: {event}\ndata: {data}\n\n"
                except _HubError as exc:
                    if not started:
                        started = True
                        yield f"retry: {RETRY_MS}\n\n"
                    yield "event: hub\ndata: " + json.dumps({"error": "feed", "message": str(exc)}) + "\n\n"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), FEED_RETRY_S)
        finally:
            self.streams -= 1

    # -- the console's reads ----------------------------------------------------------------------------------

    async def _read(self, request: Request, path: str, params: dict[str, Any] | None = None) -> Response:
        """The hub's answer to a GET, as it is (errors passed through)."""
        if self._session(request) is None:
            return _signed_out()
        try:
            status, answer = await self._hub("GET", path, params=params)
        except _HubError as exc:
            return _error(502, "hub_unreachable", str(exc))
        return JSONResponse(answer) if status == 200 else _passed(status, answer)

    @staticmethod
    def _params(request: Request, *names: str) -> dict[str, str]:
        return {n: request.query_params[n][:200] for n in names if n in request.query_params}

    async def status(self, request: Request) -> Response:
        """``GET /api/status``: the platform now (the hub's ``GET /v1/status``)."""
        return await self._read(request, "/v1/status")

    async def hub_requests(self, request: Request) -> Response:
        """``GET /api/hub-requests``: the DSO's requests at the hub, newest first (``GET /v1/requests``)."""
        return await self._read(request, "/v1/requests", self._params(request, "state", "type", "since", "limit",
                                                                      "after"))

    async def clients(self, request: Request) -> Response:
        """``GET /api/clients``: the client registry with supplier history (``GET /v1/clients``)."""
        return await self._read(request, "/v1/clients", self._params(request, "feeder_id", "retailer_id", "limit",
                                                                     "after"))

    async def client(self, request: Request) -> Response:
        """``GET /api/clients/{id}``: one client with its supplier history."""
        cid = request.path_params["client_id"]
        if not CLIENT_ID.fullmatch(cid):
            return _error(404, "not_found", "not a client id")
        return await self._read(request, f"/v1/clients/{quote(cid, safe='')}")

    async def audit(self, request: Request) -> Response:
        """``GET /api/audit?client_id=&days=``: a client's data access log (``GET /v1/audit``), the last ``days``
        (1 to 366, default 7)."""
        cid = request.query_params.get("client_id", "")
        if not CLIENT_ID.fullmatch(cid):
            return _error(422, "invalid", "give a client_id (letters, digits, _ . -)")
        try:
            days = int(request.query_params.get("days", "7"))
        except ValueError:
            days = 0
        if not 1 <= days <= 366:
            return _error(422, "invalid", "days is a whole number from 1 to 366")
        now = datetime.now(UTC)
        return await self._read(request, "/v1/audit", {"client_id": cid,
                                                       "from": (now - timedelta(days=days)).isoformat(),
                                                       "to": (now + timedelta(minutes=1)).isoformat()})

    async def feeder_plot(self, request: Request) -> Response:
        """``GET /api/feeders/{id}/plot?hours=&step_s=``: a feeder's measured active power over the last ``hours``
        (``GET /v1/feeders/{id}/measurements``) as columns for the plot, with the DSO's requests that concern the
        feeder as bands ``[start, end]`` on the time axis (their windows, from ``GET /v1/requests/{id}``)."""
        if self._session(request) is None:
            return _signed_out()
        feeder = request.path_params["feeder_id"]
        try:
            hours = float(request.query_params.get("hours", "3"))
            step_s = int(request.query_params.get("step_s", "60"))
        except ValueError:
            return _error(422, "invalid", "hours is a number and step_s a whole number")
        if not (0 < hours <= 48 and 1 <= step_s <= 3600):
            return _error(422, "invalid", "hours from 0 to 48, step_s from 1 to 3600")
        now = datetime.now(UTC)
        start = now - timedelta(hours=hours)
        path = f"/v1/feeders/{quote(feeder, safe='')}/measurements"
        try:
            status, series = await self._hub("GET", path, params={
                "from": start.isoformat(), "to": (now + timedelta(seconds=step_s)).isoformat(), "step_s": step_s})
            if status != 200:
                return _passed(status, series)
            bands = await self._bands(feeder, start)
        except _HubError as exc:
            return _error(502, "hub_unreachable", str(exc))
        xs = [datetime.fromisoformat(b["start"]).timestamp() for b in series.get("series", [])]
        kw = [b.get("active_power_kw") for b in series.get("series", [])]
        return JSONResponse({"feeder_id": feeder, "from": series.get("from"), "to": series.get("to"),
                             "step_s": step_s, "clients": series.get("clients"), "x": xs, "kw": kw,
                             "reporting": [b.get("clients_reporting") for b in series.get("series", [])],
                             "bands": bands})

    async def _bands(self, feeder: str, since: datetime) -> list[dict[str, Any]]:
        """The DSO's flexibility requests of the feeder (by feeder or by its clients) that overlap ``since`` to
        now: ``{request_id, type, state, start, end}`` (epoch seconds)."""
        status, listed = await self._hub("GET", "/v1/requests", params={
            "since": (since - timedelta(days=7)).isoformat(), "limit": MAX_BANDS})
        if status != 200:
            return []
        flex = [r for r in listed.get("requests", []) if r.get("type") in WINDOWS]
        if not flex:
            return []
        views = await asyncio.gather(*(self._hub("GET", f"/v1/requests/{quote(r['request_id'], safe='')}")
                                       for r in flex))
        ours: set[str] = set()
        if any(status == 200 and (view.get("request") or {}).get("client_ids") for status, view in views):
            # Only when a request names clients: each listing is a line per client in the data access log.
            status, members = await self._hub("GET", "/v1/clients", params={"feeder_id": feeder, "limit": 1000})
            ours = {c["client_id"] for c in members.get("clients", [])} if status == 200 else set()
        bands = []
        for (status, view), listed_one in zip(views, flex, strict=True):
            if status != 200:
                continue
            body = view.get("request") or {}
            if body.get("feeder_id") != feeder and not ours & set(body.get("client_ids") or ()):
                continue
            window = band_window(listed_one["type"], body)
            if window is None or window[1] < since.timestamp():
                continue
            bands.append({"request_id": listed_one["request_id"], "type": listed_one["type"],
                          "state": view.get("state"), "start": window[0], "end": window[1]})
        return bands

    async def latency(self, request: Request) -> Response:
        """``GET /api/latency?limit=``: the trace per component of the DSO's recent requests, oldest first."""
        if self._session(request) is None:
            return _signed_out()
        try:
            limit = int(request.query_params.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LATENCY:
            return _error(422, "invalid", f"limit is a whole number from 1 to {MAX_LATENCY}")
        try:
            status, listed = await self._hub("GET", "/v1/requests", params={"limit": limit})
            if status != 200:
                return _passed(status, listed)
            views = await asyncio.gather(*(self._hub("GET", f"/v1/requests/{quote(r['request_id'], safe='')}")
                                           for r in listed.get("requests", [])))
        except _HubError as exc:
            return _error(502, "hub_unreachable", str(exc))
        out = [{"request_id": v["request_id"], "type": v.get("type"), "state": v.get("state"),
                "created_at": v.get("created_at"),
                "trace": {k: v.get("trace", {}).get(k) for k in TRACE_KEYS}}
               for status, v in views if status == 200]
        return JSONResponse({"requests": out[::-1], "components": list(TRACE_KEYS)})

    async def revise(self, request: Request) -> Response:
        """``POST /api/requests/{id}/revise``: the fields that change, validated by the hub's revision model."""
        refused = self._post_refusal(request)
        if refused is not None:
            return refused
        rid = request.path_params["request_id"]
        if not REQUEST_ID.fullmatch(rid):
            return _error(404, "not_found", "not a request id")
        form = await _json_form(request)
        if isinstance(form, Response):
            return form
        try:
            body = build_revision(form)
        except FormProblems as exc:
            return _error(400, "invalid_form", f"nothing was revised: {exc}", problems=exc.problems)
        return await self._post_revision(rid, form, body)

    async def _post_revision(self, rid: str, form: dict[str, Any], body: dict[str, Any]) -> Response:
        """Post a checked revision to the hub (once per idempotency key the form carries) and pass on its answer."""
        headers = {}
        key = form.get("idempotency_key")
        if isinstance(key, str) and IDEMPOTENCY_KEY.fullmatch(key):
            headers["Idempotency-Key"] = "dso-console-rev-" + key
        try:
            status, answer = await self._hub("POST", f"/v1/requests/{quote(rid, safe='')}/revise", json=body,
                                             headers=headers)
        except _HubError as exc:
            return _error(502, "hub_unreachable", str(exc))
        if status >= 300:
            return _passed(status, answer)
        log.info("DSO console: revised %s to revision %s", rid, answer.get("revision"))
        return JSONResponse({**answer, "body": body}, 202)

    def _note_state(self, rid: str, view: Mapping[str, Any]) -> None:
        for r in self.recent:
            if r["request_id"] == rid:
                r["state"] = view.get("state", r["state"])

    async def _hub(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        """The hub's status and JSON answer (a 502 when it refuses the DSO's token); :class:`_HubError` when it
        cannot be reached."""
        assert self.http is not None, "the DSO page is not serving"
        try:
            try:
                r = await self.http.request(method, path, **kwargs)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                if method != "GET":
                    raise
                # A pooled connection the hub closed as it was reused (its keep-alive ran out as the request left):
                # a read is asked again once, on a fresh connection.
                r = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _HubError(f"cannot reach the hub at {self.settings.hub_url}: {type(exc).__name__}: {exc}") from None
        try:
            answer = r.json()
        except ValueError:
            answer = {"error": "error", "message": r.text[:300]}
        if not isinstance(answer, dict):
            answer = {"error": "error", "message": str(answer)[:300]}
        if "retry-after" in r.headers:
            answer["retry_after"] = r.headers["retry-after"]
        if r.status_code == 401:
            return 502, {"error": "hub_refused", "message": f"the hub refused the DSO's token: {answer.get('message')}"}
        return r.status_code, answer

    # -- serving ----------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[DsoConsole]:
        """Serve on ``host:port`` (the port may be 0) inside the block."""
        s = self.settings
        verify: ssl.SSLContext | bool = True if s.ca_file is None else ssl.create_default_context(cafile=str(s.ca_file))
        sock = bind(s.host, s.port)
        self._closing.clear()
        # Idle connections are dropped well before the hub's keep-alive ends (uvicorn: 5 s), so that a reused one
        # is not closed by the hub under the request (the page's reads come every 5 s).
        async with httpx.AsyncClient(base_url=s.hub_url, timeout=10, verify=verify,
                                     limits=httpx.Limits(keepalive_expiry=2.0),
                                     headers={"Authorization": f"Bearer {s.token.strip()}"}) as http:
            self.http = http
            config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", ws="none",
                                    server_header=False, timeout_graceful_shutdown=2,
                                    ssl_certfile=s.tls_certfile, ssl_keyfile=s.tls_keyfile,
                                    proxy_headers=s.behind_tls_proxy, forwarded_allow_ips=s.forwarded_allow_ips)
            server = EmbeddedServer(config)
            serving = asyncio.create_task(server.serve(sockets=[sock]), name="dso-console")
            self.address = sock.getsockname()[:2]  # bound already: connections wait in its backlog until served
            log.info("DSO page on %s/ (hub %s, %s)", self.url, s.hub_url,
                     "operator sign-in" if self.login_required else "no sign-in: loopback only")
            try:
                yield self
            finally:
                self._closing.set()
                server.should_exit = True
                try:
                    await serving
                finally:
                    self.address = None
                    self.http = None
                    sock.close()


class _TooLarge(Exception):
    """A request body above the page's limit."""


async def _read_body(request: Request, limit: int) -> bytes:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge
    return body


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status)


async def _json_form(request: Request) -> dict[str, Any] | Response:
    """The JSON object a form POST carries, or the refusal to answer (not JSON, too large, not an object)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return _error(415, "unsupported_media_type", "send the form as application/json")
    try:
        form = json.loads(await _read_body(request, MAX_BODY))
    except _TooLarge:
        return _error(413, "too_large", f"the form is larger than {MAX_BODY // 1024} KiB")
    except (ValueError, UnicodeDecodeError):
        return _error(400, "invalid_form", "the form is not JSON")
    if not isinstance(form, dict):
        return _error(400, "invalid_form", "the form is not a JSON object")
    return form


def _signed_out() -> JSONResponse:
    return _error(401, "signed_out", "sign in first (reload the page)")


def _passed(status: int, answer: dict[str, Any]) -> JSONResponse:
    """The hub's error as the browser gets it: same status, same code, message and problems."""
    out = {"error": answer.get("error", "error"), "message": answer.get("message", ""), "hub_status": status}
    if "problems" in answer:
        out["problems"] = answer["problems"]
    retry = answer.get("retry_after")
    return JSONResponse(out, status, headers={"retry-after": str(retry)} if retry else None)


# -- command line ------------------------------------------------------------------------------------------------


def _parser(prog: str) -> argparse.ArgumentParser:
    """The options of ``dso-console``."""
    parser = argparse.ArgumentParser(prog=prog, description="The DSO's console: the platform, requests "
                                     f"followed live, feeder plots, the client registry. ({prog} hash-password < PW "
                                     "makes a hash)")
    parser.add_argument("--hub-url", required=True, help="the hub's HTTP API, like http://127.0.0.1:8080")
    parser.add_argument("--token-file", type=Path, required=True, help="a file holding the DSO's bearer token")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090, help="0: any free port (the URL is printed)")
    login = parser.add_mutually_exclusive_group(required=True)
    login.add_argument("--password-hash-file", type=Path,
                       help="a file holding the operator password's scrypt hash (dso-console hash-password)")
    login.add_argument("--no-login", action="store_true", help="no sign-in (only on a loopback address)")
    parser.add_argument("--ca-file", type=Path, help="the CA of the hub's HTTPS certificate")
    parser.add_argument("--poll-s", type=float, default=0.25, help="how often a followed request is asked for")
    parser.add_argument("--secure-cookies", action="store_true", help="HTTPS-only cookies (implied by the next two)")
    parser.add_argument("--tls-certfile", type=Path, help="with --tls-keyfile: serve the page over HTTPS")
    parser.add_argument("--tls-keyfile", type=Path)
    parser.add_argument("--behind-tls-proxy", action="store_true",
                        help="served to a TLS proxy: Secure cookies, X-Forwarded-* from --forwarded-allow-ips")
    parser.add_argument("--forwarded-allow-ips", default="127.0.0.1",
                        help="comma-separated addresses of the TLS proxy (default 127.0.0.1)")
    parser.add_argument("--environment", choices=["development", "production"], default="development",
                        help="production: refuse a plain listener and a plain http:// hub")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None, prog: str = "dso-console") -> int:
    """``dso-console``: serve the console until SIGINT or SIGTERM; ``dso-console hash-password`` makes a hash.

    ``prog`` is the name it answers to (``mhp-sim dso-web`` runs it too)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["hash-password"]:
        password = getpass.getpass("operator password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
        if len(password) < 10:
            print(f"{prog}: the password needs at least 10 characters", file=sys.stderr)
            return 2
        print(hash_password(password))
        return 0
    ns = _parser(prog).parse_args(args)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = ConsoleSettings(
            hub_url=ns.hub_url.rstrip("/"), token=ns.token_file.read_text(), host=ns.host, port=ns.port,
            password_hash=None if ns.no_login else ns.password_hash_file.read_text().strip(), ca_file=ns.ca_file,
            poll_s=ns.poll_s, secure_cookies=ns.secure_cookies, environment=ns.environment,
            tls_certfile=ns.tls_certfile, tls_keyfile=ns.tls_keyfile, behind_tls_proxy=ns.behind_tls_proxy,
            forwarded_allow_ips=[a.strip() for a in ns.forwarded_allow_ips.split(",") if a.strip()])
    except (OSError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with DsoConsole(settings).serving() as web:
            print(f"{prog}: {web.url}/", flush=True)
            await stop.wait()

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"{prog}: cannot listen on {ns.host}:{ns.port}: {exc}", file=sys.stderr)
        return 1
    return 0
