"""Acknowledgements from a retailer's bridge partitioned by gateway (issue 14; ``docs/decisions.md``).

Every partition of a retailer's bridge receives every message the hub sends that retailer and acknowledges it once
its own share is stored, saying which partition of how many it is (``Ack.partition``). A message is acknowledged
by the retailer, and the hub stops re-sending it, only when every partition ``0..K-1`` has acknowledged it; K is
learnt from the acknowledgements themselves (no hub configuration). An acknowledgement without a partition (an
unpartitioned bridge) acknowledges the message at once, as before.

Pure: the hub keeps what :func:`acknowledged` returns on the message's outbox item, in memory only (a restarted hub
sends the message again and every partition acknowledges it again, deduplicating what it stored).
"""

from __future__ import annotations

from collections.abc import Mapping

from mhp_wire.messages import AckPartition

Seen = Mapping[int, frozenset[int]]
"""Per partition count K (as the acknowledgements said it), the partition indexes that acknowledged."""


def acknowledged(seen: Seen, partition: AckPartition | None) -> tuple[dict[int, frozenset[int]], bool]:
    """``seen`` with ``partition``'s acknowledgement added, and whether the message is now acknowledged by the
    whole retailer: every partition of the count this acknowledgement gives. Counts are kept apart, so that
    acknowledgements of a retailer re-partitioned from K to K' never mix (the stated procedure stops all K first)."""
    if partition is None:
        return dict(seen), True
    indexes = seen.get(partition.of, frozenset()) | {partition.index}
    return {**seen, partition.of: indexes}, len(indexes) == partition.of
