"""The service process's garbage collector tuning (``mhp_wire.gc_tuning``), in a process of its own: it changes
process-wide settings, which the test process must keep as they are."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json
from mhp_wire.gc_tuning import YOUNG_THRESHOLD, tune_for_throughput
before = gc.get_threshold()
held = [{"customer": i} for i in range(20_000)]   # start-up state: settings, customers
tune_for_throughput()
frozen = gc.get_freeze_count()
cycle = []; cycle.append(cycle); del cycle        # cyclic garbage made after start-up is still found
found = gc.collect()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": frozen, "young": YOUNG_THRESHOLD,
                  "found": found, "held": len(held)}))
"""


def test_start_up_state_is_frozen_and_young_collections_are_rarer() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout)
    assert seen["before"][0] == 700  # CPython's default, which the tuning replaces
    assert seen["after"] == [seen["young"], seen["before"][1], seen["before"][2]]
    assert seen["frozen"] >= 20_000  # the objects alive at start-up are no longer walked by any collection
    assert seen["found"] >= 1 and seen["held"] == 20_000
