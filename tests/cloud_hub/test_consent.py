"""The permission state machine and its rules (cloud_hub.consent), as tables; time is passed in."""

from __future__ import annotations

import time

import pytest

from cloud_hub.consent import (
    TRANSITIONS,
    Event,
    InvalidTransition,
    Permission,
    PermissionAsk,
    Scope,
    State,
    allowed_interval,
    covers,
    decide,
    decision_deadline,
    effective,
    grant,
    new_permission,
    next_state,
    resolution,
    validate_request,
)

NOW = time.time()
DAY = 86_400.0


def perm(pid: str = "perm-1", party: str = "p1", client: str = "c1", scopes: tuple[Scope, ...] = (
        Scope.CONSUMPTION_PROFILE,), data: tuple[float, float] = (NOW - 30 * DAY, NOW), valid_days: float = 10,
         resolution_s: int = 900, at: float = NOW) -> Permission:
    return new_permission(pid, party, client, PermissionAsk("an offer", scopes, resolution_s, data[0], data[1],
                                                            at + valid_days * DAY), at)


ALL_PAIRS = [(s, e) for s in State for e in Event]


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS)
def test_every_pair_of_state_and_event(state: State, event: Event) -> None:
    """The table of transitions is total: a pair in it moves on, any other is refused and says why."""
    if (state, event) in TRANSITIONS:
        assert next_state(state, event) is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(InvalidTransition, match=f"is {state.value} cannot be"):
            next_state(state, event)


def test_final_states_have_no_way_out() -> None:
    for state in State:
        outs = [e for e in Event if (state, e) in TRANSITIONS]
        assert (outs == []) is state.final, state


CASES = [
    # events (offset from NOW in days, event) applied in order by the customer or the party; the state after
    ([(1, Event.ACCEPT)], State.ACCEPTED),
    ([(1, Event.REJECT)], State.REJECTED),
    ([(1, Event.ACCEPT), (2, Event.REVOKE)], State.REVOKED),
    ([(1, Event.ACCEPT), (2, Event.TERMINATE)], State.TERMINATED),
    ([(1, Event.TERMINATE)], State.TERMINATED),  # the party withdraws its request
]


@pytest.mark.parametrize(("events", "final"), CASES)
def test_histories(events: list[tuple[float, Event]], final: State) -> None:
    p = perm()
    for day, event in events:
        p = decide(p, event, NOW + day * DAY, "someone")
    assert p.state is final
    assert [c.state for c in p.history][:2] == [State.VALIDATED, State.SENT_TO_PA]
    assert [c.event for c in p.history][2:] == [e for _, e in events]


REFUSED = [
    ([(1, Event.REJECT)], Event.ACCEPT),
    ([(1, Event.ACCEPT), (2, Event.REVOKE)], Event.ACCEPT),  # revoked is final: a new request is needed
    ([(1, Event.REJECT)], Event.REVOKE),
    ([], Event.REVOKE),  # nothing to revoke before it was accepted
    ([(4, Event.ACCEPT)], None),  # too late: it lapsed after three days
    ([(1, Event.ACCEPT), (11, Event.REVOKE)], None),  # its validity ended: fulfilled, nothing to revoke
]


@pytest.mark.parametrize(("events", "last"), REFUSED)
def test_refused_decisions(events: list[tuple[float, Event]], last: Event | None) -> None:
    p = perm()
    with pytest.raises(InvalidTransition):
        for day, event in events:
            p = decide(p, event, NOW + day * DAY, "someone")
        if last is not None:
            decide(p, last, NOW + 5 * DAY, "someone")


def test_the_clock_times_out_an_undecided_request_at_its_deadline() -> None:
    p = perm()
    assert p.decide_by == decision_deadline(NOW)
    assert effective(p, p.decide_by - 1) == p
    lapsed = effective(p, p.decide_by + 5)
    assert lapsed.state is State.TIMED_OUT
    assert lapsed.history[-1].at == p.decide_by and lapsed.history[-1].by == "clock"


