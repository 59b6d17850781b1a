"""The console's form reading and request windows (pure), in tables: a revision's fields checked by the hub's own
revision model, and the window each flexibility request is drawn over."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dso_console.app import band_window
from dso_console.forms import FormProblems, build_revision

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.mark.parametrize(("form", "body"), [
    ({"power_limit_kw": " 1,5 "}, {"power_limit_kw": 1.5}),
    ({"duration_s": "600", "reason": "", "tz": "UTC"}, {"duration_s": 600}),
    # A fixed date in a pure conversion (no clock, no "in the past" rule here): it cannot expire; May has Lisbon's
    # summer offset whatever the year.
    ({"start": "2031-05-01T10:00", "tz": "Europe/Lisbon"}, {"start": "2031-05-01T10:00:00+01:00"}),
    ({"client_ids": "c1, c2\nc1"}, {"client_ids": ["c1", "c2"]}),
])
def test_a_revision_form_becomes_the_fields_that_change(form: dict[str, Any], body: dict[str, Any]) -> None:
    assert build_revision(form) == body


@pytest.mark.parametrize(("form", "fields"), [
    ({}, {""}),  # the hub's model: "give at least one field to change"
    ({"power_limit_kw": "-2"}, {"power_limit_kw"}),
    ({"duration_s": "1.5", "kind": "emergency"}, {"duration_s"}),
    ({"tariff_id": "t", "valid_to": "x"}, {"tariff_id", "valid_to"}),
    ({"client_ids": "c1 bad!id"}, {"client_ids"}),
    ({"reduction_kw": 5}, {"reduction_kw"}),
    ({"power_limit_kw": "1", "tz": "Nowhere/Atlantis"}, {"tz"}),
])
def test_a_bad_revision_form_names_each_problem_by_field(form: dict[str, Any], fields: set[str]) -> None:
    with pytest.raises(FormProblems) as caught:
        build_revision(form)
    assert {p["field"] for p in caught.value.problems} == fields
    assert all(p["message"] for p in caught.value.problems)


@pytest.mark.parametrize(("kind", "body", "window"), [
    ("emergency", {"start": NOW.isoformat(), "duration_s": 600}, (0, 600)),
    ("load_reduction", {"start": (NOW + timedelta(hours=1)).isoformat(), "duration_s": 60}, (3600, 3660)),
    ("load_shift", {"window_start": NOW.isoformat(), "window_end": (NOW + timedelta(hours=2)).isoformat()},
     (0, 7200)),
    ("emergency", {"start": "not a time", "duration_s": 600}, None),
    ("emergency", {"duration_s": 600}, None),
    ("billing", {"period_start": NOW.isoformat()}, None),
])
def test_each_flexibility_request_is_drawn_over_its_window(kind: str, body: dict[str, Any],
                                                           window: tuple[int, int] | None) -> None:
    expected = None if window is None else (NOW.timestamp() + window[0], NOW.timestamp() + window[1])
    assert band_window(kind, body) == expected
