"""``sim.store_probe``: the bridge store's calls counted per run of a fan-out (issue 14, seventh round)."""

from __future__ import annotations

from sim.store_probe import counts


def test_calls_are_counted_in_the_run_they_began_in() -> None:
    results = {"runs": [{"post_at": 100.0, "t100_s": 0.5}, {"post_at": 200.0, "t100_s": 1.0}]}
    lines = ["next_hub_due 100.1 100.2", "next_hub_due 100.4 100.9", "due_outbox 99.9 100.1",  # began before run 1
             "due_commands 200.5 200.6", "next_hub_due 201.5 201.6"]  # after run 2's 100 %
    got = counts(results, lines)
    assert got[0] == {"next_hub_due": 2}
    assert got[1] == {"due_commands": 1}
