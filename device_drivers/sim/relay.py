"""Simulated relay board: N coils read with function 01 and written with 05 (or 15)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pymodbus.constants import ExcCodes
from pymodbus.simulator import DataType, SimData

from .base import ModbusRequest, SimulatedDevice

CoilCallback = Callable[[int, bool], None]


class RelayBoardSim(SimulatedDevice):
    """A relay board (KMtronic / Waveshare style) with `n_coils` coils at addresses 0..n_coils-1."""

    bit_addressing = True

    def __init__(
        self,
        n_coils: int = 8,
        *,
        initial: bool | Sequence[bool] = False,
        on_change: CoilCallback | None = None,
    ) -> None:
        """Create the board; `on_change(coil, on)` is called when a write changes a coil."""
        super().__init__()
        if not 1 <= n_coils <= 2000:
            raise ValueError("n_coils must be 1..2000")
        self.n_coils = n_coils
        if isinstance(initial, bool):
            self._coils = [initial] * n_coils
        else:
            if len(initial) != n_coils:
                raise ValueError(f"initial has {len(initial)} states for {n_coils} coils")
            self._coils = [bool(v) for v in initial]
        self.on_change = on_change

    def coil_state(self, coil: int) -> bool:
        """State of one coil."""
        return self._coils[coil]

    @property
    def states(self) -> list[bool]:
        """States of all coils."""
        return list(self._coils)

    def set_coil(self, coil: int, on: bool) -> None:
        """Switch a coil from the simulation side (a button on the board); calls `on_change`."""
        if not 0 <= coil < self.n_coils:
            raise IndexError(f"coil {coil} outside 0..{self.n_coils - 1}")
        if self._coils[coil] != on:
            self._coils[coil] = on
            if self.on_change is not None:
                self.on_change(coil, on)

    def simdata(self) -> list[SimData]:
        """One block of coils rounded up to whole registers (pymodbus keeps 16 coils per register)."""
        n_bits = (self.n_coils + 15) // 16 * 16
        return [SimData(0, values=[False] * n_bits, datatype=DataType.BITS)]

    def answer(self, request: ModbusRequest) -> ExcCodes | None:
        """Apply writes to the board's state, then copy the state into the registers pymodbus answers from."""
        if request.function_code not in (1, 5, 15):
            return ExcCodes.ILLEGAL_FUNCTION
        # For coils pymodbus passes `count` in registers, not coils: only a write knows its exact span.
        span = len(request.values) if request.values is not None else 1
        if request.address + span > self.n_coils:
            return ExcCodes.ILLEGAL_ADDRESS
        if request.values is not None:
            for i, value in enumerate(request.values):
                self.set_coil(request.address + i, bool(value))
        self._sync(request.registers)
        return None

    def _sync(self, registers: list[int]) -> None:
        """Pack the coil states into the first registers of the block, bit 0 first."""
        for reg in range((self.n_coils + 15) // 16):
            word = 0
            for bit, on in enumerate(self._coils[reg * 16 : reg * 16 + 16]):
                if on:
                    word |= 1 << bit
            registers[reg] = word
