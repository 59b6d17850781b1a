"""Small helpers every use case shares: times, chunks of ids."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

log = logging.getLogger(__name__)


def chunks(items: list[str], size: int) -> list[list[str]]:
    """``items`` in consecutive parts of at most ``size``."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def iso(ts: float | None) -> str | None:
    """Epoch seconds as RFC 3339 (UTC)."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def ts(value: datetime | float | str) -> float:
    if isinstance(value, str):
        return datetime.fromisoformat(value).timestamp()
    return value.timestamp() if isinstance(value, datetime) else float(value)

