"""The customers' personal area: each customer schedules the flexibility of their own home's appliances.

Starlette served by uvicorn inside the bridge's event loop; server-rendered HTML (every value escaped), no script,
no external asset (the one stylesheet is served from here). Routes:

* ``GET /login``, ``POST /login``: sign in with e-mail and password (throttled per account and per address);
* ``POST /logout``: sign out (the session is deleted);
* ``GET /``: the customer's appliances (the switchable devices of their gateway's latest telemetry and those
  already scheduled), their state and schedule, and whether the gateway has applied the latest schedule (its
  notice has left the bridge's ``gateway_outbox``: the gateway acknowledged it);
* ``POST /appliances/{device}``: new settings for one appliance; validated, stored as the next version of the
  customer's schedule, and pushed to the gateway (``BridgeRelay.push_schedule``, re-sent until acknowledged).

A customer only ever sees and changes their own home: the home comes from the session, never from the request.
Every route but ``/login`` (and the stylesheet and icon) needs a session; every POST carries a synchronizer CSRF token
(``/login`` a pre-session one bound to a SameSite=Strict cookie); every page is sent with a strict CSP, framing
denied and caching off.

Hostile input: every form field has a length bound (``FIELD_CHARS``; longer is refused with 400 before anything is
parsed), the run windows are parsed in one pass, and form posts are rate-limited per account and per client
address (429 with ``Retry-After``). The client address is the socket peer, or, when that peer is one of the
configured ``personal_area_trusted_proxies``, the address its ``X-Forwarded-For`` names (uvicorn's proxy-headers
middleware). The log names a sign-in by a pseudonym of its e-mail address, never the address itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mhp_wire.messages import ApplianceSchedule
from mhp_wire.ratelimit import Clock, RateLimiter
from mhp_wire.sqlite import StorageError
from mhp_wire.webserver import BodyLimit, EmbeddedServer, bind, with_security_headers
from retailer_bridge.accounts import (
    MAX_PASSWORD_CHARS,
    Accounts,
    ScryptCost,
    Session,
    StoredAppliance,
    StoredSchedule,
)
from retailer_bridge.consent import ConsentBoard, consent_section, parse_decision
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.settings import BridgeSettings
from retailer_bridge.store import BridgeStore

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 16 * 1024
MAX_WINDOWS = 24
MAX_WINDOWS_CHARS = 512
"""The longest run-windows text parsed (24 windows like ``22:00 - 07:00, `` need 360)."""
MAX_NUMBER_CHARS = 32
FIELD_CHARS = {"csrf": 128, "email": 254, "password": MAX_PASSWORD_CHARS, "windows": MAX_WINDOWS_CHARS,
               "hours": MAX_NUMBER_CHARS, "max_interruption_min": MAX_NUMBER_CHARS, "priority": MAX_NUMBER_CHARS,
               "never_shed": 8}
"""The longest value of each form field, in characters; any other field may have ``OTHER_FIELD_CHARS``."""
OTHER_FIELD_CHARS = 256
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
                               "object-src 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}


# -- the form (pure) ------------------------------------------------------------------------------------------


_TIME = re.compile(r"(\d{1,2}):(\d{2})")
_DASHES = ("-", "\u2013", "\u2014")
# A window's words: a run of characters that are neither spaces nor dashes, or one dash. The two alternatives
# share no character, the run is possessive and nothing follows it in the pattern, so the engine never backtracks:
# finding every word costs one pass over the text (the old ``\s*(\S+?)\s*(?:-|to)\s*(\S+)\s*`` was quadratic).
_WINDOW_WORD = re.compile("[^\\s\\-\u2013\u2014]++|[\\-\u2013\u2014]")


def parse_time(text: str, *, end: bool = False) -> int:
    """Minutes after midnight of ``HH:MM`` (``24:00`` only as a window's end); ValueError says what is wrong."""
    m = _TIME.fullmatch(text.strip())
    minutes = int(m[1]) * 60 + int(m[2]) if m and int(m[2]) < 60 else -1
    if not (0 <= minutes < 24 * 60 or (end and minutes == 24 * 60)):
        raise ValueError(f"“{text.strip()}” is not a time of day (HH:MM from 00:00 to 24:00)")
    return minutes


def window_ends(part: str) -> tuple[str, str] | None:
    """The start and end written in one window (``22:00-07:00``, ``7:30 \u2013 9:00``, ``12:00 to 14:00``), or None.

    One pass over ``part``, no backtracking (see ``_WINDOW_WORD``).
    """
    words = _WINDOW_WORD.findall(part)
    if len(words) == 3 and (words[1] in _DASHES or words[1] == "to"):
        return words[0], words[2]
    return None


def parse_windows(text: str) -> list[tuple[str, str]]:
    """Run windows ``HH:MM-HH:MM``, separated by commas, semicolons or new lines (a window may wrap past midnight).

    Empty: any time. ValueError says what is wrong; a text longer than ``MAX_WINDOWS_CHARS`` is refused before
    it is looked at.
    """
    if len(text) > MAX_WINDOWS_CHARS:
        raise ValueError(f"at most {MAX_WINDOWS_CHARS} characters")
    parts = [p for p in re.split(r"[,;\n]", text) if p.strip()]
    if len(parts) > MAX_WINDOWS:
        raise ValueError(f"at most {MAX_WINDOWS} run windows")
    windows = []
    for part in parts:
        ends = window_ends(part)
        if ends is None:
            raise ValueError(f"“{part.strip()}” is not a window like 22:00-07:00")
        start, stop = parse_time(ends[0]), parse_time(ends[1], end=True)
        if start == stop:
            raise ValueError(f"“{part.strip()}” starts when it ends")
        windows.append((_hhmm(start), _hhmm(stop)))
    return windows


def window_minutes(windows: list[tuple[str, str]]) -> int:
    """How many minutes of the day the windows allow (overlaps counted once; empty: the whole day)."""
    if not windows:
        return 24 * 60
    allowed = [False] * (24 * 60)
    for a, b in windows:
        start, stop = parse_time(a), parse_time(b, end=True)
        for minute in range(start, stop if stop > start else stop + 24 * 60):
            allowed[minute % (24 * 60)] = True
    return sum(allowed)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _number(text: str, label: str, low: float, high: float, *, integer: bool = False,
            low_open: bool = False) -> float | None:
    text = text.strip().replace(",", ".")
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{label}: “{text}” is not a number") from None
    if not math.isfinite(value) or (integer and not value.is_integer()):
        raise ValueError(f"{label}: “{text}” is not a{' whole' if integer else ''} number")
    if value < low or value > high or (low_open and value == low):
        more = "more than" if low_open else "at least"
        raise ValueError(f"{label} must be {more} {low:g} and at most {high:g}")
    return value


def parse_appliance_form(device: str, form: Mapping[str, str]) -> tuple[ApplianceSchedule | None, list[str]]:
    """An appliance's new settings from the form, or every reason they are refused."""
    errors: list[str] = []
    windows: list[tuple[str, str]] = []
    values: dict[str, float | None] = {}
    try:
        windows = parse_windows(form.get("windows", ""))
    except ValueError as exc:
        errors.append(f"Run windows: {exc}.")
    fields = (("hours", "Hours of running per day", 0.0, 24.0, False, True),
              ("max_interruption_min", "Longest interruption (minutes)", 0.0, 1440.0, False, False),
              ("priority", "Priority", 0.0, 1000.0, True, False))
    for name, label, low, high, integer, low_open in fields:
        try:
            values[name] = _number(form.get(name, ""), label, low, high, integer=integer, low_open=low_open)
        except ValueError as exc:
            errors.append(f"{exc}.")
    hours = values.get("hours")
    if hours is not None and not errors and hours * 60 > window_minutes(windows):
        errors.append(f"Hours of running per day: {hours:g} h do not fit in the run windows "
                      f"({window_minutes(windows) / 60:g} h a day).")
    if errors:
        return None, errors
    minutes, priority = values.get("max_interruption_min"), values.get("priority")
    return ApplianceSchedule(
        device=device, allowed=windows, run_s=None if hours is None else round(hours * 3600),
        max_interruption_s=None if minutes is None else round(minutes * 60),
        priority=None if priority is None else int(priority), never_shed=form.get("never_shed", "") == "on"), []


def form_values(appliance: ApplianceSchedule | None) -> dict[str, str]:
    """What the form shows for stored settings."""
    if appliance is None:
        return {}
    return {
        "windows": ", ".join(f"{a}-{b}" for a, b in appliance.allowed),
        "hours": "" if appliance.run_s is None else f"{appliance.run_s / 3600:g}",
        "max_interruption_min": ("" if appliance.max_interruption_s is None
                                 else f"{appliance.max_interruption_s / 60:g}"),
        "priority": "" if appliance.priority is None else str(appliance.priority),
        "never_shed": "on" if appliance.never_shed else "",
    }


def describe(appliance: ApplianceSchedule) -> str:
    """One sentence on an appliance's settings."""
    windows = ", ".join(f"{a}\u2013{b}" for a, b in appliance.allowed)
    parts = ["may run " + (windows if windows else "any time")]
    if appliance.run_s is not None:
        parts.append(f"needs {appliance.run_s / 3600:g} h a day")
    if appliance.never_shed:
        parts.append("never switched off for grid requests")
    elif appliance.max_interruption_s is not None:
        parts.append(f"off at most {appliance.max_interruption_s / 60:g} min at a time")
    if appliance.priority is not None:
        parts.append(f"priority {appliance.priority}")
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


# -- views ----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ApplianceView:
    """One appliance of the home as the page shows it."""

    device: str
    state: str
    """``on``, ``off``, ``unavailable`` (the gateway cannot read it) or ``unknown`` (not in the latest telemetry)."""
    stored: StoredAppliance | None = None
    errors: list[str] = field(default_factory=list)
    entered: dict[str, str] | None = None


def switchable(devices: Mapping[str, Mapping[str, float | bool | None]]) -> dict[str, str]:
    """The switchable devices of a telemetry message (those reporting ``on``) and their state."""
    out = {}
    for name, values in devices.items():
        if "on" in values:
            on = values["on"]
            out[name] = "unavailable" if on is None else "on" if on else "off"
    return out


def schedule_status(latest: StoredSchedule | None, pending: bool) -> str:
    """``none``, ``saved`` (not yet queued for the gateway), ``sent`` (waiting for its ack) or ``applied``."""
    if latest is None:
        return "none"
    if not latest.queued:
        return "saved"
    return "sent" if pending else "applied"


STATUS_TEXT = {
    "none": "You have not scheduled any appliance yet.",
    "saved": "saved; it will be sent to your gateway",
    "sent": "sent, waiting for your gateway to apply it",
    "applied": "applied by your gateway",
}
PRESENCE_TEXT = {"online": "online", "offline": "offline", "unknown": "not seen yet"}


def esc(value: object) -> str:
    """``value`` as HTML text or attribute value."""
    return html.escape(str(value), quote=True)


def page(title: str, body: str, *, csrf: str | None = None) -> str:
    """A whole page; with ``csrf`` (signed in) the header carries the sign-out button."""
    signout = ("" if csrf is None else
               f'<form method="post" action="/logout" class="signout"><input type="hidden" name="csrf" '
               f'value="{esc(csrf)}"><button type="submit">Sign out</button></form>')
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)}</title><link rel="stylesheet" href="/static/style.css">'
            '<link rel="icon" href="/static/icon.svg" type="image/svg+xml"></head>'
            f'<body><header><span class="brand">Personal area</span>{signout}</header><main>{body}</main>'
            '</body></html>')


