"""DSMR P1 smart meters: telegrams pushed on a serial line, read in the background, served from memory.

Layers: :mod:`.p1_framing` cuts telegrams out of the byte stream and checks their CRC (pure); :mod:`.obis`
parses their lines (pure); :class:`P1Reader` runs both over a :class:`~.serial_line.SerialLine` in a background
task; :class:`DsmrP1Meter` turns the newest telegram into the gateway's meter readings.

The meter pushes a telegram every second (DSMR 5; every 10 s for DSMR 4), so ``read()`` asks nothing of the
line: it returns the newest valid telegram's values, or raises :class:`DeviceUnavailable` when that telegram is
older than ``max_age_s`` (default 10 s) or none has arrived. The reader starts on the first ``read()`` (which
waits up to ``timeout_s`` for a first telegram) and stops when the :class:`BusPool` that built the meter
closes. A port that fails — missing, unplugged, hung up — is reopened with exponential back-off (1 s doubling
to 30 s); each open starts a fresh telegram, dropping any half-received one.

Line settings: DSMR 5 is 115200 8N1 (the default for this driver); DSMR 2.2/3 are 9600 7E1 (``baudrate = 9600,
bytesize = 7, parity = "E"``); DSMR 4 meters differ, try 115200 8N1 first, then 9600 7E1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import ClassVar, Literal, Self

from .backoff import Backoff
from .config import DeviceConfig
from .errors import DeviceError, DeviceUnavailable
from .obis import ParsedTelegram, parse_telegram
from .p1_framing import FramerStats, TelegramFramer
from .serial_line import LineSettings, SerialLine

_log = logging.getLogger(__name__)

#: First delay before reopening a failed port, in seconds; doubles per consecutive failure.
REOPEN_INITIAL_S = 1.0
#: Longest delay between tries to reopen a port, in seconds.
REOPEN_MAX_S = 30.0

#: OBIS values a telegram must hold to give the contract's readings, with their codes for messages.
REQUIRED: dict[str, str] = {
    "import_power_kw": "1-0:1.7.0",
    "export_power_kw": "1-0:2.7.0",
    "import_energy_t1_kwh": "1-0:1.8.1",
    "import_energy_t2_kwh": "1-0:1.8.2",
    "export_energy_t1_kwh": "1-0:2.8.1",
    "export_energy_t2_kwh": "1-0:2.8.2",
}
#: Readings given when the telegram has them: reading name -> parsed value name.
OPTIONAL: dict[str, str] = {
    "voltage_v": "voltage_l1_v",
    "current_a": "current_l1_a",
    "tariff_period": "tariff",
    "limiter_kw": "limiter_kw",
    "breaker_state": "breaker_state",
}


def p1_readings(values: Mapping[str, float]) -> dict[str, float]:
    """The contract's readings from one telegram's values (pure).

    ``active_power_kw`` is import minus export, the energies add tariffs 1 and 2. ``frequency_hz`` is left
    out: P1 does not carry it. ``voltage_v``, ``current_a`` (L1), ``tariff_period``, ``limiter_kw`` (the
    limiter threshold 0-0:17.0.0 in kW; 999.9 means no limit set) and ``breaker_state`` (0 disconnected,
    1 connected, 2 ready to reconnect) are given when the telegram holds them.
    """
    missing = [code for name, code in REQUIRED.items() if name not in values]
    if missing:
        raise DeviceError(f"telegram lacks {', '.join(missing)}")
    out = {
        "active_power_kw": values["import_power_kw"] - values["export_power_kw"],
        "import_energy_kwh": values["import_energy_t1_kwh"] + values["import_energy_t2_kwh"],
        "export_energy_kwh": values["export_energy_t1_kwh"] + values["export_energy_t2_kwh"],
    }
    for reading, name in OPTIONAL.items():
        if name in values:
            out[reading] = values[name]
    return out


class P1Reader:
    """Reads one P1 port in a background task and keeps the newest valid telegram.

    Counters: :attr:`framing` (telegrams passed, bad CRCs, truncated, discarded bytes) and
    :attr:`malformed_lines`. :attr:`port_error` is the last failure to open or read the port, None while open.
    """

    def __init__(
        self,
        settings: LineSettings,
        *,
        name: str,
        clock: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
    ) -> None:
        """Prepare the reader; :meth:`start` starts it."""
        self.settings = settings
        self.name = name
        self.backoff = backoff or Backoff(initial_s=REOPEN_INITIAL_S, max_s=REOPEN_MAX_S)
        self._clock = clock
        self._framer = TelegramFramer()
        self.malformed_lines = 0
        self.latest: ParsedTelegram | None = None
        self.latest_at = 0.0
        self.port_error: DeviceUnavailable | None = None
        self.opens = 0
        self._task: asyncio.Task[None] | None = None
        self._arrived: asyncio.Event | None = None
        self._closed = False

    @property
    def framing(self) -> FramerStats:
        """What the framer passed on and dropped since the reader was made."""
        return self._framer.stats

    @property
    def running(self) -> bool:
        """Whether the background task runs."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the background task if it is not running (a closed reader stays stopped)."""
        if self._closed:
            raise DeviceError(f"device {self.name!r}: its P1 reader is closed")
        if self._task is None:
            self._arrived = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name=f"p1-reader {self.name}")

    async def wait_for_telegram(self, timeout_s: float) -> bool:
        """Wait until a telegram arrives or `timeout_s` passes; whether one arrived."""
        if self._arrived is None:
            return False
        self._arrived.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._arrived.wait()
                return True
        return False

    async def close(self) -> None:
        """Stop the background task and close the port."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        """Open the port, read it until it fails, reopen after the back-off; until cancelled."""
        while True:
            try:
                error = await self._read_once()
            except Exception as exc:  # a bug must not end the reading for good: report it, back off, go on
                _log.exception("device %s: P1 reader failed", self.name)
                error = DeviceUnavailable(f"{self.settings}: reader failed ({type(exc).__name__}: {exc})")
            await asyncio.sleep(self._failed(error))

    async def _read_once(self) -> DeviceUnavailable:
        """Open the port and read it until it fails; return why it stopped."""
        try:
            line = SerialLine.open(self.settings)
        except DeviceUnavailable as exc:
            return exc
        self.opens += 1
        self._framer.reset()
        if self.port_error is not None:
            _log.info("device %s: %s open again after %d failure(s)", self.name, self.settings, self.backoff.failures)
        self.port_error = None
        self.backoff.record_success()
        try:
            await line.pump(self._on_data)
        except DeviceUnavailable as exc:
            return exc
        finally:
            line.close()
        return DeviceUnavailable(f"{self.settings}: reading stopped")

    def _failed(self, exc: DeviceUnavailable) -> float:
        """Record a port failure; log the first of a run at ERROR, the rest at DEBUG; return the back-off."""
        delay = self.backoff.record_failure(self._clock())
        level = logging.ERROR if self.port_error is None else logging.DEBUG
        _log.log(level, "device %s: P1 port failed (reopening in %.1f s): %s", self.name, delay, exc)
        self.port_error = exc
        return delay

    def _on_data(self, data: bytes) -> None:
        """Frame what arrived and keep the newest telegram; nothing raised here may stop the reading."""
        try:
            for telegram in self._framer.feed(data):
                parsed = parse_telegram(telegram)
                if parsed.malformed:
                    self.malformed_lines += len(parsed.malformed)
                    _log.debug("device %s: ignored malformed P1 lines %r", self.name, parsed.malformed[:5])
                self.latest, self.latest_at = parsed, self._clock()
                if self._arrived is not None:
                    self._arrived.set()
        except Exception:  # a parser bug must not stop the port being read
            _log.exception("device %s: could not handle P1 data", self.name)


class DsmrP1Meter:
    """A DSMR smart meter read through its P1 port (see the module docstring)."""

    kind: ClassVar[Literal["meter"]] = "meter"

    def __init__(
        self,
        config: DeviceConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        reopen_backoff: Backoff | None = None,
    ) -> None:
        """Bind the meter to its serial port; nothing opens before the first :meth:`read`."""
        if config.driver != "dsmr_p1" or not config.serial_port:
            raise ValueError(f"device {config.name!r}: not a dsmr_p1 device with a serial_port")
        self.config = config
        self._clock = clock
        self.reader = P1Reader(
            LineSettings(
                port=config.serial_port,
                baudrate=config.baudrate,
                bytesize=config.bytesize,
                parity=config.parity,
                stopbits=config.stopbits,
            ),
            name=config.name,
            clock=clock,
            backoff=reopen_backoff,
        )
        self._last_error: DeviceError | None = None

    @property
    def name(self) -> str:
        """The configured device name."""
        return self.config.name

    def __repr__(self) -> str:
        """Show name and line."""
        return f"DsmrP1Meter({self.name!r}, {self.reader.settings})"

    async def read(self) -> dict[str, float]:
        """The newest telegram's readings; DeviceUnavailable when it is older than ``max_age_s`` or missing."""
        try:
            readings = await self._read()
        except DeviceError as exc:
            level = logging.ERROR if self._last_error is None else logging.DEBUG
            _log.log(level, "device %s failed: %s", self.name, exc)
            self._last_error = exc
            raise
        if self._last_error is not None:
            _log.info("device %s has fresh telegrams again", self.name)
            self._last_error = None
        return readings

    async def _read(self) -> dict[str, float]:
        """Start the reader on first use, then judge the newest telegram."""
        if not self.reader.running:
            first = self.reader.opens == 0 and self.reader.port_error is None
            self.reader.start()
            if first:
                await self.reader.wait_for_telegram(self.config.timeout_s)
        latest = self.reader.latest
        if latest is None:
            raise DeviceUnavailable(
                f"device {self.name!r}: no valid telegram on {self.reader.settings} yet{self._why()}"
            )
        age = self._clock() - self.reader.latest_at
        if age > self.config.max_age_s:
            raise DeviceUnavailable(
                f"device {self.name!r}: newest valid telegram is {age:.1f} s old "
                f"(max {self.config.max_age_s:g} s){self._why()}"
            )
        try:
            return p1_readings(latest.values)
        except DeviceError as exc:
            raise DeviceError(f"device {self.name!r}: {exc}") from None

    def _why(self) -> str:
        """What the reader knows about why telegrams are missing."""
        if self.reader.port_error is not None:
            return f"; {self.reader.port_error}"
        stats = self.reader.framing
        if stats.bad_crc or stats.truncated or stats.oversized:
            return (
                f"; dropped {stats.bad_crc} telegram(s) with a bad CRC, {stats.truncated} truncated, "
                f"{stats.oversized} oversized"
            )
        return ""

    async def close(self) -> None:
        """Stop reading the port (the pool that built the meter calls this when it closes)."""
        await self.reader.close()

    async def __aenter__(self) -> Self:
        """Use the meter on its own, without a pool: it stops reading when the block ends."""
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop reading the port."""
        await self.close()
