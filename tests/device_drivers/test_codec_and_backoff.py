"""Pure parts: float32 register codec, SDM block decoding, backoff policy — tables, no I/O."""

from __future__ import annotations

import math

import pytest

from device_drivers.backoff import Backoff
from device_drivers.codec import decode_float32, encode_float32
from device_drivers.eastron import SDM120, SDM630, decode_readings


@pytest.mark.parametrize(
    ("registers", "value"),
    [
        ([0x4366, 0x0000], 230.0),
        ([0x4248, 0x0000], 50.0),
        ([0xBFC0, 0x0000], -1.5),
        ([0x0000, 0x0000], 0.0),
        ([0x4640, 0xE400], 12345.0),
        ([0x3F80, 0x0000], 1.0),
    ],
)
def test_float32_high_word_first(registers: list[int], value: float) -> None:
    assert decode_float32(registers) == value
    assert encode_float32(value) == registers


def test_float32_at_an_offset_and_out_of_range() -> None:
    regs = [0xFFFF, 0x4366, 0x0000]
    assert decode_float32(regs, 1) == 230.0
    with pytest.raises(ValueError, match="outside"):
        decode_float32(regs, 2)


def test_float32_nan_survives() -> None:
    assert math.isnan(decode_float32([0x7FC0, 0x0000]))


def block(start: int, count: int, floats: dict[int, float]) -> list[int]:
    regs = [0] * count
    for address, value in floats.items():
        regs[address - start : address - start + 2] = encode_float32(value)
    return regs


def test_sdm630_block_decodes_contract_names() -> None:
    floats = {0x0000: 231.5, 0x0006: 4.25, 0x0034: 2500.0, 0x0046: 49.5, 0x0048: 1234.5, 0x004A: 12.0}
    readings = decode_readings(SDM630, {0: block(0, 76, floats)})
    assert readings == {
        "active_power_kw": 2.5,
        "import_energy_kwh": 1234.5,
        "export_energy_kwh": 12.0,
        "voltage_v": 231.5,
        "current_a": 4.25,
        "frequency_hz": 49.5,
    }


def test_sdm120_two_blocks_and_phase_power_is_total() -> None:
    readings = decode_readings(
        SDM120,
        {
            0x0000: block(0x0000, 14, {0x0000: 229.0, 0x0006: 2.0, 0x000C: -460.0}),
            0x0046: block(0x0046, 6, {0x0046: 50.0, 0x0048: 7.5, 0x004A: 0.25}),
        },
    )
    assert readings["active_power_kw"] == -0.46
    assert (readings["voltage_v"], readings["current_a"], readings["frequency_hz"]) == (229.0, 2.0, 50.0)
    assert (readings["import_energy_kwh"], readings["export_energy_kwh"]) == (7.5, 0.25)


def test_blocks_stay_within_one_modbus_read() -> None:
    for model in (SDM630, SDM120):
        for _start, count in model.blocks:
            assert 1 <= count <= 125


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 30.0), (7, 30.0), (100, 30.0)],
)
def test_backoff_doubles_up_to_the_cap(failures: int, delay: float) -> None:
    backoff = Backoff(initial_s=1.0, max_s=30.0)
    got = [backoff.record_failure(now=0.0) for _ in range(failures)]
    assert got[-1] == delay
    assert backoff.remaining(now=0.0) == delay


def test_backoff_blocks_until_its_time_and_success_clears_it() -> None:
    backoff = Backoff(initial_s=2.0, max_s=30.0)
    backoff.record_failure(now=10.0)
    assert backoff.blocked(11.9)
    assert not backoff.blocked(12.0)
    backoff.record_failure(now=12.0)
    assert backoff.remaining(13.0) == 3.0
    backoff.record_success()
    assert (backoff.failures, backoff.blocked(13.0), backoff.remaining(13.0)) == (0, False, 0.0)
