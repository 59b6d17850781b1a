"""Modbus transport and request/response layer: the one module that drives a pymodbus client.

A :class:`ModbusBus` owns one pymodbus async client (Modbus TCP, RTU over a serial line, or RTU framing
over TCP for serial-to-Ethernet converters). Requests on a bus are serialized by one asyncio.Lock, spaced
by a configurable gap (RS-485 devices need a quiet line between frames) and bounded by a per-request
timeout. After any failure the connection is dropped and the next request opens a new one.
pymodbus exceptions and exception responses become :mod:`device_drivers.errors` here; nothing above
this module sees a pymodbus type.

Non-standard answers: the E-Redes HAN port answers a function 04 read of count 1 with as many data bytes as
the DLMS object behind that index holds (4 for a 32-bit object), not ``2 * count``. pymodbus 3.16 frames such an
answer correctly (its RTU framer sizes a response from the byte count, and nothing compares the count with the
request), but its stock response decoder turns the bytes into 16-bit registers and fails on an odd byte count.
Every client here therefore decodes function 04 with :class:`ObjectReadResponse`, registered through
``client.register()``: it keeps the raw data bytes next to the same ``registers`` the stock class gives, so
devices sharing the bus are unaffected, and :meth:`ModbusBus.read_input_object` returns the bytes.

pymodbus logs every unanswered request at ERROR, with the last 20 raw frames of *every* connection in
the process attached. The device layer already logs each failure once at ERROR and repeats at DEBUG, so
this module silences the ``pymodbus`` logger unless the application set its level itself (set it to
DEBUG to see frame dumps).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.register_message import ReadInputRegistersResponse

from .config import TCP_TRANSPORTS, DeviceConfig
from .errors import DeviceError, DeviceExceptionResponse, DeviceUnavailable

_log = logging.getLogger(__name__)

_vendor_log = logging.getLogger("pymodbus")
if _vendor_log.level == logging.NOTSET:
    _vendor_log.setLevel(logging.CRITICAL)

#: Most registers one read may ask for (Modbus limit for function codes 03/04).
MAX_READ_REGISTERS = 125
#: Most coils one read may ask for (Modbus limit for function code 01).
MAX_READ_COILS = 2000


@dataclass(frozen=True)
class BusEndpoint:
    """Where a bus connects and, for a serial line, its line settings."""

    transport: str
    host: str | None = None
    port: int | None = None
    serial_port: str | None = None
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1

    @classmethod
    def from_config(cls, cfg: DeviceConfig) -> BusEndpoint:
        """Take the connection fields of a device's configuration."""
        if not cfg.is_modbus:
            raise DeviceError(f"device {cfg.name!r}: transport {cfg.transport!r} is not a Modbus bus")
        if cfg.transport in TCP_TRANSPORTS:
            return cls(transport=cfg.transport, host=cfg.host, port=cfg.port)
        return cls(
            transport=cfg.transport,
            serial_port=cfg.serial_port,
            baudrate=cfg.baudrate,
            parity=cfg.parity,
            stopbits=cfg.stopbits,
        )

    @property
    def key(self) -> tuple[str, str]:
        """Identity of the physical connection: ``("tcp", "host:port")`` or ``("serial", path)``."""
        if self.transport in TCP_TRANSPORTS:
            return ("tcp", f"{(self.host or '').lower()}:{self.port}")
        return ("serial", self.serial_port or "")

    def __str__(self) -> str:
        """Describe the endpoint for messages."""
        if self.transport in TCP_TRANSPORTS:
            return f"{self.transport} {self.host}:{self.port}"
        return f"{self.transport} {self.serial_port} {self.baudrate} 8{self.parity}{self.stopbits}"


class ObjectReadResponse(ReadInputRegistersResponse):
    """A function 04 response decoded without assuming two bytes per register asked for.

    ``payload`` holds the data bytes as sent (any count, odd included); ``registers`` holds the same 16-bit
    words the stock response would (a trailing odd byte is left out of them).
    """

    def __init__(self, *args: Any, payload: bytes = b"", **kwargs: Any) -> None:
        """Build an empty response (pymodbus builds it, then calls :meth:`decode`)."""
        super().__init__(*args, **kwargs)
        self.payload = payload

    def decode(self, data: bytes) -> None:
        """Take the byte count, then exactly that many data bytes."""
        byte_count = int(data[0])
        if byte_count > len(data) - 1:
            raise ValueError(f"byte count {byte_count} exceeds the {len(data) - 1} data bytes received")
        self.payload = bytes(data[1 : 1 + byte_count])
        self.registers = [int.from_bytes(self.payload[i : i + 2], "big") for i in range(0, byte_count - 1, 2)]

    def encode(self) -> bytes:
        """Encode the byte count and the payload."""
        return bytes([len(self.payload)]) + self.payload


