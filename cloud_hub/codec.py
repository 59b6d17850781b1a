"""The JSON codec of the hub's stored cells (request rows, change-feed events): orjson.

The stored bytes are those ``json.dumps(obj, separators=(",", ":"), default=str)`` wrote before (datetimes still go
through ``str``, keys that are not strings are written as strings), except that text outside ASCII is written as
UTF-8 rather than ``\\uXXXX`` escapes and a float may be spelt shorter (``1e-5``); both decode to the same values,
so rows written by either load unchanged. Why orjson: encoding and decoding these cells was the largest part of the
hub's own CPU per client (``docs/performance.md``, "Issue 14, third round"); orjson does each in about a ninth of
the stdlib's time.
"""

from __future__ import annotations

from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME


def dumps(obj: Any) -> bytes:
    """One cell's bytes."""
    return orjson.dumps(obj, default=str, option=_OPTIONS)


def loads(raw: bytes | str) -> Any:
    """One cell's value."""
    return orjson.loads(raw)
