"""The gateway's decisions as pure functions: which loads to shed to hold the home under a power limit."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Load:
    """A switchable appliance as the controller sees it."""

    name: str
    rated_kw: float
    priority: int
    """Lower sheds first."""
    sheddable: bool
    on: bool | None
    """None when the plug could not be read."""


@dataclass(frozen=True, slots=True)
class ShedPlan:
    """What to switch off, and what the home is then expected to draw."""

    shed: tuple[str, ...]
    expected_kw: float
    feasible: bool
    """False when shedding every sheddable load still leaves the home over the limit."""


def plan_shedding(limit_kw: float, measured_kw: float | None, loads: list[Load]) -> ShedPlan:
    """Shed sheddable loads that are on, lowest priority number first (then largest), until under ``limit_kw``.

    With no meter reading the home's draw is unknown, so every sheddable load that is (or may be) on is shed.
    """
    candidates = sorted(
        (ld for ld in loads if ld.sheddable and ld.on is not False),
        key=lambda ld: (ld.priority, -ld.rated_kw, ld.name),
    )
    if measured_kw is None:
        return ShedPlan(tuple(ld.name for ld in candidates), float("nan"), False)
    expected = measured_kw
    shed: list[str] = []
    for ld in candidates:
        if expected <= limit_kw:
            break
        shed.append(ld.name)
        expected -= ld.rated_kw
    return ShedPlan(tuple(shed), round(expected, 6), expected <= limit_kw)
