"""The garbage collector of a long-running service process, tuned for throughput.

CPython's cyclic collector runs a young collection every 700 new container objects and, every hundred of those,
a full one over every object the process holds. A bridge in a fan-out holds hundreds of thousands of long-lived
objects (its customers, gateways' states, gmqtt's sessions) and allocates a few hundred per gateway message, so
the full collections walked the whole heap again and again: in ``sim/bench_bridge_inbound.py`` at 10,000 gateways
the collector took 0.6-1.6 s of CPU, about a third of the bridge's (docs/performance.md, "Issue 14, fourth
round"). Reference counting still frees everything acyclic at once; the collector only finds cycles, which a
larger young generation finds as well, later.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000
"""New container objects between two young collections (CPython's default: 700)."""


def tune_for_throughput(young: int = YOUNG_THRESHOLD) -> None:
    """Call once after start-up: what exists now (modules, settings, customers) moves to the permanent generation,
    which no collection walks (:func:`gc.freeze`), and young collections run every ``young`` new objects; the
    older generations keep their own thresholds."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)
