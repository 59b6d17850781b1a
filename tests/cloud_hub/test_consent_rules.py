"""The pure rules added to customer consent after issue 18: billing data coarsened to a permission's resolution
(``consent.coarsen``), and the decision window counted in working days (``consent.decision_deadline``). Dates are
relative to now: the Monday of next week, in the zone the days are counted in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from cloud_hub import consent


def block(start: float, res: int, values: list[float], quality: str = "measured") -> dict[str, Any]:
    return {"start": start, "resolution_s": res, "values_kwh": values, "quality": quality, "version": 1,
            "corrected": False}


@pytest.mark.parametrize(("blocks", "permitted", "kept", "withheld"), [
    # as fine as permitted or coarser: served as stored
    ([block(0, 3600, [1.0, 2.0])], 3600, [(0, 3600, [1.0, 2.0])], []),
    ([block(0, 3600, [1.0])], 900, [(0, 3600, [1.0])], []),
    # finer: summed in whole groups from the block's start; a short last group is withheld
    ([block(0, 900, [0.25] * 8)], 3600, [(0, 3600, [1.0, 1.0])], []),
    ([block(0, 900, [0.25] * 6)], 3600, [(0, 3600, [1.0])], [(3600, 5400, 900)]),
    ([block(0, 900, [0.25] * 3)], 3600, [], [(0, 2700, 900)]),
    # a permitted resolution that is not a multiple: the next whole multiple (never finer than permitted)
    ([block(0, 900, [1.0] * 4)], 1000, [(0, 1800, [2.0, 2.0])], []),
    # blocks are coarsened each from its own start (a change of quality starts a new block)
    ([block(0, 900, [0.5] * 4), block(3600, 900, [0.25] * 4, "estimated")], 3600,
     [(0, 3600, [2.0]), (3600, 3600, [1.0])], []),
    ([], 3600, [], []),
])
def test_coarsen(blocks: list[dict[str, Any]], permitted: int, kept: list[tuple[float, int, list[float]]],
                 withheld: list[tuple[float, float, int]]) -> None:
    got, held = consent.coarsen(blocks, permitted)
    assert [(b["start"], b["resolution_s"], b["values_kwh"]) for b in got] == kept
    assert [(w["start"], w["end"], w["resolution_s"]) for w in held] == withheld
    assert all(g["quality"] == b["quality"] for g, b in zip(got, blocks, strict=False))


def next_monday(tz: tzinfo) -> datetime:
    """Monday 00:00 of next week in ``tz`` (wall clock)."""
    today = datetime.now(tz).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + timedelta(days=7 - today.weekday())


MON, TUE, WED, THU, FRI, SAT, SUN = range(7)


@pytest.mark.parametrize("tz", [UTC, ZoneInfo("Europe/Oslo")], ids=["UTC", "Oslo"])
@pytest.mark.parametrize(("made", "days", "lapses"), [
    # (weekday, hour) made -> working days -> (days after that Monday, hour) it lapses
    ((MON, 10), 3, (THU, 10)),
    ((MON, 0), 3, (THU, 0)),
    ((WED, 10), 3, (7 + MON, 10)),          # over the weekend: Thu, Fri, Mon
    ((THU, 10), 3, (7 + TUE, 10)),
    ((FRI, 10), 3, (7 + WED, 10)),
    ((FRI, 0), 3, (7 + WED, 0)),
    ((SAT, 10), 3, (7 + THU, 0)),           # made on a weekend: counted from Monday 00:00
    ((SUN, 23), 3, (7 + THU, 0)),
    ((FRI, 10), 1, (7 + MON, 10)),
    ((SAT, 10), 0, (7 + MON, 0)),
    ((TUE, 10), 0, (TUE, 10)),
    ((MON, 10), 10, (14 + MON, 10)),        # two whole weeks
])
def test_the_decision_window_counts_working_days(tz: tzinfo, made: tuple[int, int], days: int,
                                                 lapses: tuple[int, int]) -> None:
    monday = next_monday(tz)

    def at(day: int, hour: int) -> float:  # wall-clock arithmetic in tz, as the rule counts
        return (monday + timedelta(days=day, hours=hour)).timestamp()

    assert consent.decision_deadline(at(*made), days, tz) == at(*lapses)


def test_a_new_request_lapses_after_three_working_days() -> None:
    friday = (next_monday(UTC) + timedelta(days=FRI, hours=10)).timestamp()
    p = consent.new_permission("perm-1", "p1", "c1", consent.PermissionAsk(
        "an offer", [consent.Scope.BILLING_DATA], 3600, friday - 86_400, friday, friday + 30 * 86_400), friday)
    assert p.decide_by == friday + 5 * 86_400, "Friday 10:00 -> Wednesday 10:00"
    assert consent.effective(p, friday + 4 * 86_400).state is consent.State.SENT_TO_PA, "not on Tuesday"
    lapsed = consent.effective(p, friday + 5 * 86_400)
    assert lapsed.state is consent.State.TIMED_OUT and lapsed.history[-1].at == p.decide_by
