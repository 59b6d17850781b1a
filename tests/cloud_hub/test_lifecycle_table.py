"""What reported outcomes do to a request, as tables of cases: the pure ``lifecycle.apply`` (no storage, no clock)."""

from __future__ import annotations

import copy
import itertools
import math
from collections import Counter
from typing import Any

import pytest

from cloud_hub.lifecycle import (
    OutcomeVerdict,
    ReportedOutcome,
    RequestState,
    RowChanges,
    RowState,
    acknowledged,
    apply,
    cancelled,
    expired,
    may_move,
    may_supersede,
    reported_kw,
    sent,
)
from cloud_hub.store import RequestCodec
from mhp_wire.messages import ClientState as C

R = RequestState
NOW = 1_000.0
CREATED = NOW - 2.5


def entry(state: C, retailers: dict[str, C] | None = None, **extra: Any) -> dict[str, Any]:
    """A stored target entry as the hub writes it."""
    rs = retailers if retailers is not None else {"r1": state}
    return {"state": state.value, "retailers": {r: s.value for r, s in rs.items()}, **extra}


def row(clients: dict[str, dict[str, Any]], state: R = R.DISPATCHING, **kw: Any) -> RowState:
    counts = Counter(C(e["state"]) for e in clients.values())
    return RowState(state=state, counts=counts, created_at=CREATED, kind=kw.pop("kind", "emergency"),
                    clients=clients, **kw)


def out(client: str, state: C, retailer: str = "r1", revision: int = 1, **detail: Any) -> ReportedOutcome:
    return ReportedOutcome(retailer, "req", client, state, dict(detail), {"bridge_ms": 1.0}, revision)


# -- every stored client state x reported state x phase x revision ------------------------------------------------

PHASES = ["dispatch", "availability"]
REVISIONS = [("older", 1, 2), ("same", 2, 2), ("newer", 3, 2)]  # (name, outcome's revision, client's revision)


@pytest.mark.parametrize(("stored", "reported", "phase", "revision"),
                         list(itertools.product(C, C, PHASES, REVISIONS)),
                         ids=lambda v: v[0] if isinstance(v, tuple) else str(v))
def test_every_stored_and_reported_state(stored: C, reported: C, phase: str, revision: tuple[str, int, int]) -> None:
    """An older revision's answer is stale; an availability answer in that phase is recorded once, the target's
    state untouched; else a target moves only where ``may_move`` allows, a terminal one never."""
    name, sent, current = revision
    before = {"a": entry(stored, revision=current), "b": entry(C.DELIVERED, revision=current)}
    r = row(copy.deepcopy(before), phase=phase, targets=2)
    changes, [v] = apply(r, [out("a", reported, revision=sent)], NOW)
    assert r.clients == before  # pure: the row it was given is unchanged
    assert v.known and v.addressed == ["r1"] and not v.held
    if name == "older":
        assert v.stale and not v.changed and v.request_state is R.DISPATCHING
        assert changes.empty and changes == RowChanges()
        return
    assert not v.stale
    if phase == "availability" and reported in (C.AVAILABLE, C.UNAVAILABLE):
        a = changes.clients["a"]
        assert v.changed and v.request_state is R.DISPATCHING and v.refused_claim is None
        assert a["answered"] is True and a["availability"] == reported.value and a["state"] == stored.value
        assert changes.answered == 1 and changes.state is None and changes.counts is None
        assert not changes.phase_complete  # one of two targets answered
        return
    # A terminal state never moves, but for ``unreachable`` giving way to the home's own outcome of the same
    # revision (``may_supersede``; its cases in test_lifecycle_supersede.py).
    moves = (not stored.terminal and may_move(stored, reported) and reported is not stored) or (
        may_supersede(stored, reported) and name == "same")
    assert v.changed is moves
    if not moves:
        assert changes.empty and v.request_state is R.DISPATCHING
        return
    a = changes.clients["a"]
    assert a["state"] == reported.value and a["retailers"] == {"r1": reported.value} and a["updated_at"] == NOW
    assert changes.counts is not None and +changes.counts == Counter([reported, C.DELIVERED])
    assert changes.state is R.DISPATCHING and v.request_state is R.DISPATCHING  # "b" is still open
    assert ("total_ms" in a["trace"]) is reported.terminal


