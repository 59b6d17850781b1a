"""The emergency limiter's shedding decision, as a table."""

from __future__ import annotations

import math

import pytest

from hems_firmware.controller import Load, plan_shedding

HEATER = Load("heater", 2.0, 1, True, True)
EV = Load("ev", 3.7, 2, True, True)
WASHER = Load("washer", 1.2, 3, True, True)
FRIDGE = Load("fridge", 0.15, 9, False, True)
HOME = [FRIDGE, WASHER, EV, HEATER]

CASES = [
    # limit, measured, loads, shed, expected, feasible
    (10.0, 7.35, HOME, (), 7.35, True),
    (7.35, 7.35, HOME, (), 7.35, True),
    (6.0, 7.35, HOME, ("heater",), 5.35, True),
    (4.0, 7.35, HOME, ("heater", "ev"), 1.65, True),
    (1.0, 7.35, HOME, ("heater", "ev", "washer"), 0.45, True),
    (0.2, 7.35, HOME, ("heater", "ev", "washer"), 0.45, False),
    (1.0, 5.35, [FRIDGE, WASHER, EV, Load("heater", 2.0, 1, True, False)], ("ev", "washer"), 0.45, True),
    (1.0, 7.35, [FRIDGE, WASHER, EV, Load("heater", 2.0, 1, True, None)], ("heater", "ev", "washer"), 0.45, True),
    (1.0, 2.0, [Load("a", 1.0, 5, True, True), Load("b", 3.0, 5, True, True)], ("b",), -1.0, True),
]


@pytest.mark.parametrize(("limit", "measured", "loads", "shed", "expected", "feasible"), CASES)
def test_sheds_by_priority_until_under_the_limit(
    limit: float, measured: float, loads: list[Load], shed: tuple[str, ...], expected: float, feasible: bool
) -> None:
    plan = plan_shedding(limit, measured, loads)
    assert plan.shed == shed
    assert plan.expected_kw == pytest.approx(expected)
    assert plan.feasible is feasible


def test_without_a_meter_reading_every_sheddable_load_goes() -> None:
    plan = plan_shedding(1.0, None, HOME)
    assert plan.shed == ("heater", "ev", "washer")
    assert math.isnan(plan.expected_kw)
    assert not plan.feasible


def test_never_sheds_a_load_that_may_not_be_shed() -> None:
    plan = plan_shedding(0.0, 0.15, [FRIDGE])
    assert plan.shed == ()
    assert not plan.feasible
