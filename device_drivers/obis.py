"""Parse the lines of a P1 telegram (``OBIS(value*unit)``) into named quantities. Pure: no I/O.

Only the codes of :data:`OBIS_FIELDS` (``reference/devices.md``) are kept, converted to the field's unit
(a meter that sends W or Wh instead of kW or kWh is read right). A well-formed line with any other code is
ignored and counted as unknown; a line that is not ``OBIS(...)`` at all, or a known code whose value is not a
number in an accepted unit, is ignored and kept in :attr:`ParsedTelegram.malformed`. Lines that start with
``(`` continue the line before them (DSMR 2.2 and 3 put a gas reading there) and are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_KW: Mapping[str, float] = {"kW": 1.0, "W": 0.001}
_KWH: Mapping[str, float] = {"kWh": 1.0, "Wh": 0.001}
_V: Mapping[str, float] = {"V": 1.0}
_A: Mapping[str, float] = {"A": 1.0}
_NONE: Mapping[str, float] = {"": 1.0}


@dataclass(frozen=True)
class ObisField:
    """The name a known OBIS code is kept under, and the units it may come in (unit -> factor)."""

    name: str
    units: Mapping[str, float]


#: The OBIS codes kept, by code (without the optional ``*255`` suffix some meters add).
OBIS_FIELDS: dict[str, ObisField] = {
    "1-0:1.7.0": ObisField("import_power_kw", _KW),
    "1-0:2.7.0": ObisField("export_power_kw", _KW),
    "1-0:1.8.1": ObisField("import_energy_t1_kwh", _KWH),
    "1-0:1.8.2": ObisField("import_energy_t2_kwh", _KWH),
    "1-0:2.8.1": ObisField("export_energy_t1_kwh", _KWH),
    "1-0:2.8.2": ObisField("export_energy_t2_kwh", _KWH),
    "0-0:96.14.0": ObisField("tariff", _NONE),
    "1-0:21.7.0": ObisField("import_power_l1_kw", _KW),
    "1-0:41.7.0": ObisField("import_power_l2_kw", _KW),
    "1-0:61.7.0": ObisField("import_power_l3_kw", _KW),
    "1-0:32.7.0": ObisField("voltage_l1_v", _V),
    "1-0:31.7.0": ObisField("current_l1_a", _A),
    "0-0:17.0.0": ObisField("limiter_kw", _KW),
    "0-0:96.3.10": ObisField("breaker_state", _NONE),
}

_LINE = re.compile(r"(?P<code>\d+-\d+:\d+\.\d+\.\d+)(?:\*\d+)?(?P<groups>(?:\([^()]*\))+)")
_VALUE = re.compile(r"(?P<number>[+-]?\d+(?:\.\d+)?)(?:\*(?P<unit>[A-Za-z0-9]+))?")


@dataclass
class ParsedTelegram:
    """The known values of one telegram, and what was ignored."""

    header: str
    values: dict[str, float] = field(default_factory=dict)
    #: Lines that were not OBIS lines, or known codes with a value that could not be read.
    malformed: list[str] = field(default_factory=list)
    #: Well-formed lines with a code not in OBIS_FIELDS.
    unknown: int = 0


def parse_line(line: str) -> tuple[str, list[str]] | None:
    """Split ``code(v1)(v2)...`` into the code and its values; None when the line is not of that form."""
    match = _LINE.fullmatch(line)
    if match is None:
        return None
    return match["code"], match["groups"][1:-1].split(")(")


def parse_value(text: str, units: Mapping[str, float]) -> float | None:
    """Read ``number*unit`` (or a bare number where ``""`` is an accepted unit) into the field's unit."""
    match = _VALUE.fullmatch(text)
    if match is None:
        return None
    factor = units.get(match["unit"] or "")
    if factor is None:
        return None
    return float(match["number"]) * factor


def parse_telegram(telegram: bytes | str) -> ParsedTelegram:
    """Parse a whole telegram, ``/`` header to ``!`` line (its CRC is the framer's business)."""
    text = telegram.decode("ascii", errors="replace") if isinstance(telegram, bytes) else telegram
    lines = text.splitlines()
    header = lines[0].strip() if lines else ""
    parsed = ParsedTelegram(header=header)
    for raw in lines[1:]:
        line = raw.strip()
        if line.startswith("!"):
            break
        if not line or line.startswith("("):
            continue
        split = parse_line(line)
        if split is None:
            parsed.malformed.append(line)
            continue
        code, values = split
        known = OBIS_FIELDS.get(code)
        if known is None:
            parsed.unknown += 1
            continue
        value = parse_value(values[0], known.units) if len(values) == 1 else None
        if value is None:
            parsed.malformed.append(line)
            continue
        parsed.values[known.name] = value
    return parsed
