"""Serve simulated devices with pymodbus's server: Modbus TCP, RTU on a serial device, or RTU over TCP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Literal, Self, cast

from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.base import ModbusBaseServer

from .base import SimulatedDevice

_log = logging.getLogger(__name__)

SimTransport = Literal["modbus-tcp", "modbus-rtu", "modbus-rtu-over-tcp"]


class ModbusSimServer:
    """Serve a mapping ``unit_id -> SimulatedDevice`` until the context exits.

    ``modbus-tcp`` and ``modbus-rtu-over-tcp`` listen on `host`:`port` (port 0 picks a free port, read it
    from :attr:`port`); ``modbus-rtu`` opens `serial_port` (a pty from :class:`PtyNullModem` in tests).
    A request for a unit that is not served, or whose device is offline, gets no answer at all, as on an
    RS-485 line where nobody has that address. Devices with their own dialect of a function code
    (:attr:`SimulatedDevice.request_pdus`) are served only with devices of the same dialect.
    """

    def __init__(
        self,
        devices: Mapping[int, SimulatedDevice],
        *,
        transport: SimTransport = "modbus-tcp",
        host: str = "127.0.0.1",
        port: int = 502,
        serial_port: str | None = None,
        baudrate: int = 9600,
        parity: Literal["N", "E", "O"] = "N",
        stopbits: int = 1,
    ) -> None:
        """Prepare the server; nothing listens before the context is entered."""
        if not devices:
            raise ValueError("serve at least one device")
        for unit in devices:
            if not 1 <= unit <= 247:
                raise ValueError(f"unit id {unit} outside 1..247")
        if transport == "modbus-rtu" and not serial_port:
            raise ValueError("transport 'modbus-rtu' needs serial_port")
        dialects = {device.request_pdus for device in devices.values()}
        if len(dialects) > 1:
            kinds = sorted({type(device).__name__ for device in devices.values()})
            raise ValueError(f"devices {kinds} decode requests differently and cannot share one server")
        self._custom_pdu = list(dialects.pop())
        self.devices = dict(devices)
        self.transport: SimTransport = transport
        self.host = host
        self._port = port
        self.serial_port = serial_port
        self.baudrate = baudrate
        self.parity = parity
        self.stopbits = stopbits
        self._server: ModbusBaseServer | None = None

    @property
    def port(self) -> int:
        """The TCP port listened on (the real one when 0 was asked for)."""
        return self._port

    def __repr__(self) -> str:
        """Show where the server listens."""
        where = self.serial_port if self.transport == "modbus-rtu" else f"{self.host}:{self._port}"
        return f"ModbusSimServer({self.transport} {where}, units {sorted(self.devices)})"

    async def __aenter__(self) -> Self:
        """Start serving; return once the server listens (or the serial port is open)."""
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop serving and close every connection."""
        await self.stop()

    async def start(self) -> None:
        """Start serving (what ``async with`` does)."""
        if self._server is not None:
            raise RuntimeError(f"{self!r} is already serving")
        simdevices = [device.build(unit) for unit, device in self.devices.items()]
        server: ModbusBaseServer
        if self.transport == "modbus-rtu":
            server = ModbusSerialServer(
                simdevices,
                framer=FramerType.RTU,
                port=self.serial_port or "",
                baudrate=self.baudrate,
                parity=self.parity,
                stopbits=self.stopbits,
                reconnect_delay=0.0,
                trace_pdu=self._filter,
                custom_pdu=self._custom_pdu or None,
            )
        else:
            server = ModbusTcpServer(
                simdevices,
                framer=FramerType.RTU if self.transport == "modbus-rtu-over-tcp" else FramerType.SOCKET,
                address=(self.host, self._port),
                trace_pdu=self._filter,
                custom_pdu=self._custom_pdu or None,
            )
        try:
            await server.serve_forever(background=True)
        except Exception as exc:  # RuntimeError from pymodbus, termios.error from pyserial
            server.close()
            raise OSError(f"{self!r} cannot listen: {type(exc).__name__}: {exc}") from None
        if self.transport != "modbus-rtu":
            sockets = getattr(server.transport, "sockets", None)
            if sockets:
                self._port = int(sockets[0].getsockname()[1])
        else:
            await asyncio.sleep(0)  # the serial transport registers its reader on the next loop turn
        self._server = server
        _log.debug("serving %r", self)

    async def stop(self) -> None:
        """Stop serving (what leaving ``async with`` does)."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()
            await asyncio.sleep(0)  # let the closed connections' callbacks run

    def _filter(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        """Drop requests for units not served or offline, so they get no answer."""
        if sending:
            return pdu
        device = self.devices.get(pdu.dev_id)
        if device is None or not device.online:
            # pymodbus treats a request PDU replaced by None as nothing to answer.
            return cast(ModbusPDU, None)
        return pdu
