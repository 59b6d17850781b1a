"""Which terminal state may give way to a later outcome, as tables of cases over the pure lifecycle (no storage, no
clock): ``unreachable`` is an inference (nothing acknowledged in time), a home's own outcome is a fact, so the fact
replaces it, for the same revision only; every other terminal state is final (docs/decisions.md, "A late outcome
supersedes unreachable")."""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from typing import Any

import pytest

from cloud_hub.lifecycle import RequestState, RowState, apply, may_supersede, restated
from mhp_wire.messages import ClientState as C
from tests.cloud_hub.test_lifecycle_table import CREATED, NOW, entry, out

R = RequestState

FACTS = {C.ACKNOWLEDGED, C.EXECUTED, C.LIMIT_NOT_MET, C.REFUSED}
"""What a gateway reports of itself (hems_firmware: a load shift's acknowledgement, executed, limit not met,
refused)."""


@pytest.mark.parametrize(("old", "new"), list(itertools.product(C, C)), ids=str)
def test_only_unreachable_gives_way_and_only_to_a_homes_own_outcome(old: C, new: C) -> None:
    assert may_supersede(old, new) is (old is C.UNREACHABLE and new in FACTS)


def ended(clients: dict[str, dict[str, Any]], state: R, **kw: Any) -> RowState:
    counts = Counter(C(e["state"]) for e in clients.values())
    return RowState(state=state, counts=counts, created_at=CREATED, kind=kw.pop("kind", "emergency"),
                    clients=clients, **kw)


UNREACHABLE = {"reason": "no acknowledgement from the gateway in time", "gateway_id": "gw-1"}


@pytest.mark.parametrize(("others", "before", "late", "after"), [
    # (the other clients' states, the request's state, the late outcome, the request's state after)
    ([], R.FAILED, C.EXECUTED, R.COMPLETED),
    ([], R.FAILED, C.REFUSED, R.FAILED),
    ([], R.FAILED, C.LIMIT_NOT_MET, R.FAILED),
    ([], R.FAILED, C.ACKNOWLEDGED, R.COMPLETED),  # a load shift the home acknowledged late
    ([C.EXECUTED], R.PARTIALLY_COMPLETED, C.EXECUTED, R.COMPLETED),
    ([C.EXECUTED], R.PARTIALLY_COMPLETED, C.LIMIT_NOT_MET, R.PARTIALLY_COMPLETED),
    ([C.EXPIRED], R.EXPIRED, C.EXECUTED, R.PARTIALLY_COMPLETED),
    ([C.UNREACHABLE], R.FAILED, C.EXECUTED, R.PARTIALLY_COMPLETED),
    ([C.CANCELLED], R.CANCELLED, C.EXECUTED, R.CANCELLED),  # a cancelled request stays cancelled
])
def test_a_late_outcome_replaces_unreachable_and_the_ended_request_is_derived_again(
        others: list[C], before: R, late: C, after: R) -> None:
    clients = {"a": entry(C.UNREACHABLE, detail=UNREACHABLE, updated_at=NOW - 5, revision=1),
               **{f"o{i}": entry(s, revision=1) for i, s in enumerate(others)}}
    row = ended(copy.deepcopy(clients), before)
    changes, [v] = apply(row, [out("a", late, shed=["heater"])], NOW)
    assert row.clients == clients  # pure
    assert v.changed and v.superseded and not v.stale and v.request_state is after
    a = changes.clients["a"]
    assert a["state"] == late.value and a["retailers"] == {"r1": late.value} and a["updated_at"] == NOW
    assert a["detail"] == {"shed": ["heater"]} and "total_ms" in a["trace"]
    assert a["superseded"] == [{"state": "unreachable", "detail": UNREACHABLE, "updated_at": NOW - 5,
                                "revision": 1, "by": late.value, "at": NOW}]
    assert changes.counts == Counter([late, *others])
    assert changes.state is after
    assert changes.ended_at is None and changes.finished is None  # it ended once; this corrects what it says


@pytest.mark.parametrize(("stored", "late"), [
    (C.EXECUTED, C.REFUSED), (C.REFUSED, C.EXECUTED), (C.LIMIT_NOT_MET, C.EXECUTED), (C.EXPIRED, C.EXECUTED),
    (C.CANCELLED, C.EXECUTED), (C.UNAVAILABLE, C.EXECUTED), (C.ACKNOWLEDGED, C.REFUSED),
    (C.UNREACHABLE, C.UNREACHABLE), (C.UNREACHABLE, C.EXPIRED), (C.UNREACHABLE, C.CANCELLED),
    (C.UNREACHABLE, C.DELIVERED), (C.UNREACHABLE, C.AVAILABLE),
])
def test_every_other_terminal_state_is_final(stored: C, late: C) -> None:
    row = ended({"a": entry(stored, revision=1)}, R.FAILED)
    changes, [v] = apply(row, [out("a", late)], NOW)
    assert changes.empty and not v.changed and v.request_state is R.FAILED


