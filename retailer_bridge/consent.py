"""The customer's consent in the personal area (docs/consent.md): the parties' requests for their data in plain
words, accept / reject / revoke, and who accessed their data, when and under which right.

The hub is the record: it sends this bridge a ``consent_view`` of a customer whenever something changes and when
asked (``consent_query``, sent as a page opens); the bridge keeps the latest view of each customer in memory only.
A decision goes to the hub through the bridge's stored outbox (``consent_decision``, re-sent until acknowledged);
the hub takes it only while this retailer supplies the customer.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from mhp_wire import topics
from mhp_wire.messages import ConsentDecision, ConsentItem, ConsentQuery, ConsentView, encode
from mhp_wire.mqtt import MqttError
from retailer_bridge.relay import BridgeRelay

DECISIONS = ("accept", "reject", "revoke")
FRESH_WAIT_S = 1.0
"""How long a page waits for the hub's answer to its ``consent_query`` (only while the hub is online); after it
the page shows the last view held."""

SCOPE_WORDS = {"consumption_profile": "your electricity consumption over time",
               "billing_data": "your meter readings as used for your bills",
               "live_measurements": "the live power measurements of your home"}
STATE_WORDS = {"sent_to_pa": "waiting for your answer", "accepted": "you allowed it", "rejected": "you refused it",
               "timed_out": "not answered in time: it lapsed", "revoked": "you withdrew it",
               "terminated": "ended by the company", "fulfilled": "ended: its time is over",
               "created": "being checked", "validated": "being checked"}
ACTION_WORDS = {"read_consumption": "read your consumption", "read_measurements": "read your live measurements",
                "read_client": "looked up your supply contract", "request_billing": "asked for your meter readings",
                "receive_supplier_periods": "was told when it supplies you",
                "upload_readings": "stored your meter readings", "send_measurement": "sent your live measurements"}


EVENT_WORDS = {"validate": "checked by the data hub", "send": "shown to you", "accept": "allowed",
               "reject": "refused", "time_out": "not answered in time: it lapsed", "revoke": "withdrawn",
               "terminate": "ended by the company", "fulfil": "over: its time ended"}


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _resolution(seconds: int) -> str:
    if seconds % 86_400 == 0:
        return "per day" if seconds == 86_400 else f"per {seconds // 86_400} days"
    if seconds % 3600 == 0:
        return "per hour" if seconds == 3600 else f"per {seconds // 3600} hours"
    return f"per {max(1, seconds // 60)} minutes"


def describe(p: ConsentItem) -> str:
    """A permission in plain words, for the customer."""
    what = " and ".join(SCOPE_WORDS.get(s, s) for s in p.scopes)
    return (f"{p.party_name} asks to see {what}, {_resolution(p.resolution_s)}, from {_when(p.data_from)} to "
            f"{_when(p.data_to)}, for this purpose: “{p.purpose}”. It could read it until {_when(p.valid_until)}.")


def _button(p: ConsentItem, decision: str, label: str, csrf: str) -> str:
    return (f'<form method="post" action="/consent/{_esc(p.permission_id)}" class="decide">'
            f'<input type="hidden" name="csrf" value="{_esc(csrf)}">'
            f'<input type="hidden" name="decision" value="{decision}">'
            f'<button type="submit" id="{decision}-{_esc(p.permission_id)}">{_esc(label)}</button></form>')


def access_line(principal: str, action: str, right: str, allowed: bool) -> str:
    """One line of the access log in plain words: who, what, under which right."""
    if action.startswith("permission_"):
        event = action.removeprefix("permission_")
        return f"{principal}: a request for your data was {EVENT_WORDS.get(event, event.replace('_', ' '))}"
    did = ACTION_WORDS.get(action, action.replace("_", " "))
    if not allowed:
        return f"{principal}: refused ({did})"
    return f"{principal} {did} under the right “{right}”"


def consent_section(view: ConsentView | None, csrf: str, notice: str | None = None) -> str:
    """The personal area's section on the customer's data: requests, permissions, and the access log."""
    head = '<section class="consent" id="consent"><h2>Who may see your data</h2>'
    if notice:
        head += f'<p class="notice" role="status">{_esc(notice)}</p>'
    if view is None:
        return head + '<p id="consent-unknown">The data hub has not answered yet; reload the page in a moment.</p>' \
                      "</section>"
    rows = []
    for p in reversed(view.permissions):
        buttons = ""
        if p.state == "sent_to_pa":
            buttons = (_button(p, "accept", "Allow", csrf) + _button(p, "reject", "Refuse", csrf)
                       + f' <span class="hint">Answer by {_esc(_when(p.decide_by))}.</span>')
        elif p.state == "accepted":
            buttons = _button(p, "revoke", "Withdraw my permission", csrf)
        rows.append(f'<li class="permission" id="permission-{_esc(p.permission_id)}" data-state="{_esc(p.state)}">'
                    f'<p>{_esc(describe(p))}</p><p><b>{_esc(STATE_WORDS.get(p.state, p.state))}</b></p>'
                    f'{buttons}</li>')
    asked = "<ul class=\"permissions\">" + "".join(rows) + "</ul>" if rows else \
        "<p>No company has asked for your data.</p>"
    lines = [f'<tr class="access"><td>{_esc(_when(a.at))}</td>'
             f"<td>{_esc(access_line(a.principal, a.action, a.right, a.allowed))}</td></tr>" for a in view.accesses]
    log = ('<h3>Who accessed your data</h3><table id="access-log"><thead><tr><th>When</th><th>What</th></tr>'
           f"</thead><tbody>{''.join(lines)}</tbody></table>") if lines else \
        '<h3>Who accessed your data</h3><p id="access-log">Nobody yet.</p>'
    return head + asked + log + "</section>"


def parse_decision(form: Mapping[str, str]) -> str | None:
    """The decision a form carries, or None if it carries none we know."""
    decision = form.get("decision", "")
    return decision if decision in DECISIONS else None


class ConsentBoard:
    """The latest consent view of each customer, and the way to the hub."""

    def __init__(self, relay: BridgeRelay) -> None:
        self.relay = relay
        self.views: dict[str, ConsentView] = {}
        self._fresh: dict[str, asyncio.Event] = {}
        relay.on_consent_view = self.on_view

    def on_view(self, msg: ConsentView) -> None:
        """A view from the hub: the newest of the customer's (by the hub's ``sent_at``) is kept."""
        held = self.views.get(msg.client_id)
        if held is None or msg.sent_at >= held.sent_at:
            self.views[msg.client_id] = msg
        event = self._fresh.get(msg.client_id)
        if event is not None:
            event.set()

    async def view(self, client_id: str, wait_s: float = FRESH_WAIT_S) -> ConsentView | None:
        """The customer's view: asked from the hub afresh when it is online (waiting up to ``wait_s``), else the
        last one held (None: none yet)."""
        hub = self.relay.hub
        if hub is None or not hub.connected or self.relay.hub_presence != "online":
            return self.views.get(client_id)
        event = self._fresh.setdefault(client_id, asyncio.Event())
        event.clear()
        try:
            await hub.publish(topics.up("retailers", self.relay.retailer_id),
                              encode(ConsentQuery(client_id=client_id)), wait_s=wait_s)
        except MqttError:
            return self.views.get(client_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), wait_s)
        return self.views.get(client_id)

    async def decide(self, client_id: str, permission_id: str, decision: str) -> None:
        """Queue the customer's decision for the hub (stored, re-sent until acknowledged)."""
        msg = ConsentDecision(client_id=client_id, permission_id=permission_id,
                              decision=decision,  # type: ignore[arg-type]
                              decided_at=datetime.fromtimestamp(time.time(), UTC))
        await self.relay.store.queue_for_hub([(msg.msg_id, encode(msg))])
        self.relay.kick()
