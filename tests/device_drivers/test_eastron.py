"""Eastron meter drivers against simulated meters over real Modbus TCP, RTU on a pty, and RTU over TCP."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from device_drivers import BusPool, DeviceConfig, DeviceExceptionResponse, Meter, build_device
from device_drivers.sim import MeterSim, MeterState, ModbusSimServer, PtyNullModem

MakeCfg = Callable[..., DeviceConfig]

STATE = MeterState(
    voltage_v=(231.5, 229.0, 230.25),
    current_a=(4.5, 1.25, 0.5),
    power_w=(1000.0, 250.5, -100.0),
    frequency_hz=49.95,
    import_kwh=1234.5,
    export_kwh=56.25,
)


def expected(power_w: float) -> dict[str, float]:
    return {
        "active_power_kw": power_w / 1000,
        "import_energy_kwh": 1234.5,
        "export_energy_kwh": 56.25,
        "voltage_v": 231.5,
        "current_a": 4.5,
        "frequency_hz": 49.95,
    }


def assert_readings(got: Mapping[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


async def test_sdm630_reads_total_power_and_phase_one_in_one_request(free_port: int, make_cfg: MakeCfg) -> None:
    sim = MeterSim("sdm630", STATE)
    async with ModbusSimServer({1: sim}, port=free_port), BusPool() as pool:
        meter = build_device(make_cfg(free_port), pool)
        assert isinstance(meter, Meter) and meter.kind == "meter"
        assert_readings(await meter.read(), expected(1000.0 + 250.5 - 100.0))
        assert sim.requests == 1  # one block read of 0x0000..0x004B per poll


async def test_meter_follows_its_state_between_polls(free_port: int, make_cfg: MakeCfg) -> None:
    state = MeterState(power_w=(100.0, 100.0, 100.0))
    async with ModbusSimServer({1: MeterSim("sdm630", state)}, port=free_port), BusPool() as pool:
        meter = build_device(make_cfg(free_port), pool)
        assert (await meter.read())["active_power_kw"] == pytest.approx(0.3)
        state.power_w = (2000.0, 0.0, 0.0)
        assert (await meter.read())["active_power_kw"] == pytest.approx(2.0)


async def test_sdm120_reads_its_single_phase_in_two_requests(free_port: int, make_cfg: MakeCfg) -> None:
    sim = MeterSim("sdm120", STATE)
    async with ModbusSimServer({7: sim}, port=free_port), BusPool() as pool:
        meter = build_device(make_cfg(free_port, driver="eastron_sdm120", unit_id=7), pool)
        assert_readings(await meter.read(), expected(1000.0))
        assert sim.requests == 2


async def test_sdm120_over_rtu_on_a_pty_pair() -> None:
    # Linux ptys ignore parity, and pyserial then refuses parity E/O on them: the line runs 8N2 here.
    async with PtyNullModem() as line:
        server_end, gateway_end = line.paths
        cfg = DeviceConfig(
            name="sdm120",
            driver="eastron_sdm120",
            transport="modbus-rtu",
            serial_port=gateway_end,
            baudrate=9600,
            stopbits=2,
            unit_id=3,
            timeout_s=0.5,
            gap_ms=5,
        )
        sim = MeterSim("sdm120", STATE)
        async with (
            ModbusSimServer({3: sim}, transport="modbus-rtu", serial_port=server_end, stopbits=2),
            BusPool() as pool,
        ):
            meter = build_device(cfg, pool)
            assert_readings(await meter.read(), expected(1000.0))
            assert_readings(await meter.read(), expected(1000.0))
            assert sim.requests == 4


async def test_sdm630_over_rtu_framing_on_tcp(free_port: int, make_cfg: MakeCfg) -> None:
    async with (
        ModbusSimServer({1: MeterSim("sdm630", STATE)}, transport="modbus-rtu-over-tcp", port=free_port),
        BusPool() as pool,
    ):
        meter = build_device(make_cfg(free_port, transport="modbus-rtu-over-tcp"), pool)
        assert_readings(await meter.read(), expected(1150.5))


async def test_wrong_model_surfaces_the_illegal_address_exception(free_port: int, make_cfg: MakeCfg) -> None:
    # An SDM630 block read (0x0000..0x004B) runs into registers an SDM120 does not have.
    async with ModbusSimServer({1: MeterSim("sdm120", STATE)}, port=free_port), BusPool() as pool:
        meter = build_device(make_cfg(free_port), pool)
        with pytest.raises(DeviceExceptionResponse) as info:
            await meter.read()
        assert info.value.code == 2
        assert "illegal data address" in str(info.value)