# -- named cases: one per rule ---------------------------------------------------------------------------------------

def test_unknown_client_is_not_known_and_changes_nothing() -> None:
    changes, [v] = apply(row({"a": entry(C.SENT)}), [out("zz", C.EXECUTED)], NOW)
    assert v == OutcomeVerdict(False, []) and changes.empty


def test_a_retailer_not_allowed_changes_nothing() -> None:
    changes, [v] = apply(row({"a": entry(C.SENT)}), [out("a", C.EXECUTED, retailer="r2")], NOW)
    assert v == OutcomeVerdict(True, ["r1"]) and changes.empty


def test_the_allowed_decision_is_the_callers() -> None:
    seen: list[tuple[str, list[str]]] = []

    def refuse(retailer: str, addressed: list[str]) -> bool:
        seen.append((retailer, addressed))
        return False

    changes, [v] = apply(row({"a": entry(C.SENT)}), [out("a", C.EXECUTED)], NOW, refuse)
    assert seen == [("r1", ["r1"])] and v == OutcomeVerdict(True, ["r1"]) and changes.empty


@pytest.mark.parametrize(("detail", "max_kw", "kw", "availability", "refused"), [
    ({"available_kw": 3.0}, 5.0, 3.0, "available", None),
    ({"available_kw": 5.0}, 5.0, 5.0, "available", None),  # the bound itself is believed
    ({"available_kw": 9.0}, 5.0, 0.0, "unavailable", (9.0, 5.0)),  # the bounded claim
    ({"available_kw": 9.0}, None, 9.0, "available", None),  # no contracted power known: no bound
    ({"available_kw": "lots"}, 5.0, 0.0, "available", None),
    ({"available_kw": -2}, 5.0, 0.0, "available", None),
    ({"available_kw": math.inf}, 5.0, 0.0, "available", None),
    ({}, 5.0, 0.0, "available", None),
])
def test_availability_claim_is_bounded_by_contracted_power(detail: dict[str, Any], max_kw: float | None, kw: float,
                                                          availability: str, refused: tuple[float, float] | None
                                                          ) -> None:
    extra = {} if max_kw is None else {"max_kw": max_kw}
    r = row({"a": entry(C.SENT, **extra)}, phase="availability", targets=1)
    changes, [v] = apply(r, [out("a", C.AVAILABLE, **detail)], NOW)
    a = changes.clients["a"]
    assert v.refused_claim == refused and v.changed
    assert a["available_kw"] == kw and a["availability"] == availability and a["state"] == "sent"
    if refused:
        assert a["detail"]["claimed_kw"] == refused[0] and "not believed" in a["detail"]["reason"]
    else:
        assert a["detail"] == detail
    assert changes.phase_complete  # its only target answered


def test_unavailable_answer_records_zero_whatever_it_claims() -> None:
    r = row({"a": entry(C.SENT, max_kw=5.0)}, phase="availability", targets=1)
    changes, [v] = apply(r, [out("a", C.UNAVAILABLE, available_kw=3.0)], NOW)
    assert changes.clients["a"]["available_kw"] == 0.0 and changes.clients["a"]["availability"] == "unavailable"
    assert v.refused_claim is None


def test_an_availability_answer_counts_once() -> None:
    r = row({"a": entry(C.SENT, answered=True, available_kw=2.0)}, phase="availability", answered=1, targets=2)
    changes, [v] = apply(r, [out("a", C.AVAILABLE, available_kw=4.0)], NOW)
    assert v == OutcomeVerdict(True, ["r1"]) and changes.empty


def test_a_duplicate_in_one_batch_counts_once() -> None:
    r = row({"a": entry(C.SENT), "b": entry(C.SENT)}, phase="availability", targets=2)
    changes, vs = apply(r, [out("a", C.AVAILABLE, available_kw=1.0), out("a", C.AVAILABLE, available_kw=2.0),
                            out("b", C.UNAVAILABLE)], NOW)
    assert [v.changed for v in vs] == [True, False, True]
    assert changes.answered == 2 and changes.phase_complete and changes.clients["a"]["available_kw"] == 1.0


