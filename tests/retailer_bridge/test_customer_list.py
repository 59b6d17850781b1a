"""The pure parts of customer changes: the hub's announcement of a supplier-history change (which retailers, which
periods) and the bridge's customer list (who is a customer when), as tables of cases; and the wire model."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cloud_hub.timeline import customer_changes
from mhp_wire.messages import CustomerChange, Customers, SupplyPeriod, WireError, decode, encode
from retailer_bridge.customers import CustomerList

T0 = datetime.now(UTC).replace(microsecond=0)
H = 3600.0
t = T0.timestamp()


def history(*periods: tuple[float, str]) -> list[dict[str, Any]]:
    return [{"valid_from": f, "retailer_id": r} for f, r in periods]


@pytest.mark.parametrize(("before", "after", "expected"), [
    # a new client: its retailer gains it
    ([], [(t, "r1")], {"r1": [(t, None)]}),
    # a switch: r1 loses it at t+H, r2 gains it then
    ([(t, "r1")], [(t, "r1"), (t + H, "r2")], {"r1": [(t, t + H)], "r2": [(t + H, None)]}),
    # back again: r1 has two periods, r2 one that ends
    ([(t, "r1"), (t + H, "r2")], [(t, "r1"), (t + H, "r2"), (t + 2 * H, "r1")],
     {"r1": [(t, t + H), (t + 2 * H, None)], "r2": [(t + H, t + 2 * H)]}),
    # a third retailer: the first is not concerned
    ([(t, "r1"), (t + H, "r2")], [(t, "r1"), (t + H, "r2"), (t + 2 * H, "r3")],
     {"r2": [(t + H, t + 2 * H)], "r3": [(t + 2 * H, None)]}),
    # nothing changed
    ([(t, "r1")], [(t, "r1")], {}),
])
def test_a_supplier_history_change_concerns_the_retailers_whose_periods_change(
        before: list[tuple[float, str]], after: list[tuple[float, str]],
        expected: dict[str, list[tuple[float, float | None]]]) -> None:
    assert customer_changes(history(*before), history(*after)) == expected


def change(client_id: str, revision: int, *periods: tuple[float, float | None]) -> CustomerChange:
    return CustomerChange(client_id=client_id, revision=revision, periods=[
        SupplyPeriod(valid_from=datetime.fromtimestamp(f, UTC),
                     valid_until=None if u is None else datetime.fromtimestamp(u, UTC)) for f, u in periods])


LIST = CustomerList({"static": "gw-1", "moving": "gw-2", "coming": "gw-3"})
LIST.apply([change("moving", 2, (t - H, t)), change("coming", 2, (t + H, None)),
            change("twice", 3, (t - 2 * H, t - H), (t + H, None))])


# The ids name each case by client and standing, not by its times (relative to now, they differ from one collection
# to the next, and pytest-xdist's workers must collect the same tests).
WHEN_CASES = [
    ("static", t, "customer", None, None),  # in the installation record, never announced: no limit
    ("stranger", t, "stranger", None, None),
    ("moving", t - 1, "customer", t - H, t),
    ("moving", t, "moved", t, None),  # the end of a period is the first instant of the next supplier
    ("moving", t - 2 * H, "not_yet", None, t - H),
    ("coming", t, "not_yet", None, t + H),
    ("coming", t + H, "customer", t + H, None),
    ("twice", t, "not_yet", t - H, t + H),  # left, and comes back: not ours in between
    ("twice", t + 2 * H, "customer", t + H, None),
]


@pytest.mark.parametrize(("client_id", "at", "standing", "since", "until"), WHEN_CASES,
                         ids=[f"{case[0]}-{case[2]}" for case in WHEN_CASES])
def test_who_is_a_customer_when(client_id: str, at: float, standing: str, since: float | None,
                                until: float | None) -> None:
    status = LIST.status(client_id, at)
    assert (status.standing, status.since, status.until) == (standing, since, until)


def test_an_older_or_repeated_revision_changes_nothing_and_gateways_come_from_the_installation_record() -> None:
    customers = CustomerList({"c1": "gw-1"})
    assert customers.apply([change("c1", 2, (t - H, t))]) == ["c1"]
    assert customers.apply([change("c1", 2, (t - H, t))]) == []
    assert customers.apply([change("c1", 1, (t - H, None))]) == []
    assert not customers.is_customer("c1", t + 1)
    assert customers.client_of("gw-1", "c1", t - 1) and not customers.client_of("gw-1", "c1", t + 1)
    assert customers.apply([change("c9", 1, (t - H, None))]) == ["c9"]
    assert customers.is_customer("c9", t) and customers.gateway_of("c9") is None, "a customer with no gateway yet"
    assert customers.known("c1") and customers.known("c9") and not customers.known("c5")


def test_the_customers_message_round_trips_and_refuses_disordered_periods() -> None:
    msg = Customers(items=[change("c1", 2, (t - H, t), (t + H, None))])
    assert decode(encode(msg)) == msg
    bad = msg.model_dump(mode="json")
    bad["items"][0]["periods"] = list(reversed(bad["items"][0]["periods"]))
    with pytest.raises(WireError, match="in order"):
        decode(encode_dict(bad))
    bad["items"][0]["periods"] = [{"valid_from": (T0 + timedelta(hours=1)).isoformat(), "valid_until": T0.isoformat()}]
    with pytest.raises(WireError, match="after valid_from"):
        decode(encode_dict(bad))


def encode_dict(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def test_is_customer_answers_as_status_says_at_every_edge() -> None:
    """``is_customer`` repeats ``status``'s walk over the periods without building a Status (s14-bridge2): the two
    must not drift apart. Every instant before, at and after each edge, an open end, no periods, and clients the hub
    never announced, with and without a gateway."""
    from retailer_bridge.customers import Announced

    listed = CustomerList({"two": "gw-1", "open": "gw-2", "none": "gw-3", "recorded": "gw-4"}, {
        "two": Announced(3, ((t, t + H), (t + 3 * H, t + 4 * H))),
        "open": Announced(1, ((t + H, None),)),
        "none": Announced(2, ()),
        "elsewhere": Announced(1, ((t, t + H),)),
    })
    instants = [t + k * H / 2 + d for k in range(-1, 10) for d in (-1e-6, 0.0, 1e-6)]
    for client in ("two", "open", "none", "recorded", "elsewhere", "stranger"):
        for at in instants:
            assert listed.is_customer(client, at) == (listed.status(client, at).standing == "customer"), (client, at)
