"""Billing data as the retailer exports it: one row per reading interval of each client (pure, no I/O).

The hub delivers each client's readings of a billed period in ``billing_data`` messages (blocks of consecutive
values); the bridge stores them as received (``BridgeStore.store_billing``). Exports flatten the blocks into
intervals: ``client_id``, ``start``, ``end`` (RFC 3339 with offset), ``energy_kwh``, ``quality`` (``measured`` or
``estimated``), ``request_id`` (the hub's billing request that delivered it), ``resolution_s``, ``version`` (uploads
of that interval at the DSO so far), ``corrected`` and ``received_at``. An interval delivered more than once
(the DSO asked again, or corrected it) is exported once: as last received.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

COLUMNS = ("client_id", "start", "end", "energy_kwh", "quality", "request_id", "resolution_s", "version",
           "corrected", "received_at")
"""The columns of the CSV export and the keys of each JSON object, in this order."""


@dataclass(frozen=True, slots=True)
class BillingReading:
    """The energy of one client in one reading interval, as the hub delivered it."""

    client_id: str
    start: datetime
    end: datetime
    energy_kwh: float
    quality: str
    request_id: str
    resolution_s: int
    version: int
    corrected: bool
    received_at: datetime

    def record(self) -> dict[str, Any]:
        """The reading as a JSON object (times RFC 3339 with offset)."""
        out = asdict(self)
        for k in ("start", "end", "received_at"):
            out[k] = out[k].isoformat()
        return out


def readings_of(request_id: str, client_id: str, period_start: datetime, period_end: datetime,
                blocks: Iterable[dict[str, Any]], received_at: float) -> list[BillingReading]:
    """The intervals of one client's delivered blocks (``ReadingBlock`` as JSON) inside its delivered period."""
    got = datetime.fromtimestamp(received_at, UTC)
    out = []
    for b in blocks:
        first = datetime.fromisoformat(b["start"]).astimezone(UTC)
        step = timedelta(seconds=b["resolution_s"])
        version = int(b.get("version", 1))
        for i, kwh in enumerate(b["values_kwh"]):
            start = first + i * step
            if start < period_start or start + step > period_end:
                continue
            out.append(BillingReading(client_id, start, start + step, float(kwh), b.get("quality", "measured"),
                                      request_id, int(b["resolution_s"]), version,
                                      bool(b.get("corrected")) or version > 1, got))
    return out


def select(readings: Iterable[BillingReading], start: datetime, end: datetime,
           client_ids: set[str] | None = None) -> list[BillingReading]:
    """The intervals that start in ``[start, end)`` (of ``client_ids`` only, when given), each once as last
    received (then highest version), ordered by client and time."""
    latest: dict[tuple[str, datetime], BillingReading] = {}
    for r in readings:
        if not start <= r.start < end or (client_ids is not None and r.client_id not in client_ids):
            continue
        key = (r.client_id, r.start)
        held = latest.get(key)
        if held is None or (r.received_at, r.version) >= (held.received_at, held.version):
            latest[key] = r
    return [latest[k] for k in sorted(latest)]


def to_csv(readings: Iterable[BillingReading]) -> str:
    """CSV with a header row of :data:`COLUMNS`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in readings:
        writer.writerow(r.record())
    return buf.getvalue()


def to_json(readings: Iterable[BillingReading]) -> str:
    """A JSON list of objects with the keys of :data:`COLUMNS`."""
    return json.dumps([r.record() for r in readings], indent=1) + "\n"