def test_terminal_duplicate_stays() -> None:
    changes, [v] = apply(row({"a": entry(C.EXECUTED), "b": entry(C.SENT)}), [out("a", C.REFUSED)], NOW)
    assert v == OutcomeVerdict(True, ["r1"], request_state=R.DISPATCHING) and changes.empty


def test_last_target_ends_the_request() -> None:
    r = row({"a": entry(C.EXECUTED), "b": entry(C.DELIVERED)})
    changes, [v] = apply(r, [out("b", C.EXECUTED)], NOW)
    assert v.changed and v.request_state is R.COMPLETED
    assert changes.state is R.COMPLETED and changes.ended_at == NOW
    assert changes.finished == ("emergency", R.COMPLETED, NOW - CREATED)
    assert changes.clients["b"]["trace"] == {"bridge_ms": 1.0, "total_ms": 2500.0}
    assert changes.counts == Counter({C.EXECUTED: 2, C.DELIVERED: 0})


def test_the_request_state_of_every_changed_verdict_is_the_final_one() -> None:
    r = row({"a": entry(C.SENT), "b": entry(C.SENT)})
    _, vs = apply(r, [out("a", C.EXECUTED), out("b", C.REFUSED)], NOW)
    assert [v.request_state for v in vs] == [R.PARTIALLY_COMPLETED, R.PARTIALLY_COMPLETED]


def test_an_ended_request_gets_no_new_end() -> None:
    r = row({"a": entry(C.SENT)}, state=R.CANCELLED)
    changes, [v] = apply(r, [out("a", C.EXECUTED)], NOW)
    assert v.changed and changes.state is R.CANCELLED and changes.ended_at is None and changes.finished is None


def test_several_retailers_combine() -> None:
    r = row({"a": entry(C.SENT, {"r1": C.SENT, "r2": C.SENT})})
    changes, [v] = apply(r, [out("a", C.EXECUTED)], NOW)
    assert not v.changed and changes.empty  # r2 still open: the client stays sent
    changes, [v1, v2] = apply(r, [out("a", C.EXECUTED), out("a", C.ACKNOWLEDGED, retailer="r2")], NOW)
    assert not v1.changed and v2.changed  # the first one's state is kept for the second
    assert changes.clients["a"]["retailers"] == {"r1": "executed", "r2": "acknowledged"}
    assert changes.clients["a"]["state"] == "executed" and changes.state is R.COMPLETED


@pytest.mark.parametrize(("selection", "states", "expected"), [
    ({"chosen": ["a", "b"], "covered": True}, [C.EXECUTED, C.EXECUTED], R.COMPLETED),
    ({"chosen": ["a", "b"], "covered": False}, [C.EXECUTED, C.EXECUTED], R.PARTIALLY_COMPLETED),
    ({"chosen": ["a", "b"], "covered": True}, [C.EXECUTED, C.REFUSED], R.PARTIALLY_COMPLETED),
    ({"chosen": ["a", "b"], "covered": True}, [C.REFUSED, C.LIMIT_NOT_MET], R.FAILED),
    ({"chosen": ["a"], "covered": True}, [C.EXECUTED, C.UNAVAILABLE], R.COMPLETED),  # b was not needed
    ({}, [C.EXECUTED, C.EXECUTED], R.PARTIALLY_COMPLETED),  # no selection stored
])
def test_load_reduction_outcome(selection: dict[str, Any], states: list[C], expected: R) -> None:
    r = row({"a": entry(C.SENT), "b": entry(C.SENT)}, kind="load_reduction", phase="dispatch", selection=selection)
    changes, vs = apply(r, [out("a", states[0]), out("b", states[1])], NOW)
    assert changes.state is expected and all(v.request_state is expected for v in vs)
    assert changes.finished == ("load_reduction", expected, NOW - CREATED)


def test_an_open_load_reduction_is_not_judged_yet() -> None:
    r = row({"a": entry(C.SENT), "b": entry(C.SENT)}, kind="load_reduction", phase="dispatch", selection={})
    changes, _ = apply(r, [out("a", C.EXECUTED)], NOW)
    assert changes.state is R.DISPATCHING and changes.finished is None


# -- first sends, acknowledgements, deadlines -------------------------------------------------------------------------

