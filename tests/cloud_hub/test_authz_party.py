"""The authorization table's party cases (docs/consent.md): an eligible party reads a client's data only under a
customer's permission valid now, and only the client's current retailer speaks for the customer."""

from __future__ import annotations

import pytest

from cloud_hub.authz import Action, Context, Principal, decide

DSO, ADMIN = Principal("dso"), Principal("admin")
R1, R2 = Principal("retailer", "r1"), Principal("retailer", "r2")
P1, P2 = Principal("party", party_id="p1"), Principal("party", party_id="p2")

CASES = [
    # who, action, context, allowed, right (when allowed) or conceal (when refused)
    (ADMIN, Action.MANAGE_PARTY, None, True, "admin:manage-registry"),
    (DSO, Action.MANAGE_PARTY, None, True, "dso:manage-registry"),
    (R1, Action.MANAGE_PARTY, None, False, False),
    (P1, Action.MANAGE_PARTY, None, False, False),
    (P1, Action.MANAGE_RETAILER, None, False, False),
    (P1, Action.REQUEST_PERMISSION, None, True, "party:request-permission"),
    (R1, Action.REQUEST_PERMISSION, None, False, False),
    (DSO, Action.REQUEST_PERMISSION, None, False, False),
    (P1, Action.READ_PERMISSION, Context(issuer="party:p1"), True, "issuer"),
    (P2, Action.READ_PERMISSION, Context(issuer="party:p1"), False, True),
    (P1, Action.READ_PERMISSION, Context(), False, True),
    (DSO, Action.READ_PERMISSION, Context(issuer="party:p1"), True, "dso:permission-log"),
    (R1, Action.READ_PERMISSION, Context(issuer="party:p1"), False, True),
    (P1, Action.TERMINATE_PERMISSION, Context(issuer="party:p1"), True, "issuer"),
    (P2, Action.TERMINATE_PERMISSION, Context(issuer="party:p1"), False, True),
    (DSO, Action.TERMINATE_PERMISSION, Context(issuer="party:p1"), False, True),
    (R1, Action.TERMINATE_PERMISSION, Context(issuer="party:p1"), False, True),
    (R1, Action.DECIDE_PERMISSION, Context(supplier_at_time="r1"), True, "retailer:current-supplier"),
    (R2, Action.DECIDE_PERMISSION, Context(supplier_at_time="r1"), False, True),  # the former or another retailer
    (R1, Action.DECIDE_PERMISSION, Context(), False, True),  # unknown client, or supplied by nobody now
    (DSO, Action.DECIDE_PERMISSION, Context(supplier_at_time="r1"), False, False),
    (P1, Action.DECIDE_PERMISSION, Context(supplier_at_time="r1"), False, False),  # a party never decides
    (P1, Action.READ_CONSUMPTION, Context(permission_id="perm-1"), True, "party:permission:perm-1"),
    (P1, Action.READ_CONSUMPTION, Context(), False, True),
    # a party's read never rests on a supplier's rights: only on its permission
    (P1, Action.READ_CONSUMPTION, Context(covered_by_supplier="r1", suppliers_in_range=("r1",)), False, True),
    (P1, Action.READ_MEASUREMENTS, Context(permission_id="perm-1"), True, "party:permission:perm-1"),
    (P1, Action.READ_MEASUREMENTS, Context(), False, True),
    (P1, Action.READ_BILLING_DATA, Context(permission_id="perm-1"), True, "party:permission:perm-1"),
    (P1, Action.READ_BILLING_DATA, Context(), False, True),
    (P1, Action.READ_BILLING_DATA, Context(covered_by_supplier="r1", suppliers_in_range=("r1",)), False, True),
    (DSO, Action.READ_BILLING_DATA, None, True, "dso:read_billing_data"),
    (R1, Action.READ_BILLING_DATA, Context(permission_id="perm-1", covered_by_supplier="r1"), False, False),
    (ADMIN, Action.READ_BILLING_DATA, None, False, False),
    (P1, Action.LIST_PERMISSIONS, None, True, "party:own-permissions"),
    (DSO, Action.LIST_PERMISSIONS, None, False, False),
    (ADMIN, Action.LIST_PERMISSIONS, None, False, False),
    (R1, Action.LIST_PERMISSIONS, None, False, False),
    (P1, Action.READ_CLIENT, Context(supplier_at_time="r1"), False, True),
    (P1, Action.READ_AUDIT, None, False, False),
    (P1, Action.TRIGGER_EMERGENCY, None, False, False),
    (P1, Action.UPLOAD_READINGS, None, False, False),
    (P1, Action.REQUEST_BILLING, None, False, False),
    (P1, Action.DELIVER_BILLING, Context(covered_by_supplier="r1"), False, False),
    (P1, Action.SEND_MEASUREMENT, Context(supplier_at_time="r1"), False, False),
    (P1, Action.READ_REQUEST, Context(issuer="party:p1"), False, False),
    (P1, Action.READ_EVENTS, None, False, True),
    (P1, Action.MANAGE_SUBSCRIPTION, None, False, True),
    (P1, Action.READ_TARIFF, None, True, "public:tariff"),
    # the retailers' and the DSO's own reads are unchanged by a permission in the context
    (R2, Action.READ_CONSUMPTION, Context(permission_id="perm-1"), False, True),
    (R1, Action.READ_MEASUREMENTS, Context(permission_id="perm-1"), False, False),
]


@pytest.mark.parametrize(("who", "action", "ctx", "allowed", "extra"), CASES)
def test_party_decision_table(who: Principal, action: Action, ctx: Context | None, allowed: bool,
                              extra: str | bool) -> None:
    verdict = decide(who, action, ctx)
    assert verdict.allowed is allowed
    if allowed:
        assert verdict.right == extra
    else:
        assert verdict.reason, "a refusal must say why"
        assert verdict.conceal is extra


def test_every_action_is_decided_for_a_party() -> None:
    for action in Action:
        verdict = decide(P1, action, Context())
        assert verdict.allowed or verdict.reason


@pytest.mark.parametrize(("text", "expected"), [
    ("party:p1", P1), ("party:energy-co.2", Principal("party", party_id="energy-co.2"))])
def test_party_principals_parse_and_print(text: str, expected: Principal) -> None:
    assert Principal.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["party", "party:", "parties:p1"])
def test_malformed_party_principals_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="unknown principal"):
        Principal.parse(text)
