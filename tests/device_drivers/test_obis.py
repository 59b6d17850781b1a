"""The OBIS line parser and the P1 readings built from a telegram: tables of cases, no I/O."""

from __future__ import annotations

import pytest

from device_drivers.dsmr import p1_readings
from device_drivers.errors import DeviceError
from device_drivers.obis import parse_line, parse_telegram

from .test_p1_framing import DSMR3, DSMR5, SAGEMCOM


@pytest.mark.parametrize(
    ("line", "name", "value"),
    [
        ("1-0:1.7.0(01.193*kW)", "import_power_kw", 1.193),
        ("1-0:2.7.0(00.000*kW)", "export_power_kw", 0.0),
        ("1-0:1.8.1(123456.789*kWh)", "import_energy_t1_kwh", 123456.789),
        ("1-0:1.8.2(000002.399*kWh)", "import_energy_t2_kwh", 2.399),
        ("1-0:2.8.1(000002.444*kWh)", "export_energy_t1_kwh", 2.444),
        ("1-0:2.8.2(000000.000*kWh)", "export_energy_t2_kwh", 0.0),
        ("0-0:96.14.0(0002)", "tariff", 2.0),
        ("1-0:21.7.0(01.111*kW)", "import_power_l1_kw", 1.111),
        ("1-0:41.7.0(02.222*kW)", "import_power_l2_kw", 2.222),
        ("1-0:61.7.0(03.333*kW)", "import_power_l3_kw", 3.333),
        ("1-0:32.7.0(0230.0*V)", "voltage_l1_v", 230.0),
        ("1-0:32.7.0(220.1*V)", "voltage_l1_v", 220.1),
        ("1-0:31.7.0(001*A)", "current_l1_a", 1.0),
        ("1-0:31.7.0(0.48*A)", "current_l1_a", 0.48),
        ("0-0:17.0.0(999.9*kW)", "limiter_kw", 999.9),
        ("0-0:96.3.10(1)", "breaker_state", 1.0),
        ("0-0:96.3.10(2)", "breaker_state", 2.0),
        # meters that send W and Wh are converted
        ("1-0:1.7.0(000000286*W)", "import_power_kw", 0.286),
        ("1-0:1.8.1(005017120*Wh)", "import_energy_t1_kwh", 5017.12),
        # the "*255" suffix some meters put on the code
        ("1-0:1.7.0*255(002124.86*W)", "import_power_kw", 2.12486),
    ],
)
def test_known_lines(line: str, name: str, value: float) -> None:
    parsed = parse_telegram(f"/HDR\r\n\r\n{line}\r\n!0000\r\n")
    assert parsed.values == {name: pytest.approx(value)}
    assert parsed.malformed == [] and parsed.unknown == 0


@pytest.mark.parametrize(
    "line",
    [
        "1-0:99.97.0(2)(0-0:96.7.19)(101208152415W)(0000000240*s)",
        "0-0:96.13.0()",
        "0-1:24.2.1(101209112500W)(12785.123*m3)",
        "1-0:32.32.0(00002)",
        "0-0:1.0.0(101209113020W)",
        "1-0:3.7.0(000000000*var)",
    ],
)
def test_unknown_codes_are_ignored_and_counted(line: str) -> None:
    parsed = parse_telegram(f"/HDR\r\n\r\n{line}\r\n!0000\r\n")
    assert parsed.values == {} and parsed.malformed == [] and parsed.unknown == 1


