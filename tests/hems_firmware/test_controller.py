"""The emergency limiter's shedding decision, as a table."""

from __future__ import annotations

import math

import pytest

from hems_firmware.controller import Load, available_kw, cheapest_slots, plan_restore, plan_shedding

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


@pytest.mark.parametrize(
    ("cap", "measured", "shed", "band", "back"),
    [
        (6.9, 0.45, [HEATER, EV, WASHER], 0.5, ("washer",)),  # highest priority number first
        (6.9, 5.5, [HEATER, EV, WASHER], 0.5, ()),            # no headroom for even the washer (5.5 + 1.2 > 6.4)
        (6.9, 4.0, [HEATER, EV, WASHER], 0.5, ("washer",)),
        (6.9, 0.45, [HEATER, EV], 0.5, ("ev",)),
        (1.0, 0.45, [HEATER], 0.2, ()),                       # back on would cross the limit
        (6.9, None, [HEATER], 0.5, ()),
        (6.9, 0.45, [], 0.5, ()),
    ],
)
def test_restore_one_load_at_a_time_within_the_band(cap: float, measured: float | None, shed: list[Load],
                                                    band: float, back: tuple[str, ...]) -> None:
    assert plan_restore(cap, measured, shed, band) == back


def test_available_is_what_is_on_and_sheddable() -> None:
    assert available_kw(HOME) == pytest.approx(6.9)
    assert available_kw([FRIDGE, Load("heater", 2.0, 1, True, False)]) == 0


H = 3600.0
DAY_PRICES = [(0, 7 * H, 0.08), (7 * H, 18 * H, 0.15), (18 * H, 22 * H, 0.25), (22 * H, 24 * H, 0.08)]


@pytest.mark.parametrize(
    ("allowed", "run_s", "slots"),
    [
        ([(0, 24 * H)], 3600, [0, 900, 1800, 2700]),
        ([(8 * H, 20 * H)], 1800, [8 * H, 8 * H + 900]),
        ([(17 * H, 24 * H)], 1800, [22 * H, 22 * H + 900]),
        ([(17 * H, 19 * H)], 3600 * 2, [17 * H, 17 * H + 900, 17 * H + 1800, 17 * H + 2700, 18 * H,
                                        18 * H + 900, 18 * H + 1800, 18 * H + 2700]),
        ([(25 * H, 26 * H)], 900, []),
    ],
)
def test_cheapest_slots_inside_the_allowed_windows(allowed: list[tuple[float, float]], run_s: float,
                                                   slots: list[float]) -> None:
    assert cheapest_slots(DAY_PRICES, allowed, run_s) == slots


def test_a_scripted_day_never_exceeds_the_limit_after_the_limiter_acts() -> None:
    """A home through a day in 15-minute steps, an emergency from 17:00 to 21:00 at 2.5 kW, the EV arriving at
    17:30: after the limiter's decision each step the import is under the limit; afterwards what it shed comes
    back one load per step, only while the home stays 0.5 kW under its contracted 6.9 kW."""
    base = [0.3] * 28 + [0.8] * 8 + [0.5] * 32 + [1.2] * 16 + [0.4] * 12   # 96 quarter hours
    rated = {"heater": 2.0, "ev": 3.7, "washer": 1.2}
    prio = {"heater": 1, "ev": 2, "washer": 3}
    state = {"heater": True, "ev": False, "washer": True}
    shed_by_us: set[str] = set()
    for step, b in enumerate(base):
        if step == 70:
            state["ev"] = True  # plugged in by the household
        limit = 2.5 if 68 <= step < 84 else None
        measured = b + 0.15 + sum(rated[n] for n, on in state.items() if on)
        loads = [Load(n, rated[n], prio[n], True, on) for n, on in state.items()] + [FRIDGE]
        if limit is not None:
            for name in plan_shedding(limit, measured, loads).shed:
                state[name] = False
                shed_by_us.add(name)
        else:
            shed = [ld for ld in loads if ld.name in shed_by_us]
            for name in plan_restore(6.9, measured, shed, 0.5):
                state[name] = True
                shed_by_us.discard(name)
        after = b + 0.15 + sum(rated[n] for n, on in state.items() if on)
        if limit is not None:
            assert after <= limit, f"step {step}: {after} kW over {limit}"
        elif step >= 84:
            assert after <= 6.9 - 0.5, f"step {step}: restoring took the home to {after} kW"
    assert state["washer"] and state["ev"], "what fits comes back after the emergency, most important first"
    assert not state["heater"] and shed_by_us == {"heater"}, "the heater would push the home over 6.4 kW"
