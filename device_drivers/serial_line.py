"""Serial ports read as a byte stream on the event loop: the one module of the drivers that drives pyserial.

pyserial opens the port and sets the line (baud rate, data bits, parity, stop bits); the bytes are then read
from its file descriptor with ``loop.add_reader``, without a thread: a read never blocks the loop, stopping is
immediate (no thread parked in a blocking ``read`` until its timeout), and the consumer's state needs no lock.
The price is POSIX only, which the gateway is. Every failure — the port missing, settings it refuses
(``termios.error``, not an OSError), an I/O error, a hang-up (end of file: a USB adapter unplugged, a pty whose
other side closed) — becomes :class:`DeviceUnavailable` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import serial

from .errors import DeviceUnavailable

#: Most bytes taken from the port per wake-up.
READ_CHUNK = 4096


@dataclass(frozen=True)
class LineSettings:
    """A serial port and its line settings."""

    port: str
    baudrate: int
    bytesize: int = 8
    parity: str = "N"
    stopbits: int = 1

    def __str__(self) -> str:
        """Describe the line for messages, e.g. ``/dev/ttyUSB0 115200 8N1``."""
        return f"{self.port} {self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"


class SerialLine:
    """An open serial port whose bytes are handed to a callback as they arrive."""

    def __init__(self, settings: LineSettings, port: Any) -> None:
        """Wrap an open pyserial port (use :meth:`open`)."""
        self.settings = settings
        self._port = port
        self._fd: int = port.fileno()
        os.set_blocking(self._fd, False)

    @classmethod
    def open(cls, settings: LineSettings) -> SerialLine:
        """Open the port with its settings; DeviceUnavailable when it is missing or refuses them."""
        try:
            port = serial.Serial(
                port=settings.port,
                baudrate=settings.baudrate,
                bytesize=settings.bytesize,
                parity=settings.parity,
                stopbits=settings.stopbits,
                timeout=0,
            )
        except (serial.SerialException, OSError, termios.error, ValueError) as exc:
            raise DeviceUnavailable(f"{settings}: cannot open ({type(exc).__name__}: {exc})") from None
        return cls(settings, port)

    def close(self) -> None:
        """Close the port (idempotent)."""
        with contextlib.suppress(Exception):
            self._port.close()

    async def pump(self, on_data: Callable[[bytes], None]) -> None:
        """Hand every chunk that arrives to `on_data` until the port fails; then raise DeviceUnavailable.

        Cancelling stops reading at once. `on_data` runs in the event loop's reader callback.
        """
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()

        def fail(message: str) -> None:
            loop.remove_reader(self._fd)  # a hung-up descriptor stays readable: stop the callbacks now
            if not failed.done():
                failed.set_exception(DeviceUnavailable(f"{self.settings}: {message}"))

        def readable() -> None:
            try:
                data = os.read(self._fd, READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                fail(f"read failed ({exc})")
                return
            if not data:
                fail("the port hung up (unplugged or closed by the other side)")
                return
            on_data(data)

        loop.add_reader(self._fd, readable)
        try:
            await failed
        finally:
            loop.remove_reader(self._fd)
