"""ModbusBus and BusPool: shared connections, one lock, the gap between requests, closing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from device_drivers import BusPool, DeviceConfig, DeviceError, ModbusBus
from device_drivers.sim import MeterSim, MeterState, ModbusSimServer

MakeCfg = Callable[..., DeviceConfig]


async def test_pool_shares_a_bus_per_connection(make_cfg: MakeCfg) -> None:
    async with BusPool() as pool:
        a = pool.bus_for(make_cfg(5020, "a", unit_id=1, timeout_s=0.5, gap_ms=0))
        b = pool.bus_for(make_cfg(5020, "b", unit_id=2, timeout_s=0.8, gap_ms=20))
        c = pool.bus_for(make_cfg(5021, "c"))
        rtu1 = pool.bus_for(make_cfg(0, "r1", transport="modbus-rtu", serial_port="/dev/ttyUSB0"))
        rtu2 = pool.bus_for(make_cfg(0, "r2", transport="modbus-rtu", serial_port="/dev/ttyUSB0", unit_id=9))
        assert a is b and a is not c and rtu1 is rtu2
        assert (a.timeout_s, a.gap_s) == (0.8, 0.02)  # the slowest device sets the pace
        assert len(pool.buses) == 3


async def test_pool_refuses_one_connection_with_two_framings_or_line_settings(make_cfg: MakeCfg) -> None:
    async with BusPool() as pool:
        pool.bus_for(make_cfg(5020, "a"))
        with pytest.raises(DeviceError, match=r"'b' uses modbus-rtu-over-tcp .* but device 'a' uses modbus-tcp"):
            pool.bus_for(make_cfg(5020, "b", transport="modbus-rtu-over-tcp"))
        pool.bus_for(make_cfg(0, "r1", transport="modbus-rtu", serial_port="/dev/ttyS0"))
        with pytest.raises(DeviceError, match="same connection"):
            pool.bus_for(make_cfg(0, "r2", transport="modbus-rtu", serial_port="/dev/ttyS0", baudrate=19200))


async def test_requests_on_a_bus_are_serialized_and_spaced_by_the_gap(free_port: int, make_cfg: MakeCfg) -> None:
    sims = {unit: MeterSim("sdm630", MeterState(power_w=(unit * 100.0, 0.0, 0.0))) for unit in (1, 2, 3)}
    async with ModbusSimServer(sims, port=free_port):
        async with ModbusBus.from_config(make_cfg(free_port, gap_ms=40)) as bus:
            started = time.monotonic()
            results = await asyncio.gather(*(bus.read_input_registers(u, 0x000C, 2) for u in (1, 2, 3, 1, 2, 3)))
            elapsed = time.monotonic() - started
        assert [r[0] for r in results[:3]] == [0x42C8, 0x4348, 0x4396]  # 100, 200, 300 W
        assert results[:3] == results[3:]
        assert elapsed >= 5 * 0.04 * 0.95  # five gaps between six requests
        assert bus.requests == 6


async def test_a_closed_bus_refuses_requests(free_port: int, make_cfg: MakeCfg) -> None:
    async with ModbusSimServer({1: MeterSim()}, port=free_port):
        bus = ModbusBus.from_config(make_cfg(free_port))
        async with bus:
            await bus.read_input_registers(1, 0, 2)
            assert bus.connected
        assert not bus.connected
        with pytest.raises(DeviceError, match="closed"):
            await bus.read_input_registers(1, 0, 2)


async def test_counts_outside_one_request_are_refused_before_the_wire(make_cfg: MakeCfg) -> None:
    async with ModbusBus.from_config(make_cfg(5020)) as bus:
        with pytest.raises(ValueError, match=r"1\.\.125"):
            await bus.read_input_registers(1, 0, 126)
        with pytest.raises(ValueError, match=r"1\.\.2000"):
            await bus.read_coils(1, 0, 0)
        assert bus.requests == 0
