"""The hub's use cases of customer consent (docs/consent.md): parties register, ask customers for permissions,
read data under them; the customer's current retailer relays the customer's decisions and shows them their
permissions and access log. Authorization first (:func:`cloud_hub.authz.decide`), the rules in
:mod:`cloud_hub.consent`, storage in :mod:`cloud_hub.consent_store`; time comes from ``now`` (a clock)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from cloud_hub import consent
from cloud_hub.authz import Action, Context, Principal, decide
from cloud_hub.consent import Event, InvalidTransition, Permission, Scope
from cloud_hub.consent_store import PermissionStore
from cloud_hub.errors import Forbidden, NotFound
from cloud_hub.store import AuditEntry, Conflict, HubStore
from cloud_hub.timeline import clip_blocks, profile, supplier_at, withhold_straddling
from cloud_hub.usecases.access import hidden_client
from cloud_hub.usecases.data import billing_readings, readings_json
from cloud_hub.usecases.shared import iso
from cloud_hub.views import paged
from mhp_wire.messages import (
    AccessItem,
    Ack,
    ConsentDecision,
    ConsentItem,
    ConsentQuery,
    ConsentView,
    ErrorReply,
    new_id,
)

log = logging.getLogger(__name__)

VIEW_ACCESSES = 200
"""The newest lines of a customer's access log sent to the personal area."""
VIEW_PERMISSIONS = 100
"""The newest permissions of a customer sent to the personal area (a view stays far below the payload limit)."""
VIEW_WINDOW_S = 400 * 86_400
"""How far back the personal area's access log reaches."""
LOCK_STRIPES = 64

Publish = Callable[[str, BaseModel], Awaitable[None]]
"""Send a message to one retailer (its down topic)."""


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def permission_json(p: Permission) -> dict[str, Any]:
    """A permission as the API shows it to the party that asked for it (and the DSO)."""
    return {"permission_id": p.permission_id, "party_id": p.party_id, "client_id": p.client_id,
            "purpose": p.purpose, "scopes": [s.value for s in p.scopes], "resolution_s": p.resolution_s,
            "data_from": iso(p.data_from), "data_to": iso(p.data_to), "valid_until": iso(p.valid_until),
            "decide_by": iso(p.decide_by), "created_at": iso(p.created_at), "state": p.state.value,
            "history": [{"at": iso(c.at), "event": c.event.value, "by": c.by, "state": c.state.value}
                        for c in p.history]}


def shown_principal(principal: str, recipient: str) -> str:
    """A principal as the customer's current retailer relays it: another retailer is not named to it (it learns
    that the customer was supplied by someone else, not by whom); the customer's own decisions read as theirs."""
    if principal.startswith("customer via "):
        return "you (in your supplier's personal area)"
    if principal.startswith("retailer:") and principal != f"retailer:{recipient}":
        return "retailer (your supplier at that time)"
    return principal