def test_the_clock_fulfils_an_accepted_permission_when_its_validity_ends() -> None:
    p = decide(perm(valid_days=2), Event.ACCEPT, NOW + 1, "customer")
    assert effective(p, NOW + 2 * DAY - 1).state is State.ACCEPTED
    done = effective(p, NOW + 2 * DAY)
    assert done.state is State.FULFILLED and done.ended_at() == NOW + 2 * DAY


def test_active_only_from_acceptance_until_its_end() -> None:
    p = decide(perm(), Event.ACCEPT, NOW + DAY, "customer")
    p = decide(p, Event.REVOKE, NOW + 2 * DAY, "customer")
    assert not p.active_at(NOW + DAY - 1)
    assert p.active_at(NOW + DAY) and p.active_at(NOW + 2 * DAY - 1)
    assert not p.active_at(NOW + 2 * DAY)


GRANTS = [
    # read at (days from NOW), scope, asked range (days from NOW), expected grant range or None
    (2, Scope.CONSUMPTION_PROFILE, (-10, -5), (-10, -5)),
    (2, Scope.CONSUMPTION_PROFILE, (-40, 5), (-30, 0)),   # clipped to the permitted period
    (2, Scope.LIVE_MEASUREMENTS, (-10, -5), None),        # another scope
    (0.5, Scope.CONSUMPTION_PROFILE, (-10, -5), None),    # before the customer accepted
    (2, Scope.CONSUMPTION_PROFILE, (1, 3), None),         # outside the permitted period
    (12, Scope.CONSUMPTION_PROFILE, (-10, -5), None),     # after the validity
]


@pytest.mark.parametrize(("read", "scope", "asked", "expected"), GRANTS)
def test_grants(read: float, scope: Scope, asked: tuple[float, float], expected: tuple[float, float] | None) -> None:
    p = decide(perm(), Event.ACCEPT, NOW + DAY, "customer")
    g = grant([p], "p1", "c1", scope, NOW + read * DAY, NOW + asked[0] * DAY, NOW + asked[1] * DAY)
    if expected is None:
        assert g is None
    else:
        assert g is not None and g.permission_id == "perm-1"
        assert (g.start, g.end) == (NOW + expected[0] * DAY, NOW + expected[1] * DAY)


def test_a_grant_is_for_its_party_and_client_only() -> None:
    p = decide(perm(), Event.ACCEPT, NOW + 1, "customer")
    assert grant([p], "p2", "c1", Scope.CONSUMPTION_PROFILE, NOW + 2, NOW - DAY, NOW) is None
    assert grant([p], "p1", "c2", Scope.CONSUMPTION_PROFILE, NOW + 2, NOW - DAY, NOW) is None
    g = grant([p], "p1", "c1", Scope.CONSUMPTION_PROFILE, NOW + 2, NOW - DAY, NOW)
    assert g is not None
    assert allowed_interval(g, NOW - DAY, NOW) and not allowed_interval(g, NOW - 900, NOW + 900)
    assert covers(g, NOW - DAY) and not covers(g, NOW)
    assert resolution(g, 60) == 900 and resolution(g, 3600) == 3600


@pytest.mark.parametrize(("args", "problem"), [
    (("", [Scope.BILLING_DATA], 900, NOW - DAY, NOW, NOW + DAY), "purpose"),
    (("x", [], 900, NOW - DAY, NOW, NOW + DAY), "scopes"),
    (("x", [Scope.BILLING_DATA], 0, NOW - DAY, NOW, NOW + DAY), "resolution_s"),
    (("x", [Scope.BILLING_DATA], 900, NOW, NOW - DAY, NOW + DAY), "data_to"),
    (("x", [Scope.BILLING_DATA], 900, NOW - DAY, NOW, NOW - 1), "valid_until"),
])
def test_bad_requests_say_what_is_wrong(args: tuple, problem: str) -> None:  # type: ignore[type-arg]
    problems = validate_request(*args, now=NOW)
    assert len(problems) == 1 and problems[0].startswith(problem)
