"""The one identifier rule of the platform: retailer, gateway, client, tariff and replica ids.

An id is also an MQTT username and a topic level (``mhp_wire.topics``) and a path segment of the HTTP API, so one
pattern serves all three: 1-64 characters of letters, digits, ``_``, ``.``, ``-``, starting with a letter or a
digit. Validate with :func:`is_id` (``mhp_wire.topics.check_id`` raises instead; ``mhp_wire.messages.Id`` is the
pydantic type of the wire models), or give :data:`ID_PATTERN` to ``Field``/``Path(pattern=...)``.
"""

from __future__ import annotations

import re

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
"""The pattern, for pydantic ``Field(pattern=...)``, FastAPI ``Path(pattern=...)`` and JSON schemas."""
ID_RE = re.compile(ID_PATTERN)


def is_id(value: str) -> bool:
    """Whether ``value`` is a valid id."""
    return ID_RE.fullmatch(value) is not None
