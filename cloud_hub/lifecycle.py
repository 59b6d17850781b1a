"""The request lifecycle as pure functions: state of a request from the states of its clients, what reported
outcomes do to a request (:func:`apply`), and retry timing. No I/O and no storage cell names here."""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from mhp_wire.backoff import delay_s
from mhp_wire.messages import ClientState


class RequestState(StrEnum):
    """Where a DSO request stands as a whole."""

    ACCEPTED = "accepted"
    DISPATCHING = "dispatching"
    COMPLETED = "completed"
    PARTIALLY_COMPLETED = "partially_completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether the request has ended."""
        return self not in (RequestState.ACCEPTED, RequestState.DISPATCHING)


SUCCESS = frozenset({ClientState.ACKNOWLEDGED, ClientState.AVAILABLE, ClientState.EXECUTED})
TIMED_OUT = frozenset({ClientState.EXPIRED, ClientState.UNREACHABLE})


def request_state(current: RequestState, clients: Iterable[ClientState]) -> RequestState:
    """The request's state once its targets are in ``clients``; a terminal request stays as it is."""
    return request_state_from_counts(current, Counter(clients))


# Complexity (PLR0911): one return per request state: the rule reads as the table it is.
def request_state_from_counts(current: RequestState, counts: Mapping[ClientState, int]) -> RequestState:  # noqa: PLR0911
    """:func:`request_state` from the number of targets in each state (cheap for large requests)."""
    if current.terminal:
        return current
    total = sum(counts.values())
    if not total:
        return RequestState.FAILED
    open_ = sum(n for s, n in counts.items() if not s.terminal)
    if open_:
        if current is RequestState.ACCEPTED and counts.get(ClientState.PENDING, 0) == total:
            return RequestState.ACCEPTED
        return RequestState.DISPATCHING
    if counts.get(ClientState.CANCELLED, 0):
        return RequestState.CANCELLED
    ok = sum(n for s, n in counts.items() if s in SUCCESS)
    if ok == total:
        return RequestState.COMPLETED
    if ok:
        return RequestState.PARTIALLY_COMPLETED
    timed_out = sum(n for s, n in counts.items() if s in TIMED_OUT)
    if timed_out == total and counts.get(ClientState.EXPIRED, 0):
        return RequestState.EXPIRED
    return RequestState.FAILED


def combine(states: Iterable[ClientState]) -> ClientState:
    """One client's state from its deliveries to several retailers (billing across a supplier switch)."""
    states = list(states)
    if len(states) == 1:  # one retailer, the common case: its state is the client's
        return states[0]
    open_ = [s for s in states if not s.terminal]
    if open_:
        return min(open_, key=_OPEN_RANK.__getitem__)
    bad = [s for s in states if s not in SUCCESS]
    return bad[0] if bad else states[0]


def state_after_deadline(state: ClientState) -> ClientState:
    """What a client still open at its request's deadline becomes: never delivered means unreachable."""
    if state.terminal:
        return state
    return ClientState.EXPIRED if state is ClientState.DELIVERED else ClientState.UNREACHABLE


_OPEN_RANK = {ClientState.PENDING: 0, ClientState.SENT: 1, ClientState.DELIVERED: 2}
"""The order of the states that are not terminal."""
_BY_VALUE = {s.value: s for s in ClientState}
"""A stored state's value to its :class:`ClientState` (a dict look-up: the enum's own call costs several times more,
and it runs for every target of every batch)."""


_RANK_OF_VALUE = {s.value: rank for s, rank in _OPEN_RANK.items()}
""":data:`_OPEN_RANK` by the stored value: :func:`move` runs per target of every write, and an enum member's hash is
a Python call (``Enum.__hash__``) where a ``str``'s is cached."""


def may_move(old: ClientState, new: ClientState) -> bool:
    """Whether a reported state may replace the stored one: terminal states never change, and never go back."""
    return _may_move_value(old._value_, new._value_)


def _may_move_value(old: str, new: str) -> bool:
    """:func:`may_move` on the states' stored values (the one rule; :func:`move` asks it per target)."""
    rank_old = _RANK_OF_VALUE.get(old)
    if rank_old is None:  # terminal
        return False
    rank_new = _RANK_OF_VALUE.get(new)
    return rank_new is None or rank_new > rank_old


