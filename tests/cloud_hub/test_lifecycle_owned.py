"""``lifecycle.apply(..., owned=True)`` and ``lifecycle.sent(..., owned=True)``: the book hands over entries decoded
for one write, which are then changed in place instead of copied (issue 14, thirteenth round). Whatever the
outcomes or sends, they decide exactly what the pure calls decide; and ``allowed`` is asked once per retailer and
set of addressed retailers of a call."""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from typing import Any

import pytest

from cloud_hub.lifecycle import RequestState, RowState, apply, sent
from mhp_wire.messages import ClientState as C
from tests.cloud_hub.test_lifecycle_table import NOW, entry, out, row


def _both(clients: dict[str, dict[str, Any]], outcomes: list[Any], **kw: Any) -> tuple[Any, Any]:
    """The pure call and the owned one on equal rows: ``(owned, pure)`` decisions, after checking that the pure call
    left its row as it was, that an owned entry is the row's own object and that the counts are a recount."""
    pure_row, owned_row = row(copy.deepcopy(clients), **kw), row(copy.deepcopy(clients), **kw)
    pure = apply(pure_row, outcomes, NOW)
    owned = apply(owned_row, outcomes, NOW, owned=True)
    assert pure_row.clients == clients  # the pure call still leaves its row as it was
    changes = owned[0]
    assert all(changes.clients[c] is owned_row.clients[c] for c in changes.clients if c in owned_row.clients), \
        "an owned entry is changed where it is, not copied"
    after = {**clients, **changes.clients}  # the counts are a recount of the row as the change leaves it
    if changes.counts is not None:
        assert +Counter(C(e["state"]) for e in after.values()) == +Counter(changes.counts)
    return owned, pure


@pytest.mark.parametrize(("stored", "reported", "phase"), list(itertools.product(C, C, ["dispatch", "availability"])))
def test_owned_decides_as_the_pure_call_for_every_pair_of_states(stored: C, reported: C, phase: str) -> None:
    clients = {"a": entry(stored, revision=2), "b": entry(C.SENT, revision=2)}
    owned, pure = _both(clients, [out("a", reported, revision=2), out("b", reported, revision=1),
                                  out("a", C.EXECUTED, revision=2)], phase=phase, targets=2)
    assert owned == pure


def test_owned_decides_as_the_pure_call_with_two_retailers_and_strangers() -> None:
    """A client supplied by two retailers (each one's state kept, the combination moved), a retailer the client's
    message never went to (refused), a client that is no target, and a re-sent outcome in the same batch."""
    clients = {"a": entry(C.SENT, {"r1": C.SENT, "r2": C.PENDING}), "b": entry(C.PENDING),
               "c": entry(C.UNREACHABLE)}
    owned, pure = _both(clients, [out("a", C.EXECUTED), out("a", C.DELIVERED, retailer="r2"),
                                  out("b", C.EXECUTED, retailer="r9"), out("b", C.DELIVERED), out("zz", C.EXECUTED),
                                  out("b", C.EXECUTED), out("b", C.EXECUTED), out("c", C.EXECUTED),
                                  out("a", C.EXECUTED, retailer="r2")])
    assert owned == pure


def test_allowed_is_asked_once_per_retailer_and_addressed_set_and_refuses_each_outcome() -> None:
    asked: list[tuple[str, list[str]]] = []

    def only_r1(retailer_id: str, addressed: list[str]) -> bool:
        asked.append((retailer_id, addressed))
        return retailer_id == "r1" and retailer_id in addressed

    r: RowState = row({f"c{i}": entry(C.SENT) for i in range(50)})
    changes, verdicts = apply(r, [out(f"c{i}", C.EXECUTED, retailer="r1" if i % 2 else "r2") for i in range(50)],
                              NOW, only_r1, owned=True)
    assert sorted(asked) == [("r1", ["r1"]), ("r2", ["r1"])]
    assert [v.changed for v in verdicts] == [bool(i % 2) for i in range(50)]
    assert sorted(changes.clients) == sorted(f"c{i}" for i in range(1, 50, 2))
    assert changes.counts == {C.EXECUTED: 25, C.SENT: 25}


@pytest.mark.parametrize("stored", list(C))
def test_owned_sent_decides_as_the_pure_call(stored: C) -> None:
    """First sends of two messages (one client in both, of two retailers; one of an older revision; one at a time
    before the entry was written) mark what the pure call marks, at the same times."""
    clients = {"a": entry(stored), "b": entry(C.PENDING, {"r1": C.PENDING, "r2": C.PENDING}),
               "c": entry(C.PENDING, revision=2), "d": entry(C.PENDING, updated_at=NOW)}
    messages = [(["a", "b", "c", "d"], "r1", 1, NOW - 2), (["b", "zz"], "r2", 1, NOW - 1)]
    pure_row = row(copy.deepcopy(clients), state=RequestState.ACCEPTED)
    owned_row = row(copy.deepcopy(clients), state=RequestState.ACCEPTED)
    pure = sent(pure_row, messages, NOW - 2)
    owned = sent(owned_row, messages, NOW - 2, owned=True)
    assert owned == pure
    assert all(owned.clients[c] is owned_row.clients[c] for c in owned.clients if c in owned_row.clients), \
        "an owned entry is marked where it is, not copied"
    assert pure_row.clients == clients
    assert pure.clients["b"]["state"] == "sent" and pure.clients["b"]["updated_at"] == NOW - 1  # moved by r2's
