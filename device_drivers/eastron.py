"""Eastron SDM630 (three-phase) and SDM120 (single-phase) energy meters over Modbus.

Measurements are input registers (function 04), each an IEEE 754 float32 over two registers, high word
first (``reference/devices.md``). One poll reads each contiguous block once instead of one request per value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from .backoff import Backoff
from .codec import decode_float32
from .config import DeviceConfig
from .device import ModbusDevice
from .modbus import ModbusBus

#: Names of a meter reading, in the gateway's contract.
METER_READINGS: tuple[str, ...] = (
    "active_power_kw",
    "import_energy_kwh",
    "export_energy_kwh",
    "voltage_v",
    "current_a",
    "frequency_hz",
)


@dataclass(frozen=True)
class EastronModel:
    """Where one meter model keeps the values a poll reads, and which blocks cover them."""

    name: str
    #: (first address, register count) of each block read per poll.
    blocks: tuple[tuple[int, int], ...]
    #: Address of each float32 the poll decodes.
    active_power_w: int
    import_energy_kwh: int
    export_energy_kwh: int
    voltage_v: int
    current_a: int
    frequency_hz: int

    def addresses(self) -> dict[str, int]:
        """Map each decoded quantity to its register address."""
        return {
            "active_power_w": self.active_power_w,
            "import_energy_kwh": self.import_energy_kwh,
            "export_energy_kwh": self.export_energy_kwh,
            "voltage_v": self.voltage_v,
            "current_a": self.current_a,
            "frequency_hz": self.frequency_hz,
        }


#: SDM630: 0x0000..0x004B in one read of 76 registers covers every value used.
SDM630 = EastronModel(
    name="SDM630",
    blocks=((0x0000, 76),),
    active_power_w=0x0034,  # total system active power
    import_energy_kwh=0x0048,
    export_energy_kwh=0x004A,
    voltage_v=0x0000,  # L1 to neutral
    current_a=0x0006,  # L1
    frequency_hz=0x0046,
)

#: SDM120: the single phase's values at 0x0000..0x000D, the rest at 0x0046..0x004B: two reads.
SDM120 = EastronModel(
    name="SDM120",
    blocks=((0x0000, 14), (0x0046, 6)),
    active_power_w=0x000C,  # the SDM120 has no total register; its one phase is the total
    import_energy_kwh=0x0048,
    export_energy_kwh=0x004A,
    voltage_v=0x0000,
    current_a=0x0006,
    frequency_hz=0x0046,
)

MODELS: dict[str, EastronModel] = {"eastron_sdm630": SDM630, "eastron_sdm120": SDM120}


def decode_readings(model: EastronModel, blocks: Mapping[int, list[int]]) -> dict[str, float]:
    """Decode one poll: `blocks` maps each block's first address to the registers read there."""
    values: dict[str, float] = {}
    for quantity, address in model.addresses().items():
        values[quantity] = _float_at(model, blocks, address)
    return {
        "active_power_kw": values["active_power_w"] / 1000.0,
        "import_energy_kwh": values["import_energy_kwh"],
        "export_energy_kwh": values["export_energy_kwh"],
        "voltage_v": values["voltage_v"],
        "current_a": values["current_a"],
        "frequency_hz": values["frequency_hz"],
    }


def _float_at(model: EastronModel, blocks: Mapping[int, list[int]], address: int) -> float:
    """Find the block holding `address` and decode the float32 there."""
    for start, count in model.blocks:
        if start <= address and address + 2 <= start + count:
            return decode_float32(blocks[start], address - start)
    raise ValueError(f"{model.name}: register {address:#06x} is in no block read per poll")


class EastronMeter(ModbusDevice):
    """An Eastron SDM630 or SDM120 meter."""

    kind: ClassVar[Literal["meter"]] = "meter"

    def __init__(
        self,
        config: DeviceConfig,
        bus: ModbusBus,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
    ) -> None:
        """Bind the meter; the model follows ``config.driver``."""
        if config.driver not in MODELS:
            raise ValueError(f"device {config.name!r}: driver {config.driver!r} is not an Eastron meter")
        super().__init__(config, bus, clock=clock, backoff=backoff)
        self.model = MODELS[config.driver]

    async def read(self) -> dict[str, float]:
        """Poll the meter once: power (kW, import positive), energies (kWh), L1 voltage and current, frequency."""
        return await self._guarded(self._poll)

    async def _poll(self) -> dict[str, float]:
        """Read every block of the model and decode them."""
        blocks: dict[int, list[int]] = {}
        for start, count in self.model.blocks:
            blocks[start] = await self.bus.read_input_registers(
                self.unit, start, count, timeout_s=self.config.timeout_s
            )
        return decode_readings(self.model, blocks)