class _ConnectionLost(Exception):
    """The connection closed while a request waited for its answer."""


class ModbusBus:
    """One Modbus connection shared by the devices on it; an async context manager."""

    def __init__(
        self,
        endpoint: BusEndpoint,
        *,
        timeout_s: float = 1.0,
        gap_s: float = 0.0,
        retries: int = 0,
    ) -> None:
        """Prepare the bus; the connection opens on the first request."""
        if endpoint.transport not in ("modbus-tcp", "modbus-rtu", "modbus-rtu-over-tcp"):
            raise DeviceError(f"transport {endpoint.transport!r} is not a Modbus transport")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.gap_s = gap_s
        self.retries = retries
        self._lock = asyncio.Lock()
        self._client: ModbusBaseClient | None = None
        self._lost: asyncio.Future[None] | None = None
        self._last_done = 0.0
        self._closed = False
        self.requests = 0
        self.failures = 0

    @classmethod
    def from_config(cls, cfg: DeviceConfig, *, retries: int = 0) -> ModbusBus:
        """Build a bus for one device's connection, with its timeout and gap."""
        return cls(BusEndpoint.from_config(cfg), timeout_s=cfg.timeout_s, gap_s=cfg.gap_ms / 1000, retries=retries)

    def __repr__(self) -> str:
        """Show the endpoint."""
        return f"ModbusBus({self.endpoint})"

    @property
    def connected(self) -> bool:
        """Whether a connection is open now."""
        return self._client is not None and self._client.connected

    async def __aenter__(self) -> Self:
        """Open the bus for requests (the connection itself opens lazily)."""
        self._closed = False
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the connection."""
        await self.close()

    async def close(self) -> None:
        """Close the connection; later requests raise DeviceError until the bus is entered again."""
        self._closed = True
        self._drop_client()
        await asyncio.sleep(0)  # let the transport's close callbacks run

    async def read_input_registers(
        self, unit: int, address: int, count: int, *, timeout_s: float | None = None
    ) -> list[int]:
        """Read `count` input registers (function 04) from `unit` starting at `address`."""
        rsp = await self._read(unit, "input registers", address, count, timeout_s, lambda c: c.read_input_registers)
        return _registers(rsp, count, unit)

    async def read_input_object(self, unit: int, index: int, *, timeout_s: float | None = None) -> bytes:
        """Read one object with function 04, count 1, and return its data bytes however many came back.

        For devices that map a whole object to one "register" index (the E-Redes HAN port).
        """
        rsp = await self._execute(
            unit,
            f"read input object {index:#06x}",
            lambda c: c.read_input_registers(index, count=1, device_id=unit),
            timeout_s,
        )
        if not isinstance(rsp, ObjectReadResponse):
            raise DeviceError(f"{self.endpoint} unit {unit}: unexpected answer {type(rsp).__name__} to object read")
        return rsp.payload

    async def read_holding_registers(
        self, unit: int, address: int, count: int, *, timeout_s: float | None = None
    ) -> list[int]:
        """Read `count` holding registers (function 03) from `unit` starting at `address`."""
        rsp = await self._read(unit, "holding registers", address, count, timeout_s, lambda c: c.read_holding_registers)
        return _registers(rsp, count, unit)

    async def read_coils(self, unit: int, address: int, count: int, *, timeout_s: float | None = None) -> list[bool]:
        """Read `count` coils (function 01) from `unit` starting at `address`."""
        rsp = await self._read(unit, "coils", address, count, timeout_s, lambda c: c.read_coils)
        bits = list(rsp.bits)
        if len(bits) < count:
            raise DeviceError(f"{self.endpoint} unit {unit}: asked for {count} coils, got {len(bits)}")
        return [bool(b) for b in bits[:count]]

    async def write_coil(self, unit: int, address: int, value: bool, *, timeout_s: float | None = None) -> None:
        """Write one coil (function 05) of `unit`."""
        await self._execute(
            unit,
            f"write coil {address}={'on' if value else 'off'}",
            lambda c: c.write_coil(address, value, device_id=unit),
            timeout_s,
        )

    async def _read(
        self,
        unit: int,
        what: str,
        address: int,
        count: int,
        timeout_s: float | None,
        method: Callable[[ModbusBaseClient], Callable[..., Awaitable[ModbusPDU]]],
    ) -> ModbusPDU:
        """Read `count` `what` ("coils", "input registers", ...) from `address` with the client's `method`.

        The count is checked against what one request may carry (coils have their own limit) first.
        """
        _check_count(count, MAX_READ_COILS if what == "coils" else MAX_READ_REGISTERS)
        return await self._execute(
            unit,
            f"read {what} {address}+{count}",
            lambda c: method(c)(address, count=count, device_id=unit),
            timeout_s,
        )

    async def _execute(
        self,
        unit: int,
        what: str,
        call: Callable[[ModbusBaseClient], Awaitable[ModbusPDU]],
        timeout_s: float | None,
    ) -> ModbusPDU:
        """Run one request under the bus lock, after the gap, within the timeout; map every failure.

        A request whose reused connection turns out to be dead (the peer closed it since the last request)
        is sent once more on a new connection; every other failure drops the connection and raises.
        """
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        limit = timeout * (self.retries + 1)  # pymodbus waits its own timeout once per try
        async with self._lock:
            if self._closed:
                raise DeviceError(f"{self.endpoint}: bus is closed")
            await self._wait_gap()
            self.requests += 1
            answered = False
            try:
                for attempt in (1, 2):
                    client, lost, fresh = await self._connected_client(connect_limit_s=timeout)
                    try:
                        response = await self._request(client, lost, call, limit_s=limit)
                        break
                    except _ConnectionLost:
                        self._drop_client()
                        if fresh or attempt == 2:
                            raise DeviceUnavailable(
                                f"{self.endpoint} unit {unit}: connection lost during {what}"
                            ) from None
                        _log.debug("%s: connection was closed by the peer; reconnecting", self.endpoint)
                answered = True
            except DeviceError:
                self.failures += 1
                raise
            except ModbusException as exc:
                self.failures += 1
                raise DeviceUnavailable(
                    f"{self.endpoint} unit {unit}: no answer to {what} ({type(exc).__name__}: {exc})"
                ) from None
            except (TimeoutError, OSError) as exc:
                self.failures += 1
                raise DeviceUnavailable(
                    f"{self.endpoint} unit {unit}: no answer to {what} within {limit:g} s"
                    if isinstance(exc, TimeoutError)
                    else f"{self.endpoint} unit {unit}: {what} failed: {exc}"
                ) from exc
            finally:
                self._last_done = time.monotonic()
                if not answered:
                    self._drop_client()
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            raise DeviceExceptionResponse(code, f"{self.endpoint} unit {unit}: {what}")
        return response

    async def _request(
        self,
        client: ModbusBaseClient,
        lost: asyncio.Future[None],
        call: Callable[[ModbusBaseClient], Awaitable[ModbusPDU]],
        *,
        limit_s: float,
    ) -> ModbusPDU:
        """Await the answer, giving up at the timeout or as soon as the connection drops.

        pymodbus leaves a request pending until its timeout when the connection closes under it (for
        example a server that went away between two polls), so the loss is watched for here.
        """
        request: asyncio.Future[ModbusPDU] = asyncio.ensure_future(call(client))
        watched: set[asyncio.Future[Any]] = {request, lost}
        try:
            done, _ = await asyncio.wait(watched, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not request.done():
                request.cancel()
                await asyncio.wait({request})
        if request in done:
            return request.result()
        if lost.done():
            raise _ConnectionLost
        raise TimeoutError

    async def _wait_gap(self) -> None:
        """Keep the line quiet for `gap_s` after the previous request ended."""
        if self.gap_s > 0:
            wait = self._last_done + self.gap_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)

    async def _connected_client(self, *, connect_limit_s: float) -> tuple[ModbusBaseClient, asyncio.Future[None], bool]:
        """Return the open client, a future set when its connection drops, and whether it is new."""
        if self._client is not None and self._client.connected and self._lost is not None:
            return self._client, self._lost, False
        self._drop_client()
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def connection_changed(connected: bool) -> None:
            if not connected and not lost.done():
                lost.set_result(None)

        client = self._new_client(connection_changed)
        self._client, self._lost = client, lost
        _log.debug("connecting %s", self.endpoint)
        try:
            async with asyncio.timeout(connect_limit_s + 0.1):
                ok = await client.connect()
        except (TimeoutError, OSError):
            raise
        except Exception as exc:  # e.g. termios.error from pyserial for settings the port refuses
            raise DeviceUnavailable(f"{self.endpoint}: cannot open ({type(exc).__name__}: {exc})") from None
        if not ok:
            raise DeviceUnavailable(f"{self.endpoint}: cannot connect (refused, unreachable or no such port)")
        return client, lost, True

    def _new_client(self, trace_connect: Callable[[bool], None]) -> ModbusBaseClient:
        """Build the pymodbus client for this endpoint, decoding function 04 with :class:`ObjectReadResponse`."""
        client = self._stock_client(trace_connect)
        client.register(ObjectReadResponse)
        return client

    def _stock_client(self, trace_connect: Callable[[bool], None]) -> ModbusBaseClient:
        """Build the pymodbus client for this endpoint, with automatic reconnection off."""
        ep = self.endpoint
        if ep.transport == "modbus-rtu":
            return AsyncModbusSerialClient(
                ep.serial_port or "",
                framer=FramerType.RTU,
                baudrate=ep.baudrate,
                bytesize=8,
                parity=ep.parity,
                stopbits=ep.stopbits,
                name=str(ep),
                timeout=self.timeout_s,
                retries=self.retries,
                reconnect_delay=0.0,
                trace_connect=trace_connect,
            )
        return AsyncModbusTcpClient(
            ep.host or "",
            port=ep.port or 502,
            framer=FramerType.RTU if ep.transport == "modbus-rtu-over-tcp" else FramerType.SOCKET,
            name=str(ep),
            timeout=self.timeout_s,
            retries=self.retries,
            reconnect_delay=0.0,
            trace_connect=trace_connect,
        )

    def _drop_client(self) -> None:
        """Close and forget the client so the next request reconnects."""
        client, self._client, self._lost = self._client, None, None
        if client is not None:
            client.close()


def _check_count(count: int, limit: int) -> None:
    """Refuse counts outside what one Modbus request may carry."""
    if not 1 <= count <= limit:
        raise ValueError(f"count must be 1..{limit}, got {count}")


def _registers(rsp: ModbusPDU, count: int, unit: int) -> list[int]:
    """Take exactly `count` registers from a read response."""
    regs = list(rsp.registers)
    if len(regs) != count:
        raise DeviceError(f"unit {unit}: asked for {count} registers, got {len(regs)}")
    return regs


class BusPool:
    """Hands the same :class:`ModbusBus` to devices that share a connection; closes them all on exit.

    A device that owns a serial port outright (a P1 reader) claims it with :meth:`claim_port`; the pool then
    refuses any other device on that port and runs the device's closer when it closes.
    """

    def __init__(self, *, retries: int = 0) -> None:
        """Start empty; `retries` is passed to every bus (keep it 0 or 1 so dead devices fail fast)."""
        self.retries = retries
        self._buses: dict[tuple[str, str], ModbusBus] = {}
        self._owners: dict[tuple[str, str], str] = {}
        self._claims: dict[tuple[str, str], str] = {}
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def claim_port(self, cfg: DeviceConfig, close: Callable[[], Awaitable[None]]) -> None:
        """Give `cfg`'s serial port to that one device; `close` is awaited when the pool closes."""
        key = ("serial", cfg.serial_port or "")
        other = self._claims.get(key) or self._owners.get(key)
        if other is not None:
            raise DeviceError(f"device {cfg.name!r} needs {cfg.serial_port} to itself but device {other!r} uses it")
        self._claims[key] = cfg.name
        self._closers.append(close)

    def bus_for(self, cfg: DeviceConfig) -> ModbusBus:
        """Return the bus for `cfg`'s connection, creating it on first use.

        Devices on one bus share the longest timeout and the longest gap among them. Two devices that
        name the same connection with different framing or line settings are a configuration error.
        """
        endpoint = BusEndpoint.from_config(cfg)
        if endpoint.key in self._claims:
            raise DeviceError(
                f"device {cfg.name!r} uses {endpoint} but device {self._claims[endpoint.key]!r} "
                f"has {endpoint.serial_port} to itself"
            )
        bus = self._buses.get(endpoint.key)
        if bus is None:
            bus = ModbusBus.from_config(cfg, retries=self.retries)
            self._buses[endpoint.key] = bus
            self._owners[endpoint.key] = cfg.name
            return bus
        if bus.endpoint != endpoint:
            raise DeviceError(
                f"device {cfg.name!r} uses {endpoint} but device {self._owners[endpoint.key]!r} "
                f"uses {bus.endpoint} on the same connection"
            )
        bus.timeout_s = max(bus.timeout_s, cfg.timeout_s)
        bus.gap_s = max(bus.gap_s, cfg.gap_ms / 1000)
        return bus

    @property
    def buses(self) -> list[ModbusBus]:
        """The buses created so far."""
        return list(self._buses.values())

    async def close(self) -> None:
        """Stop every port owner that claimed a port, then close every bus."""
        closers, self._closers = self._closers, []
        for close in closers:
            try:
                await close()
            except Exception:  # one owner failing to stop must not leave the others running
                _log.exception("closing a serial port owner failed")
        for bus in self._buses.values():
            await bus.close()

    async def __aenter__(self) -> Self:
        """Use the pool."""
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close every bus."""
        await self.close()
