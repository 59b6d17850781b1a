"""Customers' permissions for eligible parties: the state machine and the rules, pure (no I/O, time passed in).

A permission request moves through EDDIE's states (docs/consent.md)::

    created -> validated -> sent_to_pa -> accepted -> revoked | terminated | fulfilled
                                       -> rejected
                                       -> timed_out

``sent_to_pa``: shown to the customer in their retailer's personal area ("permission administrator"). A request
the customer does not decide by ``decide_by`` (three working days, :func:`decision_deadline`) times out; an
accepted permission whose validity ends is fulfilled. Both happen by the clock: :func:`effective` applies them to a
stored permission at ``now``, so nothing has to run at the deadline. The customer revokes at any time, the party
terminates at any time; both end the permission at once. A supplier switch changes who relays the customer's
decisions (the new retailer), never the permission.

A party's read is served only under a permission that is accepted and valid at the time of the read and whose
data period contains the data served (:func:`grant`, :func:`allowed_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, tzinfo
from enum import StrEnum
from typing import Any


class State(StrEnum):
    """The states of a permission (EDDIE's names)."""

    CREATED = "created"
    VALIDATED = "validated"
    SENT_TO_PA = "sent_to_pa"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"
    REVOKED = "revoked"
    TERMINATED = "terminated"
    FULFILLED = "fulfilled"

    @property
    def final(self) -> bool:
        """Whether no later state can follow."""
        return self in _FINAL


_FINAL = frozenset({State.REJECTED, State.TIMED_OUT, State.REVOKED, State.TERMINATED, State.FULFILLED})


class Event(StrEnum):
    """What moves a permission on, and who may cause it (docs/consent.md)."""

    VALIDATE = "validate"      # the hub: the request is well formed and names a registered client
    SEND = "send"              # the hub: shown to the customer's current retailer
    ACCEPT = "accept"          # the customer, relayed by their current retailer
    REJECT = "reject"          # the customer
    TIME_OUT = "time_out"      # the clock: not decided by decide_by
    REVOKE = "revoke"          # the customer, at any time while it is accepted
    TERMINATE = "terminate"    # the party, at any time before it ends
    FULFIL = "fulfil"          # the clock: the validity ended


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.CREATED, Event.VALIDATE): State.VALIDATED,
    (State.VALIDATED, Event.SEND): State.SENT_TO_PA,
    (State.SENT_TO_PA, Event.ACCEPT): State.ACCEPTED,
    (State.SENT_TO_PA, Event.REJECT): State.REJECTED,
    (State.SENT_TO_PA, Event.TIME_OUT): State.TIMED_OUT,
    (State.SENT_TO_PA, Event.TERMINATE): State.TERMINATED,
    (State.ACCEPTED, Event.REVOKE): State.REVOKED,
    (State.ACCEPTED, Event.TERMINATE): State.TERMINATED,
    (State.ACCEPTED, Event.FULFIL): State.FULFILLED,
}
"""Every allowed transition; anything else is refused with :class:`InvalidTransition`."""


class InvalidTransition(ValueError):
    """The event does not apply to the permission's state (e.g. an accept after the request timed out)."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"a permission that is {state.value} cannot be {_PAST[event]}")
        self.state, self.event = state, event


_PAST = {Event.VALIDATE: "validated", Event.SEND: "sent to the customer", Event.ACCEPT: "accepted",
         Event.REJECT: "rejected", Event.TIME_OUT: "timed out", Event.REVOKE: "revoked",
         Event.TERMINATE: "terminated", Event.FULFIL: "fulfilled"}


def next_state(state: State, event: Event) -> State:
    """The state after ``event``, or :class:`InvalidTransition`."""
    after = TRANSITIONS.get((state, event))
    if after is None:
        raise InvalidTransition(state, event)
    return after


class Scope(StrEnum):
    """The data a permission covers."""

    CONSUMPTION_PROFILE = "consumption_profile"
    BILLING_DATA = "billing_data"
    LIVE_MEASUREMENTS = "live_measurements"


SCOPE_WORDS = {Scope.CONSUMPTION_PROFILE: "your electricity consumption over time",
               Scope.BILLING_DATA: "your meter readings as used for your bills",
               Scope.LIVE_MEASUREMENTS: "the live power measurements of your home"}
"""How the personal area names each scope to the customer."""

DECIDE_WITHIN_WORKING_DAYS = 3
"""How long a customer has to decide: three working days, as Elhub counts them (BRS-NO-622, docs/consent.md)."""


def decision_deadline(created_at: float, working_days: int = DECIDE_WITHIN_WORKING_DAYS, tz: tzinfo = UTC) -> float:
    """When a request made at ``created_at`` lapses: ``working_days`` working days later, a working day being
    Monday to Friday in ``tz`` (national holidays are not counted as such: they are working days here). The window
    runs only on working days: a request made on a working day lapses at the same wall-clock time that many working
    days later (Friday 10:00 -> Wednesday 10:00); one made on a Saturday or Sunday counts from Monday 00:00
    (-> Thursday 00:00)."""
    t = datetime.fromtimestamp(created_at, tz)
    if t.weekday() >= _SATURDAY:
        t = (t + timedelta(days=7 - t.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
    left = working_days
    while left > 0:
        t += timedelta(days=1)  # wall-clock arithmetic in tz: a day across a DST change keeps the time of day
        if t.weekday() < _SATURDAY:
            left -= 1
    return t.timestamp()


_SATURDAY = 5


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of a permission's history: when, what, by whom, and the state it led to."""

    at: float
    event: Event
    by: str
    state: State


