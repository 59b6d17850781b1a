"""Neutral access control, as a table: who may do what, evaluated at the time the data or action refers to."""

from __future__ import annotations

import pytest

from cloud_hub.authz import Action, Context, Principal, decide

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
