"""The gateway's decisions as pure functions: which loads to shed to hold the home under a power limit, which to
bring back, whether an action met what it was asked, when the failsafe applies, when a flexible appliance runs, and
what a command's expiry and revision mean. Every rule of the gateway lives here; nothing here reads a clock, a device,
the database or the network (times and readings are arguments).
May import: the gateway's and the drivers' configuration models and :mod:`mhp_wire.messages` (data only).
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass

from device_drivers.config import DeviceConfig
from hems_firmware.config import FlexibleSchedule
from mhp_wire.messages import ApplianceSchedule, Schedule


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


# -- the home as the controller sees it --------------------------------------------------------------------------


def finite_kw(value: object) -> float | None:
    """A reading as a power in kW, or None when it is missing, not a number (a bool is not) or not finite."""
    if isinstance(value, float | int) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def measured_kw(readings: Mapping[str, Mapping[str, object]], meters: Iterable[str]) -> float | None:
    """The home's import power: the ``active_power_kw`` of the first of ``meters`` that answered, in kW."""
    for name in meters:
        value = finite_kw(readings.get(name, {}).get("active_power_kw"))
        if value is not None:
            return value
    return None


def cap_kw(readings: Mapping[str, Mapping[str, object]], meters: Iterable[str], contracted_kw: float | None) -> float:
    """The power the home must stay under when nothing is active: the contracted power a meter reports (the first
    positive one), else the configured one, else no cap."""
    for name in meters:
        kva = readings.get(name, {}).get("contracted_power_kva")
        if isinstance(kva, float | int) and not isinstance(kva, bool) and kva > 0:
            return float(kva)
    return contracted_kw or float("inf")


def appliance(schedule: Schedule | None, name: str) -> ApplianceSchedule | None:
    """The customer's settings for one appliance, if any."""
    if schedule is None:
        return None
    return next((a for a in schedule.appliances if a.device == name), None)


def loads(switches: Mapping[str, DeviceConfig], readings: Mapping[str, Mapping[str, object]],
          schedule: Schedule | None, shed_since: Mapping[str, float], exempt: Container[str], now: float) -> list[Load]:
    """The switchable appliances as the controller sees them: the customer's schedule overrides the installer's
    priority, may forbid shedding an appliance, or bound how long it stays off (``shed_since``: monotonic time each
    was shed; ``exempt``: loads that reached that bound and are not shed again while actions hold the home)."""
    out = []
    for name, c in switches.items():
        on = readings.get(name, {}).get("on")
        a = appliance(schedule, name)
        priority = a.priority if a is not None and a.priority is not None else c.priority
        sheddable = c.sheddable and not (a is not None and a.never_shed)
        if a is not None and a.max_interruption_s is not None and name in shed_since:
            sheddable = sheddable and now - shed_since[name] < a.max_interruption_s
        sheddable = sheddable and name not in exempt
        out.append(Load(name, c.rated_power_kw, priority, sheddable, on if isinstance(on, bool) else None))
    return out


def sheddable_kw(current: list[Load]) -> float:
    """What the home claims it can shed now (telemetry's ``sheddable_kw``): :func:`available_kw`, to the watt."""
    return round(available_kw(current), 3)


def rated_sheddable_kw(switches: Iterable[DeviceConfig]) -> float:
    """Rated power of every load the installer configured as sheddable, on or off: what the home could shed at
    most, and so the bound of its claim (``sheddable_kw``)."""
    return round(sum(c.rated_power_kw for c in switches if c.sheddable), 3)


def shed_kw(current: list[Load], shed: Container[str]) -> float:
    """Rated power of the loads in ``shed``, to the watt."""
    return round(sum(ld.rated_kw for ld in current if ld.name in shed), 3)


def due_back(settings: ApplianceSchedule | None, shed_at: float | None, now: float) -> bool:
    """Whether a load an action holds off must come back on now: the customer forbids shedding it, or it has been
    off for the longest interruption the customer allows (``shed_at``: monotonic time it was shed)."""
    if settings is None or shed_at is None:
        return False
    return settings.never_shed or (settings.max_interruption_s is not None
                                   and now - shed_at >= settings.max_interruption_s)


def strictest(limits: Mapping[str, float]) -> str | None:
    """The action holding the home under the lowest limit (the first of equal ones); None when none is active."""
    return min(limits, key=lambda k: limits[k]) if limits else None


def failsafe_limit_kw(limit_kw: float, floor_kw: float) -> float:
    """The failsafe's import limit: the configured one, never below the legal floor."""
    return max(limit_kw, floor_kw)


def restore_due(last_restore: float, now: float, interval_s: float) -> bool:
    """Whether the next shed load may come back: ``interval_s`` after the last one (monotonic seconds)."""
    return now - last_restore >= interval_s


# -- commands ------------------------------------------------------------------------------------------------------


def command_expired(expires_at: float, now: float) -> bool:
    """A command that arrives at or after its expiry is refused (reported ``refused``, never executed)."""
    return expires_at <= now