@pytest.mark.parametrize(("stored", "message_revision", "after"), [
    (C.PENDING, 1, C.SENT),
    (C.PENDING, 2, C.SENT),
    (C.SENT, 1, None),  # sent again: unchanged, not written
    (C.DELIVERED, 1, None),  # past sent: never back, not written
    (C.EXECUTED, 1, None),  # answered before the mark settled: left alone, not written
])
def test_sent(stored: C, message_revision: int, after: C | None) -> None:
    r = row({"a": entry(stored), "b": entry(C.PENDING)}, state=R.ACCEPTED)
    changes = sent(r, [(["a"], "r1", message_revision, NOW - 1)], NOW - 2)
    assert "b" not in changes.clients and changes.first_dispatch_at == NOW - 2
    if after is None:
        assert "a" not in changes.clients and changes.state is None and changes.counts is None
    else:
        assert changes.clients["a"]["state"] == after.value and changes.clients["a"]["updated_at"] == NOW - 1
        assert changes.state is R.DISPATCHING
    assert r.clients["a"]["state"] == stored.value  # pure


def test_sent_older_revision_leaves_the_target_and_a_party_is_a_target() -> None:
    r = row({"a": entry(C.PENDING, revision=2)}, state=R.ACCEPTED)
    changes = sent(r, [(["a"], "r1", 1, NOW)], NOW)
    assert changes.clients == {} and changes.state is None and changes.counts is None
    r = RowState(R.ACCEPTED, Counter({C.PENDING: 1}), CREATED, "tariff", parties={"r1": entry(C.PENDING)},
                  first_dispatch_at=CREATED)
    changes = sent(r, [([], "r1", 1, NOW)], NOW)
    assert changes.parties["r1"]["state"] == "sent" and changes.first_dispatch_at is None
    assert sent(row({"a": entry(C.PENDING)}, state=R.CANCELLED, first_dispatch_at=CREATED),
                [(["a"], "r1", 1, NOW)], NOW).empty


def test_sent_after_the_request_ended_writes_only_its_missing_first_dispatch_time() -> None:
    """A request that ended before its first send's mark settled (every home answered within the settle time)
    keeps its targets as they are, but gets its first dispatch time (its trace's ``dispatch_ms``)."""
    r = row({"a": entry(C.EXECUTED)}, state=R.COMPLETED)
    changes = sent(r, [(["a"], "r1", 1, NOW)], NOW)
    assert changes.first_dispatch_at == NOW and not changes.clients and changes.state is None


def test_sent_two_messages_of_one_client_keep_their_own_times() -> None:
    """A client of two retailers (billing across a supplier switch) sent by each at its own time: each message's
    retailer becomes ``sent``, the target once, at the time of the send that moved it."""
    r = row({"a": entry(C.PENDING, {"r1": C.PENDING, "r2": C.PENDING})}, state=R.ACCEPTED)
    changes = sent(r, [(["a"], "r1", 1, NOW - 3), (["a"], "r2", 1, NOW - 2)], NOW - 3)
    got = changes.clients["a"]
    assert got["retailers"] == {"r1": "sent", "r2": "sent"} and got["state"] == "sent"
    assert got["updated_at"] == NOW - 2  # r1's send left it pending (r2 was): r2's moved it
    assert changes.counts == Counter({C.SENT: 1}) and changes.state is R.DISPATCHING


def test_acknowledged_delivery_and_cancel() -> None:
    r = row({"a": entry(C.SENT), "b": entry(C.SENT)}, kind="billing")
    changes = acknowledged(r, [(["a"], "r1", 1)], [], NOW)
    assert changes.clients["a"]["state"] == "acknowledged" and changes.state is R.DISPATCHING
    assert changes.cancel is None and changes.ended_at is None
    changes = acknowledged(r, [(["a", "b"], "r1", 1)], [], NOW)
    assert changes.state is R.COMPLETED and changes.ended_at == NOW and changes.finished is None
    cancelled = row({"a": entry(C.CANCELLED)}, state=R.CANCELLED, cancel={"requested_at": CREATED, "retailers": {}})
    changes = acknowledged(cancelled, [], ["r1"], NOW)
    assert changes.cancel == {"requested_at": CREATED, "retailers": {"r1": NOW}}
    assert cancelled.cancel == {"requested_at": CREATED, "retailers": {}}  # pure
    assert changes.state is R.CANCELLED and changes.ended_at is None


