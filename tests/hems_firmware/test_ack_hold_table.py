"""The gateway's ack hold (:class:`hems_firmware.controller.AckHold`), a pure rule driven by an injected time: a
command's ``ack`` waits ``hold_s``; an outcome of the command stored meanwhile stands for it (it is never sent);
otherwise it is due exactly at the hold's end, never later. A table of cases, then the edges."""

from __future__ import annotations

import pytest

from hems_firmware.config import GatewayConfig
from hems_firmware.controller import AckHold

T0 = 1_000.0  # an arbitrary monotonic time (the rule only compares times it is given)

# (case, holds [(msg_id, request_id, revision, at)], answers [(request_id, revision)], now, due now, still held)
CASES = [
    ("nothing held", [], [], T0, [], 0),
    ("held, not yet due", [("m1", "q1", 1, T0)], [], T0 + 0.1, [], 1),
    ("due exactly at the hold's end", [("m1", "q1", 1, T0)], [], T0 + 0.2, ["m1"], 0),
    ("due after it (late timer)", [("m1", "q1", 1, T0)], [], T0 + 5.0, ["m1"], 0),
    ("answered within the hold: never sent", [("m1", "q1", 1, T0)], [("q1", 1)], T0 + 5.0, [], 0),
    ("a newer revision's outcome answers an older command", [("m1", "q1", 1, T0)], [("q1", 2)], T0 + 5.0, [], 0),
    ("an older revision's outcome does not answer a newer command", [("m2", "q1", 2, T0)], [("q1", 1)], T0 + 5.0,
     ["m2"], 0),
    ("another request's outcome does not answer it", [("m1", "q1", 1, T0)], [("q2", 1)], T0 + 5.0, ["m1"], 0),
    ("two held, one answered, the other due", [("m1", "q1", 1, T0), ("m2", "q2", 1, T0 + 0.05)], [("q1", 1)],
     T0 + 0.3, ["m2"], 0),
    ("two held, due in the order held", [("m1", "q1", 1, T0), ("m2", "q2", 1, T0 + 0.05)], [], T0 + 0.3,
     ["m1", "m2"], 0),
    ("two held, only the first due yet", [("m1", "q1", 1, T0), ("m2", "q2", 1, T0 + 0.1)], [], T0 + 0.25,
     ["m1"], 1),
    ("the same command held twice keeps its first hold", [("m1", "q1", 1, T0), ("m1", "q1", 1, T0 + 0.15)], [],
     T0 + 0.2, ["m1"], 0),
]


@pytest.mark.parametrize(("case", "holds", "answers", "now", "due", "left"), CASES, ids=[c[0] for c in CASES])
def test_ack_hold(case: str, holds: list[tuple[str, str, int, float]], answers: list[tuple[str, int]], now: float,
                  due: list[str], left: int) -> None:
    rule = AckHold(0.2)
    for msg_id, request_id, revision, at in holds:
        assert rule.hold(msg_id, request_id, revision, at)
    for request_id, revision in answers:
        rule.answered(request_id, revision)
    assert rule.due(now) == due, case
    assert len(rule) == left, case
    assert rule.due(now) == [], "a due ack is handed out once"


def test_next_at_is_the_earliest_end_of_a_hold() -> None:
    rule = AckHold(0.2)
    assert rule.next_at() is None
    rule.hold("m1", "q1", 1, T0)
    rule.hold("m2", "q2", 1, T0 + 0.1)
    assert rule.next_at() == pytest.approx(T0 + 0.2)
    assert rule.answered("q1", 1) == ["m1"]
    assert rule.next_at() == pytest.approx(T0 + 0.3)
    assert rule.answered("q1", 1) == [], "answered once"


@pytest.mark.parametrize("hold_s", [0.0, -1.0])
def test_without_a_hold_every_ack_goes_at_once(hold_s: float) -> None:
    rule = AckHold(hold_s)
    assert not rule.hold("m1", "q1", 1, T0), "the caller acknowledges at once, as before the hold"
    assert len(rule) == 0 and rule.next_at() is None


def test_the_setting_defaults_to_a_short_hold_and_refuses_one_near_the_bridges_resend() -> None:
    base = {"gateway": {"id": "gw-1", "client_id": "c1"}}
    assert GatewayConfig.model_validate(base).gateway.ack_hold_s == pytest.approx(0.2)
    assert GatewayConfig.model_validate({"gateway": {**base["gateway"], "ack_hold_s": 0}}).gateway.ack_hold_s == 0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="ack_hold_s"):
            GatewayConfig.model_validate({"gateway": {**base["gateway"], "ack_hold_s": bad}})