GATEWAY_FACTS = frozenset({ClientState.ACKNOWLEDGED, ClientState.EXECUTED, ClientState.LIMIT_NOT_MET,
                           ClientState.REFUSED})
"""The terminal states a home's gateway reports of itself: what it did (or would not do), a fact."""


def may_supersede(old: ClientState, new: ClientState) -> bool:
    """Whether a reported state may replace a terminal one: only ``unreachable``, the bridge's (or the hub's)
    inference that the home did not get the command in time, gives way, and only to the home's own outcome
    (:data:`GATEWAY_FACTS`), which says what happened; every other terminal state is final (docs/decisions.md,
    "A late outcome supersedes unreachable")."""
    return old is ClientState.UNREACHABLE and new in GATEWAY_FACTS


def restated(current: RequestState, counts: Mapping[ClientState, int], kind: str | None,
             selection: Mapping[str, Any]) -> RequestState:
    """The state of a request that had ended, once one of its clients' ``unreachable`` gave way to the home's own
    outcome (:func:`may_supersede`): derived again from ``counts`` as if it were still open (a load reduction's by
    :func:`reduction_outcome`); a cancelled request stays cancelled, and one still open follows its counts as
    usual."""
    if current is RequestState.CANCELLED or not current.terminal:
        return request_state_from_counts(current, counts)
    state = request_state_from_counts(RequestState.DISPATCHING, counts)
    if kind == "load_reduction" and state.terminal:
        state = reduction_outcome(dict(selection), counts)
    return state


def retry_delay_s(attempts: int, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """Back-off before re-sending an unacknowledged message for the ``attempts``-th time (:func:`delay_s`)."""
    return delay_s(attempts, base_s, cap_s)


# -- outcomes applied to one request -------------------------------------------------------------------------

C = ClientState
_TERMINAL = TERMINAL_VALUES = frozenset(s.value for s in ClientState if s.terminal)
"""The stored values of the terminal client states."""
Allowed = Callable[[str, list[str]], bool]
"""``allowed(retailer_id, addressed_retailers)``: whether that retailer may report on a client (the relay's
decision through :mod:`cloud_hub.authz`)."""


def addressed_only(retailer_id: str, addressed: list[str]) -> bool:
    """The default :data:`Allowed`: only a retailer the client's message went to reports on it."""
    return retailer_id in addressed


@dataclass(slots=True)
class ReportedOutcome:
    """One client's outcome as a retailer reported it (already checked against the topic's retailer)."""

    retailer_id: str
    request_id: str
    client_id: str
    state: ClientState
    detail: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, float] = field(default_factory=dict)
    revision: int = 1
    """The revision of the request the outcome answers."""


@dataclass(slots=True)
class OutcomeVerdict:
    """What the book did with one reported outcome."""

    known: bool
    addressed: list[str]
    changed: bool = False
    request_state: RequestState | None = None
    held: bool = False
    """Not applied: another replica owns the request (it adopted it meanwhile); not acknowledged either, so the
    retailer sends it again and the owner applies it."""
    refused_claim: tuple[float, float] | None = None
    """``(claimed_kw, bound_kw)`` of an availability claim above the client's contracted power: recorded as
    ``unavailable``, not believed."""
    stale: bool = False
    """The outcome answers an older revision of the request than the client's latest: acknowledged, not applied."""
    superseded: bool = False
    """The outcome replaced the client's ``unreachable`` (:func:`may_supersede`)."""


@dataclass(slots=True)
class RowState:
    """What :func:`apply` knows of one request: its stored state, decoded (``cloud_hub.store`` owns the cells).

    ``clients`` maps a client id to its stored target entry (the JSON object kept per client: ``state``,
    ``retailers``, ``revision``, ``max_kw``, ``answered``...), only for the clients asked about; :func:`apply`
    never changes these objects unless its caller says they are its own (``owned``)."""

    state: RequestState
    counts: Counter[ClientState]
    created_at: float | None = None
    kind: str | None = None
    """The request's type (``load_reduction``, ``billing``...)."""
    phase: str | None = None
    """``availability`` while a load reduction waits for its clients' answers; ``dispatch``, ``done``..."""
    answered: int = 0
    """How many clients answered the availability question."""
    targets: int = 0
    """How many clients the availability question went to."""
    selection: dict[str, Any] = field(default_factory=dict)
    """A load reduction's choice of clients (``chosen``, ``covered``...)."""
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    parties: dict[str, dict[str, Any]] = field(default_factory=dict)
    """A request without clients (a tariff, a customer list): one entry per retailer addressed, as ``clients``."""
    first_dispatch_at: float | None = None
    cancel: dict[str, Any] | None = None
    """A cancelled request's cancel record: ``{"requested_at", "retailers": {retailer: acknowledged_at}}``."""


