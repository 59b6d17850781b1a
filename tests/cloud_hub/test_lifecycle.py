"""The request lifecycle, as tables of cases."""

from __future__ import annotations

import pytest

from cloud_hub.lifecycle import RequestState, may_move, request_state, retry_delay_s, state_after_deadline
from mhp_wire.messages import ClientState as C

R = RequestState

CASES = [
    (R.ACCEPTED, [C.PENDING, C.PENDING], R.ACCEPTED),
    (R.ACCEPTED, [C.SENT, C.PENDING], R.DISPATCHING),
    (R.DISPATCHING, [C.EXECUTED, C.DELIVERED], R.DISPATCHING),
    (R.DISPATCHING, [C.EXECUTED, C.EXECUTED], R.COMPLETED),
    (R.DISPATCHING, [C.ACKNOWLEDGED, C.AVAILABLE], R.COMPLETED),
    (R.DISPATCHING, [C.EXECUTED, C.REFUSED], R.PARTIALLY_COMPLETED),
    (R.DISPATCHING, [C.EXECUTED, C.UNREACHABLE], R.PARTIALLY_COMPLETED),
    (R.DISPATCHING, [C.REFUSED, C.UNREACHABLE], R.FAILED),
    (R.DISPATCHING, [C.EXPIRED, C.UNREACHABLE], R.EXPIRED),
    (R.DISPATCHING, [C.UNREACHABLE, C.UNREACHABLE], R.FAILED),
    (R.DISPATCHING, [C.CANCELLED, C.EXECUTED], R.CANCELLED),
    (R.COMPLETED, [C.REFUSED], R.COMPLETED),
    (R.ACCEPTED, [], R.FAILED),
]


@pytest.mark.parametrize(("current", "clients", "expected"), CASES)
def test_request_state_from_client_states(current: RequestState, clients: list[C], expected: RequestState) -> None:
    assert request_state(current, clients) is expected


@pytest.mark.parametrize(
    ("old", "new", "ok"),
    [(C.PENDING, C.SENT, True), (C.SENT, C.DELIVERED, True), (C.DELIVERED, C.SENT, False),
     (C.SENT, C.PENDING, False), (C.PENDING, C.EXECUTED, True), (C.DELIVERED, C.REFUSED, True),
     (C.EXECUTED, C.REFUSED, False), (C.EXECUTED, C.EXECUTED, False), (C.UNREACHABLE, C.EXECUTED, False)],
)
def test_terminal_states_never_change(old: C, new: C, ok: bool) -> None:
    assert may_move(old, new) is ok


@pytest.mark.parametrize(
    ("state", "after"),
    [(C.PENDING, C.UNREACHABLE), (C.SENT, C.UNREACHABLE), (C.DELIVERED, C.EXPIRED), (C.EXECUTED, C.EXECUTED)],
)
def test_deadline_closes_open_clients(state: C, after: C) -> None:
    assert state_after_deadline(state) is after


def test_retry_backs_off_and_is_capped() -> None:
    delays = [retry_delay_s(n) for n in range(1, 12)]
    assert delays[0] == 0.5
    assert delays == sorted(delays)
    assert max(delays) == 30.0
