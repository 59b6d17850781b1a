"""E-Redes (EDP Distribuição) smart meter, read through its HAN port: one DLMS object per Modbus request.

The wire (``reference/devices.md``): Modbus RTU on RS-485, unit id 1, 9600 8N1 — some ZIV meters are reported
to need two stop bits (``stopbits = 2``). Function 04 where the "register" address is the *index of a DLMS
object* and the count is always 1; the meter answers with the object's own bytes, 4 for a 32-bit object.
:meth:`ModbusBus.read_input_object` carries that answer up as bytes; this module gives them meaning.

Layers: framing and request/response are :mod:`.modbus` (pymodbus with a response decoder that keeps the raw
bytes); :func:`decode_object` and :class:`PollPlan` are pure; :class:`EredesHanMeter` is the device.

Requests per poll. The meter answers one object per request and needs a quiet line between requests (field
configurations throttle it at 200 ms per command; the driver's default ``gap_ms`` is 100), so a poll does not
read everything:

* every poll reads import and export power (2 requests: what the gateway's control decisions use);
* plus one of four slow groups, in turn (2 requests): voltage and current; import and export energy; tariff
  period and the demand-control threshold of that period; frequency and breaker state.

That is **4 requests per poll**, every value at most 4 polls old. The first poll, and the first poll after a
failed one, read all **10** objects so no reading is ever missing or left from before an outage. Pass
``slow_groups_per_poll=4`` to read everything on every poll.

Transports: ``modbus-rtu`` on the RS-485 adapter, or ``modbus-rtu-over-tcp`` through a transparent
serial-to-Ethernet converter. ``modbus-tcp`` through a Modbus TCP gateway works only with a gateway that passes
the answer on by its byte count or by the line falling quiet; one that waits for ``2 * count`` bytes cuts a 32-bit
answer short (seen as a timeout or a wrong-size error): put such a converter in transparent mode instead.

Uncertain parts, and what the driver does about them: the map is the field-reported one (the official map is
E-Redes document DEF-C44-509/N) and lives in :class:`HanMap`, replaceable per meter; frequency, tariff period
(with its threshold) and breaker state are *optional*: a meter that answers "illegal data address" for one of
them has it dropped from later polls and its readings left out (logged once at WARNING). Enumerations (tariff
period, breaker state) are read from a one-byte answer, or from two bytes either as the high byte (the
documented format of the tariff period) or as a 16-bit value. A value outside its documented range, or an
answer of the wrong size, is a :class:`DeviceError` naming the index and the bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from .backoff import Backoff
from .config import DeviceConfig
from .device import ModbusDevice
from .errors import DeviceError, DeviceExceptionResponse
from .modbus import ModbusBus

_log = logging.getLogger(__name__)

ObjectKind = Literal["u16", "u32", "enum"]

#: Modbus exception code a meter gives for an index it does not have.
ILLEGAL_DATA_ADDRESS = 2
#: Number of demand-control thresholds (tariff periods T1..T6).
N_TARIFF_PERIODS = 6


@dataclass(frozen=True)
class HanObject:
    """One object the driver reads: its index, its format and the divisor into the reading's unit."""

    index: int
    kind: ObjectKind
    divisor: int = 1


@dataclass(frozen=True)
class HanMap:
    """Index of each object the driver reads; defaults from ``reference/devices.md``."""

    tariff_period: int = 0x000B
    #: Threshold of tariff period T1; T2..T6 follow at the next indexes.
    first_threshold: int = 0x000C
    import_energy: int = 0x0016
    export_energy: int = 0x0017
    voltage_l1: int = 0x006C
    current_l1: int = 0x006D
    #: Total import / export active power (on a single-phase meter the same as L1's, 0x0073).
    import_power: int = 0x0079
    export_power: int = 0x007A
    frequency: int = 0x007F
    breaker: int = 0x0084

    def objects(self) -> dict[str, HanObject]:
        """Every quantity a poll may read, by name; ``threshold`` is the T1 one (see :meth:`threshold`)."""
        return {
            "import_power": HanObject(self.import_power, "u32"),  # W
            "export_power": HanObject(self.export_power, "u32"),  # W
            "voltage": HanObject(self.voltage_l1, "u16", 10),  # V
            "current": HanObject(self.current_l1, "u16", 10),  # A
            "import_energy": HanObject(self.import_energy, "u32", 1000),  # Wh -> kWh
            "export_energy": HanObject(self.export_energy, "u32", 1000),  # Wh -> kWh
            "tariff_period": HanObject(self.tariff_period, "enum"),
            "threshold": HanObject(self.first_threshold, "u32", 1000),  # VA -> kVA
            "frequency": HanObject(self.frequency, "u16", 10),  # Hz
            "breaker": HanObject(self.breaker, "enum"),
        }

    def threshold(self, period: int) -> HanObject:
        """The demand-control threshold of tariff `period` (1..6)."""
        if not 1 <= period <= N_TARIFF_PERIODS:
            raise ValueError(f"tariff period {period} outside 1..{N_TARIFF_PERIODS}")
        return HanObject(self.first_threshold + period - 1, "u32", 1000)


#: Plausible range of each enumeration.
ENUM_RANGES: dict[str, range] = {"tariff_period": range(1, N_TARIFF_PERIODS + 1), "breaker": range(3)}


def decode_object(obj: HanObject, data: bytes) -> int:
    """The integer an object's answer holds (before scaling); DeviceError for a size that does not fit."""
    expected = {"u16": (2,), "u32": (4,), "enum": (1, 2)}[obj.kind]
    if len(data) not in expected:
        raise DeviceError(
            f"object {obj.index:#06x} ({obj.kind}): expected {' or '.join(map(str, expected))} bytes, "
            f"got {len(data)} ({data.hex(' ') or 'none'})"
        )
    if obj.kind == "enum" and len(data) == 2 and data[1] == 0:
        return data[0]  # the value in the high byte (the documented format of the tariff period)
    return int.from_bytes(data, "big")


