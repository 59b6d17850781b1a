"""Simulated E-Redes smart meter HAN port: function 04, one DLMS object per index, answered with its own bytes.

Served by :class:`~device_drivers.sim.server.ModbusSimServer` like every simulated device (Modbus RTU on a pty,
RTU over TCP, or Modbus TCP), but its server decodes function 04 with :class:`HanReadRequest`, which answers a
read of count 1 with as many data bytes as the object holds (4 for a 32-bit object) — the non-standard framing
of the real meter. Other counts are refused with "illegal data value": the reference documents count 1 only.

The register memory pymodbus keeps for the device holds object ``i`` in registers ``2i`` and ``2i + 1`` (high
word first); :meth:`HanMeterSim.on_request` refreshes it from a :class:`HanState` on every request, and
:class:`HanReadRequest` cuts the object's bytes out of it.

Start one on a pty pair (the gateway opens ``line.paths[1]``)::

    state = HanState(import_power_w=1500, tariff_period=3)
    async with PtyNullModem() as line, ModbusSimServer(
        {1: HanMeterSim(state)}, transport="modbus-rtu", serial_port=line.paths[0]
    ):
        ...
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.register_message import ReadInputRegistersRequest
from pymodbus.simulator import DataType, SimData

from ..config import DeviceConfig, TransportName
from .base import ModbusRequest, SimulatedDevice


@dataclass
class HanState:
    """What the meter measures and its demand-control settings; change it between polls.

    A single-phase meter: L1 is the only phase and its import power is the total.
    """

    import_power_w: int = 0
    export_power_w: int = 0
    import_energy_wh: int = 0
    export_energy_wh: int = 0
    #: Import energy in tariff periods 1..3 ("vazio", "ponta", "cheias").
    tariff_energy_wh: tuple[int, int, int] = (0, 0, 0)
    voltage_v: float = 230.0
    current_a: float = 0.0
    power_factor: float = 1.0
    frequency_hz: float = 50.0
    #: Demand-control threshold (contracted power) of tariff periods T1..T6, in VA.
    thresholds_va: tuple[int, int, int, int, int, int] = (6900, 6900, 6900, 6900, 6900, 6900)
    tariff_period: int = 1
    #: 0 off, 1 on, 2 ready to reconnect.
    breaker_state: int = 1


Getter = Callable[[HanState], int]


def _threshold(period: int) -> Getter:
    return lambda s: s.thresholds_va[period - 1]


def _tariff_energy(period: int) -> Getter:
    return lambda s: s.tariff_energy_wh[period - 1]


# index -> (bytes in the answer, value). Transcribed from reference/devices.md on purpose separately from the
# driver's map, so a test reading one through the other checks both. The tariff period sits in the high byte
# of two; the breaker state is sent as a 16-bit value.
HAN_MAP: dict[int, tuple[int, Getter]] = {
    0x000B: (2, lambda s: s.tariff_period << 8),
    **{0x000C + p - 1: (4, _threshold(p)) for p in range(1, 7)},
    0x0016: (4, lambda s: s.import_energy_wh),
    0x0017: (4, lambda s: s.export_energy_wh),
    **{0x0026 + p - 1: (4, _tariff_energy(p)) for p in range(1, 4)},
    0x006C: (2, lambda s: round(s.voltage_v * 10)),
    0x006D: (2, lambda s: round(s.current_a * 10)),
    0x0073: (4, lambda s: s.import_power_w),
    0x0079: (4, lambda s: s.import_power_w),
    0x007A: (4, lambda s: s.export_power_w),
    0x007B: (2, lambda s: round(s.power_factor * 1000)),
    0x007F: (2, lambda s: round(s.frequency_hz * 10)),
    0x0084: (2, lambda s: s.breaker_state),
}
#: Registers of pymodbus memory the map needs (two per object index).
_MEMORY = 2 * (max(HAN_MAP) + 1)


class HanReadResponse(ModbusPDU):
    """The HAN port's answer to function 04: a byte count and the object's bytes (server side)."""

    function_code = 4
    rtu_byte_count_pos = 2

    def __init__(self, payload: bytes = b"", dev_id: int = 0, transaction_id: int = 0) -> None:
        """Hold the object's bytes."""
        super().__init__(dev_id=dev_id, transaction_id=transaction_id)
        self.payload = payload

    def encode(self) -> bytes:
        """Byte count, then the bytes."""
        return bytes([len(self.payload)]) + self.payload


class HanReadRequest(ReadInputRegistersRequest):
    """Function 04 as the HAN port understands it: read object ``address``, count 1 (server side)."""

    async def datastore_update(self, context: ModbusServerContext, device_id: int) -> ModbusPDU:
        """Answer with the object's bytes, or an exception response."""
        if self.count != 1:
            return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_VALUE)
        entry = HAN_MAP.get(self.address)
        if entry is None:
            return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_ADDRESS)
        words = await context.async_getValues(device_id, self.function_code, 2 * self.address, 2)
        if isinstance(words, ExcCodes):
            return ExceptionResponse(self.function_code, words)
        raw = struct.pack(">HH", *(int(w) for w in words))
        width = entry[0]
        return HanReadResponse(raw[4 - width :], dev_id=device_id, transaction_id=self.transaction_id)


class HanMeterSim(SimulatedDevice):
    """An E-Redes meter's HAN port answering from a :class:`HanState`.

    ``refuse`` maps an object index to the Modbus exception code the meter answers for it (2 for an object
    this meter lacks, 4 or 6 for a failing or busy meter); ``requests`` counts the requests that reached the
    device, ``objects_read`` the indexes read in order.
    """

    request_pdus = (HanReadRequest,)

    def __init__(self, state: HanState | None = None) -> None:
        """Serve `state` (a fresh default one when None)."""
        super().__init__()
        self.state = state if state is not None else HanState()
        self.refuse: dict[int, int] = {}
        self.objects_read: list[int] = []

    def simdata(self) -> list[SimData]:
        """One block holding every object, two registers each."""
        return [SimData(0, count=_MEMORY, values=0, datatype=DataType.REGISTERS)]

    def answer(self, request: ModbusRequest) -> ExcCodes | None:
        """Refresh the requested object from the state, or refuse it."""
        if request.function_code != 4:
            return ExcCodes.ILLEGAL_FUNCTION
        index = request.address // 2
        self.objects_read.append(index)
        if index in self.refuse:
            return ExcCodes(self.refuse[index])
        width, getter = HAN_MAP[index]
        value = getter(self.state)
        if not 0 <= value < 1 << (8 * width):
            return ExcCodes.DEVICE_FAILURE  # the state holds something the object cannot carry
        offset = 2 * index - request.start_address
        request.registers[offset : offset + 2] = [value >> 16, value & 0xFFFF]
        return None

    @staticmethod
    def device_config(
        name: str = "han",
        *,
        transport: TransportName = "modbus-rtu",
        host: str | None = None,
        port: int | None = None,
        serial_port: str | None = None,
        **fields: object,
    ) -> DeviceConfig:
        """The gateway's device entry for a HAN meter served at `host`:`port` or on `serial_port`."""
        entry: dict[str, object] = {"name": name, "driver": "eredes_han", "transport": transport}
        entry |= {k: v for k, v in (("host", host), ("port", port), ("serial_port", serial_port)) if v is not None}
        return DeviceConfig.model_validate(entry | fields)
