"""The DSMR P1 driver reading the simulated meter's telegrams over a real pty pair."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from device_drivers import (
    Backoff,
    BusPool,
    DeviceConfig,
    DeviceError,
    DeviceUnavailable,
    DsmrP1Meter,
    Meter,
    build_device,
)
from device_drivers.dsmr import p1_readings
from device_drivers.obis import parse_telegram
from device_drivers.p1_framing import crc16
from device_drivers.serial_line import LineSettings, SerialLine
from device_drivers.sim import ManualClock, P1State, P1TelegramWriter, PtyNullModem, build_telegram
from tests.waiting import eventually

STATE = P1State(
    import_power_kw=1.193,
    export_power_kw=0.25,
    import_energy_kwh=(1234.5, 678.25),
    export_energy_kwh=(12.5, 3.0),
    tariff=2,
    voltage_v=231.4,
    current_a=6,
    limiter_kw=6.9,
    breaker_state=1,
)
EXPECTED = {
    "active_power_kw": 1.193 - 0.25,
    "import_energy_kwh": 1234.5 + 678.25,
    "export_energy_kwh": 15.5,
    "voltage_v": 231.4,
    "current_a": 6.0,
    "tariff_period": 2.0,
    "limiter_kw": 6.9,
    "breaker_state": 1.0,
}


def p1_cfg(port: str, **fields: object) -> DeviceConfig:
    entry: dict[str, object] = {"name": "p1", "driver": "dsmr_p1", "transport": "serial", "serial_port": port}
    return DeviceConfig.model_validate(entry | {"timeout_s": 1.0} | fields)



@pytest.fixture
async def line() -> AsyncIterator[PtyNullModem]:
    async with PtyNullModem() as modem:
        yield modem


async def test_readings_of_the_newest_telegram(line: PtyNullModem) -> None:
    meter_end, gateway_end = line.paths
    state = dataclasses.replace(STATE)
    async with P1TelegramWriter(meter_end, state, interval_s=0.05), BusPool() as pool:
        meter = build_device(p1_cfg(gateway_end), pool)
        assert isinstance(meter, DsmrP1Meter) and isinstance(meter, Meter) and meter.kind == "meter"
        readings = await meter.read()  # the first read starts the reader and waits for a telegram
        assert readings == pytest.approx(EXPECTED)
        assert "frequency_hz" not in readings  # P1 does not carry it
        state.import_power_kw, state.export_power_kw = 0.0, 2.0
        seen = meter.reader.framing.telegrams
        await eventually(lambda: meter.reader.framing.telegrams > seen + 1)
        assert (await meter.read())["active_power_kw"] == pytest.approx(-2.0)
    assert not meter.reader.running  # closing the pool stopped the reader


async def test_garbage_bad_crcs_and_truncated_telegrams_on_the_line(line: PtyNullModem) -> None:
    meter_end, gateway_end = line.paths
    state = P1State(import_power_kw=0.5, import_energy_kwh=(10.0, 20.0))
    async with P1TelegramWriter(meter_end, state, interval_s=None) as sim, BusPool() as pool:
        meter = build_device(p1_cfg(gateway_end, timeout_s=0.2), pool)
        assert isinstance(meter, DsmrP1Meter)
        with pytest.raises(DeviceUnavailable, match="no valid telegram"):
            await meter.read()  # nothing sent yet: waits timeout_s, then unavailable
        await sim.send_garbage(b"\x00\xff\xfe line noise !12")
        await sim.send_truncated()
        await sim.send_bad_crc()
        await sim.send_garbage(b"/half a header without an end")
        await eventually(lambda: meter.reader.framing.bad_crc == 1)
        with pytest.raises(DeviceUnavailable, match=r"1 telegram\(s\) with a bad CRC"):
            await meter.read()
        await sim.send()
        await eventually(lambda: meter.reader.framing.telegrams == 1)
        assert (await meter.read())["active_power_kw"] == pytest.approx(0.5)
        stats = meter.reader.framing
        assert (stats.telegrams, stats.bad_crc, stats.truncated) == (1, 1, 2)
        assert stats.discarded_bytes > 0


async def test_a_meter_that_goes_quiet_is_unavailable_until_it_speaks_again(
    line: PtyNullModem, clock: ManualClock
) -> None:
    meter_end, gateway_end = line.paths
    async with P1TelegramWriter(meter_end, P1State(import_power_kw=0.7), interval_s=None) as sim, BusPool() as pool:
        meter = build_device(p1_cfg(gateway_end, max_age_s=10), pool, clock=clock)
        assert isinstance(meter, DsmrP1Meter)
        meter.reader.start()
        await asyncio.sleep(0.05)  # let the reader open the port
        await sim.send()
        await eventually(lambda: meter.reader.latest is not None)
        assert (await meter.read())["active_power_kw"] == pytest.approx(0.7)
        clock.advance(9.9)
        assert await meter.read()  # still young enough
        clock.advance(0.2)
        with pytest.raises(DeviceUnavailable, match=r"10\.1 s old \(max 10 s\)"):
            await meter.read()
        sim.state.import_power_kw = 1.4
        await sim.send()
        await eventually(lambda: meter.reader.framing.telegrams == 2)
        assert (await meter.read())["active_power_kw"] == pytest.approx(1.4)


async def test_the_periodic_writer_going_offline_and_back(line: PtyNullModem) -> None:
    meter_end, gateway_end = line.paths
    async with P1TelegramWriter(meter_end, P1State(import_power_kw=0.3), interval_s=0.02) as sim, BusPool() as pool:
        meter = build_device(p1_cfg(gateway_end, max_age_s=0.15), pool)
        assert isinstance(meter, DsmrP1Meter)
        assert await meter.read()
        sim.online = False
        await asyncio.sleep(0.3)
        with pytest.raises(DeviceUnavailable, match="old"):
            await meter.read()
        sim.online = True
        await eventually(lambda: sim.sent > 0 and time.monotonic() - meter.reader.latest_at < 0.05)
        assert (await meter.read())["active_power_kw"] == pytest.approx(0.3)


async def test_a_port_that_disappears_is_reopened_with_backoff(tmp_path: Path) -> None:
    # The gateway names the port by a stable link (as udev's /dev/serial/by-id/... links); the device behind it
    # goes away (the null modem closes: the reader sees a hang-up) and comes back as a new pty.
    link = tmp_path / "ttyP1"
    cfg = p1_cfg(str(link))
    meter = DsmrP1Meter(cfg, reopen_backoff=Backoff(initial_s=0.05, max_s=0.1))
    async with BusPool() as pool:
        pool.claim_port(cfg, meter.close)
        async with PtyNullModem() as first:
            os.symlink(first.paths[1], link)
            async with P1TelegramWriter(first.paths[0], P1State(import_power_kw=1.0), interval_s=0.02):
                assert (await meter.read())["active_power_kw"] == pytest.approx(1.0)
            link.unlink()
        await eventually(lambda: meter.reader.port_error is not None)
        assert "hung up" in str(meter.reader.port_error)
        await eventually(lambda: meter.reader.backoff.failures >= 2)  # the missing port is retried, backed off
        assert "cannot open" in str(meter.reader.port_error)
        async with PtyNullModem() as second:
            os.symlink(second.paths[1], link)
            async with P1TelegramWriter(second.paths[0], P1State(import_power_kw=2.0), interval_s=0.02):
                await eventually(lambda: meter.reader.port_error is None and meter.reader.opens == 2)
                await eventually(
                    lambda: meter.reader.latest is not None and meter.reader.latest.values["import_power_kw"] == 2
                )
                assert (await meter.read())["active_power_kw"] == pytest.approx(2.0)
            link.unlink()
    assert not meter.reader.running


async def test_a_missing_port_is_unavailable_and_the_pool_stops_its_retries() -> None:
    async with BusPool() as pool:
        meter = build_device(p1_cfg("/dev/does-not-exist", timeout_s=0.1), pool)
        assert isinstance(meter, DsmrP1Meter)
        with pytest.raises(DeviceUnavailable, match=r"does-not-exist.*cannot open"):
            await meter.read()
        assert meter.reader.running
    assert not meter.reader.running
    with pytest.raises(DeviceError, match="closed"):
        await meter.read()


async def test_a_7e1_line_for_older_meters(line: PtyNullModem) -> None:
    # A fresh Linux pty takes 7E1 through pyserial (it silently stays 8N1: ASCII telegrams pass either way), so
    # this checks the settings reach the port, not that the line really has 7 bits.
    meter_end, gateway_end = line.paths
    cfg = p1_cfg(gateway_end, baudrate=9600, bytesize=7, parity="E")
    async with P1TelegramWriter(meter_end, P1State(import_power_kw=0.9), interval_s=0.05), BusPool() as pool:
        meter = build_device(cfg, pool)
        assert repr(meter).endswith("9600 7E1)")
        assert (await meter.read())["active_power_kw"] == pytest.approx(0.9)


@pytest.mark.parametrize("where", ["pty", "not a tty"])
async def test_a_port_that_refuses_its_settings_is_unavailable(line: PtyNullModem, where: str) -> None:
    # A pty once set to 8N1 refuses 8E1 with termios.error (not an OSError); /dev/null is no tty at all.
    path = line.paths[1] if where == "pty" else "/dev/null"
    if where == "pty":
        SerialLine.open(LineSettings(path, 115200)).close()
    cfg = p1_cfg(path, parity="E", timeout_s=0.1)
    async with BusPool() as pool:
        with pytest.raises(DeviceUnavailable, match=r"115200 8E1: cannot open \((error|SerialException)"):
            await build_device(cfg, pool).read()


async def test_a_telegram_without_the_needed_values_is_an_error_not_stale(line: PtyNullModem) -> None:
    meter_end, gateway_end = line.paths
    body = b"/XMX5\\odd\r\n\r\n1-0:1.7.0(00.500*kW)\r\nnonsense line\r\n!"
    async with P1TelegramWriter(meter_end, interval_s=None) as sim, BusPool() as pool:
        meter = build_device(p1_cfg(gateway_end, timeout_s=0.1), pool)
        assert isinstance(meter, DsmrP1Meter)
        meter.reader.start()
        await asyncio.sleep(0.05)
        await sim.send_garbage(body + b"%04X\r\n" % crc16(body))
        await eventually(lambda: meter.reader.latest is not None)
        with pytest.raises(DeviceError, match=r"lacks 1-0:2\.7\.0") as info:
            await meter.read()
        assert not isinstance(info.value, DeviceUnavailable)
        assert meter.reader.malformed_lines == 1


async def test_log_policy_first_error_then_debug_then_recovery(
    line: PtyNullModem, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="device_drivers")
    meter_end, gateway_end = line.paths
    async with P1TelegramWriter(meter_end, interval_s=None) as sim, BusPool() as pool:
        meter = build_device(p1_cfg(gateway_end, timeout_s=0.05), pool, clock=clock)
        for _ in range(3):
            with pytest.raises(DeviceUnavailable):
                await meter.read()
        await sim.send()
        await eventually(lambda: isinstance(meter, DsmrP1Meter) and meter.reader.latest is not None)
        await meter.read()
    failures = [r for r in caplog.records if r.name == "device_drivers.dsmr" and "failed" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.ERROR, logging.DEBUG, logging.DEBUG]
    assert any(r.levelno == logging.INFO and "fresh telegrams again" in r.getMessage() for r in caplog.records)


async def test_a_p1_port_belongs_to_one_device() -> None:
    async with BusPool() as pool:
        build_device(p1_cfg("/dev/ttyP1"), pool)
        with pytest.raises(DeviceError, match="'p1' uses it"):
            build_device(p1_cfg("/dev/ttyP1", name="other"), pool)
        rtu = DeviceConfig(name="m", driver="eastron_sdm120", transport="modbus-rtu", serial_port="/dev/ttyP1")
        with pytest.raises(DeviceError, match="'p1' has /dev/ttyP1 to itself"):
            build_device(rtu, pool)
        build_device(rtu.model_copy(update={"serial_port": "/dev/ttyP2"}), pool)
        with pytest.raises(DeviceError, match="'m' uses it"):
            build_device(p1_cfg("/dev/ttyP2", name="late"), pool)


def test_the_simulators_telegram_is_what_the_parser_reads() -> None:
    assert p1_readings(parse_telegram(build_telegram(STATE)).values) == pytest.approx(EXPECTED)


async def test_a_meter_used_without_a_pool_stops_reading_when_its_block_ends(line: PtyNullModem) -> None:
    meter_end, gateway_end = line.paths
    async with P1TelegramWriter(meter_end, P1State(import_power_kw=0.4), interval_s=0.05):
        async with DsmrP1Meter(p1_cfg(gateway_end)) as meter:
            assert (await meter.read())["active_power_kw"] == pytest.approx(0.4)
            assert meter.reader.running
        assert not meter.reader.running
