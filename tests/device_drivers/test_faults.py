"""Faults: exception responses, dead and silent devices, backoff, recovery, reconnects, log policy."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest

from device_drivers import (
    BusPool,
    DeviceBackedOff,
    DeviceConfig,
    DeviceExceptionResponse,
    DeviceUnavailable,
    Switch,
    build_device,
)
from device_drivers.sim import ManualClock, MeterSim, MeterState, ModbusSimServer, PtyNullModem, RelayBoardSim

MakeCfg = Callable[..., DeviceConfig]


async def test_exception_code_surfaces_with_its_code(free_port: int, make_cfg: MakeCfg) -> None:
    async with ModbusSimServer({1: MeterSim("sdm630")}, port=free_port), BusPool() as pool:
        bus = pool.bus_for(make_cfg(free_port))
        for address, count in ((0x004C, 2), (0x0100, 2), (0x004A, 4), (0x0155, 2)):
            with pytest.raises(DeviceExceptionResponse) as info:
                await bus.read_input_registers(1, address, count)
            assert info.value.code == 2, (address, count)
        assert len(await bus.read_input_registers(1, 0x0156, 2)) == 2
        with pytest.raises(DeviceExceptionResponse) as info:
            await bus.read_holding_registers(1, 0, 2)
        assert info.value.code == 1  # the simulated meter serves input registers only
        assert len(await bus.read_input_registers(1, 0, 76)) == 76  # the connection survived


async def test_nothing_listening_fails_fast_then_backs_off(
    free_port: int, make_cfg: MakeCfg, clock: ManualClock
) -> None:
    async with BusPool() as pool:
        meter = build_device(make_cfg(free_port), pool, clock=clock)
        bus = pool.bus_for(meter.config)
        started = time.monotonic()
        with pytest.raises(DeviceUnavailable, match="cannot connect") as info:
            await meter.read()
        assert not isinstance(info.value, DeviceBackedOff)
        assert time.monotonic() - started < 0.5
        requests = bus.requests

        started = time.monotonic()
        with pytest.raises(DeviceBackedOff) as backed_off:
            await meter.read()
        assert time.monotonic() - started < 0.05
        assert bus.requests == requests  # the bus was not touched
        assert backed_off.value.retry_in_s == pytest.approx(1.0)


async def test_backoff_grows_while_the_device_stays_dead(free_port: int, make_cfg: MakeCfg, clock: ManualClock) -> None:
    async with BusPool() as pool:
        meter = build_device(make_cfg(free_port), pool, clock=clock)
        delays = []
        for _ in range(7):
            with pytest.raises(DeviceUnavailable):
                await meter.read()
            with pytest.raises(DeviceBackedOff) as info:
                await meter.read()
            delays.append(info.value.retry_in_s)
            clock.advance(info.value.retry_in_s)
        assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


async def test_a_silent_device_times_out_within_its_timeout(free_port: int, make_cfg: MakeCfg) -> None:
    sim = MeterSim("sdm630")
    sim.online = False
    async with ModbusSimServer({1: sim}, port=free_port), BusPool() as pool:
        meter = build_device(make_cfg(free_port, timeout_s=0.3), pool)
        started = time.monotonic()
        with pytest.raises(DeviceUnavailable, match="no answer") as info:
            await meter.read()
        elapsed = time.monotonic() - started
        assert not isinstance(info.value, DeviceBackedOff)
        assert 0.25 < elapsed < 1.0


async def test_a_device_that_comes_back_is_read_after_its_backoff(
    free_port: int, make_cfg: MakeCfg, clock: ManualClock
) -> None:
    sim = MeterSim("sdm630", MeterState(power_w=(500.0, 0.0, 0.0)))
    async with BusPool() as pool:
        meter = build_device(make_cfg(free_port), pool, clock=clock)
        with pytest.raises(DeviceUnavailable):
            await meter.read()
        async with ModbusSimServer({1: sim}, port=free_port):
            with pytest.raises(DeviceBackedOff):
                await meter.read()
            assert sim.requests == 0
            clock.advance(1.0)
            assert (await meter.read())["active_power_kw"] == pytest.approx(0.5)
            assert sim.requests == 1
            assert await meter.read()  # the backoff is cleared: read again at once


async def test_the_bus_reconnects_after_the_server_restarts(
    free_port: int, make_cfg: MakeCfg, clock: ManualClock
) -> None:
    sim = MeterSim("sdm630")
    async with BusPool() as pool:
        meter = build_device(make_cfg(free_port), pool, clock=clock)
        async with ModbusSimServer({1: sim}, port=free_port):
            await meter.read()
        with pytest.raises(DeviceUnavailable):
            await meter.read()
        clock.advance(1.0)
        async with ModbusSimServer({1: sim}, port=free_port):
            await meter.read()
        assert sim.requests == 2


async def test_a_failing_device_does_not_stop_its_bus_neighbours(
    free_port: int, make_cfg: MakeCfg, clock: ManualClock
) -> None:
    dead = MeterSim("sdm630")
    dead.online = False
    async with ModbusSimServer({1: dead, 2: MeterSim("sdm630")}, port=free_port), BusPool() as pool:
        bad = build_device(make_cfg(free_port, "bad", unit_id=1, timeout_s=0.2), pool, clock=clock)
        good = build_device(make_cfg(free_port, "good", unit_id=2, timeout_s=0.2), pool, clock=clock)
        with pytest.raises(DeviceUnavailable):
            await bad.read()
        assert await good.read()
        started = time.monotonic()
        for _ in range(5):  # the dead one is backed off and costs the bus nothing
            with pytest.raises(DeviceBackedOff):
                await bad.read()
            assert await good.read()
        assert time.monotonic() - started < 0.5  # five timeouts of the dead one would take 1 s


async def test_a_command_is_tried_even_while_reads_are_backed_off(
    free_port: int, make_cfg: MakeCfg, clock: ManualClock
) -> None:
    board = RelayBoardSim(8)
    async with BusPool() as pool:
        plug = build_device(make_cfg(free_port, driver="modbus_relay", coil=2), pool, clock=clock)
        assert isinstance(plug, Switch)
        with pytest.raises(DeviceUnavailable):
            await plug.read()
        async with ModbusSimServer({1: board}, port=free_port):
            with pytest.raises(DeviceBackedOff):
                await plug.read()
            assert await plug.set(True) is True
            assert board.coil_state(2)
            assert await plug.read() == {"on": True}  # the successful command cleared the backoff


async def test_first_error_logs_at_error_and_repeats_at_debug(
    free_port: int, make_cfg: MakeCfg, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="device_drivers")
    async with BusPool() as pool:
        meter = build_device(make_cfg(free_port, "m1"), pool, clock=clock)
        for _ in range(3):
            with pytest.raises(DeviceUnavailable):
                await meter.read()
            clock.advance(60)
        async with ModbusSimServer({1: MeterSim("sdm630")}, port=free_port):
            await meter.read()
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.ERROR, logging.DEBUG, logging.DEBUG]
    assert isinstance(failures[0].args, tuple) and failures[0].args[0] == "m1"  # lazy %-args, not an f-string
    assert any(r.levelno == logging.INFO and "answers again" in r.getMessage() for r in caplog.records)


async def test_a_missing_serial_port_is_unavailable() -> None:
    cfg = DeviceConfig(
        name="m", driver="eastron_sdm120", transport="modbus-rtu", serial_port="/dev/does-not-exist", timeout_s=0.5
    )
    async with BusPool() as pool:
        with pytest.raises(DeviceUnavailable, match="does-not-exist"):
            await build_device(cfg, pool).read()


async def test_line_settings_a_port_refuses_are_unavailable_not_a_crash() -> None:
    # pyserial raises termios.error (not an OSError) for parity on a pty; it must still map to ours.
    async with PtyNullModem() as line:
        cfg = DeviceConfig(
            name="m", driver="eastron_sdm120", transport="modbus-rtu", serial_port=line.paths[1], parity="E"
        )
        async with BusPool() as pool:
            with pytest.raises(DeviceUnavailable, match="cannot open"):
                await build_device(cfg, pool).read()


async def test_a_server_restart_between_polls_costs_no_failed_read(free_port: int, make_cfg: MakeCfg) -> None:
    sim = MeterSim("sdm630")
    async with BusPool() as pool:
        meter = build_device(make_cfg(free_port), pool)
        async with ModbusSimServer({1: sim}, port=free_port):
            await meter.read()
        async with ModbusSimServer({1: sim}, port=free_port):
            started = time.monotonic()
            await meter.read()  # the stale connection is noticed and replaced at once
            assert time.monotonic() - started < 0.4  # well under the 0.5 s timeout
        assert sim.requests == 2


async def test_one_pymodbus_retry_still_fails_well_under_two_seconds(free_port: int, make_cfg: MakeCfg) -> None:
    sim = MeterSim("sdm630")
    sim.online = False
    async with ModbusSimServer({1: sim}, port=free_port), BusPool(retries=1) as pool:
        meter = build_device(make_cfg(free_port, timeout_s=0.5), pool)
        started = time.monotonic()
        with pytest.raises(DeviceUnavailable, match="within 1 s"):
            await meter.read()
        assert 0.9 < time.monotonic() - started < 1.5