class PollPlan:
    """Which quantities each poll reads: the fast ones always, the slow groups in turn (a pure policy)."""

    FAST: ClassVar[tuple[str, ...]] = ("import_power", "export_power")
    SLOW_GROUPS: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("voltage", "current"),
        ("import_energy", "export_energy"),
        ("tariff_period", "threshold"),
        ("frequency", "breaker"),
    )
    #: Quantities a meter may lack; the rest are required.
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"tariff_period", "threshold", "frequency", "breaker"})

    def __init__(self, slow_groups_per_poll: int = 1) -> None:
        """Read `slow_groups_per_poll` slow groups per poll (1..4)."""
        if not 1 <= slow_groups_per_poll <= len(self.SLOW_GROUPS):
            raise ValueError(f"slow_groups_per_poll must be 1..{len(self.SLOW_GROUPS)}")
        self.slow_groups_per_poll = slow_groups_per_poll
        self._next_group = 0

    def next(self, *, full: bool, unsupported: frozenset[str] = frozenset()) -> list[str]:
        """The quantities of the next poll, in request order; `full` reads every one."""
        if full:
            groups = list(self.SLOW_GROUPS)
        else:
            groups = []
            for _ in range(self.slow_groups_per_poll):
                groups.append(self.SLOW_GROUPS[self._next_group])
                self._next_group = (self._next_group + 1) % len(self.SLOW_GROUPS)
        names = [*self.FAST, *(name for group in groups for name in group)]
        return [n for n in names if n not in unsupported and not (n == "threshold" and "tariff_period" in unsupported)]


def readings(values: Mapping[str, float]) -> dict[str, float]:
    """The contract's readings from the decoded quantities; optional ones only when the meter has them."""
    out = {
        "active_power_kw": (values["import_power"] - values["export_power"]) / 1000.0,
        "import_energy_kwh": values["import_energy"],
        "export_energy_kwh": values["export_energy"],
        "voltage_v": values["voltage"],
        "current_a": values["current"],
    }
    optional = {
        "frequency_hz": "frequency",
        "contracted_power_kva": "threshold",
        "tariff_period": "tariff_period",
        "breaker_state": "breaker",
    }
    for reading, quantity in optional.items():
        if quantity in values:
            out[reading] = values[quantity]
    return out


class EredesHanMeter(ModbusDevice):
    """An E-Redes smart meter read through its HAN port (see the module docstring for the request plan)."""

    kind: ClassVar[Literal["meter"]] = "meter"

    def __init__(
        self,
        config: DeviceConfig,
        bus: ModbusBus,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
        objects: HanMap | None = None,
        slow_groups_per_poll: int = 1,
    ) -> None:
        """Bind the meter to its bus; `objects` replaces the index map for a meter that differs."""
        super().__init__(config, bus, clock=clock, backoff=backoff)
        self.map = objects or HanMap()
        self.plan = PollPlan(slow_groups_per_poll)
        self._objects = self.map.objects()
        self._values: dict[str, float] = {}
        self._unsupported: set[str] = set()
        self._full_next = True
        #: Requests sent by the last poll.
        self.last_poll_requests = 0

    @property
    def unsupported(self) -> frozenset[str]:
        """Optional quantities this meter turned out not to have."""
        return frozenset(self._unsupported)

    async def read(self) -> dict[str, float]:
        """Poll the meter: power (kW, import positive), energies (kWh), L1 voltage and current, frequency,
        ``contracted_power_kva``, ``tariff_period`` (1..6) and ``breaker_state`` (0 off, 1 on, 2 ready)."""
        return await self._guarded(self._poll)

    async def _poll(self) -> dict[str, float]:
        """Read this poll's objects; a failed poll makes the next one a full one."""
        full = self._full_next
        self._full_next = True
        names = self.plan.next(full=full, unsupported=frozenset(self._unsupported))
        self.last_poll_requests = 0
        values = dict(self._values) if not full else {}
        for name in names:
            obj = self._object(name, values)
            if obj is None:
                continue
            value = await self._read_object(name, obj)
            if value is not None:
                values[name] = value
            elif name == "tariff_period":
                values.pop("threshold", None)
        self._values = values
        self._full_next = False
        return readings(values)

    def _object(self, name: str, values: Mapping[str, float]) -> HanObject | None:
        """The object behind `name`; the threshold follows the tariff period read (None while it is unknown)."""
        if name != "threshold":
            return self._objects[name]
        period = values.get("tariff_period")
        return None if period is None else self.map.threshold(int(period))

    async def _read_object(self, name: str, obj: HanObject) -> float | None:
        """Read, decode and scale one object; None when an optional one turns out to be missing."""
        self.last_poll_requests += 1
        try:
            data = await self.bus.read_input_object(self.unit, obj.index, timeout_s=self.config.timeout_s)
        except DeviceExceptionResponse as exc:
            if exc.code != ILLEGAL_DATA_ADDRESS or name not in PollPlan.OPTIONAL:
                raise
            self._unsupported.add(name)
            _log.warning("device %s has no object %#06x (%s); leaving it out from now on", self.name, obj.index, name)
            return None
        value = decode_object(obj, data)
        allowed = ENUM_RANGES.get(name)
        if allowed is not None and value not in allowed:
            raise DeviceError(
                f"device {self.name!r}: object {obj.index:#06x} ({name}) reads {value} ({data.hex(' ')}), "
                f"outside {allowed.start}..{allowed.stop - 1}"
            )
        return value / obj.divisor
