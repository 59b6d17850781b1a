"""The one identifier rule of the platform: retailer, gateway, client, tariff and replica ids.

An id is also an MQTT username and a topic level (``mhp_wire.topics``) and a path segment of the HTTP API, so one
pattern serves all three: 1-64 characters of letters, digits, ``_``, ``.``, ``-``, starting with a letter or a
digit. Validate with :func:`is_id` (``mhp_wire.topics.check_id`` raises instead; ``mhp_wire.messages.Id`` is the
pydantic type of the wire models), or give :data:`ID_PATTERN` to ``Field``/``Path(pattern=...)``.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
from collections.abc import Callable

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
"""The pattern, for pydantic ``Field(pattern=...)``, FastAPI ``Path(pattern=...)`` and JSON schemas."""
ID_RE = re.compile(ID_PATTERN)
ID_MAX_CHARS = 64
"""The longest id :data:`ID_PATTERN` takes."""


def is_id(value: str) -> bool:
    """Whether ``value`` is a valid id."""
    return ID_RE.fullmatch(value) is not None


class MsgIds:
    """Message ids for a hot path, cheaper than :func:`mhp_wire.messages.new_id` (a ``uuid4`` each, ~4-8 µs):
    a random prefix drawn once per process (96 bits from :mod:`secrets`, drawn again in a forked child) and a
    counter, ``<24 hex>-<counter in hex>``: at most 42 characters, within a ``msg_id``'s 64 with room for
    prefixes such as ``dlv-``. Unique across restarts and processes as long as no two processes draw the same
    prefix (a chance of about n²/2⁹⁷ for n processes), which is what a ``uuid4`` per message relies on too; the
    counter only has to be unique within one process. Not secret and not unguessable beyond the prefix: a
    ``msg_id`` only names a message for its acknowledgement."""

    def __init__(self) -> None:
        self._prefix = ""
        self._next: Callable[[], int] = itertools.count(1).__next__
        self.reseed()

    def reseed(self) -> None:
        """Draw a new prefix and start the counter again (at start and in a forked child)."""
        self._prefix = secrets.token_hex(12) + "-"
        self._next = itertools.count(1).__next__

    def __call__(self) -> str:
        """A fresh id."""
        return f"{self._prefix}{self._next():x}"


msg_ids = MsgIds()
"""The process's :class:`MsgIds`."""
os.register_at_fork(after_in_child=msg_ids.reseed)
