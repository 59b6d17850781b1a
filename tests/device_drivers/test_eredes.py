"""E-Redes HAN meters: object decoding and the poll plan (pure), then the driver against the simulated HAN port
over Modbus RTU on a pty pair, RTU over TCP and Modbus TCP, with its non-standard answers, faults and back-off."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

import pytest

from device_drivers import (
    BusPool,
    DeviceBackedOff,
    DeviceConfig,
    DeviceError,
    DeviceExceptionResponse,
    DeviceUnavailable,
    EredesHanMeter,
    Meter,
    build_device,
)
from device_drivers.eredes import HanMap, HanObject, PollPlan, decode_object
from device_drivers.modbus import ObjectReadResponse
from device_drivers.sim import HanMeterSim, HanState, ManualClock, MeterSim, ModbusSimServer, PtyNullModem

STATE = HanState(
    import_power_w=2350,
    export_power_w=150,
    import_energy_wh=12_345_678,
    export_energy_wh=987_654,
    voltage_v=231.4,
    current_a=10.2,
    frequency_hz=49.9,
    thresholds_va=(3450, 6900, 10350, 13800, 17250, 20700),
    tariff_period=3,
    breaker_state=1,
)
EXPECTED = {
    "active_power_kw": 2.2,
    "import_energy_kwh": 12345.678,
    "export_energy_kwh": 987.654,
    "voltage_v": 231.4,
    "current_a": 10.2,
    "frequency_hz": 49.9,
    "contracted_power_kva": 10.35,
    "tariff_period": 3.0,
    "breaker_state": 1.0,
}


def han_cfg(**fields: object) -> DeviceConfig:
    return HanMeterSim.device_config(**({"timeout_s": 0.3, "gap_ms": 0} | fields))  # type: ignore[arg-type]


def fresh_state(**changes: object) -> HanState:
    return dataclasses.replace(STATE, **changes)  # type: ignore[arg-type]


# -- pure layers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "data", "value"),
    [
        ("u32", bytes.fromhex("00bc614e"), 12_345_678),
        ("u32", bytes.fromhex("ffffffff"), 0xFFFFFFFF),
        ("u16", bytes.fromhex("090a"), 2314),
        ("enum", bytes.fromhex("0300"), 3),  # the tariff period in the high byte, as documented
        ("enum", bytes.fromhex("0001"), 1),  # an enumeration sent as a 16-bit value
        ("enum", bytes.fromhex("0000"), 0),
        ("enum", bytes.fromhex("02"), 2),  # a one-byte answer
    ],
)
def test_decode_object(kind: str, data: bytes, value: int) -> None:
    assert decode_object(HanObject(0x10, kind), data) == value  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "data"), [("u32", b"\x00\x01"), ("u16", b"\x00\x00\x00\x01"), ("enum", b"")])
def test_an_answer_of_the_wrong_size_is_an_error(kind: str, data: bytes) -> None:
    with pytest.raises(DeviceError, match=r"object 0x0079"):
        decode_object(HanObject(0x79, kind), data)  # type: ignore[arg-type]


def test_the_poll_plan_reads_power_always_and_one_slow_group_in_turn() -> None:
    plan = PollPlan()
    fast = ["import_power", "export_power"]
    assert plan.next(full=True) == [*fast, *(n for g in PollPlan.SLOW_GROUPS for n in g)]
    assert [plan.next(full=False) for _ in range(5)] == [
        [*fast, "voltage", "current"],
        [*fast, "import_energy", "export_energy"],
        [*fast, "tariff_period", "threshold"],
        [*fast, "frequency", "breaker"],
        [*fast, "voltage", "current"],
    ]
    assert PollPlan(4).next(full=False) == plan.next(full=True)
    missing = frozenset({"tariff_period", "breaker"})
    assert PollPlan().next(full=True, unsupported=missing) == [
        *fast,
        "voltage",
        "current",
        "import_energy",
        "export_energy",
        "frequency",
    ]
    with pytest.raises(ValueError):
        PollPlan(0)


def test_thresholds_follow_the_tariff_period() -> None:
    han = HanMap()
    assert [han.threshold(p).index for p in range(1, 7)] == list(range(0x000C, 0x0012))
    with pytest.raises(ValueError):
        han.threshold(7)


@pytest.mark.parametrize(
    ("wire", "payload", "registers"),
    [
        (b"\x04\x00\xbc\x61\x4e", b"\x00\xbc\x61\x4e", [0x00BC, 0x614E]),
        (b"\x02\x03\x00", b"\x03\x00", [0x0300]),
        (b"\x01\x02", b"\x02", []),  # an odd count, which pymodbus's own response cannot decode
        (b"\x03\x01\x02\x03", b"\x01\x02\x03", [0x0102]),
    ],
)
def test_the_response_decoder_keeps_every_byte(wire: bytes, payload: bytes, registers: list[int]) -> None:
    rsp = ObjectReadResponse()
    rsp.decode(wire)
    assert rsp.payload == payload and list(rsp.registers) == registers
    assert rsp.encode() == wire
    with pytest.raises(ValueError, match="byte count 5"):
        ObjectReadResponse().decode(b"\x05\x00\x01")


# -- over the wire ------------------------------------------------------------------------------------------


@pytest.fixture
async def rtu_line() -> AsyncIterator[tuple[str, str]]:
    async with PtyNullModem() as line:
        yield line.paths


async def test_reads_over_rtu_on_a_pty_pair_with_two_stop_bits(rtu_line: tuple[str, str]) -> None:
    meter_end, gateway_end = rtu_line
    sim = HanMeterSim(fresh_state())
    cfg = han_cfg(serial_port=gateway_end, stopbits=2, gap_ms=2)  # 8N2 as some ZIV meters need
    async with (
        ModbusSimServer({1: sim}, transport="modbus-rtu", serial_port=meter_end, stopbits=2),
        BusPool() as pool,
    ):
        meter = build_device(cfg, pool)
        assert isinstance(meter, EredesHanMeter) and isinstance(meter, Meter)
        assert await meter.read() == pytest.approx(EXPECTED)
        assert meter.last_poll_requests == 10  # the first poll reads everything
        assert await meter.read() == pytest.approx(EXPECTED)
        assert meter.last_poll_requests == 4  # then power plus one slow group
        assert sim.requests == 14


@pytest.mark.parametrize("transport", ["modbus-rtu-over-tcp", "modbus-tcp"])
async def test_reads_over_tcp(transport: str) -> None:
    sim = HanMeterSim(fresh_state())
    async with ModbusSimServer({1: sim}, transport=transport, port=0) as server, BusPool() as pool:  # type: ignore[arg-type]
        meter = build_device(han_cfg(transport=transport, host="127.0.0.1", port=server.port), pool)
        assert await meter.read() == pytest.approx(EXPECTED)


async def test_changes_show_within_one_round_of_the_slow_groups(free_port: int) -> None:
    state = fresh_state()
    sim = HanMeterSim(state)
    async with (
        ModbusSimServer({1: sim}, transport="modbus-rtu-over-tcp", port=free_port),
        BusPool() as pool,
    ):
        meter = build_device(han_cfg(transport="modbus-rtu-over-tcp", host="127.0.0.1", port=free_port), pool)
        await meter.read()
        state.import_power_w, state.export_power_w = 0, 3000
        state.tariff_period, state.breaker_state = 2, 0
        state.import_energy_wh += 1000
        first = await meter.read()
        assert first["active_power_kw"] == pytest.approx(-3.0)  # power is read on every poll
        for _ in range(3):
            last = await meter.read()
        assert last["tariff_period"] == 2.0
        assert last["contracted_power_kva"] == pytest.approx(6.9)  # the threshold of period 2
        assert last["breaker_state"] == 0.0
        assert last["import_energy_kwh"] == pytest.approx(12346.678)
        assert sim.objects_read[10:] == [
            *(0x0079, 0x007A, 0x006C, 0x006D),
            *(0x0079, 0x007A, 0x0016, 0x0017),
            *(0x0079, 0x007A, 0x000B, 0x000D),
            *(0x0079, 0x007A, 0x007F, 0x0084),
        ]


async def test_read_everything_every_poll_when_asked(free_port: int) -> None:
    sim = HanMeterSim(fresh_state())
    async with ModbusSimServer({1: sim}, port=free_port), BusPool() as pool:
        cfg = han_cfg(transport="modbus-tcp", host="127.0.0.1", port=free_port)
        meter = EredesHanMeter(cfg, pool.bus_for(cfg), slow_groups_per_poll=4)
        await meter.read()
        sim.state.breaker_state = 2
        assert (await meter.read())["breaker_state"] == 2.0
        assert meter.last_poll_requests == 10


async def test_an_exception_response_surfaces_with_its_code(free_port: int, clock: ManualClock) -> None:
    sim = HanMeterSim(fresh_state())
    sim.refuse[0x0079] = 4  # server device failure on the import power
    async with ModbusSimServer({1: sim}, port=free_port), BusPool() as pool:
        meter = build_device(han_cfg(transport="modbus-tcp", host="127.0.0.1", port=free_port), pool, clock=clock)
        with pytest.raises(DeviceExceptionResponse) as info:
            await meter.read()
        assert info.value.code == 4
        with pytest.raises(DeviceBackedOff):
            await meter.read()
        del sim.refuse[0x0079]
        sim.refuse[0x0016] = 2  # a required object the meter says it lacks
        clock.advance(1.0)
        with pytest.raises(DeviceExceptionResponse, match="illegal data address"):
            await meter.read()


async def test_an_optional_object_the_meter_lacks_is_left_out(free_port: int) -> None:
    sim = HanMeterSim(fresh_state())
    sim.refuse[0x0084] = 2  # no breaker state on this meter
    sim.refuse[0x000B] = 2  # nor tariff period (so no threshold either)
    async with ModbusSimServer({1: sim}, port=free_port), BusPool() as pool:
        meter = build_device(han_cfg(transport="modbus-tcp", host="127.0.0.1", port=free_port), pool)
        assert isinstance(meter, EredesHanMeter)
        want = {
            k: v for k, v in EXPECTED.items() if k not in ("breaker_state", "tariff_period", "contracted_power_kva")
        }
        assert await meter.read() == pytest.approx(want)
        assert meter.unsupported == {"breaker", "tariff_period"}
        assert meter.last_poll_requests == 9
        sim.objects_read.clear()
        for _ in range(4):
            assert await meter.read() == pytest.approx(want)
        assert 0x0084 not in sim.objects_read and 0x000B not in sim.objects_read


async def test_an_implausible_value_is_an_error(free_port: int) -> None:
    async with ModbusSimServer({1: HanMeterSim(fresh_state(tariff_period=9))}, port=free_port), BusPool() as pool:
        meter = build_device(han_cfg(transport="modbus-tcp", host="127.0.0.1", port=free_port), pool)
        with pytest.raises(DeviceError, match=r"0x000b \(tariff_period\) reads 9 \(09 00\), outside 1\.\.6"):
            await meter.read()


async def test_a_silent_meter_times_out_backs_off_and_is_read_when_it_comes_back(
    rtu_line: tuple[str, str], clock: ManualClock
) -> None:
    meter_end, gateway_end = rtu_line
    sim = HanMeterSim(fresh_state())
    async with (
        ModbusSimServer({1: sim}, transport="modbus-rtu", serial_port=meter_end),
        BusPool() as pool,
    ):
        meter = build_device(han_cfg(serial_port=gateway_end, timeout_s=0.2), pool, clock=clock)
        assert isinstance(meter, EredesHanMeter)
        await meter.read()
        sim.online = False
        started = time.monotonic()
        with pytest.raises(DeviceUnavailable, match="no answer") as info:
            await meter.read()
        assert not isinstance(info.value, DeviceBackedOff)
        assert 0.15 < time.monotonic() - started < 0.6
        with pytest.raises(DeviceBackedOff) as backed_off:
            await meter.read()
        assert backed_off.value.retry_in_s == pytest.approx(1.0)
        sim.online = True
        sim.state.breaker_state = 2
        clock.advance(1.0)
        assert (await meter.read())["breaker_state"] == 2.0
        assert meter.last_poll_requests == 10  # after a failure, everything is read again


async def test_a_meter_behind_a_server_that_restarts(free_port: int, clock: ManualClock) -> None:
    sim = HanMeterSim(fresh_state())
    async with BusPool() as pool:
        meter = build_device(
            han_cfg(transport="modbus-rtu-over-tcp", host="127.0.0.1", port=free_port), pool, clock=clock
        )
        with pytest.raises(DeviceUnavailable, match="cannot connect"):
            await meter.read()
        clock.advance(1.0)
        async with ModbusSimServer({1: sim}, transport="modbus-rtu-over-tcp", port=free_port):
            assert await meter.read() == pytest.approx(EXPECTED)


async def test_the_han_dialect_is_not_served_with_standard_devices(free_port: int) -> None:
    with pytest.raises(ValueError, match="cannot share one server"):
        ModbusSimServer({1: HanMeterSim(), 2: MeterSim()}, port=free_port)


async def test_counts_other_than_one_are_refused_by_the_simulated_port(free_port: int) -> None:
    async with ModbusSimServer({1: HanMeterSim(fresh_state())}, port=free_port), BusPool() as pool:
        bus = pool.bus_for(han_cfg(transport="modbus-tcp", host="127.0.0.1", port=free_port))
        with pytest.raises(DeviceExceptionResponse) as info:
            await bus.read_input_registers(1, 0x0016, 2)
        assert info.value.code == 3
        with pytest.raises(DeviceExceptionResponse) as info:
            await bus.read_input_object(1, 0x0050)  # not in the map
        assert info.value.code == 2
        assert await bus.read_input_object(1, 0x0016) == (12_345_678).to_bytes(4, "big")
