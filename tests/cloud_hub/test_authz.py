"""Neutral access control, as a table: who may do what, evaluated at the time the data or action refers to."""

from __future__ import annotations

import pytest

from cloud_hub.authz import Action, Context, Principal, decide, visible_suppliers

DSO, ADMIN, R1, R2 = Principal("dso"), Principal("admin"), Principal("retailer", "r1"), Principal("retailer", "r2")

CASES = [
    # who, action, context, allowed
    (DSO, Action.MANAGE_RETAILER, None, True),
    (ADMIN, Action.MANAGE_RETAILER, None, True),
    (R1, Action.MANAGE_RETAILER, None, False),
    (DSO, Action.MANAGE_CLIENT, None, True),
    (ADMIN, Action.MANAGE_CLIENT, None, False),
    (R1, Action.MANAGE_CLIENT, None, False),
    (DSO, Action.TRIGGER_EMERGENCY, None, True),
    (ADMIN, Action.TRIGGER_EMERGENCY, None, False),
    (R1, Action.TRIGGER_EMERGENCY, None, False),
    (DSO, Action.READ_CLIENT, Context(supplier_at_time="r1"), True),
    (R1, Action.READ_CLIENT, Context(supplier_at_time="r1"), True),
    (R2, Action.READ_CLIENT, Context(supplier_at_time="r1"), False),
    (R1, Action.READ_CLIENT, Context(supplier_at_time=None), False),
    (ADMIN, Action.READ_CLIENT, Context(supplier_at_time="r1"), False),
    (DSO, Action.READ_REQUEST, Context(issuer="dso"), True),
    (R1, Action.READ_REQUEST, Context(issuer="dso"), False),
    (R1, Action.READ_REQUEST, Context(issuer="retailer:r1"), True),
    (R2, Action.READ_REQUEST, Context(issuer="retailer:r1"), False),
    (R1, Action.REPORT_OUTCOME, Context(addressed_retailers=("r1",)), True),
    (R2, Action.REPORT_OUTCOME, Context(addressed_retailers=("r1",)), False),
    (R2, Action.REPORT_OUTCOME, Context(addressed_retailers=("r1", "r2")), True),
    (R1, Action.REPORT_OUTCOME, Context(), False),
    (DSO, Action.REPORT_OUTCOME, Context(addressed_retailers=("r1",)), False),
    (DSO, Action.READ_CONSUMPTION, Context(), True),
    (R1, Action.READ_CONSUMPTION, Context(covered_by_supplier="r1"), True),
    (R2, Action.READ_CONSUMPTION, Context(covered_by_supplier="r1"), False),
    (R1, Action.READ_CONSUMPTION, Context(covered_by_supplier=None), False),
    (R1, Action.SEND_MEASUREMENT, Context(supplier_at_time="r1"), True),
    (R2, Action.SEND_MEASUREMENT, Context(supplier_at_time="r1"), False),
    (DSO, Action.SEND_MEASUREMENT, Context(supplier_at_time="r1"), False),
    (DSO, Action.CANCEL_REQUEST, Context(issuer="dso"), True),
    (R1, Action.CANCEL_REQUEST, Context(issuer="dso"), False),
    (R1, Action.UPLOAD_READINGS, None, False),
    (DSO, Action.UPLOAD_READINGS, None, True),
    (R1, Action.READ_AUDIT, None, False),
    (R1, Action.READ_MEASUREMENTS, None, False),
    (R1, Action.PUBLISH_TARIFF, None, False),
    (DSO, Action.TRIGGER_LOAD_REDUCTION, None, True),
    (ADMIN, Action.TRIGGER_LOAD_SHIFT, None, False),
]


# Neutral refusals: towards a retailer, a client it does not supply (at the time concerned) is answered as an
# unknown one (``conceal``), so that it cannot tell another retailer's client from no client; the DSO never needs it.
CONCEAL_CASES = [
    # who, action, context, conceal
    (R2, Action.READ_CLIENT, Context(supplier_at_time="r1"), True),  # another retailer's client
    (R2, Action.READ_CLIENT, Context(supplier_at_time=None), True),  # an unknown client, or nobody supplies it now
    (R1, Action.READ_CLIENT, Context(supplier_at_time="r1"), False),  # allowed
    (DSO, Action.READ_CLIENT, Context(), False),
    (ADMIN, Action.READ_CLIENT, Context(supplier_at_time="r1"), False),  # not a market party: a plain 403
    (R2, Action.READ_CONSUMPTION, Context(covered_by_supplier="r1", suppliers_in_range=("r1",)), True),
    (R2, Action.READ_CONSUMPTION, Context(), True),  # unknown client, or nobody supplied it in the range
    (R1, Action.READ_CONSUMPTION, Context(covered_by_supplier=None, suppliers_in_range=("r1", "r2")), False),
    (R1, Action.READ_CONSUMPTION, Context(covered_by_supplier="r1", suppliers_in_range=("r1",)), False),
    (DSO, Action.READ_CONSUMPTION, Context(), False),
]


@pytest.mark.parametrize(("who", "action", "ctx", "conceal"), CONCEAL_CASES)
def test_refusals_that_must_look_like_an_unknown_client(who: Principal, action: Action, ctx: Context,
                                                         conceal: bool) -> None:
    verdict = decide(who, action, ctx)
    assert verdict.conceal is conceal
    if conceal:
        assert not verdict.allowed


def test_refusals_about_a_client_say_the_same_whether_it_exists_or_not() -> None:
    """The MQTT answers are built from the reason: another retailer's client and an unknown one read the same."""
    for action, theirs in ((Action.REPORT_OUTCOME, Context(addressed_retailers=("r1",))),
                           (Action.SEND_MEASUREMENT, Context(supplier_at_time="r1")),
                           (Action.READ_CLIENT, Context(supplier_at_time="r1")),
                           (Action.READ_CONSUMPTION, Context(covered_by_supplier="r1", suppliers_in_range=("r1",)))):
        assert decide(R2, action, theirs) == decide(R2, action, Context()), action


PERIODS = [{"retailer_id": "r2", "valid_from": 1.0}, {"retailer_id": "r1", "valid_from": 2.0},
           {"retailer_id": "r2", "valid_from": 3.0}, {"retailer_id": "r1", "valid_from": 4.0}]


@pytest.mark.parametrize(("who", "seen"), [(DSO, [1.0, 2.0, 3.0, 4.0]), (R1, [2.0, 4.0]), (R2, [1.0, 3.0])])
def test_a_retailer_sees_only_its_own_supplier_periods(who: Principal, seen: list[float]) -> None:
    assert [p["valid_from"] for p in visible_suppliers(who, PERIODS)] == seen


@pytest.mark.parametrize(("who", "action", "ctx", "allowed"), CASES)
def test_decision_table(who: Principal, action: Action, ctx: Context | None, allowed: bool) -> None:
    verdict = decide(who, action, ctx)
    assert verdict.allowed is allowed
    if allowed:
        assert verdict.right != "none"
    else:
        assert verdict.reason, "a refusal must say why"


def test_every_action_is_decided() -> None:
    for action in Action:
        for who in (DSO, ADMIN, R1):
            verdict = decide(who, action, Context())
            assert verdict.allowed or verdict.reason


@pytest.mark.parametrize(("text", "expected"), [("dso", DSO), ("admin", ADMIN), ("retailer:r1", R1)])
def test_principals_parse_and_print(text: str, expected: Principal) -> None:
    assert Principal.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["", "root", "retailer", "retailer:"])
def test_unknown_principals_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="unknown principal"):
        Principal.parse(text)