def login_page(csrf: str, message: str | None = None, email: str = "") -> str:
    """The sign-in form."""
    alert = f'<p class="alert" role="alert">{esc(message)}</p>' if message else ""
    return page("Sign in", f"""<section class="login"><h1>Sign in</h1>{alert}
<form method="post" action="/login"><input type="hidden" name="csrf" value="{esc(csrf)}">
<label>E-mail <input type="email" name="email" value="{esc(email)}" maxlength="{FIELD_CHARS['email']}"
autocomplete="username" required></label>
<label>Password <input type="password" name="password" maxlength="{FIELD_CHARS['password']}"
autocomplete="current-password" required></label>
<button type="submit">Sign in</button></form></section>""")


def _when(ts: float) -> str:
    """A time for a customer: UTC, to the minute."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def moved_page(text: str, csrf: str, title: str = "Your supplier has changed") -> str:
    """What a signed-in customer who is no longer (or not yet) this retailer's sees instead of their home."""
    return page(title, f'<h1>{esc(title)}</h1><p id="moved" class="alert" role="alert">{esc(text)}</p>', csrf=csrf)


def message_page(title: str, text: str, csrf: str | None = None) -> str:
    """A page with one message and a way back."""
    back = '<a href="/">Back to your home</a>' if csrf else '<a href="/login">Sign in</a>'
    return page(title, f'<h1>{esc(title)}</h1><p class="alert" role="alert">{esc(text)}</p><p>{back}</p>',
                csrf=csrf)


