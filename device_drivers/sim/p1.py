"""Simulated DSMR 5 P1 port: writes telegrams from a :class:`P1State` on a serial line, faults on request.

A double of a smart meter's P1 output that speaks the real wire format (telegram layout, OBIS lines and
CRC16 of ``reference/devices.md``) on a real tty — one end of a :class:`~device_drivers.sim.pty.PtyNullModem`;
the gateway reads the other. The CRC is computed here bit by bit, independently of the driver's table-driven
one, so a fault in either shows.

Start it (the gateway's ``serial_port`` is ``line.paths[1]``)::

    state = P1State(import_power_kw=1.2, import_energy_kwh=(100.0, 50.0))
    async with PtyNullModem() as line, P1TelegramWriter(line.paths[0], state, interval_s=1.0) as meter:
        ...
        meter.online = False          # the meter goes quiet
        await meter.send_garbage(b"\\x00\\xff noise")
        await meter.send_bad_crc()
        await meter.send_truncated()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Self


def p1_crc16(data: bytes) -> int:
    """CRC16 over `data`: reflected polynomial 0xA001, initial value 0, no final XOR (bit by bit)."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


@dataclass
class P1State:
    """What the simulated meter reports; change it between telegrams. None leaves an optional line out."""

    import_power_kw: float = 0.0
    export_power_kw: float = 0.0
    #: Import energy in tariffs 1 and 2.
    import_energy_kwh: tuple[float, float] = (0.0, 0.0)
    #: Export energy in tariffs 1 and 2.
    export_energy_kwh: tuple[float, float] = (0.0, 0.0)
    tariff: int = 1
    voltage_v: float | None = 230.0
    #: L1 current; DSMR 5 sends whole amperes.
    current_a: int | None = 0
    #: Limiter threshold (0-0:17.0.0); DSMR meters send 999.9 when no limit is set.
    limiter_kw: float | None = 999.9
    #: 0 disconnected, 1 connected, 2 ready to reconnect.
    breaker_state: int | None = 1
    header: str = "/ISk5\\2MT382-1000"


def telegram_body(state: P1State, *, now: datetime | None = None) -> bytes:
    """A DSMR 5 telegram from its ``/`` to its ``!`` inclusive (the bytes the CRC covers)."""
    stamp = (now or datetime.now(UTC)).strftime("%y%m%d%H%M%S") + "S"
    lines = [
        state.header,
        "",
        "1-3:0.2.8(50)",
        f"0-0:1.0.0({stamp})",
        "0-0:96.1.1(4B384547303034303436333935353037)",
        f"1-0:1.8.1({state.import_energy_kwh[0]:010.3f}*kWh)",
        f"1-0:1.8.2({state.import_energy_kwh[1]:010.3f}*kWh)",
        f"1-0:2.8.1({state.export_energy_kwh[0]:010.3f}*kWh)",
        f"1-0:2.8.2({state.export_energy_kwh[1]:010.3f}*kWh)",
        f"0-0:96.14.0({state.tariff:04d})",
        f"1-0:1.7.0({state.import_power_kw:06.3f}*kW)",
        f"1-0:2.7.0({state.export_power_kw:06.3f}*kW)",
        "0-0:96.7.21(00004)",
        "1-0:99.97.0(1)(0-0:96.7.19)(101208152415W)(0000000240*s)",
    ]
    if state.limiter_kw is not None:
        lines.append(f"0-0:17.0.0({state.limiter_kw:05.1f}*kW)")
    if state.breaker_state is not None:
        lines.append(f"0-0:96.3.10({state.breaker_state})")
    if state.voltage_v is not None:
        lines.append(f"1-0:32.7.0({state.voltage_v:05.1f}*V)")
    if state.current_a is not None:
        lines.append(f"1-0:31.7.0({state.current_a:03d}*A)")
    lines += [
        f"1-0:21.7.0({state.import_power_kw:06.3f}*kW)",
        "0-1:24.1.0(003)",
        "0-1:24.2.1(101209112500W)(12785.123*m3)",
    ]
    return ("\r\n".join(lines) + "\r\n!").encode("ascii")


def build_telegram(state: P1State, *, now: datetime | None = None, crc: int | None = None) -> bytes:
    """A whole telegram, ``/`` to the CR LF after its CRC; `crc` overrides the right one (to send a bad one)."""
    body = telegram_body(state, now=now)
    return body + b"%04X\r\n" % (p1_crc16(body) if crc is None else crc)


class P1TelegramWriter:
    """Writes one telegram per `interval_s` from `state` on the tty at `path` while :attr:`online`.

    ``interval_s=None`` writes only when asked (:meth:`send`). :attr:`sent` counts the valid telegrams written.
    """

    def __init__(self, path: str, state: P1State | None = None, *, interval_s: float | None = 1.0) -> None:
        """Prepare; the tty opens when the context is entered."""
        if interval_s is not None and interval_s <= 0:
            raise ValueError("interval_s must be > 0 or None")
        self.path = path
        self.state = state if state is not None else P1State()
        self.interval_s = interval_s
        self.online = True
        self.sent = 0
        self._fd: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        """Open the tty and start writing."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        if self.interval_s is not None:
            self._task = asyncio.create_task(self._run(self.interval_s), name=f"p1-sim {self.path}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop writing and close the tty."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    async def send(self) -> bytes:
        """Write one valid telegram from the state now; return it."""
        telegram = build_telegram(self.state)
        await self.send_garbage(telegram)
        self.sent += 1
        return telegram

    async def send_bad_crc(self) -> bytes:
        """Write a telegram whose CRC is wrong."""
        body = telegram_body(self.state)
        telegram = body + b"%04X\r\n" % (p1_crc16(body) ^ 0x0101)
        await self.send_garbage(telegram)
        return telegram

    async def send_truncated(self, keep: int | None = None) -> bytes:
        """Write the first `keep` bytes of a telegram (by default, half of it) and nothing else."""
        telegram = build_telegram(self.state)
        part = telegram[: len(telegram) // 2 if keep is None else keep]
        await self.send_garbage(part)
        return part

    async def send_garbage(self, data: bytes) -> None:
        """Write `data` as it is (noise on the line, or any bytes a test wants the reader to see)."""
        if self._fd is None:
            raise RuntimeError("the writer is not open")
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                await asyncio.sleep(0.001)  # the pty is full: let the null modem drain it
                continue
            view = view[written:]
        await asyncio.sleep(0)

    async def _run(self, interval_s: float) -> None:
        """Write a telegram per interval while online; a tty that fails ends the writing."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            if self.online:
                try:
                    await self.send()
                except OSError:
                    return
            next_at += interval_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
