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


def plan_restore(cap_kw: float, measured_kw: float | None, shed: list[Load], band_kw: float) -> tuple[str, ...]:
    """Which shed load to switch back on now, if any: one at a time (the most important first: highest
    priority number, then the smallest), and only while the home stays ``band_kw`` under ``cap_kw`` with it on —
    the hysteresis band that stops a load from flapping at the limit. With no meter reading nothing comes back."""
    if measured_kw is None:
        return ()
    for ld in sorted(shed, key=lambda ld: (-ld.priority, ld.rated_kw, ld.name)):
        if measured_kw + ld.rated_kw <= cap_kw - band_kw:
            return (ld.name,)
    return ()


def available_kw(loads: list[Load]) -> float:
    """What the home could shed right now: the rated power of the sheddable loads that are on."""
    return round(sum(ld.rated_kw for ld in loads if ld.sheddable and ld.on), 6)


def cheapest_slots(prices: list[tuple[float, float, float]], allowed: list[tuple[float, float]], run_s: float,
                   slot_s: float = 900.0) -> list[float]:
    """The start times of the cheapest ``slot_s`` slots, inside the ``allowed`` windows, that add up to ``run_s``.

    ``prices`` are ``(start, end, price)`` periods of the tariff; a slot is priced by the period it starts in and
    slots outside every period are never chosen. Ties go to the earliest slot. Returns slot starts in time order.
    """
    need = int(-(-run_s // slot_s))
    candidates: list[tuple[float, float]] = []
    for w_start, w_end in allowed:
        t = w_start
        while t + slot_s <= w_end:
            price = next((p for s, e, p in prices if s <= t < e), None)
            if price is not None:
                candidates.append((price, t))
            t += slot_s
    chosen = sorted(candidates)[:need]
    return sorted(t for _, t in chosen)
