"""ModbusSimServer itself: listening, free ports, unknown units, many servers in one loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AsyncExitStack

import pytest

from device_drivers import BusPool, DeviceConfig, DeviceUnavailable, Meter, build_device
from device_drivers.sim import MeterSim, ModbusSimServer, SimulatedHome

from_port = Callable[..., DeviceConfig]


async def test_listening_before_enter_returns_and_closed_after_exit(free_port: int) -> None:
    async with ModbusSimServer({1: MeterSim()}, port=free_port) as server:
        assert server.port == free_port
        _reader, writer = await asyncio.open_connection("127.0.0.1", free_port)
        writer.close()
        await writer.wait_closed()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", free_port)


async def test_port_zero_reports_the_port_it_got() -> None:
    async with ModbusSimServer({1: MeterSim()}, port=0) as server:
        assert server.port > 0


async def test_a_busy_port_is_a_clear_error(free_port: int) -> None:
    async with ModbusSimServer({1: MeterSim()}, port=free_port):
        with pytest.raises(OSError, match="cannot listen"):
            async with ModbusSimServer({1: MeterSim()}, port=free_port):
                pass


async def test_a_unit_that_is_not_served_does_not_answer(free_port: int, make_cfg: from_port) -> None:
    async with ModbusSimServer({1: MeterSim()}, port=free_port), BusPool() as pool:
        with pytest.raises(DeviceUnavailable, match="no answer"):
            await build_device(make_cfg(free_port, unit_id=5, timeout_s=0.2), pool).read()


async def test_two_hundred_homes_in_one_loop(make_cfg: from_port) -> None:
    """One loop serves 200 homes at once, each its own meter. What it shows is that every home answers with its own
    reading; how fast is a benchmark's question, so each read may wait as long as a loaded machine needs (a 4 s
    bound on the whole and the fixture's 0.5 s per read failed a full suite at load 11)."""
    homes = [SimulatedHome(0.1 * i, [(0, 1.0)]) for i in range(200)]
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(ModbusSimServer(h.units, port=0)) for h in homes]
        pool = await stack.enter_async_context(BusPool())
        meters = [build_device(make_cfg(s.port, f"m{i}", timeout_s=30.0), pool) for i, s in enumerate(servers)]
        readings = await asyncio.gather(*(m.read() for m in meters if isinstance(m, Meter)))
    assert [round(r["active_power_kw"], 3) for r in readings] == [round(0.1 * i + 1.0, 3) for i in range(200)]
