"""Base of the simulated Modbus devices that :class:`~device_drivers.sim.server.ModbusSimServer` serves."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.simulator import SimData, SimDevice


@dataclass(frozen=True)
class ModbusRequest:
    """One request pymodbus hands a simulated device, after checking the address is inside the map.

    `registers` is the whole block, starting at `start_address`, that the answer is read from; `values` holds
    what a write request writes, None for reads.
    """

    function_code: int
    start_address: int
    address: int
    count: int
    registers: list[int]
    values: list[int] | list[bool] | None


class SimulatedDevice(ABC):
    """A device answered by pymodbus's server side with real Modbus frames.

    Each server that serves the device builds its own pymodbus ``SimDevice`` (register memory) from
    :meth:`simdata`; the state lives here, and :meth:`on_request` refreshes the registers from it on every
    request, so one simulated device can be served over TCP and RTU at once.

    Set ``online = False`` to make the device stop answering (a dead RS-485 node); ``requests`` counts the
    requests it answered or refused.
    """

    #: Whether coils are addressed bit by bit (relay boards) rather than register by register.
    bit_addressing: bool = False
    #: Request PDU classes the server must decode with instead of pymodbus's own, for a device that speaks a
    #: non-standard dialect of a function code (the E-Redes HAN port's function 04). Devices served together
    #: must agree on them.
    request_pdus: tuple[type[ModbusPDU], ...] = ()

    def __init__(self) -> None:
        """Start online with no requests seen."""
        self.online = True
        self.requests = 0

    @abstractmethod
    def simdata(self) -> list[SimData]:
        """The register blocks the device answers for; any other address is an illegal data address."""

    def on_request(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Refresh `registers` (the whole block, starting at `start_address`) or refuse with an exception code.

        `values` holds what a write request writes, None for reads. Devices answer in :meth:`answer`; this
        flat signature is pymodbus's, kept so a test can wrap it on one device.
        """
        return self.answer(ModbusRequest(function_code, start_address, address, count, registers, values))

    @abstractmethod
    def answer(self, request: ModbusRequest) -> ExcCodes | None:
        """Refresh ``request.registers`` from the device's state, or refuse with an exception code."""

    def build(self, unit_id: int) -> SimDevice:
        """Build a fresh pymodbus ``SimDevice`` answering as `unit_id`."""
        return SimDevice(
            id=unit_id,
            simdata=self.simdata(),
            action=self._action,
            use_bit_addressing=self.bit_addressing,
        )

    async def _action(self, *request: Any) -> ExcCodes | None:
        """pymodbus calls this after checking the address is inside the map, before answering.

        `request` is :meth:`on_request`'s arguments, passed through unchanged (written once, there).
        """
        self.requests += 1
        return self.on_request(*request)
