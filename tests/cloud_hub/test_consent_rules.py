"""The pure rules added to customer consent after issue 18: billing data coarsened to a permission's resolution
(``consent.coarsen``)."""

from __future__ import annotations

from typing import Any

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