def _input(name: str, label: str, values: Mapping[str, str], hint: str, mode: str) -> str:
    return (f'<label>{esc(label)} <input type="text" name="{name}" value="{esc(values.get(name, ""))}" '
            f'maxlength="{FIELD_CHARS[name]}" inputmode="{mode}" placeholder="{esc(hint)}"></label>')


def appliance_section(view: ApplianceView, csrf: str, status: str) -> str:
    """One appliance: its state, its schedule and the form to change it."""
    stored = view.stored
    values = view.entered if view.entered is not None else form_values(stored.settings if stored else None)
    if stored is None:
        current = '<p class="current">Not scheduled: the installer\'s settings apply.</p>'
    else:
        label = STATUS_TEXT[status]
        current = (f'<p class="current">{esc(describe(stored.settings))} '
                   f'<span class="status {esc(status)}" data-status="{esc(status)}">{esc(label)}</span></p>')
    errors = "".join(f"<li>{esc(e)}</li>" for e in view.errors)
    errors = f'<ul class="errors" role="alert">{errors}</ul>' if errors else ""
    checked = " checked" if values.get("never_shed") == "on" else ""
    return f"""<section class="appliance" data-device="{esc(view.device)}">
<h2>{esc(view.device)} <span class="state {esc(view.state)}">{esc(view.state)}</span></h2>{current}{errors}
<form method="post" action="/appliances/{esc(quote(view.device, safe=""))}">
<input type="hidden" name="csrf" value="{esc(csrf)}">
{_input("windows", "Allowed run windows", values, "any time, or e.g. 22:00-07:00, 12:00-14:00", "text")}
{_input("hours", "Hours of running per day", values, "not scheduled by tariff", "decimal")}
{_input("max_interruption_min", "Longest interruption (minutes)", values, "no limit", "numeric")}
{_input("priority", "Priority (lower is switched off first)", values, "as installed", "numeric")}
<label class="check"><input type="checkbox" name="never_shed"{checked}> Never switch off for grid requests</label>
<button type="submit">Save</button></form></section>"""


