"""What every device driver shares: its configuration, its bus, backoff after failures, and log policy."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .backoff import Backoff
from .config import DeviceConfig
from .errors import DeviceBackedOff, DeviceError
from .modbus import ModbusBus

_log = logging.getLogger(__name__)

T = TypeVar("T")

#: First delay after a failure, in seconds; doubles per consecutive failure.
BACKOFF_INITIAL_S = 1.0
#: Longest delay between tries of a failing device, in seconds.
BACKOFF_MAX_S = 30.0


class ModbusDevice:
    """Base of the Modbus drivers: runs operations on the bus under the device's backoff.

    A failed operation (any :class:`DeviceError`) backs the device off exponentially, capped at
    ``BACKOFF_MAX_S``; while backed off, :meth:`_guarded` raises :class:`DeviceBackedOff` at once without
    touching the bus. A success clears the backoff. The first error of a run of failures logs at ERROR,
    repeats at DEBUG, and the recovery at INFO.
    """

    def __init__(
        self,
        config: DeviceConfig,
        bus: ModbusBus,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
    ) -> None:
        """Bind the device to its bus."""
        self.config = config
        self.bus = bus
        self.backoff = backoff or Backoff(initial_s=BACKOFF_INITIAL_S, max_s=BACKOFF_MAX_S)
        self._clock = clock
        self._last_error: DeviceError | None = None

    @property
    def name(self) -> str:
        """The configured device name."""
        return self.config.name

    @property
    def unit(self) -> int:
        """The Modbus unit id."""
        return self.config.unit_id

    @property
    def last_error(self) -> DeviceError | None:
        """The error of the last failed operation, None after a success."""
        return self._last_error

    def __repr__(self) -> str:
        """Show name, driver and bus."""
        return f"{type(self).__name__}({self.name!r}, {self.bus.endpoint} unit {self.unit})"

    async def _guarded(self, op: Callable[[], Awaitable[T]], *, honour_backoff: bool = True) -> T:
        """Run `op` unless backed off; record its outcome for backoff and logging."""
        now = self._clock()
        if honour_backoff and self.backoff.blocked(now):
            wait = self.backoff.remaining(now)
            raise DeviceBackedOff(
                f"device {self.name!r} backed off for {wait:.1f} s more after "
                f"{self.backoff.failures} failure(s); last error: {self._last_error}",
                wait,
            )
        try:
            result = await op()
        except DeviceError as exc:
            delay = self.backoff.record_failure(self._clock())
            level = logging.ERROR if self._last_error is None else logging.DEBUG
            _log.log(level, "device %s failed (next try in %.1f s): %s", self.name, delay, exc)
            self._last_error = exc
            raise
        if self._last_error is not None:
            _log.info("device %s answers again after %d failure(s)", self.name, self.backoff.failures)
        self._last_error = None
        self.backoff.record_success()
        return result