def revision_step(held: int | None, revision: int) -> str:
    """What a command's revision means against the one stored: ``"new"`` (none stored), ``"newer"`` (it replaces
    the one in force), ``"same"`` (a redelivery: acknowledged, not executed twice) or ``"stale"`` (older than the
    one held: acknowledged, ignored, and said so)."""
    if held is None:
        return "new"
    if revision > held:
        return "newer"
    return "same" if revision == held else "stale"


def judge(reduction: bool, limit_kw: float, target_kw: float | None, shed: float, before_kw: float | None,
          after_kw: float | None, current: list[Load]) -> Verdict:
    """Whether an action achieved what it was asked: a load reduction by :func:`judge_reduction`, any import
    limit (emergency, failsafe, load shift) by :func:`judge_limit`."""
    if reduction:
        return judge_reduction(target_kw, shed, before_kw, after_kw, current)
    return judge_limit(limit_kw, after_kw, current)


# -- flexible appliances on the tariff -----------------------------------------------------------------------------

SLOT_S = 900.0
"""The length of one tariff slot a flexible appliance runs in."""


def flexible(configured: Iterable[FlexibleSchedule], schedule: Schedule | None,
             switches: Container[str]) -> list[FlexibleSchedule]:
    """Appliances to run in the cheapest slots: the customer's schedule where it says so (for a plug this gateway
    has), else the installer's configuration; a customer's appliance without ``run_s`` is not tariff-scheduled."""
    out = {f.device: f for f in configured}
    if schedule is not None:
        for a in schedule.appliances:
            if a.run_s and a.device in switches:
                out[a.device] = FlexibleSchedule(device=a.device, run_s=a.run_s,
                                                 allowed=a.allowed or [("00:00", "24:00")])
            elif a.device in out and not a.run_s:
                del out[a.device]
    return list(out.values())


def seconds_of_day(hhmm: str) -> float:
    """``"HH:MM"`` as seconds after midnight (``"24:00"`` is the day's end)."""
    hh, _, mm = hhmm.partition(":")
    return int(hh) * 3600.0 + int(mm) * 60.0


def day_windows(midnight: float, allowed: Iterable[tuple[str, str]]) -> list[tuple[float, float]]:
    """The ``allowed`` ``("HH:MM", "HH:MM")`` windows as times of the day starting at ``midnight``; a window that
    ends before it starts runs over midnight, so it is the day's start to its end plus its start to the day's end."""
    windows: list[tuple[float, float]] = []
    for a, b in allowed:
        s = midnight + seconds_of_day(a)
        e = midnight + seconds_of_day(b)
        windows += [(s, e)] if e > s else [(midnight, e), (s, midnight + 86_400)]
    return windows


def in_slot(slots: Iterable[float], t: float, slot_s: float = SLOT_S) -> bool:
    """Whether ``t`` falls in one of the slots starting at ``slots``: a flexible appliance should run now."""
    return any(s <= t < s + slot_s for s in slots)


@dataclass(slots=True)
class _HeldAck:
    msg_id: str
    request_id: str
    revision: int
    until: float


class AckHold:
    """The acknowledgements of stored commands, held for ``hold_s``: an outcome of the command stored meanwhile
    stands for its ``ack`` (the bridge closes a command on its outcome as its ack would, and never re-sends a closed
    one: docs/protocol.md, "An outcome acknowledges its command"), so only one uplink message answers it. An ``ack``
    not answered so goes at the hold's end, never later. ``hold_s`` <= 0: every ack goes at once, as before.

    Pure: the caller passes the (monotonic) time; nothing here reads a clock or sends anything."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self._held: dict[str, _HeldAck] = {}
        """By the command's ``msg_id``, in the order held (so the earliest hold ends first)."""

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, msg_id: str, request_id: str, revision: int, now: float) -> bool:
        """Hold the ack of command ``msg_id`` (revision ``revision`` of ``request_id``) until ``now + hold_s``;
        False when there is no hold (``hold_s`` <= 0): the caller acknowledges at once."""
        if self.hold_s <= 0:
            return False
        if msg_id not in self._held:
            self._held[msg_id] = _HeldAck(msg_id, request_id, revision, now + self.hold_s)
        return True

    def answered(self, request_id: str, revision: int) -> list[str]:
        """An outcome of ``request_id``'s revision ``revision`` is stored (it goes out from the stored outbox): the
        held acks it stands for (its request's, of that revision or older) are dropped; returns their ``msg_id``s."""
        gone = [m for m, h in self._held.items() if h.request_id == request_id and h.revision <= revision]
        for m in gone:
            del self._held[m]
        return gone

    def due(self, now: float) -> list[str]:
        """The acks whose hold has ended by ``now``, in the order held; removed (the caller sends them)."""
        out = [m for m, h in self._held.items() if h.until <= now]
        for m in out:
            del self._held[m]
        return out

    def next_at(self) -> float | None:
        """When the next hold ends (None: nothing held)."""
        return min((h.until for h in self._held.values()), default=None)
