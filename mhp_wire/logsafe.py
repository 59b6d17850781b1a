"""Text from outside (topics, ids, error texts, messages of other parties) made safe for one log line.

Anything a peer sends may be long, and may hold newlines, terminal escapes or other control characters that forge
log lines or garble a terminal. :func:`outside` clips such a value and escapes what is not printable the way
``repr`` does (``\\n``, ``\\x1b``, ``\\u2028``), so a logged value is always one bounded line. :class:`Once` remembers
which keys (a gateway, a client) were already logged, so that a condition repeated by every message of a party is
logged once, not once per message.
"""

from __future__ import annotations

CLIP = 120
"""Characters of an outside value kept in a log line by default."""


def _escape(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def outside(value: object, limit: int = CLIP) -> str:
    """``value`` (from outside) as one log-safe line: at most ``limit`` characters of it, every non-printable
    character escaped as in ``repr``, and when clipped the original length noted.

    Only the first ``limit`` characters are looked at, so a megabyte costs what ``limit`` characters cost.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return _escape(text)
    return f"{_escape(text[:limit])}... ({len(text)} characters)"


class Once:
    """Which keys have been logged already; at most ``max_keys`` are remembered (the oldest are forgotten first),
    so that a party inventing keys cannot grow it without bound."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self.max_keys = max_keys
        self._seen: dict[object, None] = {}

    def first(self, key: object) -> bool:
        """True the first time ``key`` is seen (log it then), False afterwards."""
        if key in self._seen:
            return False
        if len(self._seen) >= self.max_keys:
            del self._seen[next(iter(self._seen))]
        self._seen[key] = None
        return True
