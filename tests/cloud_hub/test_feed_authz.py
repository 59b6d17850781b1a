"""Table cases of who may follow the change feed and manage webhook subscriptions (the pure decision)."""

from __future__ import annotations

import pytest

from cloud_hub.authz import Action, Context, Principal, decide

DSO, ADMIN = Principal("dso"), Principal("admin")
R1, R2 = Principal("retailer", "r1"), Principal("retailer", "r2")
ONE_REQUEST = Context(issuer="dso", addressed_retailers=("r1",))


@pytest.mark.parametrize(("who", "action", "ctx", "allowed", "conceal"), [
    (DSO, Action.READ_EVENTS, None, True, False),                 # GET /v1/events: its own requests
    (R1, Action.READ_EVENTS, None, True, False),                  # GET /v1/events: its own clients
    (ADMIN, Action.READ_EVENTS, None, False, False),              # 403
    (DSO, Action.READ_EVENTS, ONE_REQUEST, True, False),          # the issuer
    (R1, Action.READ_EVENTS, ONE_REQUEST, True, False),           # a retailer of some of its clients
    (R2, Action.READ_EVENTS, ONE_REQUEST, False, True),           # 404: the request does not concern r2
    (ADMIN, Action.READ_EVENTS, ONE_REQUEST, False, False),
    (R1, Action.READ_EVENTS, Context(issuer="retailer:r2"), False, True),
    (DSO, Action.MANAGE_SUBSCRIPTION, None, True, False),         # create
    (R1, Action.MANAGE_SUBSCRIPTION, None, True, False),
    (ADMIN, Action.MANAGE_SUBSCRIPTION, None, False, False),
    (R1, Action.MANAGE_SUBSCRIPTION, Context(issuer="retailer:r1"), True, False),  # its own
    (R2, Action.MANAGE_SUBSCRIPTION, Context(issuer="retailer:r1"), False, True),  # another's: 404
    (DSO, Action.MANAGE_SUBSCRIPTION, Context(issuer="retailer:r1"), False, True),
    (ADMIN, Action.MANAGE_SUBSCRIPTION, Context(issuer="dso"), False, False),
])
def test_feed_decisions(who: Principal, action: Action, ctx: Context | None, allowed: bool, conceal: bool) -> None:
    verdict = decide(who, action, ctx)
    assert verdict.allowed is allowed
    assert verdict.conceal is conceal
    assert (verdict.right != "none") if allowed else bool(verdict.reason)
