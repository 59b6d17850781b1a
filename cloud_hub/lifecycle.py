"""The request lifecycle as pure functions: state of a request from the states of its clients, and retry timing."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

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
    """The request's state once its clients are in ``clients``; a terminal request stays as it is."""
    if current.terminal:
        return current
    states = list(clients)
    if not states:
        return RequestState.FAILED
    if not all(s.terminal for s in states):
        if current is RequestState.ACCEPTED and all(s is ClientState.PENDING for s in states):
            return RequestState.ACCEPTED
        return RequestState.DISPATCHING
    if any(s is ClientState.CANCELLED for s in states):
        return RequestState.CANCELLED
    ok = sum(1 for s in states if s in SUCCESS)
    if ok == len(states):
        return RequestState.COMPLETED
    if ok:
        return RequestState.PARTIALLY_COMPLETED
    if all(s in TIMED_OUT for s in states) and any(s is ClientState.EXPIRED for s in states):
        return RequestState.EXPIRED
    return RequestState.FAILED


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
    """Back-off before re-sending an unacknowledged message for the ``attempts``-th time."""
    return float(min(cap_s, base_s * (2 ** max(0, attempts - 1))))
