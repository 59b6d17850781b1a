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


TOLERANCE_KW = 0.001
"""Rounding slack when comparing a measured or rated power with a limit or a target."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether an action achieved what it was asked; if not, why (the outcome's ``detail.reason``)."""

    met: bool
    reason: str | None = None


def _still_on(loads: list[Load]) -> list[str]:
    return [ld.name for ld in loads if ld.sheddable and ld.on is not False]


def _kept_on(loads: list[Load]) -> list[str]:
    return [ld.name for ld in loads if not ld.sheddable and ld.on]


def judge_limit(limit_kw: float, measured_kw: float | None, loads: list[Load]) -> Verdict:
    """An import limit (emergency, failsafe) is met only when the home's measured draw, after shedding, is at most
    ``limit_kw``: an unreadable meter, a load that may not be shed or a plug that would not switch is a miss."""
    if measured_kw is None:
        return Verdict(False, "the meter could not be read: the home's draw is unknown")
    if measured_kw <= limit_kw + TOLERANCE_KW:
        return Verdict(True)
    over = f"the home draws {measured_kw:g} kW, over the limit of {limit_kw:g} kW"
    left = _still_on(loads)
    if left:
        return Verdict(False, f"{over}; still on: {', '.join(left)} (not switched off or state unknown)")
    kept = _kept_on(loads)
    return Verdict(False, f"{over} after shedding every load it may shed"
                   + (f"; not sheddable: {', '.join(kept)}" if kept else ""))


def reduction_limit(target_kw: float | None, measured_kw: float | None) -> float:
    """The import a load reduction holds the home under: ``target_kw`` below the draw measured at its start; with no
    target, or no reading, 0 (every sheddable load off)."""
    if target_kw is None or measured_kw is None:
        return 0.0
    return max(0.0, measured_kw - target_kw)


def judge_reduction(target_kw: float | None, shed_kw: float, before_kw: float | None, after_kw: float | None,
                    loads: list[Load]) -> Verdict:
    """A load reduction is met when the loads switched off add up to ``target_kw`` (rated), or the meter shows a
    drop of at least ``target_kw``; with no target, when no sheddable load is left on."""
    left = _still_on(loads)
    if target_kw is None:
        if not left:
            return Verdict(True)
        return Verdict(False, f"still on: {', '.join(left)} (not switched off or state unknown)")
    if shed_kw >= target_kw - TOLERANCE_KW:
        return Verdict(True)
    if before_kw is not None and after_kw is not None and before_kw - after_kw >= target_kw - TOLERANCE_KW:
        return Verdict(True)
    short = f"shed {shed_kw:g} kW of the {target_kw:g} kW target"
    if left:
        return Verdict(False, f"{short}; still on: {', '.join(left)} (not switched off or state unknown)")
    return Verdict(False, f"{short}: nothing more it may shed")


@dataclass(frozen=True, slots=True)
class Failsafe:
    """Where the gateway's failsafe stands: when the uplink was lost, and the failsafe applied during this outage."""

    lost_at: float | None = None
    """Monotonic time the uplink went down (None: connected)."""
    since: float | None = None
    """When the failsafe limit was applied (None: not in force)."""
    until: float | None = None
    """When it ends at the latest (``since`` + its duration)."""
    spent: bool = False
    """Already applied during this outage: not applied again until the uplink has come back."""


def failsafe_step(fs: Failsafe, connected: bool, now: float, after_s: float,
                  duration_s: float) -> tuple[Failsafe, str | None]:
    """The next failsafe state and what to do now: ``"apply"``, ``"release"`` or None.

    Applied once the uplink has been down for ``after_s``; released when its ``duration_s`` has passed or the
    uplink is back, whichever comes first; applied at most once per outage (bounded, as EEBus LPC's failsafe)."""
    if connected:
        return Failsafe(), ("release" if fs.since is not None else None)
    lost_at = fs.lost_at if fs.lost_at is not None else now
    if fs.since is not None:
        if fs.until is not None and now >= fs.until:
            return Failsafe(lost_at=lost_at, spent=True), "release"
        return Failsafe(lost_at, fs.since, fs.until, True), None
    if not fs.spent and now - lost_at >= after_s:
        return Failsafe(lost_at, now, now + duration_s, True), "apply"
    return Failsafe(lost_at=lost_at, spent=fs.spent), None