@pytest.mark.parametrize(("states", "expected", "after"), [
    ([C.DELIVERED, C.EXECUTED], R.PARTIALLY_COMPLETED, [C.EXPIRED, C.EXECUTED]),
    ([C.SENT, C.PENDING], R.FAILED, [C.UNREACHABLE, C.UNREACHABLE]),
    ([C.DELIVERED, C.SENT], R.EXPIRED, [C.EXPIRED, C.UNREACHABLE]),
    ([C.EXECUTED, C.EXECUTED], R.COMPLETED, [C.EXECUTED, C.EXECUTED]),
])
def test_expired(states: list[C], expected: R, after: list[C]) -> None:
    r = row({"a": entry(states[0]), "b": entry(states[1])})
    changes = expired(r, NOW)
    assert changes.state is expected and changes.finished == ("emergency", expected, NOW - CREATED)
    for cid, s in zip("ab", after, strict=True):
        e = changes.clients.get(cid, r.clients[cid])
        assert e["state"] == s.value
        assert (cid in changes.clients) is (s is not C(r.clients[cid]["state"]))
        if cid in changes.clients:
            assert changes.clients[cid]["detail"]["reason"] == "no outcome before the request's deadline"


def test_an_ended_request_does_not_expire_again() -> None:
    changes = expired(row({"a": entry(C.EXECUTED)}, state=R.COMPLETED), NOW)
    assert changes.state is R.COMPLETED and changes.finished is None and not changes.clients


def test_cancelled() -> None:
    r = row({"a": entry(C.EXECUTED), "b": entry(C.PENDING, {"r1": C.PENDING, "r2": C.PENDING}), "c": entry(C.SENT)})
    changes, reached = cancelled(r, NOW)
    assert reached == {"r1": ["a", "b", "c"], "r2": ["b"]}  # even a pending one may have the message already
    assert set(changes.clients) == {"b", "c"} and changes.clients["b"]["state"] == "cancelled"
    assert changes.clients["c"]["updated_at"] == NOW and "a" not in changes.clients
    assert changes.state is R.CANCELLED and changes.ended_at == NOW
    assert changes.counts == Counter({C.EXECUTED: 1, C.CANCELLED: 2})
    assert changes.cancel == {"requested_at": NOW, "retailers": {}}
    assert r.clients["b"]["state"] == "pending"  # pure
    put = RequestCodec.changes(changes)
    assert put["r:counts"] == {"executed": 1, "cancelled": 2} and put["r:phase"] == "done"


# -- the codec: cells <-> row state, the storage format unchanged ---------------------------------------------------

def test_codec_reads_and_writes_the_cells_the_hub_always_stored() -> None:
    cells = {"r:state": "dispatching", "r:counts": {"sent": 1, "executed": 1}, "r:created_at": CREATED,
             "r:phase": "dispatch", "r:type": "emergency", "r:answered": None, "r:targets": None,
             "c:a": entry(C.SENT), "c:b": entry(C.EXECUTED), "r:owner": "hub-1"}
    assert RequestCodec.outcome_columns(["a", "b", "a"], owner=True) == [
        "c:a", "c:b", "r:state", "r:counts", "r:created_at", "r:phase", "r:type", "r:answered", "r:targets",
        "r:selection", "r:owner"]
    assert RequestCodec.owner(cells) == "hub-1"
    r = RequestCodec.row_state(cells)
    assert r is not None and r.state is R.DISPATCHING and r.counts == Counter({C.SENT: 1, C.EXECUTED: 1})
    assert set(r.clients) == {"a", "b"} and r.answered == 0 and r.selection == {}
    changes, _ = apply(r, [out("a", C.EXECUTED)], NOW)
    put = RequestCodec.changes(changes)
    assert list(put) == ["c:a", "r:counts", "r:state", "r:completed_at", "r:phase"]
    assert put["r:counts"] == {"executed": 2} and put["r:state"] == "completed"
    assert put["r:completed_at"] == NOW and put["r:phase"] == "done"
    assert RequestCodec.row_state({"c:a": entry(C.SENT)}) is None  # no such request


def test_reported_kw() -> None:
    assert [reported_kw(v) for v in (2, "1.5", None, "x", -1, math.nan, math.inf)] == [2.0, 1.5, 0, 0, 0, 0, 0]
