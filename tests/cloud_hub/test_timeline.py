"""Supplier periods and consumption series, as tables of cases."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_hub.book import reduction_outcome
from cloud_hub.lifecycle import RequestState, combine
from cloud_hub.timeline import (
    _clip_points,
    choose_for_reduction,
    clip_blocks,
    covered_by,
    profile,
    reduction_targets,
    supplier_at,
    supply_spans,
)
from mhp_wire.messages import ClientState as C

PERIODS = [{"valid_from": 100.0, "retailer_id": "r1"}, {"valid_from": 200.0, "retailer_id": "r2"},
           {"valid_from": 300.0, "retailer_id": "r1"}]


@pytest.mark.parametrize(("at", "who"), [(50, None), (100, "r1"), (199.9, "r1"), (200, "r2"), (1e9, "r1")])
def test_supplier_at(at: float, who: str | None) -> None:
    assert supplier_at(PERIODS, at) == who


@pytest.mark.parametrize(
    ("start", "end", "spans"),
    [(0, 50, []), (0, 150, [("r1", 100, 150)]), (150, 250, [("r1", 150, 200), ("r2", 200, 250)]),
     (120, 180, [("r1", 120, 180)]), (250, 350, [("r2", 250, 300), ("r1", 300, 350)])],
)
def test_supply_spans(start: float, end: float, spans: list[tuple[str, float, float]]) -> None:
    assert supply_spans(PERIODS, start, end) == spans


def test_covered_only_by_one_supplier_for_the_whole_range() -> None:
    assert covered_by(supply_spans(PERIODS, 120, 180), "r1", 120, 180)
    assert not covered_by(supply_spans(PERIODS, 150, 250), "r1", 150, 250)
    assert not covered_by(supply_spans(PERIODS, 50, 150), "r1", 50, 150), "unsupplied time is nobody's"


def block(start: float, values: list[float], uploaded: float, quality: str = "measured", version: int = 1,
          corrected: bool = False) -> dict:  # type: ignore[type-arg]
    return {"start": start, "resolution_s": 10, "values_kwh": values, "quality": quality, "version": version,
            "uploaded_at": uploaded, "corrected": corrected}


def test_profile_sums_buckets_marks_estimates_and_gaps() -> None:
    blocks = [block(0, [1, 1, 1, 1], 1), block(40, [2, 2], 2, quality="estimated")]
    assert profile(blocks, 0, 80, 20) == [
        {"start": 0, "kwh": 2.0, "quality": "measured", "complete": True},
        {"start": 20, "kwh": 2.0, "quality": "measured", "complete": True},
        {"start": 40, "kwh": 4.0, "quality": "estimated", "complete": True},
    ]


def test_a_later_upload_replaces_what_it_covers_and_is_flagged_corrected() -> None:
    blocks = [block(0, [1, 1, 1, 1], 1), block(10, [5, 5], 2, corrected=True)]
    assert [p["kwh"] for p in profile(blocks, 0, 40, 10)] == [1, 5, 5, 1]
    clipped = clip_blocks(blocks, 0, 40)
    assert [(b["start"], b["values_kwh"], b["corrected"]) for b in clipped] == [
        (0, [1], False), (10, [5, 5], True), (30, [1], False)]


@st.composite
def disjoint_blocks(draw: st.DrawFn) -> list[dict]:  # type: ignore[type-arg]
    t, out = draw(st.sampled_from([0, 0.0, 1_700_000_000.0])) + draw(st.integers(-100, 100)), []
    for _ in range(draw(st.integers(0, 4))):
        t += draw(st.integers(0, 20))
        res, n = draw(st.sampled_from([1, 3, 900])), draw(st.integers(0, 6))
        out.append({"start": t, "resolution_s": res, "values_kwh": [float(i) for i in range(n)],
                    "quality": draw(st.sampled_from(["measured", "estimated"])), "version": draw(st.integers(1, 2)),
                    "corrected": draw(st.booleans()), "uploaded_at": draw(st.floats(0, 10))})
        t += res * n
    return draw(st.permutations(out))


@given(disjoint_blocks(), st.one_of(st.integers(-150, 150), st.floats(-150, 150)), st.floats(0, 150),
       st.sampled_from([0, 1_700_000_000.0]))
def test_clipping_disjoint_blocks_whole_equals_clipping_value_by_value(blocks: list[dict],  # type: ignore[type-arg]
                                                                       start: float, span: float,
                                                                       offset: float) -> None:
    start += offset
    assert clip_blocks(blocks, start, start + span) == _clip_points(blocks, start, start + span)


def test_clip_keeps_only_the_period() -> None:
    assert [(b["start"], b["values_kwh"]) for b in clip_blocks([block(0, [1, 2, 3, 4], 1)], 10, 30)] == [
        (10, [2, 3])]


@pytest.mark.parametrize(
    ("available", "need", "chosen"),
    [({"a": 3, "b": 2, "c": 1}, 4, ["a", "b"]), ({"a": 3, "b": 3}, 3, ["a"]), ({"a": 1}, 5, ["a"]),
     ({}, 1, []), ({"a": 0, "b": 2}, 5, ["b"])],
)
def test_choose_most_available_first(available: dict[str, float], need: float, chosen: list[str]) -> None:
    assert choose_for_reduction(available, need) == chosen


@pytest.mark.parametrize(
    ("available", "need", "targets"),
    [({"a": 3, "b": 2, "c": 1}, 4, {"a": 3, "b": 1}), ({"a": 3, "b": 3}, 3, {"a": 3}), ({"a": 1}, 5, {"a": 1}),
     ({}, 1, {}), ({"a": 2.5, "b": 4}, 2, {"b": 2}), ({"a": 0.1, "b": 0.2}, 0.25, {"b": 0.2, "a": 0.05})],
)
def test_each_chosen_client_sheds_what_it_offered_and_the_last_only_the_rest(
        available: dict[str, float], need: float, targets: dict[str, float]) -> None:
    assert reduction_targets(available, choose_for_reduction(available, need), need) == targets


@pytest.mark.parametrize(
    ("selection", "counts", "state"),
    [({"chosen": ["a", "b"], "covered": True}, {C.EXECUTED: 2, C.UNAVAILABLE: 1}, RequestState.COMPLETED),
     ({"chosen": ["a", "b"], "covered": False}, {C.EXECUTED: 2}, RequestState.PARTIALLY_COMPLETED),
     ({"chosen": ["a", "b"], "covered": True}, {C.EXECUTED: 1, C.UNREACHABLE: 1}, RequestState.PARTIALLY_COMPLETED),
     ({"chosen": ["a"], "covered": True}, {C.REFUSED: 1}, RequestState.FAILED)],
)
def test_reduction_outcome(selection: dict, counts: dict, state: RequestState) -> None:  # type: ignore[type-arg]
    assert reduction_outcome(selection, Counter(counts)) is state


@pytest.mark.parametrize(
    ("states", "combined"),
    [([C.SENT, C.PENDING], C.PENDING), ([C.ACKNOWLEDGED, C.SENT], C.SENT),
     ([C.ACKNOWLEDGED, C.ACKNOWLEDGED], C.ACKNOWLEDGED), ([C.ACKNOWLEDGED, C.EXPIRED], C.EXPIRED)],
)
def test_combine_deliveries_of_one_client(states: list[C], combined: C) -> None:
    assert combine(states) is combined