@dataclass(slots=True)
class RowChanges:
    """What :func:`apply` changes in one request: nothing to write when :attr:`empty`."""

    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The new target entries of the clients that changed, in the order they changed."""
    parties: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The same for the parties of a request without clients."""
    answered: int | None = None
    """The new number of availability answers (None: unchanged)."""
    counts: Counter[ClientState] | None = None
    """The new number of targets in each state, with :attr:`state` (None: no target's state changed)."""
    state: RequestState | None = None
    ended_at: float | None = None
    """Set when the request reached a terminal state here: its completion time (its phase is then ``done``)."""
    phase_complete: bool = False
    """Every target answered the availability question: the phase may end now."""
    finished: tuple[str, RequestState, float] | None = None
    """``(kind, state, seconds since creation)`` of a request that ended here, for the metrics."""
    first_dispatch_at: float | None = None
    """Set by the request's first send."""
    cancel: dict[str, Any] | None = None
    """The new cancel record (None: unchanged)."""

    @property
    def empty(self) -> bool:
        """Whether nothing is to be written."""
        return not (self.clients or self.parties) and self.answered is None and self.state is None and (
            self.cancel is None and self.first_dispatch_at is None)


def reported_kw(value: Any) -> float:
    """A power a retailer reported in an outcome's free-form ``detail``: a finite, non-negative number, else 0."""
    try:
        kw = float(value)
    except (TypeError, ValueError):
        return 0.0
    return kw if math.isfinite(kw) and kw >= 0 else 0.0


def reduction_outcome(selection: dict[str, Any], counts: Mapping[ClientState, int]) -> RequestState:
    """A finished load reduction: completed when every chosen client executed and the reduction was covered;
    clients that were unavailable, or available but not needed, do not make it partial."""
    chosen = len(selection.get("chosen", []))
    executed = counts.get(C.EXECUTED, 0)
    if chosen and executed == chosen and selection.get("covered"):
        return RequestState.COMPLETED
    if executed:
        return RequestState.PARTIALLY_COMPLETED
    return RequestState.FAILED


def move(entry: dict[str, Any], new: ClientState, counts: Counter[ClientState], now: float) -> bool:
    """Move one target ``entry`` (changed in place) to ``new`` when :func:`may_move` allows, keeping ``counts``;
    returns whether it moved."""
    stored = entry["state"]
    old = _BY_VALUE[stored]  # an unknown stored state raises here, as before
    value = new._value_
    if value == stored or not _may_move_value(stored, value):
        return False
    counts[old] -= 1
    counts[new] += 1
    entry["state"] = value
    entry["updated_at"] = now
    return True