class ConsentService:
    """Parties, permissions and the reads that rest on them."""

    def __init__(self, store: HubStore, now: Callable[[], float] = time.time) -> None:
        self.store = store
        self.permissions = PermissionStore(store)
        self.now = now
        """The clock: expiry, deadlines and the times written to the logs."""
        self.publish: Publish | None = None
        """Set by the app: sends a ``consent_view`` to a retailer (best effort; a page asks again)."""
        self._locks = [asyncio.Lock() for _ in range(LOCK_STRIPES)]

    def _lock(self, permission_id: str) -> asyncio.Lock:
        return self._locks[hash(permission_id) % LOCK_STRIPES]

    # -- parties ----------------------------------------------------------------------------------------------

    async def put_party(self, who: Principal, party_id: str, name: str) -> bool:
        """Register or rename an eligible party (admin, dso)."""
        verdict = decide(who, Action.MANAGE_PARTY)
        if not verdict.allowed:
            raise Forbidden(verdict.reason)
        return await self.permissions.put_party(party_id, name)

    # -- permissions --------------------------------------------------------------------------------------------

    async def _changed(self, old: Permission | None, new: Permission, right: str) -> Permission:
        """Store ``new`` with an access-log line for each change of its history since ``old``."""
        seen = len(old.history) if old is not None else 0
        audit = [AuditEntry(c.by, new.client_id, f"permission_{c.event.value}", right, True, new.permission_id,
                            at=c.at, detail=f"party:{new.party_id} {c.state.value}")
                 for c in new.history[seen:]]
        await self.permissions.put([new], audit)
        return new

    async def _current(self, p: Permission) -> Permission:
        """``p`` with the clock's changes applied and stored (a request that lapsed, a validity that ended)."""
        e = consent.effective(p, self.now())
        return p if e == p else await self._changed(p, e, "clock")

    async def _load(self, permission_id: str) -> Permission | None:
        p = await self.permissions.get(permission_id)
        return None if p is None else await self._current(p)

    async def of_client(self, client_id: str) -> list[Permission]:
        """The client's permissions now (the clock's changes stored)."""
        return [await self._current(p) for p in await self.permissions.of_client(client_id)]

    async def request(self, who: Principal, body: dict[str, Any]) -> dict[str, Any]:
        """A party asks a customer for access: validated, stored and sent to the customer's current retailer."""
        verdict = decide(who, Action.REQUEST_PERMISSION)
        if not verdict.allowed:
            raise Forbidden(verdict.reason)
        assert who.party_id is not None
        if await self.permissions.get_party(who.party_id) is None:
            raise Forbidden(f"party {who.party_id!r} is not registered: ask the hub's administrator")
        now = self.now()
        client_id = body["client_id"]
        ask = consent.PermissionAsk(body["purpose"], [Scope(s) for s in body["scopes"]], body["resolution_s"],
                                    body["data_from"].timestamp(), body["data_to"].timestamp(),
                                    body["valid_until"].timestamp())
        problems = consent.validate_request(ask.purpose, ask.scopes, ask.resolution_s, ask.data_from, ask.data_to,
                                            ask.valid_until, now)
        if problems:
            raise ValueError("; ".join(problems))
        client = await self.store.get_client(client_id)
        if client is None:
            # The party had the id from the customer: an unknown id is a mistake to report (nothing is logged:
            # it names no one's data).
            raise NotFound(f"client {client_id!r} is not registered")
        p = consent.new_permission(new_id(), who.party_id, client_id, ask, now)
        await self._changed(None, p, verdict.right)
        await self.push_view(client_id, supplier_at(client["suppliers"], now))
        return permission_json(p)

    async def get(self, who: Principal, permission_id: str) -> dict[str, Any]:
        """A permission, for the party that asked for it (or the DSO)."""
        p = await self._load(permission_id)
        verdict = decide(who, Action.READ_PERMISSION, Context(issuer=None if p is None else f"party:{p.party_id}"))
        if p is None or not verdict.allowed:
            raise NotFound(f"permission {permission_id!r} is unknown")
        return permission_json(p)

    async def of_party(self, who: Principal, *, state: consent.State | None, limit: int, after: str | None
                       ) -> dict[str, Any]:
        """The caller's own permissions, newest first, ``limit`` a page, after the cursor ``after`` (the
        ``next_after`` of the previous page); ``state`` (after the clock's changes) filters, so such a page may be
        short (at most :data:`cloud_hub.views.SCAN_MAX` are read for one page). An eligible party only: no other
        principal asks for permissions."""
        verdict = decide(who, Action.LIST_PERMISSIONS)
        if not verdict.allowed:
            raise Forbidden(verdict.reason)
        assert who.party_id is not None  # only a party may list
        party_id = who.party_id

        async def fetch(cursor: str | None, n: int) -> list[tuple[str, Permission | None]]:
            return [(k, None if p is None else await self._current(p))
                    for k, p in await self.permissions.of_party(party_id, cursor, n)]

        def keep(p: Permission | None) -> dict[str, Any] | None:
            if p is None or (state is not None and p.state is not state):
                return None
            verdict = decide(who, Action.READ_PERMISSION, Context(issuer=f"party:{p.party_id}"))
            return permission_json(p) if verdict.allowed else None

        found, cursor = await paged(fetch, keep, limit=limit, after=after, filtered=state is not None)
        return {"permissions": found, "count": len(found), "next_after": cursor}

    async def terminate(self, who: Principal, permission_id: str) -> dict[str, Any]:
        """The party ends its permission (or withdraws its request) now."""
        async with self._lock(permission_id):
            p = await self._load(permission_id)
            verdict = decide(who, Action.TERMINATE_PERMISSION,
                             Context(issuer=None if p is None else f"party:{p.party_id}"))
            if p is None or not verdict.allowed:
                raise NotFound(f"permission {permission_id!r} is unknown")
            try:
                ended = consent.decide(p, Event.TERMINATE, self.now(), str(who))
            except InvalidTransition as exc:
                raise Conflict(str(exc)) from None
            new = await self._changed(p, ended, verdict.right)
        client = await self.store.get_client(new.client_id)
        if client is not None:
            await self.push_view(new.client_id, supplier_at(client["suppliers"], self.now()))
        return permission_json(new)

    # -- the customer, through their retailer -------------------------------------------------------------------

    async def on_retailer(self, retailer_id: str, msg: ConsentQuery | ConsentDecision
                          ) -> list[Ack | ErrorReply | ConsentView]:
        """A retailer's ``consent_query`` or ``consent_decision``: the answers to send it, in order."""
        who = Principal("retailer", retailer_id)
        client = await self.store.get_client(msg.client_id)
        now = self.now()
        current = None if client is None else supplier_at(client["suppliers"], now)
        verdict = decide(who, Action.DECIDE_PERMISSION, Context(supplier_at_time=current))
        if not verdict.allowed:
            if client is not None:
                await self.store.audit([AuditEntry(str(who), msg.client_id, Action.DECIDE_PERMISSION.value,
                                                   verdict.right, False, msg.msg_id)])
            # The same answer for an unknown client as for another retailer's (neutrality).
            return [ErrorReply(ref_msg_id=msg.msg_id, code="forbidden",
                               message=f"{hidden_client(msg.client_id)}, or not your client now: only the "
                                       "client's current retailer speaks for the customer")]
        if isinstance(msg, ConsentQuery):
            return [await self.view(msg.client_id, retailer_id)]
        event = {"accept": Event.ACCEPT, "reject": Event.REJECT, "revoke": Event.REVOKE}[msg.decision]
        async with self._lock(msg.permission_id):
            p = await self._load(msg.permission_id)
            if p is None or p.client_id != msg.client_id:
                return [ErrorReply(ref_msg_id=msg.msg_id, code="invalid",
                                   message=f"no permission {msg.permission_id!r} of this client")]
            try:
                new = consent.decide(p, event, now, f"customer via {who}")
            except InvalidTransition as exc:
                lapsed = p.state in (consent.State.TIMED_OUT, consent.State.FULFILLED)
                return [ErrorReply(ref_msg_id=msg.msg_id, code="expired" if lapsed else "invalid", message=str(exc)),
                        await self.view(msg.client_id, retailer_id)]
            await self._changed(p, new, verdict.right)
        return [Ack(ack_ids=[msg.msg_id]), await self.view(msg.client_id, retailer_id)]

    async def view(self, client_id: str, retailer_id: str) -> ConsentView:
        """What the customer's personal area shows: their permissions and the newest lines of their access log."""
        perms = await self.of_client(client_id)
        names: dict[str, str] = {}
        for p in perms:
            if p.party_id not in names:
                party = await self.permissions.get_party(p.party_id)
                names[p.party_id] = party["name"] if party else p.party_id
        now = self.now()
        lines = await self.store.get_audit(client_id, now - VIEW_WINDOW_S, now + 1)
        lines = lines[-VIEW_ACCESSES:]
        return ConsentView(
            client_id=client_id,
            permissions=[ConsentItem(
                permission_id=p.permission_id, party_id=p.party_id, party_name=names[p.party_id][:200],
                purpose=p.purpose[:500], scopes=[s.value for s in p.scopes], resolution_s=p.resolution_s,
                data_from=_dt(p.data_from), data_to=_dt(p.data_to), valid_until=_dt(p.valid_until),
                decide_by=_dt(p.decide_by), state=p.state.value) for p in perms[-VIEW_PERMISSIONS:]],
            accesses=[AccessItem(at=_dt(e["at"]), principal=shown_principal(e["principal"], retailer_id)[:200],
                                 action=e["action"][:64], right=e["right"][:200], allowed=e["allowed"])
                      for e in reversed(lines)])

    async def push_view(self, client_id: str, retailer_id: str | None) -> None:
        """Send the customer's view to their current retailer (best effort: the personal area asks on each page)."""
        if retailer_id is None or self.publish is None:
            return
        try:
            await self.publish(retailer_id, await self.view(client_id, retailer_id))
        except Exception as exc:  # a lost push is asked for again by the next page: never fail the write for it
            log.warning("consent view for client %s not pushed to retailer %s: %s", client_id, retailer_id, exc)

    # -- reads by parties --------------------------------------------------------------------------------------

    async def _grant(self, who: Principal, action: Action, scope: Scope, client_id: str, start: float,
                     end: float) -> tuple[consent.Grant, str]:
        """The grant a party's read rests on, logged either way; refused as an unknown client when there is none."""
        assert who.party_id is not None
        if end <= start:
            raise ValueError("'to' must be after 'from'")
        now = self.now()
        perms = await self.of_client(client_id)
        g = consent.grant(perms, who.party_id, client_id, scope, now, start, end)
        verdict = decide(who, action, Context(permission_id=None if g is None else g.permission_id))
        exists = await self.store.get_client(client_id) is not None
        if exists:
            await self.store.audit([AuditEntry(str(who), client_id, action.value, verdict.right, verdict.allowed,
                                               None if g is None else g.permission_id, at=now)])
        if not verdict.allowed or g is None:
            raise NotFound(hidden_client(client_id))
        return g, verdict.right

    async def consumption_profile(self, who: Principal, client_id: str, start: float, end: float,
                                  resolution_s: int) -> dict[str, Any]:
        """A client's consumption series for a party: only the part of the range and at the resolution its
        permission covers; a reading interval that runs past the permitted period is withheld."""
        g, right = await self._grant(who, Action.READ_CONSUMPTION, Scope.CONSUMPTION_PROFILE, client_id, start, end)
        res = consent.resolution(g, resolution_s)
        if (g.end - g.start) / res > 100_000:
            raise ValueError("too many points: ask for a shorter range or a coarser resolution_s")
        blocks, withheld = withhold_straddling(
            clip_blocks(await self.store.readings(client_id, g.start, g.end), g.start, g.end), g.end,
            lambda t0, t1: consent.allowed_interval(g, t0, t1))
        return {"client_id": client_id, "from": iso(g.start), "to": iso(g.end), "resolution_s": res,
                "permission_id": g.permission_id, "right": right,
                "series": [{**p, "start": iso(p["start"])} for p in profile(blocks, g.start, g.end, res)],
                "withheld": [{"start": iso(w["start"]), "end": iso(w["end"]), "resolution_s": w["resolution_s"],
                              "reason": "runs past the period the permission covers"} for w in withheld]}

    async def measurements(self, who: Principal, client_id: str, start: float, end: float) -> dict[str, Any]:
        """A client's active-power series for a party, within its permission's period (the senders not named)."""
        g, right = await self._grant(who, Action.READ_MEASUREMENTS, Scope.LIVE_MEASUREMENTS, client_id, start, end)
        series = [s for s in await self.store.measurements(client_id, g.start, g.end)
                  if consent.covers(g, s["at"])]
        return {"client_id": client_id, "from": iso(g.start), "to": iso(g.end), "permission_id": g.permission_id,
                "right": right,
                "series": [{"at": iso(s["at"]), "active_power_kw": s["active_power_kw"]} for s in series]}

    async def billing_data(self, who: Principal, client_id: str, start: float, end: float) -> dict[str, Any]:
        """A client's meter readings as used for its bills, for a party: only the part of the range its permission
        covers, at the permitted resolution or coarser (:func:`consent.coarsen`); a reading interval that runs past
        the permitted period, or that cannot be made as coarse as the permission asks, is withheld."""
        g, right = await self._grant(who, Action.READ_BILLING_DATA, Scope.BILLING_DATA, client_id, start, end)
        blocks, past = await billing_readings(self.store, client_id, g.start, g.end,
                                              lambda t0, t1: consent.allowed_interval(g, t0, t1))
        blocks, partial = consent.coarsen(blocks, g.resolution_s)
        withheld = [{**w, "reason": "runs past the period the permission covers"} for w in past]
        withheld += [{**w, "reason": f"does not make a whole interval of {g.resolution_s} s, the finest the "
                                     "permission allows"} for w in partial]
        return {"client_id": client_id, "from": iso(g.start), "to": iso(g.end), "resolution_s": g.resolution_s,
                "permission_id": g.permission_id, "right": right, "readings": readings_json(blocks),
                "withheld": [{**w, "start": iso(w["start"]), "end": iso(w["end"])}
                             for w in sorted(withheld, key=lambda w: w["start"])]}