@pytest.mark.parametrize(
    "line",
    [
        "garbage",
        "1-0:1.7.0(01.193*kW",  # unclosed
        "1-0:1.7.0",  # no value
        "1-0:1.7(01.193*kW)",  # code too short
        "1-0:1.7.0(01.193*MW)",  # unit not accepted for the field
        "1-0:1.7.0(abc*kW)",  # not a number
        "1-0:1.7.0(01.193)",  # a power without its unit
        "1-0:32.7.0(230.0*A)",  # a voltage in amperes
        "0-0:17.0.0(016*A)",  # DSMR 3's limiter in amperes: not a power
        "1-0:1.7.0(01.193*kW)(1)",  # two values where one is expected
        "0-0:96.3.10(1*kW)",  # a unit where none belongs
    ],
)
def test_malformed_lines_are_ignored_and_kept(line: str) -> None:
    parsed = parse_telegram(f"/HDR\r\n\r\n{line}\r\n1-0:2.7.0(00.100*kW)\r\n!0000\r\n")
    assert parsed.malformed == [line]
    assert parsed.values == {"export_power_kw": pytest.approx(0.1)}


def test_parse_line_splits_code_and_values() -> None:
    assert parse_line("1-0:99.97.0(0)(0-0:96.7.19)") == ("1-0:99.97.0", ["0", "0-0:96.7.19"])
    assert parse_line("0-0:96.13.0()") == ("0-0:96.13.0", [""])
    assert parse_line("(00001.001)") is None


def test_the_dsmr5_example_telegram() -> None:
    parsed = parse_telegram(DSMR5)
    assert parsed.header == "/ISk5\\2MT382-1000"
    assert parsed.malformed == []
    assert parsed.values == pytest.approx(
        {
            "import_energy_t1_kwh": 4.426,
            "import_energy_t2_kwh": 2.399,
            "export_energy_t1_kwh": 2.444,
            "export_energy_t2_kwh": 0.0,
            "tariff": 2.0,
            "import_power_kw": 0.244,
            "export_power_kw": 0.0,
            "voltage_l1_v": 230.0,
            "current_l1_a": 0.48,
            "import_power_l1_kw": 0.070,
            "import_power_l2_kw": 0.032,
            "import_power_l3_kw": 0.142,
        }
    )
    assert p1_readings(parsed.values) == pytest.approx(
        {
            "active_power_kw": 0.244,
            "import_energy_kwh": 4.426 + 2.399,
            "export_energy_kwh": 2.444,
            "voltage_v": 230.0,
            "current_a": 0.48,
            "tariff_period": 2.0,
        }
    )


def test_continuation_lines_of_dsmr3_are_skipped_and_its_amperes_limiter_is_malformed() -> None:
    parsed = parse_telegram(DSMR3)
    assert parsed.malformed == ["0-0:17.0.0(016*A)"]
    readings = p1_readings(parsed.values)
    assert readings["active_power_kw"] == pytest.approx(1.19)
    assert readings["breaker_state"] == 1.0
    assert "limiter_kw" not in readings and "voltage_v" not in readings


def test_readings_from_a_meter_in_watts() -> None:
    readings = p1_readings(parse_telegram(SAGEMCOM).values)
    assert readings == pytest.approx(
        {"active_power_kw": 0.286, "import_energy_kwh": 5017.12 + 1528.646, "export_energy_kwh": 0.058}
    )


def test_export_makes_power_negative_and_frequency_is_never_given() -> None:
    values = {
        "import_power_kw": 0.0,
        "export_power_kw": 2.5,
        "import_energy_t1_kwh": 1.0,
        "import_energy_t2_kwh": 2.0,
        "export_energy_t1_kwh": 3.0,
        "export_energy_t2_kwh": 4.0,
        "limiter_kw": 6.9,
        "breaker_state": 0.0,
    }
    readings = p1_readings(values)
    assert readings == {
        "active_power_kw": -2.5,
        "import_energy_kwh": 3.0,
        "export_energy_kwh": 7.0,
        "limiter_kw": 6.9,
        "breaker_state": 0.0,
    }


def test_a_telegram_without_power_or_energy_gives_no_readings() -> None:
    with pytest.raises(DeviceError, match=r"lacks 1-0:2\.7\.0, 1-0:2\.8\.2"):
        p1_readings(
            {
                "import_power_kw": 1.0,
                "import_energy_t1_kwh": 1.0,
                "import_energy_t2_kwh": 1.0,
                "export_energy_t1_kwh": 1.0,
            }
        )