@pytest.mark.parametrize(("reported", "stale"), [(1, True), (3, False)], ids=["older", "newer"])
def test_only_an_outcome_of_the_clients_revision_replaces_unreachable(reported: int, stale: bool) -> None:
    """An answer to revision 1 after revision 2 was sent says nothing of revision 2; one of a revision the hub
    never sent says nothing at all."""
    row = ended({"a": entry(C.UNREACHABLE, revision=2)}, R.FAILED)
    changes, [v] = apply(row, [out("a", C.EXECUTED, revision=reported)], NOW)
    assert changes.empty and not v.changed and v.stale is stale


def test_a_re_sent_late_outcome_changes_nothing_more() -> None:
    row = ended({"a": entry(C.UNREACHABLE, revision=1)}, R.FAILED)
    changes, [first, again] = apply(row, [out("a", C.EXECUTED), out("a", C.EXECUTED)], NOW)
    assert first.changed and not again.changed
    assert len(changes.clients["a"]["superseded"]) == 1 and changes.state is R.COMPLETED


def test_unreachable_from_the_hubs_deadline_also_gives_way() -> None:
    """The hub's own deadline makes a never-delivered client ``unreachable`` (its retailer's entry still says
    ``sent``): the home's outcome replaces that inference too."""
    row = ended({"a": entry(C.UNREACHABLE, {"r1": C.SENT}, revision=1)}, R.FAILED)
    changes, [v] = apply(row, [out("a", C.EXECUTED)], NOW)
    assert v.changed and changes.clients["a"]["retailers"] == {"r1": "executed"} and changes.state is R.COMPLETED


@pytest.mark.parametrize("one_batch", [True, False], ids=["one-batch", "two-batches"])
def test_a_client_of_two_retailers_gives_way_once_both_homes_outcomes_are_in(one_batch: bool) -> None:
    """Delivered through two retailers (billing across a supplier switch), both declared ``unreachable``: the first
    late fact is kept (the client still combines to ``unreachable``), the second one completes it. Before, the first
    was dropped, so the second combined with the stored ``unreachable`` and was dropped as well."""
    both = {"r1": C.UNREACHABLE, "r2": C.UNREACHABLE}
    row = ended({"a": entry(C.UNREACHABLE, both, revision=1)}, R.FAILED)
    if one_batch:
        changes, [first, second] = apply(row, [out("a", C.EXECUTED, "r1"), out("a", C.EXECUTED, "r2")], NOW)
    else:
        kept, [first] = apply(row, [out("a", C.EXECUTED, "r1")], NOW)
        assert kept.clients["a"]["state"] == "unreachable"
        assert kept.clients["a"]["retailers"] == {"r1": "executed", "r2": "unreachable"}
        changes, [second] = apply(ended({"a": kept.clients["a"]}, R.FAILED), [out("a", C.EXECUTED, "r2")], NOW)
    assert not first.changed and second.changed and second.superseded
    assert changes.clients["a"]["state"] == "executed"
    assert changes.clients["a"]["retailers"] == {"r1": "executed", "r2": "executed"}
    assert changes.state is R.COMPLETED


def test_a_retailer_not_addressed_cannot_replace_unreachable() -> None:
    row = ended({"a": entry(C.UNREACHABLE, revision=1)}, R.FAILED)
    changes, [v] = apply(row, [out("a", C.EXECUTED, retailer="r2")], NOW)
    assert changes.empty and not v.changed and v.addressed == ["r1"]


@pytest.mark.parametrize(("executed", "covered", "after"), [
    (2, True, R.COMPLETED), (2, False, R.PARTIALLY_COMPLETED), (1, True, R.PARTIALLY_COMPLETED),
])
def test_a_load_reductions_state_is_derived_again_by_its_own_rule(executed: int, covered: bool, after: R) -> None:
    """A load reduction completes only when every chosen home executed and the reduction was covered."""
    clients = {"a": entry(C.UNREACHABLE, revision=1),
               "b": entry(C.EXECUTED if executed == 2 else C.REFUSED, revision=1)}
    row = ended(clients, R.PARTIALLY_COMPLETED if executed == 2 else R.FAILED, kind="load_reduction",
                selection={"chosen": ["a", "b"], "covered": covered})
    changes, _ = apply(row, [out("a", C.EXECUTED)], NOW)
    assert changes.state is after


@pytest.mark.parametrize(("current", "counts", "kind", "after"), [
    (R.FAILED, {C.EXECUTED: 1}, "emergency", R.COMPLETED),
    (R.CANCELLED, {C.EXECUTED: 1}, "emergency", R.CANCELLED),
    (R.DISPATCHING, {C.EXECUTED: 1, C.SENT: 1}, "emergency", R.DISPATCHING),  # still open: as usual
    (R.FAILED, {C.EXECUTED: 1}, "load_reduction", R.PARTIALLY_COMPLETED),  # chosen but not covered
])
def test_restated(current: R, counts: dict[C, int], kind: str, after: R) -> None:
    assert restated(current, Counter(counts), kind, {"chosen": ["a"], "covered": False}) is after