@dataclass(frozen=True, slots=True)
class Permission:
    """A party's request for a customer's data, and what became of it. Times are epoch seconds."""

    permission_id: str
    party_id: str
    client_id: str
    purpose: str
    scopes: tuple[Scope, ...]
    resolution_s: int
    """The finest resolution the party may read (a coarser one is fine)."""
    data_from: float
    data_to: float
    """The period of the data the party may read: ``[data_from, data_to)``."""
    valid_until: float
    """Until when the party may read, once accepted."""
    decide_by: float
    created_at: float
    state: State = State.CREATED
    history: tuple[Change, ...] = ()

    def apply(self, event: Event, at: float, by: str) -> Permission:
        """This permission after ``event`` at ``at`` caused by ``by`` (:class:`InvalidTransition` if it does not
        apply)."""
        after = next_state(self.state, event)
        return replace(self, state=after, history=(*self.history, Change(at, event, by, after)))

    def accepted_at(self) -> float | None:
        """When the customer accepted it (None: never)."""
        return next((c.at for c in self.history if c.event is Event.ACCEPT), None)

    def ended_at(self) -> float | None:
        """When an accepted permission ended (revoked, terminated, fulfilled), None while it runs."""
        accepted = self.accepted_at()
        if accepted is None:
            return None
        return next((c.at for c in self.history if c.at >= accepted and c.state.final), None)

    def active_at(self, t: float) -> bool:
        """Whether a read at ``t`` may rest on this permission: accepted by then, not ended, within its validity."""
        accepted = self.accepted_at()
        ended = self.ended_at()
        return (accepted is not None and accepted <= t < self.valid_until
                and (ended is None or t < ended))


def validate_request(purpose: str, scopes: Iterable[Scope], resolution_s: int, data_from: float, data_to: float,
                     valid_until: float, now: float) -> list[str]:
    """What is wrong with a permission request (empty: nothing), in words the party can act on."""
    problems = []
    if not purpose.strip():
        problems.append("purpose: say what the data is for")
    if not list(scopes):
        problems.append("scopes: name at least one of " + ", ".join(s.value for s in Scope))
    if resolution_s <= 0:
        problems.append("resolution_s: must be positive")
    if not (math.isfinite(data_from) and math.isfinite(data_to)) or data_to <= data_from:
        problems.append("data_to: must be after data_from")
    if valid_until <= now:
        problems.append("valid_until: must be in the future")
    return problems


@dataclass(frozen=True, slots=True)
class PermissionAsk:
    """What a party asks a customer for: ``scopes`` of data of ``[data_from, data_to)`` at ``resolution_s``, for
    ``purpose``, valid until ``valid_until`` (the fields :func:`validate_request` checks)."""

    purpose: str
    scopes: Iterable[Scope]
    resolution_s: int
    data_from: float
    data_to: float
    valid_until: float


