"""Authorization of the use cases, with the data access log: every action on client data goes through
:func:`cloud_hub.authz.decide` here first."""

from __future__ import annotations

import logging
from typing import Any

from cloud_hub.authz import Action, Context, Principal, decide
from cloud_hub.errors import Forbidden, NotFound
from cloud_hub.store import AuditEntry, HubStore

log = logging.getLogger(__name__)

REGISTER_LOCK_STRIPES = 256
"""Locks serialising registrations of the same client (by a hash of its id)."""
AUDIT_REFUSALS_LOGGED = 100
"""A refusal is written to the data access log one line per registered client for at most this many client ids
of one request or message; the rest, and ids that name no client, are counted in one summary line (client
``*``)."""
AUDIT_SUMMARY_CLIENT = "*"
"""The ``client_id`` of a summary line of the data access log (``GET /v1/audit?client_id=*``)."""


def refusal_audit(principal: str, action: str, right: str, known: list[str], unknown: int, more: list[str],
                  ref: str | None = None) -> list[AuditEntry]:
    """The data access log of one refused request or message: a line per registered client it concerned (the first
    :data:`AUDIT_REFUSALS_LOGGED`), and one summary line (client ``*``, ``detail`` saying what it counts) for the
    rest of them, ``unknown`` ids that name no client and the ``more`` that were not looked up, when there are any."""
    lines = [AuditEntry(principal, cid, action, right, False, ref) for cid in known[:AUDIT_REFUSALS_LOGGED]]
    counted = list(more)
    if len(known) > AUDIT_REFUSALS_LOGGED:
        counted.insert(0, f"{len(known) - AUDIT_REFUSALS_LOGGED} more registered client(s), not logged one by one")
    if unknown:
        counted.insert(0, f"{unknown} id(s) that name no registered client")
    if counted:
        lines.append(AuditEntry(principal, AUDIT_SUMMARY_CLIENT, action, right, False, ref, detail="; ".join(counted)))
    return lines


def hidden_client(client_id: str) -> str:
    """The one answer a retailer gets for a client that is unknown or not its own (HTTP 404 ``not_found``)."""
    return f"client {client_id!r} not found"


class Access:
    """The one door to :func:`cloud_hub.authz.decide` for the use cases, writing refusals to the data access log."""

    def __init__(self, store: HubStore) -> None:
        self.store = store

    def authorize(self, who: Principal, action: Action, ctx: Context | None = None) -> str:
        """Raise :class:`Forbidden` unless allowed; returns the right the permission rests on."""
        verdict = decide(who, action, ctx)
        if not verdict.allowed:
            raise Forbidden(verdict.reason)
        return verdict.right

    async def logged(self, who: Principal, action: Action, client_id: str,
                                ctx: Context | None = None, ref: str | None = None, *, exists: bool = True) -> str:
        """Authorize an operation on one client's data and write it to the data access log either way.

        ``exists`` False: the client is not registered. A principal allowed to know that (the DSO) gets
        :class:`NotFound` and nothing is logged, as before any read; a refused one is logged and answered as the
        verdict says, so that a retailer gets the same answer for an unknown client as for another's."""
        verdict = decide(who, action, ctx)
        if not exists and verdict.allowed:
            raise NotFound(f"client {client_id!r} is not registered")
        await self.store.audit([AuditEntry(str(who), client_id, action.value, verdict.right, verdict.allowed, ref)])
        if verdict.conceal:
            raise NotFound(hidden_client(client_id))
        if not verdict.allowed:
            raise Forbidden(verdict.reason)
        return verdict.right

    async def named(self, who: Principal, action: Action, client_ids: list[str] | None = None,
                               feeder_id: str | None = None) -> str:
        """Authorize an operation only the DSO may do on named clients (a trigger, an upload, a read); returns the
        right it rests on. A refusal is first written to the data access log for every registered client it
        named (an id that names no client is no one's data), then raised as :class:`Forbidden`."""
        verdict = decide(who, action)
        if verdict.allowed:
            return verdict.right
        # A refused body may name any number of ids: only the first AUDIT_REFUSALS_LOGGED are looked up and logged
        # per registered client, the rest counted in one summary line (the refusal costs a bounded read and write).
        named = list(dict.fromkeys(client_ids or []))
        looked = named[:AUDIT_REFUSALS_LOGGED]
        more: list[str] = []
        if len(named) > len(looked):
            more.append(f"{len(named) - len(looked)} more client id(s) named, not looked up")
        if feeder_id:
            room = AUDIT_REFUSALS_LOGGED - len(looked)
            on_feeder = await self.store.clients_on_feeder(feeder_id, limit=room + 1) if room > 0 else []
            looked = list(dict.fromkeys(looked + on_feeder[:max(room, 0)]))
            if room <= 0 or len(on_feeder) > room:
                more.append(f"more clients of feeder {feeder_id!r}, not looked up")
        known = sorted(await self.store.get_clients(looked)) if looked else []
        await self.store.audit(refusal_audit(str(who), action.value, verdict.right, known,
                                             len(looked) - len(known), more))
        raise Forbidden(verdict.reason)

    async def known_clients(self, client_ids: list[str]) -> dict[str, dict[str, Any]]:
        clients = await self.store.get_clients(client_ids)
        unknown = sorted(set(client_ids) - set(clients))
        if unknown:
            raise NotFound(f"unknown client(s): {', '.join(unknown[:20])}")
        return clients

    async def known_suppliers(self, client_ids: list[str], at: float, *, power: bool = False
                              ) -> dict[str, tuple[str | None, float | None]]:
        """Each client's retailer at ``at`` (and, with ``power``, contracted power), reading only that
        (:meth:`HubStore.suppliers_at`); raises :class:`NotFound` naming the unknown ones, as
        :meth:`known_clients` does."""
        suppliers = await self.store.suppliers_at(client_ids, at, power=power)
        if len(suppliers) < len(set(client_ids)):
            unknown = sorted(set(client_ids) - set(suppliers))
            raise NotFound(f"unknown client(s): {', '.join(unknown[:20])}")
        return suppliers