def working(entry: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of a stored target entry that :func:`apply` may change: its top-level fields and its nested
    ``retailers`` in place (copied too); the other nested values (``detail``, ``trace``, ``history``,
    ``superseded``) are the stored entry's own objects, to be replaced, never changed in place."""
    copy = dict(entry)
    if "retailers" in copy:
        copy["retailers"] = dict(copy["retailers"])
    return copy


def _availability(entry: dict[str, Any], o: ReportedOutcome, now: float) -> tuple[float, float] | None:
    """Record a client's availability answer in ``entry``; returns ``(claimed, bound)`` of a claim not believed:
    a home cannot shed more than it may draw, so a claim above its contracted power counts as unavailable
    (docs/decisions.md, "Bounded claims")."""
    entry["answered"] = True
    kw = reported_kw(o.detail.get("available_kw", 0.0)) if o.state is C.AVAILABLE else 0.0
    bound = entry.get("max_kw")
    refused: tuple[float, float] | None = None
    if bound is not None and kw > bound:
        refused = (kw, float(bound))
        entry["available_kw"], entry["availability"] = 0.0, C.UNAVAILABLE.value
        entry["detail"] = {"reason": f"claimed {kw:g} kW available, more than the client's contracted "
                                     f"power ({bound:g} kW): not believed", "claimed_kw": kw, "available_kw": 0.0}
    else:
        entry["available_kw"] = kw
        entry["availability"] = o.state.value
        entry["detail"] = o.detail
    entry["updated_at"] = now
    return refused


class _Apply:
    """One :func:`apply`: the row's working copy and what changed, outcome by outcome."""

    def __init__(self, row: RowState, now: float, allowed: Allowed, owned: bool = False) -> None:
        self.row, self.now, self.allowed = row, now, allowed
        self.counts = Counter(row.counts)
        self.answered = row.answered
        self.work: dict[str, dict[str, Any]] = {}
        self.changes = RowChanges()
        self.moved = False
        self.owned = owned
        """Whether the row's entries are this call's to change (see :func:`apply`): no working copies then."""
        self.moves: Counter[tuple[str, str]] = Counter()
        """Targets moved by :meth:`report`, by ``(stored value, new value)``; :meth:`settle` adds them to ``counts``."""
        self._allowed: dict[tuple[str, ...], bool] = {}
        """``allowed``'s answers in this batch, by ``(retailer, *addressed)`` (see :func:`apply`)."""

    def entry(self, client_id: str) -> dict[str, Any] | None:
        """The client's entry as this batch left it so far (None: not a target of the request)."""
        entry = self.work.get(client_id)
        if entry is None:
            stored = self.row.clients.get(client_id)
            if stored is None:
                return None
            entry = self.work[client_id] = stored if self.owned else working(stored)
        return entry

    def may_report(self, retailer_id: str, addressed: list[str]) -> bool:
        """``allowed(retailer_id, addressed)``, asked once per pair in a batch (thousands of outcomes of one
        retailer for clients addressed to it ask the same question)."""
        key = (retailer_id, *addressed)
        ok = self._allowed.get(key)
        if ok is None:
            ok = self._allowed[key] = self.allowed(retailer_id, addressed)
        return ok

    def one(self, o: ReportedOutcome) -> OutcomeVerdict:
        """Apply one outcome; its verdict."""
        entry = self.entry(o.client_id)
        if entry is None:
            return OutcomeVerdict(False, [])
        addressed = list(entry.get("retailers", {}))
        if not self.may_report(o.retailer_id, addressed):
            return OutcomeVerdict(True, addressed)
        if o.revision < int(entry.get("revision", 1)):
            # An answer to a revision the client has since been sent a newer one of (a late delivery, or a
            # re-send): the hub keeps the latest revision's outcome only (docs/decisions.md, "Revisions").
            return OutcomeVerdict(True, addressed, request_state=self.row.state, stale=True)
        if self.row.phase == "availability" and o.state in (C.AVAILABLE, C.UNAVAILABLE):
            return self.answer(o, entry, addressed)
        return self.report(o, entry, addressed)

    def answer(self, o: ReportedOutcome, entry: dict[str, Any], addressed: list[str]) -> OutcomeVerdict:
        """A client's answer to the availability question: recorded once."""
        if entry.get("answered"):
            return OutcomeVerdict(True, addressed)
        refused = _availability(entry, o, self.now)
        self.answered += 1
        self.changes.clients[o.client_id] = entry
        self.changes.answered = self.answered
        return OutcomeVerdict(True, addressed, changed=True, request_state=self.row.state, refused_claim=refused)

    def report(self, o: ReportedOutcome, entry: dict[str, Any], addressed: list[str]) -> OutcomeVerdict:
        """A client's reported state: its target moves forward only, a terminal one never (but ``unreachable``
        gives way to the home's own outcome of the same revision: :meth:`supersede`)."""
        if entry["state"] in _TERMINAL:  # a re-sent outcome, the common duplicate: a terminal state stays
            if entry["state"] == C.UNREACHABLE.value and may_supersede(C.UNREACHABLE, o.state):
                return self.supersede(o, entry, addressed)
            return OutcomeVerdict(True, addressed, request_state=self.row.state)
        retailers = entry["retailers"]
        value = retailers[o.retailer_id] = o.state._value_
        if len(retailers) > 1:  # one retailer, the common case: its state is the client's
            value = _combined(retailers)._value_
        # move(), inline and on the stored values (per outcome of every commit): the counts' changes are kept by
        # value and folded into ``counts`` once, in settle() (an enum member's hash is a Python call)
        stored = entry["state"]
        if stored not in _BY_VALUE:
            raise KeyError(stored)  # an unknown stored state, as move() raises it
        if value == stored or not _may_move_value(stored, value):
            return OutcomeVerdict(True, addressed, request_state=self.row.state)
        self.moves[stored, value] += 1
        entry["state"] = value
        entry["updated_at"] = self.now
        entry["detail"] = o.detail
        full = {**entry.get("trace", {}), **o.trace}
        if value in _TERMINAL:
            full["total_ms"] = round((self.now - float(self.row.created_at or 0.0)) * 1000, 3)
        entry["trace"] = full
        self.changes.clients[o.client_id] = entry
        self.moved = True
        return OutcomeVerdict(True, addressed, changed=True)

    def supersede(self, o: ReportedOutcome, entry: dict[str, Any], addressed: list[str]) -> OutcomeVerdict:
        """A home's own outcome after its client was declared ``unreachable`` (its gateway got the command late,
        from the broker's queue, and acted on it): the fact replaces the inference when it answers the client's
        current revision; the ``unreachable`` it replaces is kept in the entry's ``superseded``."""
        if o.revision != int(entry.get("revision", 1)):
            return OutcomeVerdict(True, addressed, request_state=self.row.state, stale=o.revision < int(
                entry.get("revision", 1)))
        retailers = {**entry["retailers"], o.retailer_id: o.state.value}
        new = combine([_BY_VALUE[s] for s in retailers.values()])
        if new not in GATEWAY_FACTS:  # another retailer's delivery of the client still says otherwise
            # Kept all the same (written with the entry): when that delivery's home reports too, both facts are in.
            entry["retailers"] = retailers
            self.changes.clients[o.client_id] = entry
            return OutcomeVerdict(True, addressed, request_state=self.row.state)
        old = _BY_VALUE[entry["state"]]
        entry["superseded"] = [*entry.get("superseded", []), {
            "state": old.value, "detail": entry.get("detail", {}), "updated_at": entry.get("updated_at"),
            "revision": o.revision, "by": new.value, "at": self.now}]
        entry["retailers"] = retailers
        self.counts[old] -= 1
        self.counts[new] += 1
        entry["state"] = new.value
        entry["updated_at"] = self.now
        entry["detail"] = o.detail
        full = {**entry.get("trace", {}), **o.trace}
        full["total_ms"] = round((self.now - float(self.row.created_at or 0.0)) * 1000, 3)
        entry["trace"] = full
        self.changes.clients[o.client_id] = entry
        self.moved = True
        return OutcomeVerdict(True, addressed, changed=True, superseded=True)

    def settle(self, verdicts: list[OutcomeVerdict]) -> None:
        """The request's state after the batch, given to the verdicts of outcomes that moved a target."""
        row, changes = self.row, self.changes
        for (old, new), n in self.moves.items():
            self.counts[_BY_VALUE[old]] -= n
            self.counts[_BY_VALUE[new]] += n
        if changes.answered is not None and self.answered >= row.targets:
            changes.phase_complete = True
        if not self.moved:
            return
        if row.state.terminal:  # only a superseded ``unreachable`` moves a target of an ended request
            state = restated(row.state, self.counts, row.kind, row.selection)
        else:
            state = request_state_from_counts(row.state, self.counts)
            if row.kind == "load_reduction" and state.terminal and state is not row.state:
                state = reduction_outcome(row.selection, self.counts)
        changes.counts = self.counts
        changes.state = state
        if state is not row.state and state.terminal and not row.state.terminal:  # it ended here (not again)
            changes.ended_at = self.now
            changes.finished = (str(row.kind), state, self.now - float(row.created_at or 0.0))
        for v in verdicts:
            if v.changed and v.request_state is None:
                v.request_state = state


def apply(row: RowState, outcomes: Sequence[ReportedOutcome], now: float,
          allowed: Allowed = addressed_only, *, owned: bool = False) -> tuple[RowChanges, list[OutcomeVerdict]]:
    """Outcomes reported for one request, in order, applied to its state: what changes, and one verdict per outcome.

    Pure: ``row`` is left as it was. An outcome for a client that is not a target, or from a retailer ``allowed``
    refuses, changes nothing; one answering an older revision than the client's latest is ``stale``; during a load
    reduction's availability phase an ``available``/``unavailable`` answer is recorded once (a claim above the
    client's ``max_kw`` counts as unavailable); otherwise a target moves only forward (:func:`may_move`, its
    retailers' states :func:`combine`\\ d), a terminal one never, and the request's state follows its counts
    (a load reduction's by :func:`reduction_outcome`).

    ``allowed`` must be pure (it is asked once per retailer and set of addressed retailers in a call). ``owned``:
    the caller hands over ``row.clients``' entries (decoded for this call, read by nobody after it), so they are
    changed in place instead of copied first; the entries of ``changes`` are then those same objects. Without it
    each entry is :func:`working`: only its top-level fields and ``retailers`` are changed in place (its other
    nested values are shared with the caller's entry and replaced when they change)."""
    run = _Apply(row, now, allowed, owned)
    verdicts = [run.one(o) for o in outcomes]
    run.settle(verdicts)
    return run.changes, verdicts


# -- messages sent, acknowledged, deadlines ----------------------------------------------------------------------

Sent = tuple[Sequence[str], str, int]
"""A message's ``(clients, retailer_id, revision)``: its targets are its clients, or (none) the retailer as a
party of a request without clients."""


def _targets(work: dict[str, dict[str, Any]], parties: dict[str, dict[str, Any]], clients: Sequence[str],
             retailer_id: str) -> list[tuple[bool, str, dict[str, Any] | None]]:
    """``(is_client, id, entry)`` of a message's targets."""
    if clients:
        return [(True, c, work.get(c)) for c in clients]
    return [(False, retailer_id, parties.get(retailer_id))]


_PENDING, _SENT, _ACKNOWLEDGED = C.PENDING.value, C.SENT.value, C.ACKNOWLEDGED.value
"""The stored values :func:`sent` and :func:`acknowledged` compare and write per target (an enum member's
``.value`` is a descriptor call)."""


def _combined(retailers: dict[str, str]) -> ClientState:
    """:func:`combine` of a target's stored per-retailer states; one retailer (the common case) without a list."""
    if len(retailers) == 1:
        for value in retailers.values():
            return _BY_VALUE[value]
    return combine([_BY_VALUE[s] for s in retailers.values()])


def _record(changes: RowChanges, is_client: bool, key: str, entry: dict[str, Any]) -> None:
    (changes.clients if is_client else changes.parties)[key] = entry


def _finish(changes: RowChanges, current: RequestState, counts: Counter[ClientState], now: float) -> RequestState:
    """The request's state from ``counts``, always written; its end when it reaches a terminal state here."""
    state = request_state_from_counts(current, counts)
    changes.counts, changes.state = counts, state
    if state is not current and state.terminal:
        changes.ended_at = now
    return state


SentAt = tuple[Sequence[str], str, int, float]
"""A first send's ``(clients, retailer_id, revision, sent_at)``: :data:`Sent` with the time it was published."""


def sent(row: RowState, messages: Sequence[SentAt], first_at: float, *, owned: bool = False) -> RowChanges:
    """First sends of ``messages``, each at its own time: their targets still ``pending`` for that retailer become
    ``sent`` (``updated_at`` the message's send time). Only what changes is recorded: a target that moved on meanwhile
    (answered: terminal, or already past ``sent``), or of a newer revision than the message (the entry waits for its
    own revision's), is left alone, and the request's state and counts are written only when a target moved. The
    request's first dispatch time (``first_at``, the earliest send) is written when it has none, even once the
    request has ended (its trace's ``dispatch_ms``); nothing else is then. ``owned``: as for :func:`apply`, the
    row's entries are the caller's to hand over, changed in place instead of copied."""
    changes = RowChanges()
    if row.first_dispatch_at is None:
        changes.first_dispatch_at = first_at
    if row.state.terminal:
        return changes
    counts = Counter(row.counts)
    moved = False
    for clients, retailer_id, revision, at in messages:
        for is_client, key, _ in _targets(row.clients, row.parties, clients, retailer_id):
            done = changes.clients if is_client else changes.parties
            entry = done.get(key)
            if entry is None:
                stored = (row.clients if is_client else row.parties).get(key)
                if stored is None or stored["state"] in _TERMINAL or revision < stored.get("revision", 1) or (
                        stored["retailers"].get(retailer_id) != _PENDING) or stored.get("updated_at", at) > at:
                    # Moved on, an older revision's message, or written after the send (a load reduction's chosen
                    # clients set pending again for its second phase): nothing to write for it.
                    continue
                entry = stored if owned else working(stored)
            elif revision < entry.get("revision", 1) or entry["retailers"].get(retailer_id) != _PENDING:
                continue
            entry["retailers"][retailer_id] = _SENT
            moved = move(entry, _combined(entry["retailers"]), counts, at) or moved
            done[key] = entry
    if moved:
        changes.counts = counts
        changes.state = request_state_from_counts(row.state, counts)
    return changes


def acknowledged(row: RowState, deliveries: Sequence[Sent], cancels: Sequence[str], now: float) -> RowChanges:
    """Retailers acknowledged ``deliveries`` (billing, tariff, customers: their targets are ``acknowledged``) and
    the cancels of ``cancels`` (retailer ids: the time each acknowledged is recorded)."""
    changes = RowChanges()
    if cancels:
        cancel = copy.deepcopy(row.cancel) if row.cancel else {"retailers": {}}
        for retailer_id in cancels:
            cancel["retailers"][retailer_id] = now
        changes.cancel = cancel
    counts = Counter(row.counts)
    work = {c: working(e) for c, e in row.clients.items()}
    parties = {p: working(e) for p, e in row.parties.items()}
    for clients, retailer_id, _ in deliveries:
        for is_client, key, entry in _targets(work, parties, clients, retailer_id):
            if entry is None:
                continue
            entry["retailers"][retailer_id] = _ACKNOWLEDGED
            move(entry, _combined(entry["retailers"]), counts, now)
            _record(changes, is_client, key, entry)
    _finish(changes, row.state, counts, now)
    return changes


def expired(row: RowState, now: float) -> RowChanges:
    """The request's deadline passed: every target still open ends (:func:`state_after_deadline`), with the
    reason in its detail; ``row`` holds every client (or, without clients, every party)."""
    changes = RowChanges()
    counts = Counter(row.counts)
    is_client = bool(row.clients)
    for key, stored in (row.clients or row.parties).items():
        entry = working(stored)
        if move(entry, state_after_deadline(C(entry["state"])), counts, now):
            entry["detail"] = {**entry.get("detail", {}), "reason": "no outcome before the request's deadline"}
            _record(changes, is_client, key, entry)
    state = _finish(changes, row.state, counts, now)
    if state is not row.state:
        changes.finished = (str(row.kind), state, now - float(row.created_at or 0.0))
    return changes


def cancelled(row: RowState, now: float) -> tuple[RowChanges, dict[str, list[str]]]:
    """A cancel of a request that has not ended: every client not ended is ``cancelled``; returns the changes and
    every retailer the request addressed with its clients, even one whose entry still reads pending (a round is
    published before it is recorded as sent, and a revision resets its clients to pending, so the message may be
    at the broker already; a bridge that never got it stops nothing, and acknowledges)."""
    changes = RowChanges(state=RequestState.CANCELLED, ended_at=now, cancel={"requested_at": now, "retailers": {}})
    reached: dict[str, list[str]] = {}
    counts: Counter[ClientState] = Counter()
    for cid, stored in row.clients.items():
        for rid in stored["retailers"]:
            reached.setdefault(rid, []).append(cid)
        entry = stored
        if not C(stored["state"]).terminal:
            entry = {**working(stored), "state": C.CANCELLED.value, "updated_at": now}
            changes.clients[cid] = entry
        counts[C(entry["state"])] += 1
    changes.counts = counts
    return changes, reached
