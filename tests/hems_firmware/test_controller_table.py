"""The gateway's policy as tables of cases: every rule the daemon asks of the pure controller (the shedding,
restore and judging tables are in test_controller.py and test_outcomes_truth.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from device_drivers.config import DeviceConfig
from hems_firmware import controller as rules
from hems_firmware.config import FlexibleSchedule
from hems_firmware.controller import Load
from mhp_wire.messages import ApplianceSchedule, Schedule


def plug(name: str, rated_kw: float, priority: int = 100, sheddable: bool = True) -> DeviceConfig:
    return DeviceConfig(name=name, driver="modbus_relay", transport="modbus-tcp", host="127.0.0.1", port=502,
                        coil=0, rated_power_kw=rated_kw, priority=priority, sheddable=sheddable)


def schedule(*appliances: ApplianceSchedule) -> Schedule:
    return Schedule(client_id="c1", version=1, appliances=list(appliances))


HEATER, EV, FRIDGE = plug("heater", 2.0, 1), plug("ev", 3.7, 2), plug("fridge", 0.15, 9, sheddable=False)
PLUGS = {"heater": HEATER, "ev": EV, "fridge": FRIDGE}
ALL_ON: dict[str, dict[str, Any]] = {"heater": {"on": True}, "ev": {"on": True}, "fridge": {"on": True}}
NOW = 1_000.0

LOADS_CASES = [
    # readings, schedule, shed_since, exempt, expected (name, priority, sheddable, on) per plug
    ("the installer's settings", ALL_ON, None, {}, set(),
     [("heater", 1, True, True), ("ev", 2, True, True), ("fridge", 9, False, True)]),
    ("an unreadable plug is unknown, a bool-less reading too", {"heater": {"available": False}, "ev": {"on": 1}},
     None, {}, set(), [("heater", 1, True, None), ("ev", 2, True, None), ("fridge", 9, False, None)]),
    ("the customer's priority overrides the installer's", ALL_ON,
     schedule(ApplianceSchedule(device="heater", priority=50)), {}, set(),
     [("heater", 50, True, True), ("ev", 2, True, True), ("fridge", 9, False, True)]),
    ("never shed", ALL_ON, schedule(ApplianceSchedule(device="ev", never_shed=True)), {}, set(),
     [("heater", 1, True, True), ("ev", 2, False, True), ("fridge", 9, False, True)]),
    ("a customer cannot make an unsheddable load sheddable", ALL_ON,
     schedule(ApplianceSchedule(device="fridge", priority=0)), {}, set(),
     [("heater", 1, True, True), ("ev", 2, True, True), ("fridge", 0, False, True)]),
    ("off for less than its longest interruption", ALL_ON,
     schedule(ApplianceSchedule(device="heater", max_interruption_s=60)), {"heater": NOW - 59.0}, set(),
     [("heater", 1, True, True), ("ev", 2, True, True), ("fridge", 9, False, True)]),
    ("off for its longest interruption", ALL_ON,
     schedule(ApplianceSchedule(device="heater", max_interruption_s=60)), {"heater": NOW - 60.0}, set(),
     [("heater", 1, False, True), ("ev", 2, True, True), ("fridge", 9, False, True)]),
    ("exempt while actions hold the home", ALL_ON, None, {}, {"ev"},
     [("heater", 1, True, True), ("ev", 2, False, True), ("fridge", 9, False, True)]),
]


@pytest.mark.parametrize(("why", "readings", "sched", "shed_since", "exempt", "expected"), LOADS_CASES,
                         ids=[c[0] for c in LOADS_CASES])
def test_loads_as_the_controller_sees_them(why: str, readings: dict[str, dict[str, Any]], sched: Schedule | None,
                                           shed_since: dict[str, float], exempt: set[str],
                                           expected: list[tuple[str, int, bool, bool | None]]) -> None:
    got = rules.loads(PLUGS, readings, sched, shed_since, exempt, NOW)
    assert [(ld.name, ld.priority, ld.sheddable, ld.on) for ld in got] == expected, why
    assert [ld.rated_kw for ld in got] == [2.0, 3.7, 0.15]


METER_CASES = [
    # readings, meters, measured, cap (configured 6.9)
    ({}, ["m"], None, 6.9),
    ({"m": {"active_power_kw": 1.5}}, ["m"], 1.5, 6.9),
    ({"m": {"active_power_kw": 2}}, ["m"], 2.0, 6.9),
    ({"m": {"active_power_kw": True}}, ["m"], None, 6.9),
    ({"m": {"active_power_kw": math.nan}, "p1": {"active_power_kw": 0.4}}, ["m", "p1"], 0.4, 6.9),
    ({"m": {"active_power_kw": math.inf}}, ["m"], None, 6.9),
    ({"m": {"available": False}, "p1": {"active_power_kw": 3.0, "contracted_power_kva": 10.35}}, ["m", "p1"],
     3.0, 10.35),
    ({"m": {"contracted_power_kva": 0}}, ["m"], None, 6.9),
    ({"m": {"contracted_power_kva": False}}, ["m"], None, 6.9),
    ({"heater": {"active_power_kw": 9.0}}, ["m"], None, 6.9),
]


@pytest.mark.parametrize(("readings", "meters", "measured", "cap"), METER_CASES)
def test_the_home_draw_and_cap_come_from_the_first_meter_that_answers(
        readings: dict[str, dict[str, Any]], meters: list[str], measured: float | None, cap: float) -> None:
    assert rules.measured_kw(readings, meters) == measured
    assert rules.cap_kw(readings, meters, 6.9) == cap


def test_with_no_contracted_power_there_is_no_cap() -> None:
    assert rules.cap_kw({}, ["m"], None) == math.inf


def test_the_sheddable_claims() -> None:
    current = [Load("heater", 2.0004, 1, True, True), Load("ev", 3.7, 2, True, False),
               Load("washer", 1.2, 3, True, None), Load("fridge", 0.15, 9, False, True)]
    assert rules.sheddable_kw(current) == 2.0
    assert rules.rated_sheddable_kw(PLUGS.values()) == 5.7
    assert rules.shed_kw(current, {"heater", "fridge"}) == 2.15
    assert rules.shed_kw(current, set()) == 0.0


DUE_BACK_CASES = [
    # settings, shed at, due back
    (None, NOW - 10_000, False),
    (ApplianceSchedule(device="heater", never_shed=True), None, False),
    (ApplianceSchedule(device="heater", never_shed=True), NOW, True),
    (ApplianceSchedule(device="heater", max_interruption_s=60), NOW - 59.9, False),
    (ApplianceSchedule(device="heater", max_interruption_s=60), NOW - 60.0, True),
    (ApplianceSchedule(device="heater", max_interruption_s=0), NOW, True),
    (ApplianceSchedule(device="heater", priority=3), NOW - 10_000, False),
]


@pytest.mark.parametrize(("settings", "shed_at", "due"), DUE_BACK_CASES)
def test_a_shed_load_comes_back_when_the_customer_says(settings: ApplianceSchedule | None, shed_at: float | None,
                                                       due: bool) -> None:
    assert rules.due_back(settings, shed_at, NOW) is due


@pytest.mark.parametrize(("limits", "owner"), [
    ({}, None),
    ({"r1": 3.0}, "r1"),
    ({"r1": 3.0, "failsafe": 2.0, "r2": 5.0}, "failsafe"),
    ({"r1": 2.0, "r2": 2.0}, "r1"),
    ({"r2": 2.0, "r1": 2.0}, "r2"),
])
def test_the_strictest_action_holds_the_home(limits: dict[str, float], owner: str | None) -> None:
    assert rules.strictest(limits) == owner


@pytest.mark.parametrize(("limit", "floor", "applied"), [(1.0, 2.0, 2.0), (3.0, 2.0, 3.0), (2.0, 2.0, 2.0)])
def test_the_failsafe_limit_is_never_below_the_floor(limit: float, floor: float, applied: float) -> None:
    assert rules.failsafe_limit_kw(limit, floor) == applied


@pytest.mark.parametrize(("last", "now", "due"), [(-math.inf, 0.0, True), (100.0, 129.9, False),
                                                  (100.0, 130.0, True)])
def test_one_load_comes_back_per_restore_interval(last: float, now: float, due: bool) -> None:
    assert rules.restore_due(last, now, 30.0) is due


@pytest.mark.parametrize(("expires_at", "expired"), [(NOW - 1, True), (NOW, True), (NOW + 0.001, False)])
def test_a_command_arriving_at_its_expiry_is_refused(expires_at: float, expired: bool) -> None:
    assert rules.command_expired(expires_at, NOW) is expired


@pytest.mark.parametrize(("held", "revision", "step"), [
    (None, 1, "new"), (None, 3, "new"), (1, 2, "newer"), (1, 1, "same"), (3, 2, "stale"), (3, 1, "stale"),
])
def test_what_a_revision_means_against_the_one_held(held: int | None, revision: int, step: str) -> None:
    assert rules.revision_step(held, revision) == step


ON = [Load("heater", 2.0, 1, True, True)]
OFF = [Load("heater", 2.0, 1, True, False)]
JUDGE_CASES = [
    # reduction?, limit, target, shed kW, before, after, loads, met
    (False, 3.0, None, 0.0, 5.0, 2.9, OFF, True),
    (False, 3.0, None, 0.0, 5.0, 3.001, OFF, True),
    (False, 3.0, None, 2.0, 5.0, 3.5, OFF, False),
    (False, 3.0, None, 0.0, 5.0, None, OFF, False),
    (True, 0.0, 2.0, 2.0, 5.0, 4.9, OFF, True),
    (True, 0.0, 2.0, 0.0, 5.0, 3.0, ON, True),
    (True, 0.0, 2.0, 0.0, 5.0, 4.0, ON, False),
    (True, 0.0, None, 0.0, None, None, OFF, True),
    (True, 0.0, None, 0.0, None, None, ON, False),
]


@pytest.mark.parametrize(("reduction", "limit", "target", "shed", "before", "after", "current", "met"), JUDGE_CASES)
def test_a_reduction_is_judged_by_its_target_any_other_action_by_its_limit(
        reduction: bool, limit: float, target: float | None, shed: float, before: float | None,
        after: float | None, current: list[Load], met: bool) -> None:
    verdict = rules.judge(reduction, limit, target, shed, before, after, current)
    assert verdict.met is met
    assert (verdict.reason is None) is met


CONFIGURED = [FlexibleSchedule(device="washer", run_s=3600, allowed=[("22:00", "06:00")]),
              FlexibleSchedule(device="boiler", run_s=1800)]
FLEX_CASES = [
    ("no schedule: the installer's", None, {"washer", "boiler"},
     [("washer", 3600, [("22:00", "06:00")]), ("boiler", 1800, [("00:00", "24:00")])]),
    ("the customer's run time and windows win", schedule(ApplianceSchedule(device="washer", run_s=900,
                                                                            allowed=[("10:00", "12:00")])),
     {"washer", "boiler"}, [("washer", 900, [("10:00", "12:00")]), ("boiler", 1800, [("00:00", "24:00")])]),
    ("no windows: all day", schedule(ApplianceSchedule(device="ev", run_s=7200)), {"washer", "boiler", "ev"},
     [("washer", 3600, [("22:00", "06:00")]), ("boiler", 1800, [("00:00", "24:00")]),
      ("ev", 7200, [("00:00", "24:00")])]),
    ("no run time: not tariff-scheduled", schedule(ApplianceSchedule(device="boiler", run_s=0)),
     {"washer", "boiler"}, [("washer", 3600, [("22:00", "06:00")])]),
    ("settings without run time keep the installer's plan", schedule(ApplianceSchedule(device="washer", priority=4)),
     {"washer"}, [("boiler", 1800, [("00:00", "24:00")])]),
    ("a plug this gateway does not have", schedule(ApplianceSchedule(device="pool", run_s=600)), {"washer"},
     [("washer", 3600, [("22:00", "06:00")]), ("boiler", 1800, [("00:00", "24:00")])]),
]


@pytest.mark.parametrize(("why", "sched", "switches", "expected"), FLEX_CASES, ids=[c[0] for c in FLEX_CASES])
def test_which_appliances_run_on_the_tariff(why: str, sched: Schedule | None, switches: set[str],
                                            expected: list[tuple[str, float, list[tuple[str, str]]]]) -> None:
    got = rules.flexible(CONFIGURED, sched, switches)
    assert [(f.device, f.run_s, f.allowed) for f in got] == expected, why


MIDNIGHT = 1_700_000_000.0
H = 3600.0
WINDOW_CASES = [
    ([("00:00", "24:00")], [(MIDNIGHT, MIDNIGHT + 24 * H)]),
    ([("10:00", "12:30")], [(MIDNIGHT + 10 * H, MIDNIGHT + 12.5 * H)]),
    ([("22:00", "06:00")], [(MIDNIGHT, MIDNIGHT + 6 * H), (MIDNIGHT + 22 * H, MIDNIGHT + 24 * H)]),
    ([("01:00", "02:00"), ("20:00", "21:15")], [(MIDNIGHT + H, MIDNIGHT + 2 * H),
                                                (MIDNIGHT + 20 * H, MIDNIGHT + 21.25 * H)]),
    ([("05:00", "05:00")], [(MIDNIGHT, MIDNIGHT + 5 * H), (MIDNIGHT + 5 * H, MIDNIGHT + 24 * H)]),
]


@pytest.mark.parametrize(("allowed", "windows"), WINDOW_CASES)
def test_allowed_windows_as_times_of_the_day(allowed: list[tuple[str, str]],
                                             windows: list[tuple[float, float]]) -> None:
    assert rules.day_windows(MIDNIGHT, allowed) == windows


@pytest.mark.parametrize(("hhmm", "seconds"), [("00:00", 0.0), ("06:30", 23_400.0), ("24:00", 86_400.0)])
def test_seconds_of_the_day(hhmm: str, seconds: float) -> None:
    assert rules.seconds_of_day(hhmm) == seconds


@pytest.mark.parametrize(("t", "run"), [(MIDNIGHT - 1, False), (MIDNIGHT, True), (MIDNIGHT + 899.9, True),
                                        (MIDNIGHT + 900, False), (MIDNIGHT + 3600, True)])
def test_a_flexible_appliance_runs_inside_its_chosen_slots(t: float, run: bool) -> None:
    assert rules.in_slot([MIDNIGHT, MIDNIGHT + 3600], t) is run