# Complexity (PLR0913): a form handler answers each refusal at the point it is found.
def home_page(client_id: str, gateway_id: str, presence: str, telemetry_age_s: float | None,  # noqa: PLR0913
              views: list[ApplianceView], latest: StoredSchedule | None, status: str, csrf: str,
              saved: str | None = None, consent: str = "") -> str:
    """The customer's home: its appliances, their state and their schedule."""
    seen = "no report yet" if telemetry_age_s is None else f"last report {max(0, round(telemetry_age_s))} s ago"
    notice = ""
    if saved is not None:
        notice = f'<p class="notice" role="status">Saved the new schedule of {esc(saved)}.</p>'
    if latest is None:
        overall = f'<p id="schedule-status" data-status="none">{esc(STATUS_TEXT["none"])}</p>'
    else:
        overall = (f'<p id="schedule-status" data-status="{esc(status)}">Your schedule (version '
                   f'{latest.version}): <b>{esc(STATUS_TEXT[status])}</b>.</p>')
    sections = "".join(appliance_section(v, csrf, status) for v in views)
    if not views:
        sections = "<p>Your gateway has not reported any switchable appliance yet.</p>"
    return page("Your home", f"""<h1>Your home</h1>
<p class="home">Client <b id="client-id">{esc(client_id)}</b> · gateway <b id="gateway-id">{esc(gateway_id)}</b>
<span class="presence {esc(presence)}">{esc(PRESENCE_TEXT.get(presence, presence))}</span> · {esc(seen)}</p>
{notice}{overall}
<p class="hint">Times are your home's local time; a window may wrap past midnight (22:00-07:00).</p>
{sections}{consent}""", csrf=csrf)


STYLE = """
:root { font-family: system-ui, sans-serif; color: #1d2733; background: #f3f5f7; }
body { margin: 0; }
header { display: flex; justify-content: space-between; align-items: center; background: #134e6f; color: #fff;
         padding: .6rem 1.2rem; }
header .brand { font-weight: 600; letter-spacing: .02em; }
header button { background: transparent; color: #fff; border: 1px solid #fff; }
main { max-width: 60rem; margin: 0 auto; padding: 1rem 1.2rem 3rem; }
h1 { font-size: 1.5rem; }
h2 { font-size: 1.15rem; margin: 0 0 .4rem; }
.login { max-width: 22rem; margin: 3rem auto; background: #fff; padding: 1.2rem 1.5rem; border-radius: 6px; }
.appliance { background: #fff; border-radius: 6px; padding: 1rem 1.2rem; margin: 1rem 0;
             box-shadow: 0 1px 2px rgba(0,0,0,.08); }
form label { display: block; margin: .45rem 0; }
form input[type=text], form input[type=email], form input[type=password] { display: block; width: 100%;
    max-width: 26rem; padding: .35rem .45rem; border: 1px solid #9aa7b3; border-radius: 4px; box-sizing: border-box; }
.appliance form { display: grid; grid-template-columns: repeat(auto-fit, minmax(14rem, 1fr)); gap: 0 1.2rem; }
.appliance form label.check, .appliance form button { align-self: end; }
button { padding: .4rem 1rem; border-radius: 4px; border: 1px solid #134e6f; background: #134e6f; color: #fff;
         cursor: pointer; }
.state, .presence, .status { font-size: .8rem; padding: .1rem .45rem; border-radius: 999px; background: #dde3e8; }
.state.on, .presence.online, .status.applied { background: #cdeccf; color: #1b5e20; }
.state.off, .presence.offline { background: #eee; color: #555; }
.status.sent, .status.saved { background: #fff1c2; color: #7a5a00; }
.alert, .errors { color: #8a1c1c; background: #fde8e8; padding: .5rem .8rem; border-radius: 4px; }
.errors { margin: .5rem 0; padding-left: 2rem; }
.notice { background: #e3f1fb; padding: .5rem .8rem; border-radius: 4px; }
.hint, .home { color: #4b5966; }
.consent { background: #fff; border-radius: 6px; padding: 1rem 1.2rem; margin: 1rem 0; }
.consent form.decide { display: inline-block; margin-right: .5rem; }
.consent li.permission { margin: .6rem 0; }
"""

ICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
        'fill="#134e6f"/><path d="M9 2 4 9h3l-1 5 5-7H8z" fill="#ffd54f"/></svg>')


CONSENT_NOTICES = {"accept": "Sent: you allowed it. The company can read the data once the data hub has it.",
                   "reject": "Sent: you refused it.", "revoke": "Sent: you withdrew your permission."}


# -- the application ------------------------------------------------------------------------------------------


class SecurityHeaders:
    """ASGI middleware: the security headers on every response, and no caching unless a route allows it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        await self.app(scope, receive, with_security_headers(send, SECURITY_HEADERS))


def _too_many_text(wait: float) -> str:
    seconds = max(1, math.ceil(wait))
    return f"Too many forms sent in a short time; nothing was changed. Try again in {seconds} s."


class FormError(Exception):
    """A request body that is not an acceptable form; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


async def read_form(request: Request, limit: int = MAX_FORM_BYTES) -> dict[str, str]:
    """A URL-encoded form body (first value of each field), at most ``limit`` bytes and 50 fields, each field at
    most as long as ``FIELD_CHARS`` says (other fields ``OTHER_FIELD_CHARS``): a longer one is refused (400)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        raise FormError(415, "Expected a form.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise FormError(413, "The form is too large.")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        raise FormError(400, "The form could not be read.") from None
    form: dict[str, str] = {}
    for k, v in pairs:
        longest = FIELD_CHARS.get(k, OTHER_FIELD_CHARS)
        if len(v) > longest or len(k) > 64:
            name = k if len(k) <= 64 else k[:60] + "…"
            raise FormError(400, f"The field “{name}” is too long (at most {longest} characters).")
        form.setdefault(k, v)
    return form


class PersonalArea:
    """The personal area of one bridge; :meth:`serving` runs it."""

    def __init__(self, settings: BridgeSettings, relay: BridgeRelay, store: BridgeStore,
                 accounts: Accounts | None = None, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.relay = relay
        self.store = store
        self.accounts = accounts or Accounts(settings.db_path, cost=ScryptCost(n=settings.personal_area_scrypt_n))
        self.account_limiter = RateLimiter(settings.personal_area_form_rate_per_s, settings.personal_area_form_burst,
                                           clock)
        """Form posts per account: ``login:<e-mail>`` for sign-ins, ``customer:<client id>`` for the rest."""
        self.address_limiter = RateLimiter(settings.personal_area_address_rate_per_s,
                                           settings.personal_area_address_burst, clock)
        """Form posts per client address."""
        secure = settings.personal_area_secure_cookies
        self.session_cookie = "__Host-mhp_session" if secure else "mhp_session"
        self.login_cookie = "__Host-mhp_login" if secure else "mhp_login"
        self.consent = ConsentBoard(relay)
        """The customers' permissions for eligible parties, and their access log (docs/consent.md)."""
        self.address: tuple[str, int] | None = None
        """``(host, port)`` it listens on (the real port when configured with 0), while serving."""
        self.app = Starlette(routes=[
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/", self.home, methods=["GET"]),
            Route("/appliances/{device:path}", self.change, methods=["POST"]),
            Route("/consent/{permission_id}", self.consent_decide, methods=["POST"]),
            Route("/static/style.css", self.style, methods=["GET"]),
            Route("/static/icon.svg", self.icon, methods=["GET"]),
        ], middleware=[Middleware(SecurityHeaders), Middleware(BodyLimit, max_bytes=MAX_FORM_BYTES)])

    @property
    def url(self) -> str:
        """``http://host:port`` (``https://`` with its own certificate) while serving."""
        assert self.address is not None, "the personal area is not serving"
        host, port = self.address
        scheme = "https" if self.settings.personal_area_tls_certfile is not None else "http"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"

    # -- sessions -------------------------------------------------------------------------------------------

    def _set_cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict",
                            secure=self.settings.personal_area_secure_cookies)

    async def _session(self, request: Request) -> tuple[str, Session] | None:
        token = request.cookies.get(self.session_cookie, "")
        if not token or len(token) > 100:
            return None
        session = await self.accounts.session(token)
        return None if session is None else (token, session)

    @staticmethod
    def _csrf_ok(form: Mapping[str, str], expected: str) -> bool:
        given = form.get("csrf", "")
        return bool(given and expected) and hmac.compare_digest(given.encode(), expected.encode())

    def _login_response(self, status: int, message: str | None = None, email: str = "") -> Response:
        token = secrets.token_urlsafe(32)
        response = HTMLResponse(login_page(token, message, email), status)
        self._set_cookie(response, self.login_cookie, token, 3600)
        return response

    @staticmethod
    def _address(request: Request) -> str:
        """The client's address (uvicorn has already taken it from a trusted proxy's ``X-Forwarded-For``)."""
        return request.client.host[:64] if request.client else "unknown"

    def _address_wait(self, request: Request) -> float:
        """Count a form post against its client address: 0.0 when it may go on, else the seconds to wait."""
        address = self._address(request)
        wait = self.address_limiter.take(address)
        if wait > 0:
            log.warning("%s %r from %s refused: too many form posts from that address", request.method,
                        request.url.path[:100], address)
        return wait

    def _account_wait(self, key: str, request: Request, who: str) -> float:
        """Count a form post against its account (``who`` names it in the log): 0.0 or the seconds to wait."""
        wait = self.account_limiter.take(key)
        if wait > 0:
            log.warning("%s %r as %s from %s refused: too many form posts for that account", request.method,
                        request.url.path[:100], who, self._address(request))
        return wait

    @staticmethod
    def _too_many(response: Response, wait: float) -> Response:
        """``response`` (a 429) with its ``Retry-After``."""
        response.headers["retry-after"] = str(max(1, math.ceil(wait)))
        return response

    # -- routes ---------------------------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        """``GET /login``: the sign-in form (straight home when already signed in)."""
        if await self._session(request) is not None:
            return RedirectResponse("/", 303)
        return self._login_response(200)

    # Complexity (PLR0911): a form handler answers each refusal at the point it is found.
    async def login(self, request: Request) -> Response:  # noqa: PLR0911
        """``POST /login``: check the password; a new session on success."""
        wait = self._address_wait(request)
        if wait > 0:
            return self._too_many(self._login_response(429, _too_many_text(wait)), wait)
        try:
            form = await read_form(request)
        except FormError as exc:
            return self._login_response(exc.status, str(exc))
        email = form.get("email", "")
        if not self._csrf_ok(form, request.cookies.get(self.login_cookie, "")):
            return self._login_response(403, "The sign-in form had expired; please sign in again.", email)
        address = self._address(request)
        wait = self._account_wait("login:" + email.strip().lower(), request, self.accounts.pseudonym(email))
        if wait > 0:
            return self._too_many(self._login_response(429, _too_many_text(wait), email), wait)
        result = await self.accounts.login(email, form.get("password", ""), address)
        if result.client_id is None:
            if result.locked_for_s > 0:
                minutes = max(1, math.ceil(result.locked_for_s / 60))
                response = self._login_response(
                    429, f"Too many failed sign-ins. Try again in {minutes} minute{'s' if minutes > 1 else ''}.",
                    email)
                response.headers["retry-after"] = str(math.ceil(result.locked_for_s))
                log.warning("sign-in as %s from %s refused: locked for %.0f s", self.accounts.pseudonym(email),
                            address, result.locked_for_s)
                return response
            return self._login_response(401, "Wrong e-mail or password.", email)
        away = self._away(result.client_id)
        if away is not None:
            log.info("sign-in of %s refused: %s", result.client_id, away)
            return self._login_response(403, away, email)
        old = await self._session(request)
        if old is not None:
            await self.accounts.end_session(old[0])
        token, session = await self.accounts.new_session(result.client_id)
        log.info("customer %s signed in", result.client_id)
        response = RedirectResponse("/", 303)
        self._set_cookie(response, self.session_cookie, token, int(session.expires_at - time.time()))
        response.delete_cookie(self.login_cookie, path="/", httponly=True, samesite="strict",
                               secure=self.settings.personal_area_secure_cookies)
        return response

    async def logout(self, request: Request) -> Response:
        """``POST /logout``: the session is deleted and its cookie cleared."""
        wait = self._address_wait(request)
        if wait > 0:
            return self._too_many(HTMLResponse(message_page("Not signed out", _too_many_text(wait)), 429), wait)
        signed_in = await self._session(request)
        if signed_in is not None:
            token, session = signed_in
            try:
                form = await read_form(request)
            except FormError as exc:
                return HTMLResponse(message_page("Not signed out", str(exc), session.csrf_token), exc.status)
            if not self._csrf_ok(form, session.csrf_token):
                return HTMLResponse(message_page("Not signed out", "The form was out of date or not from this site.",
                                                 session.csrf_token), 403)
            await self.accounts.end_session(token)
            log.info("customer %s signed out", session.client_id)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(self.session_cookie, path="/", httponly=True, samesite="strict",
                               secure=self.settings.personal_area_secure_cookies)
        return response

    async def home(self, request: Request) -> Response:
        """``GET /``: the customer's home."""
        signed_in = await self._session(request)
        if signed_in is None:
            return RedirectResponse("/login", 303)
        session = signed_in[1]
        away = self._away(session.client_id)
        if away is not None:
            return HTMLResponse(moved_page(away, session.csrf_token))
        views = await self._appliances(session.client_id)
        saved = request.query_params.get("saved")
        decided = request.query_params.get("decided")
        return await self._home(session, views, 200, saved if saved in views else None,
                                decided if decided in CONSENT_NOTICES else None)

    async def consent_decide(self, request: Request) -> Response:
        """``POST /consent/{permission_id}``: the signed-in customer accepts, rejects or revokes a party's
        permission; relayed to the hub through the stored outbox."""
        checked = await self._customer_form(request, "Not sent")
        if isinstance(checked, Response):
            return checked
        session, form = checked
        cid = session.client_id
        decision = parse_decision(form)
        permission_id = request.path_params["permission_id"]
        held = self.consent.views.get(cid)
        if decision is None or held is None or all(p.permission_id != permission_id for p in held.permissions):
            return HTMLResponse(message_page("Not found", "No such request for your data.", session.csrf_token), 404)
        try:
            await self.consent.decide(cid, permission_id, decision)
        except StorageError as exc:
            log.error("consent decision of %s not queued: %s", cid, exc)
            return HTMLResponse(message_page("Not sent", "Your answer could not be stored; please try again.",
                                             session.csrf_token), 503)
        log.info("customer %s decided %s on permission %s", cid, decision, permission_id)
        return RedirectResponse("/?decided=" + decision, 303)

    async def change(self, request: Request) -> Response:
        """``POST /appliances/{device}``: new settings for one appliance of the signed-in customer's home."""
        checked = await self._customer_form(request, "Not saved")
        if isinstance(checked, Response):
            return checked
        session, form = checked
        cid = session.client_id
        gateway_id = self.relay.customer_list.gateway_of(cid)
        if gateway_id is None:
            return HTMLResponse(message_page("Not saved", "Your home has no gateway yet: your retailer installs it "
                                             "first.", session.csrf_token), 403)
        device = request.path_params["device"]
        views = await self._appliances(cid)
        if device not in views:
            return HTMLResponse(message_page("Not found", "Your home has no such appliance.", session.csrf_token), 404)
        appliance, errors = parse_appliance_form(device, form)
        if appliance is None:
            entered = {k: form.get(k, "")[:200] for k in ("windows", "hours", "max_interruption_min", "priority",
                                                          "never_shed")}
            views[device].errors, views[device].entered = errors, entered
            return await self._home(session, views, 400)
        schedule = await self.accounts.save(cid, gateway_id, appliance)
        try:
            await self.relay.push_schedule(gateway_id, schedule)
            await self.accounts.mark_queued(cid, schedule.version)
        except StorageError as exc:
            log.error("schedule v%d of %s stored but not queued for gateway %s: %s", schedule.version, cid,
                      gateway_id, exc)
        log.info("customer %s changed %s: schedule v%d for gateway %s", cid, device, schedule.version, gateway_id)
        return RedirectResponse("/?saved=" + quote(device, safe=""), 303)

    async def style(self, request: Request) -> Response:
        """``GET /static/style.css``: the one stylesheet."""
        return Response(STYLE, media_type="text/css", headers={"cache-control": "public, max-age=3600"})

    async def icon(self, request: Request) -> Response:
        """``GET /static/icon.svg``: the page icon."""
        return Response(ICON, media_type="image/svg+xml", headers={"cache-control": "public, max-age=3600"})

    # -- helpers --------------------------------------------------------------------------------------------

    async def _customer_form(self, request: Request, title: str) -> tuple[Session, dict[str, str]] | Response:
        """The signed-in customer's session and the form they posted, or the page refusing it under ``title``
        (see :meth:`_posting_customer`; a bad or stale form; no longer this retailer's customer)."""
        session = await self._posting_customer(request, title)
        if isinstance(session, Response):
            return session
        try:
            form = await read_form(request)
        except FormError as exc:
            return HTMLResponse(message_page(title, str(exc), session.csrf_token), exc.status)
        if not self._csrf_ok(form, session.csrf_token):
            return HTMLResponse(message_page(title, "The form was out of date or not from this site; nothing "
                                             "was changed. Please try again.", session.csrf_token), 403)
        away = self._away(session.client_id)
        if away is not None:
            return HTMLResponse(moved_page(away, session.csrf_token, title), 403)
        return session, form

    async def _posting_customer(self, request: Request, title: str) -> Session | Response:
        """The session of the customer posting a form, or the page refusing it under ``title`` (too many forms from
        the address or the account, or signed out)."""
        wait = self._address_wait(request)
        if wait > 0:
            return self._too_many(HTMLResponse(message_page(title, _too_many_text(wait)), 429), wait)
        signed_in = await self._session(request)
        if signed_in is None:
            return HTMLResponse(message_page("Signed out", "Your session has ended; please sign in again."), 403)
        session = signed_in[1]
        wait = self._account_wait("customer:" + session.client_id, request, session.client_id)
        if wait > 0:
            return self._too_many(HTMLResponse(message_page(title, _too_many_text(wait), session.csrf_token),
                                               429), wait)
        return session

    def _away(self, client_id: str) -> str | None:
        """None while ``client_id`` is this retailer's customer, else what to tell them (moved, not yet, never)."""
        status = self.relay.customer_list.status(client_id, self.relay.clock())
        if status.standing == "customer":
            return None
        if status.standing == "moved" and status.since is not None:
            return (f"You have moved to another supplier: since {_when(status.since)} this retailer no longer "
                    "supplies your home, and its personal area can no longer change your home's schedule.")
        if status.standing == "not_yet" and status.until is not None:
            return f"This retailer supplies your home from {_when(status.until)}; your personal area opens then."
        return "This account is not a customer of this retailer any more."

    async def _appliances(self, client_id: str) -> dict[str, ApplianceView]:
        """The appliances of this customer's home: seen in the gateway's latest telemetry, or already scheduled."""
        gateway_id = self.relay.customer_list.gateway_of(client_id)
        tel = self.relay.latest_telemetry.get(gateway_id) if gateway_id else None
        states = switchable(tel.devices) if tel is not None and tel.client_id == client_id else {}
        views = {name: ApplianceView(name, state) for name, state in states.items()}
        for name, stored in (await self.accounts.appliances(client_id)).items():
            views.setdefault(name, ApplianceView(name, "unknown")).stored = stored
        return views

    async def _pending(self, msg_id: str) -> bool:
        """Whether a notice is still in the bridge's outbox towards the gateways (not yet acknowledged)."""
        return await self.store.sql.read(lambda db: db.execute(
            "SELECT 1 FROM gateway_outbox WHERE msg_id=?", (msg_id,)).fetchone() is not None)

    async def _home(self, session: Session, views: dict[str, ApplianceView], status_code: int,
                    saved: str | None = None, decided: str | None = None) -> Response:
        cid = session.client_id
        gateway_id = self.relay.customer_list.gateway_of(cid) or ""
        latest = await self.accounts.latest(cid)
        status = schedule_status(latest, latest is not None and latest.queued and await self._pending(latest.msg_id))
        tel = self.relay.latest_telemetry.get(gateway_id)
        age = None if tel is None else time.time() - tel.at.timestamp()
        presence = self.relay.gateway_presence.get(gateway_id, "unknown")
        consent = consent_section(await self.consent.view(cid), session.csrf_token,
                                  CONSENT_NOTICES.get(decided or ""))
        body = home_page(cid, gateway_id, presence, age, list(views.values()), latest, status, session.csrf_token,
                         saved, consent)
        return HTMLResponse(body, status_code)

    # -- serving --------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[PersonalArea]:
        """Serve on ``personal_area_host:personal_area_port`` inside the block (the port may be 0).

        A port that cannot be bound is logged and the bridge runs on without its personal area.
        """
        s = self.settings
        await self.accounts.open()
        try:
            await self._push_unqueued()
            try:
                sock = bind(s.personal_area_host, s.personal_area_port or 0)
            except OSError as exc:
                log.error("no personal area: cannot listen on %s:%s: %s", s.personal_area_host,
                          s.personal_area_port, exc)
                yield self
                return
            # X-Forwarded-For is believed only from the configured proxies (never uvicorn's default 127.0.0.1).
            proxies = s.personal_area_trusted_proxies
            config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", ws="none",
                                    proxy_headers=bool(proxies), forwarded_allow_ips=list(proxies) or None,
                                    server_header=False, timeout_graceful_shutdown=2,
                                    ssl_certfile=s.personal_area_tls_certfile, ssl_keyfile=s.personal_area_tls_keyfile)
            server = EmbeddedServer(config)
            serving = asyncio.create_task(server.serve(sockets=[sock]), name="bridge-personal-area")
            self.address = sock.getsockname()[:2]
            log.info("personal area of %s on %s/", s.retailer_id, self.url)
            try:
                yield self
            finally:
                server.should_exit = True
                try:
                    await serving
                except Exception:
                    log.exception("the personal area stopped with an error")
                finally:
                    self.address = None
                    sock.close()
        finally:
            await self.accounts.close()

    async def _push_unqueued(self) -> None:
        for stored in await self.accounts.unqueued():
            cid = stored.schedule.client_id
            if self.relay.customer_list.gateway_of(cid) != stored.gateway_id or self._away(cid) is not None:
                continue
            await self.relay.push_schedule(stored.gateway_id, stored.schedule)
            await self.accounts.mark_queued(cid, stored.version)
            log.info("schedule v%d of %s queued for its gateway after a restart", stored.version, cid)
