"""The lifecycle's per-target fast paths (issue 14, sixth round): a target with one retailer takes that retailer's
state without building a list for :func:`combine`, and :func:`move` compares stored values rather than enum members.
Checked here against the rules they shortcut (``combine`` and ``may_move``), for one and for two retailers and every
pair of states, through :func:`sent`, :func:`acknowledged` and :func:`apply`."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import pytest

from cloud_hub.lifecycle import (
    ReportedOutcome,
    RequestState,
    RowState,
    acknowledged,
    apply,
    combine,
    may_move,
    move,
    sent,
)
from mhp_wire.messages import ClientState as C

NOW = 1_000.0


def _row(entries: dict[str, dict[str, Any]], state: RequestState = RequestState.DISPATCHING) -> RowState:
    return RowState(state=state, counts=Counter(C(e["state"]) for e in entries.values()), created_at=NOW - 1,
                    kind="emergency", clients=entries)


def _expected(stored: C, retailers: dict[str, str]) -> C:
    """What the target becomes by the rules themselves: the retailers' states combined, moved only forward."""
    new = combine([C(s) for s in retailers.values()])
    return new if new is not stored and may_move(stored, new) else stored


OPEN = [C.PENDING, C.SENT, C.DELIVERED]


@pytest.mark.parametrize(("r1", "r2"), [(a, None) for a in C] + list(itertools.product(C, C)),
                         ids=lambda v: str(v))
def test_sent_one_and_two_retailers(r1: C, r2: C | None) -> None:
    retailers = {"r1": r1.value} if r2 is None else {"r1": r1.value, "r2": r2.value}
    stored = combine([C(s) for s in retailers.values()])
    r = _row({"a": {"state": stored.value, "retailers": dict(retailers)}})
    changes = sent(r, [(["a"], "r1", 1, NOW)], NOW)
    assert r.clients["a"]["retailers"] == retailers  # pure
    if r1 is not C.PENDING:  # this retailer's delivery moved on (answered, or past sent): nothing is written for it
        assert "a" not in changes.clients and changes.counts is None and changes.state is None
        return
    after = {**retailers, "r1": C.SENT.value}
    want = _expected(stored, after)
    got = changes.clients["a"]
    assert got["state"] == want.value and got["retailers"] == after
    assert ("updated_at" in got) is (want is not stored)
    if want is stored:  # only the retailer's own state changed: the request's counts stay as they are
        assert changes.counts is None
    else:
        assert changes.counts is not None and changes.counts[want] == 1 and sum(changes.counts.values()) == 1


@pytest.mark.parametrize(("stored", "r2"), [(a, None) for a in OPEN] + list(itertools.product(OPEN, C)),
                         ids=lambda v: str(v))
def test_acknowledged_one_and_two_retailers(stored: C, r2: C | None) -> None:
    retailers = {"r1": stored.value} if r2 is None else {"r1": stored.value, "r2": r2.value}
    combined = combine([C(s) for s in retailers.values()])
    r = _row({"a": {"state": combined.value, "retailers": dict(retailers)}})
    changes = acknowledged(r, [(["a"], "r1", 1)], [], NOW)
    after = {**retailers, "r1": C.ACKNOWLEDGED.value}
    assert changes.clients["a"]["state"] == _expected(combined, after).value


@pytest.mark.parametrize(("stored", "reported", "r2"),
                         [(a, b, None) for a, b in itertools.product(OPEN, C)]
                         + [(a, b, c) for a, b, c in itertools.product(OPEN, C, OPEN)],
                         ids=lambda v: str(v))
def test_apply_one_and_two_retailers(stored: C, reported: C, r2: C | None) -> None:
    retailers = {"r1": stored.value} if r2 is None else {"r1": stored.value, "r2": r2.value}
    combined = combine([C(s) for s in retailers.values()])
    r = _row({"a": {"state": combined.value, "retailers": dict(retailers)}})
    changes, [verdict] = apply(r, [ReportedOutcome("r1", "req", "a", reported, {}, {}, 1)], NOW)
    want = _expected(combined, {**retailers, "r1": reported.value})
    assert verdict.changed is (want is not combined)
    if verdict.changed:
        assert changes.clients["a"]["state"] == want.value
        assert changes.counts == Counter({want: 1})
    assert r.clients["a"] == {"state": combined.value, "retailers": retailers}  # pure


def test_move_keeps_counts_and_refuses_what_may_move_refuses() -> None:
    for old, new in itertools.product(C, C):
        entry: dict[str, Any] = {"state": old.value}
        counts = Counter({old: 1})
        moved = move(entry, new, counts, NOW)
        assert moved is (new is not old and may_move(old, new))
        assert entry["state"] == (new if moved else old).value
        assert counts == Counter({new if moved else old: 1})  # one left, nothing negative (zero equals missing)


def test_move_of_an_unknown_stored_state_raises_as_before() -> None:
    with pytest.raises(KeyError):
        move({"state": "nonsense"}, C.SENT, Counter(), NOW)
