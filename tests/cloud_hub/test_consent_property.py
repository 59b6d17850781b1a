"""Property: for random histories of supplier switches, permission requests, decisions (by whichever retailer),
terminations, lapses and reads, no party ever receives data outside a permission valid at the time of the data and
of the read. The hub's pure functions (cloud_hub.authz.decide, cloud_hub.consent) answer the reads; an independent
oracle judges each answer from the raw event log (who did what when), not from the state machine."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import event as note
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_hub import consent
from cloud_hub.authz import Action, Context, Principal, decide
from cloud_hub.consent import Event, InvalidTransition, Permission, Scope

H = 3600.0
RETAILERS = ["r1", "r2"]
PARTIES = ["p1", "p2"]
SCOPES = list(Scope)
DATA = [(i * H, (i + 1) * H) for i in range(48)]
"""The client's data: one value per hour over two days (the reads ask for parts of it)."""
READ_OF = {Scope.CONSUMPTION_PROFILE: Action.READ_CONSUMPTION, Scope.BILLING_DATA: Action.READ_BILLING_DATA,
           Scope.LIVE_MEASUREMENTS: Action.READ_MEASUREMENTS}
"""The action a party's read of each scope is authorized as (every scope is read through its own route)."""

switch = st.tuples(st.just("switch"), st.sampled_from(RETAILERS))
request = st.tuples(st.just("request"), st.sampled_from(PARTIES), st.lists(st.sampled_from(SCOPES), min_size=1,
                                                                             max_size=3),
                    st.integers(0, 47), st.integers(1, 48), st.integers(1, 200), st.sampled_from([900, 3600, 7200]))
decision = st.tuples(st.just("decide"), st.sampled_from(RETAILERS), st.integers(0, 3),
                     st.sampled_from(["accept", "accept", "reject", "revoke"]))
terminate = st.tuples(st.just("terminate"), st.sampled_from(PARTIES), st.integers(0, 3))
read = st.tuples(st.just("read"), st.sampled_from(PARTIES), st.sampled_from(SCOPES), st.integers(0, 47),
                 st.integers(1, 48), st.sampled_from([900, 3600]))
step = st.tuples(st.floats(0.1, 12.0), st.one_of(
    switch, request, decision, decision, decision, terminate, read, read, read, read))


@dataclass
class World:
    """The hub's view (permissions, the supplier now) and the raw log the oracle judges by."""

    supplier: str = "r1"
    perms: dict[str, Permission] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    accepted: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    """permission id -> (time, retailer that relayed it, supplier at that time) of each accept the hub applied."""
    ended: dict[str, float] = field(default_factory=dict)
    """permission id -> first time the customer revoked or the party terminated it after an accept."""
    suppliers: list[tuple[float, str]] = field(default_factory=list)


def legitimate(w: World, party: str, scope: Scope, read_at: float, t0: float, t1: float, res: int) -> bool:
    """The oracle: a permission of ``party`` for ``scope``, accepted by then through the retailer that supplied
    the client at the time of the accept, before its deadline, not revoked or terminated by ``read_at``, still
    valid, whose data period holds ``[t0, t1)`` and whose resolution allows ``res``."""
    for pid, p in w.perms.items():
        if p.party_id != party or scope not in p.scopes or res < p.resolution_s:
            continue
        if not (p.data_from <= t0 and t1 <= p.data_to and read_at < p.valid_until):
            continue
        for at, by in w.accepted.get(pid, []):
            supplier_then = [r for t, r in w.suppliers if t <= at][-1]
            if by == supplier_then and at <= read_at and at < p.decide_by and w.ended.get(pid, float("inf")) > read_at:
                return True
    return False


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.just(0.1), request), min_size=1, max_size=3), st.lists(step, min_size=20, max_size=60))
def test_no_party_ever_receives_data_outside_a_valid_permission(
        first: list[tuple[float, tuple]], rest: list[tuple[float, tuple]]) -> None:  # type: ignore[type-arg]
    steps = first + rest  # a few requests first: most histories then have something to decide, end and read
    w = World(suppliers=[(0.0, "r1")])
    now = 0.0
    served_any = 0
    for dt, op in steps:
        now += dt * H
        kind = op[0]
        if kind == "switch":
            w.supplier = op[1]
            w.suppliers.append((now, op[1]))
        elif kind == "request":
            _, party, scopes, first, hours, valid_h, res = op
            pid = f"perm-{len(w.order)}"
            w.perms[pid] = consent.new_permission(pid, party, "c1", consent.PermissionAsk(
                "x", scopes, res, first * H, min(48, first + hours) * H, now + valid_h * H), now)
            w.order.append(pid)
        elif kind in ("decide", "terminate") and w.order:
            pid = w.order[-1 - op[2] % len(w.order)]  # mostly the newest requests
            p = w.perms[pid]
            if kind == "decide":
                who = Principal("retailer", op[1])
                if not decide(who, Action.DECIDE_PERMISSION, Context(supplier_at_time=w.supplier)).allowed:
                    continue
                event = {"accept": Event.ACCEPT, "reject": Event.REJECT, "revoke": Event.REVOKE}[op[3]]
            else:
                if op[1] != p.party_id:  # the API answers another party's permission as unknown
                    continue
                event = Event.TERMINATE
            try:
                w.perms[pid] = consent.decide(p, event, now, str(op[1]))
            except InvalidTransition:
                continue
            if event is Event.ACCEPT:
                w.accepted.setdefault(pid, []).append((now, op[1]))
            elif pid in w.accepted and pid not in w.ended:
                w.ended[pid] = now
        elif kind == "read":
            _, party, scope, first, hours, asked_res = op
            start, end = first * H, min(48, first + hours) * H
            g = consent.grant(w.perms.values(), party, "c1", scope, now, start, end)
            verdict = decide(Principal("party", party_id=party), READ_OF[scope],
                             Context(permission_id=None if g is None else g.permission_id))
            if not verdict.allowed:
                assert g is None
                # nothing served; and if the oracle sees a permission covering the whole range, that is a bug too
                assert not legitimate(w, party, scope, now, start, end, max(asked_res, 7200)), "wrongly refused"
                continue
            assert g is not None and verdict.right == f"party:permission:{g.permission_id}"
            res = consent.resolution(g, asked_res)
            served = [(t0, t1) for t0, t1 in DATA if start <= t0 and t1 <= end and consent.allowed_interval(g, t0, t1)]
            if scope is Scope.BILLING_DATA and served:  # the readings, summed to the permission's resolution
                coarse, _ = consent.coarsen([{"start": served[0][0], "resolution_s": int(H),
                                              "values_kwh": [1.0] * len(served), "quality": "measured",
                                              "corrected": False}], g.resolution_s)
                res = coarse[0]["resolution_s"] if coarse else g.resolution_s
                served = [(b["start"] + i * b["resolution_s"], b["start"] + (i + 1) * b["resolution_s"])
                          for b in coarse for i in range(len(b["values_kwh"]))]
            for t0, t1 in served:
                assert legitimate(w, party, scope, now, t0, t1, res), (party, scope, now, t0, t1, g)
            served_any += len(served)
    note(f"data served: {'yes' if served_any else 'no'}")
