"""Count the bridge's store calls during a fan-out (issue 14, seventh round): a measurement, not a part.

Put this directory on ``PYTHONPATH`` with ``MHP_PROBE_DIR`` set, and every Python process of an experiment started
from there loads :mod:`sitecustomize` below, which wraps :class:`retailer_bridge.store.BridgeStore`'s methods so
that each call writes one line ``name start end`` (epoch seconds) to ``MHP_PROBE_DIR/probe-<pid>.log``::

    MHP_PROBE_DIR=/tmp/probe PYTHONPATH=sim/store_probe:. python -m sim.experiment.cli fanout --out OUT \\
        --gateways 1000 --runs 3
    python -m sim.store_probe OUT /tmp/probe

prints, per run, how many calls of each kind began between the run's POST and its 100 % executed. The product
never imports this.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

WRAPPED = ("accept_request", "due_commands", "mark_sent", "apply_reports", "postpone_hub_resends", "due_outbox",
           "mark_outbox_sent", "next_hub_due", "next_gateway_due", "ack_outbox")
"""The :class:`~retailer_bridge.store.BridgeStore` methods counted."""


def counts(results: dict[str, object], lines: list[str]) -> list[Counter[str]]:
    """Per run of ``results`` (``results.json``), the calls that began between its POST and its 100 % executed."""
    runs = [(float(r["post_at"]), float(r["post_at"]) + float(r["t100_s"] or 0.0))
            for r in results["runs"]]  # type: ignore[attr-defined]
    per: list[Counter[str]] = [Counter() for _ in runs]
    for line in lines:
        name, start, _ = line.split()
        t = float(start)
        for i, (a, b) in enumerate(runs):
            if a <= t <= b:
                per[i][name] += 1
    return per


def main(argv: list[str] | None = None) -> int:
    """``python -m sim.store_probe OUT PROBE_DIR``."""
    out, probe = (Path(a) for a in (argv if argv is not None else sys.argv[1:]))
    results = json.loads((out / "results.json").read_text())
    lines = [ln for f in sorted(probe.glob("probe-*.log")) for ln in f.read_text().splitlines() if ln]
    per = counts(results, lines)
    for name in WRAPPED:
        print(f"{name:22s}", " / ".join(str(c[name]) for c in per))
    return 0