def new_permission(permission_id: str, party_id: str, client_id: str, ask: PermissionAsk, now: float,
                   decide_by: float | None = None) -> Permission:
    """A validated request, sent to the customer's personal area: created, validated and sent at ``now``; the
    customer decides by ``decide_by`` (default: :func:`decision_deadline`, three working days)."""
    deadline = decision_deadline(now) if decide_by is None else decide_by
    p = Permission(permission_id, party_id, client_id, ask.purpose, tuple(dict.fromkeys(ask.scopes)),
                   ask.resolution_s, ask.data_from, ask.data_to, ask.valid_until, deadline, now)
    return p.apply(Event.VALIDATE, now, "hub").apply(Event.SEND, now, "hub")


def effective(p: Permission, now: float) -> Permission:
    """``p`` with what the clock did by ``now``: a request not decided by ``decide_by`` timed out (at
    ``decide_by``), an accepted permission past ``valid_until`` fulfilled (at ``valid_until``)."""
    if p.state is State.SENT_TO_PA and now >= p.decide_by:
        return p.apply(Event.TIME_OUT, p.decide_by, "clock")
    if p.state is State.ACCEPTED and now >= p.valid_until:
        return p.apply(Event.FULFIL, p.valid_until, "clock")
    return p


def decide(p: Permission, event: Event, now: float, by: str) -> Permission:
    """The customer's or the party's ``event`` on ``p`` at ``now``, after the clock's (:func:`effective`)."""
    if event not in (Event.ACCEPT, Event.REJECT, Event.REVOKE, Event.TERMINATE):
        raise InvalidTransition(p.state, event)
    return effective(p, now).apply(event, now, by)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a party may read now: the data of ``[start, end)`` at ``resolution_s`` or coarser, under
    ``permission_id``."""

    permission_id: str
    start: float
    end: float
    resolution_s: int


def grant(permissions: Iterable[Permission], party_id: str, client_id: str, scope: Scope, now: float,
          start: float, end: float) -> Grant | None:
    """The permission a read by ``party_id`` at ``now`` of ``client_id``'s ``scope`` over ``[start, end)`` rests
    on, and the part of the range it covers; None when none does (no permission active now, for that scope, whose
    data period overlaps the range). Of several, the one covering most of the range (then the oldest)."""
    best: tuple[float, float, Grant] | None = None
    for p in permissions:
        p = effective(p, now)
        if p.party_id != party_id or p.client_id != client_id or scope not in p.scopes or not p.active_at(now):
            continue
        s, e = max(start, p.data_from), min(end, p.data_to)
        if e <= s:
            continue
        key = (e - s, -p.created_at)
        if best is None or key > best[:2]:
            best = (key[0], key[1], Grant(p.permission_id, s, e, p.resolution_s))
    return None if best is None else best[2]


def allowed_interval(g: Grant, t0: float, t1: float) -> bool:
    """Whether data of the interval ``[t0, t1)`` may be served under ``g`` (wholly inside its period)."""
    return g.start <= t0 and t1 <= g.end


def covers(g: Grant, t: float) -> bool:
    """Whether a value at the instant ``t`` may be served under ``g``."""
    return g.start <= t < g.end


def resolution(g: Grant, asked_s: int) -> int:
    """The resolution a read is answered at: what was asked, or the permission's finest if that is coarser."""
    return max(asked_s, g.resolution_s)


def coarsen(blocks: Iterable[dict[str, Any]], resolution_s: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Reading blocks (:func:`cloud_hub.timeline.clip_blocks`' form) at ``resolution_s`` or coarser, for a party
    whose permission allows no finer: a block at a finer resolution is summed in groups of
    ``ceil(resolution_s / its resolution)`` consecutive values from its own start (the block's resolution times
    that count is the served resolution); a last group shorter than that is withheld, since its energy would pass
    for a whole interval. Returns ``(blocks, withheld)``, each withheld item ``{"start", "end", "resolution_s"}``."""
    kept: list[dict[str, Any]] = []
    withheld: list[dict[str, Any]] = []
    for b in blocks:
        res, values = b["resolution_s"], b["values_kwh"]
        if res >= resolution_s:
            kept.append(b)
            continue
        k = math.ceil(resolution_s / res)
        whole = len(values) // k * k
        if whole:
            kept.append({**b, "resolution_s": res * k,
                         "values_kwh": [round(sum(values[i:i + k]), 6) for i in range(0, whole, k)]})
        if whole < len(values):
            withheld.append({"start": b["start"] + whole * res, "end": b["start"] + len(values) * res,
                             "resolution_s": res})
    return kept, withheld
