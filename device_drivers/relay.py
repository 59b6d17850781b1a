"""Relay boards and smart plugs switched through coils (KMtronic, Waveshare and alike): one coil per device."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ClassVar, Literal

from .backoff import Backoff
from .config import DeviceConfig
from .device import ModbusDevice
from .errors import DeviceError
from .modbus import ModbusBus


class ModbusRelay(ModbusDevice):
    """One relay channel: written with function 05, read back with function 01."""

    kind: ClassVar[Literal["switch"]] = "switch"

    def __init__(
        self,
        config: DeviceConfig,
        bus: ModbusBus,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
    ) -> None:
        """Bind the relay channel ``config.coil``."""
        if config.coil is None:
            raise ValueError(f"device {config.name!r}: a relay needs a coil")
        super().__init__(config, bus, clock=clock, backoff=backoff)
        self.coil: int = config.coil

    async def read(self) -> dict[str, bool]:
        """Read the relay state: ``{"on": bool}``."""
        return {"on": await self._guarded(self._read_coil)}

    async def set(self, on: bool) -> bool:
        """Switch the relay, read it back and return the read-back state.

        A command is always tried, even while reads are backed off; its outcome updates the backoff.
        Raises :class:`DeviceError` when the read-back state differs from the one written.
        """
        return await self._guarded(lambda: self._write_and_confirm(on), honour_backoff=False)

    async def _read_coil(self) -> bool:
        """Read this channel's coil."""
        states = await self.bus.read_coils(self.unit, self.coil, 1, timeout_s=self.config.timeout_s)
        return states[0]

    async def _write_and_confirm(self, on: bool) -> bool:
        """Write the coil, then read it back."""
        await self.bus.write_coil(self.unit, self.coil, on, timeout_s=self.config.timeout_s)
        state = await self._read_coil()
        if state != on:
            raise DeviceError(
                f"device {self.name!r}: wrote coil {self.coil} {'on' if on else 'off'} "
                f"but it reads back {'on' if state else 'off'}"
            )
        return state
