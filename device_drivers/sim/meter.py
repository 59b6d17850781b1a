"""Simulated Eastron SDM630 / SDM120 meters serving the input-register map of ``reference/devices.md``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pymodbus.constants import ExcCodes
from pymodbus.simulator import DataType, SimData

from ..codec import encode_float32
from .base import ModbusRequest, SimulatedDevice

Phases = tuple[float, float, float]


@dataclass
class MeterState:
    """What a meter measures at one moment; SDM120 uses phase 1 only."""

    voltage_v: Phases = (230.0, 230.0, 230.0)
    current_a: Phases = (0.0, 0.0, 0.0)
    power_w: Phases = (0.0, 0.0, 0.0)
    frequency_hz: float = 50.0
    import_kwh: float = 0.0
    export_kwh: float = 0.0

    @property
    def total_power_w(self) -> float:
        """Active power of all phases, import positive."""
        return sum(self.power_w)


Getter = Callable[[MeterState], float]

# Input registers (function 04), float32 high word first. Transcribed from reference/devices.md on purpose
# separately from the driver's map, so a test reading one through the other checks both.
SDM630_MAP: dict[int, Getter] = {
    0x0000: lambda s: s.voltage_v[0],
    0x0002: lambda s: s.voltage_v[1],
    0x0004: lambda s: s.voltage_v[2],
    0x0006: lambda s: s.current_a[0],
    0x0008: lambda s: s.current_a[1],
    0x000A: lambda s: s.current_a[2],
    0x000C: lambda s: s.power_w[0],
    0x000E: lambda s: s.power_w[1],
    0x0010: lambda s: s.power_w[2],
    0x0034: lambda s: s.total_power_w,
    0x0046: lambda s: s.frequency_hz,
    0x0048: lambda s: s.import_kwh,
    0x004A: lambda s: s.export_kwh,
    0x0156: lambda s: s.import_kwh + s.export_kwh,
}
SDM120_MAP: dict[int, Getter] = {
    0x0000: lambda s: s.voltage_v[0],
    0x0006: lambda s: s.current_a[0],
    0x000C: lambda s: s.power_w[0],
    0x0046: lambda s: s.frequency_hz,
    0x0048: lambda s: s.import_kwh,
    0x004A: lambda s: s.export_kwh,
    0x0156: lambda s: s.import_kwh + s.export_kwh,
}
# Address ranges (first, register count) that answer. Registers inside a range that the reference does not
# list read as 0.0 (on the real meters they hold apparent/reactive power, power factor, ...), so a block
# read across them works as on the real meter; anything outside is an illegal data address.
SDM630_RANGES: tuple[tuple[int, int], ...] = ((0x0000, 0x004C), (0x0156, 2))
SDM120_RANGES: tuple[tuple[int, int], ...] = ((0x0000, 0x000E), (0x0046, 6), (0x0156, 2))

MeterModel = Literal["sdm630", "sdm120"]


class MeterSim(SimulatedDevice):
    """An SDM630 or SDM120 whose registers are computed from a :class:`MeterState` on every read."""

    def __init__(self, model: MeterModel = "sdm630", state: MeterState | Callable[[], MeterState] | None = None):
        """Serve `model`'s map; `state` is a fixed state (mutable) or a callable giving the state now."""
        super().__init__()
        if model not in ("sdm630", "sdm120"):
            raise ValueError(f"unknown meter model {model!r}")
        self.model: MeterModel = model
        self._map = SDM630_MAP if model == "sdm630" else SDM120_MAP
        self._ranges = SDM630_RANGES if model == "sdm630" else SDM120_RANGES
        self.state: MeterState | Callable[[], MeterState] = state if state is not None else MeterState()

    def current_state(self) -> MeterState:
        """The state the next read reports."""
        return self.state() if callable(self.state) else self.state

    def simdata(self) -> list[SimData]:
        """One block of registers per answering range."""
        return [SimData(start, count=count, values=0, datatype=DataType.REGISTERS) for start, count in self._ranges]

    def answer(self, request: ModbusRequest) -> ExcCodes | None:
        """Answer input-register reads with the state now; refuse every other function."""
        if request.function_code != 4:
            return ExcCodes.ILLEGAL_FUNCTION
        state = self.current_state()
        for reg, getter in self._map.items():
            offset = reg - request.start_address
            request.registers[offset : offset + 2] = encode_float32(getter(state))
        return None
