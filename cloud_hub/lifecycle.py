"""The request lifecycle as pure functions: state of a request from the states of its clients, and retry timing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from enum import StrEnum

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
    open_ = [s for s in states if not s.terminal]
    if open_:
        order = [ClientState.PENDING, ClientState.SENT, ClientState.DELIVERED]
        return min(open_, key=order.index)
    bad = [s for s in states if s not in SUCCESS]
    return bad[0] if bad else states[0]


def state_after_deadline(state: ClientState) -> ClientState:
    """What a client still open at its request's deadline becomes: never delivered means unreachable."""
    if state.terminal:
        return state
    return ClientState.EXPIRED if state is ClientState.DELIVERED else ClientState.UNREACHABLE


def may_move(old: ClientState, new: ClientState) -> bool:
    """Whether a reported state may replace the stored one: terminal states never change, and never go back."""
    if old.terminal:
        return False
    order = {ClientState.PENDING: 0, ClientState.SENT: 1, ClientState.DELIVERED: 2}
    return new.terminal or order[new] > order[old]


def retry_delay_s(attempts: int, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """Back-off before re-sending an unacknowledged message for the ``attempts``-th time (:func:`delay_s`)."""
    return delay_s(attempts, base_s, cap_s)
