"""DeviceConfig validation and the factory's refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from device_drivers import BusPool, DeviceConfig, DeviceError, build_device, build_devices


def tcp_meter(**overrides: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "name": "meter",
        "driver": "eastron_sdm630",
        "transport": "modbus-tcp",
        "host": "127.0.0.1",
        "port": 502,
    }
    entry.update(overrides)
    return entry


def test_a_complete_tcp_entry_validates_with_defaults() -> None:
    cfg = DeviceConfig.model_validate(tcp_meter())
    assert (cfg.unit_id, cfg.baudrate, cfg.parity, cfg.stopbits) == (1, 9600, "N", 1)
    assert (cfg.timeout_s, cfg.gap_ms, cfg.priority, cfg.sheddable) == (1.0, 0, 100, False)


def test_missing_host_is_a_clear_error() -> None:
    entry = tcp_meter()
    del entry["host"]
    with pytest.raises(ValidationError, match=r"device 'meter': transport 'modbus-tcp' needs host"):
        DeviceConfig.model_validate(entry)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"transport": "modbus-rtu-over-tcp", "port": None}, "needs port"),
        ({"transport": "modbus-rtu", "host": None, "port": None}, "needs serial_port"),
        ({"driver": "modbus_relay"}, "needs coil"),
        ({"driver": "dsmr_p1"}, "use transport 'serial'"),
        ({"transport": "serial", "serial_port": "/dev/ttyUSB0"}, "speaks Modbus"),
        ({"unit_id": 0}, "greater than or equal to 1"),
        ({"unit_id": 248}, "less than or equal to 247"),
        ({"parity": "X"}, "'N', 'E' or 'O'"),
        ({"rated_power_kw": -1}, "greater than or equal to 0"),
        ({"colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_entries_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DeviceConfig.model_validate(tcp_meter(**overrides))


def test_every_missing_field_is_reported_at_once() -> None:
    with pytest.raises(ValidationError) as info:
        DeviceConfig.model_validate(tcp_meter(driver="modbus_relay", host=None, port=None))
    text = str(info.value)
    assert "needs host and port" in text
    assert "needs coil" in text


async def test_every_driver_is_built() -> None:
    from device_drivers import DsmrP1Meter, EredesHanMeter

    async with BusPool() as pool:
        han = build_device(
            DeviceConfig(name="han", driver="eredes_han", transport="modbus-rtu", serial_port="/dev/ttyUSB0"), pool
        )
        p1 = build_device(
            DeviceConfig(name="p1", driver="dsmr_p1", transport="serial", serial_port="/dev/ttyUSB1"), pool
        )
    assert isinstance(han, EredesHanMeter) and isinstance(p1, DsmrP1Meter)


def test_driver_defaults_apply_only_where_the_entry_is_silent() -> None:
    p1 = {"name": "p1", "driver": "dsmr_p1", "transport": "serial", "serial_port": "/dev/ttyUSB0"}
    cfg = DeviceConfig.model_validate(p1)
    assert (cfg.baudrate, cfg.bytesize, cfg.parity, cfg.max_age_s) == (115200, 8, "N", 10.0)
    dsmr3 = DeviceConfig.model_validate(p1 | {"baudrate": 9600, "bytesize": 7, "parity": "E", "max_age_s": 30})
    assert (dsmr3.baudrate, dsmr3.bytesize, dsmr3.parity, dsmr3.max_age_s) == (9600, 7, "E", 30.0)
    han = DeviceConfig.model_validate(tcp_meter(driver="eredes_han"))
    assert (han.baudrate, han.gap_ms, han.stopbits) == (9600, 100.0, 1)
    assert DeviceConfig.model_validate(tcp_meter(driver="eredes_han", gap_ms=0)).gap_ms == 0
    assert DeviceConfig.model_validate(tcp_meter()).gap_ms == 0  # other drivers keep theirs
    assert DeviceConfig.model_validate(cfg.model_dump()) == cfg  # a dumped entry validates to itself


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bytesize": 7}, "needs bytesize 8"),
        ({"bytesize": 6}, "Input should be 7 or 8"),
        ({"max_age_s": 0}, "greater than 0"),
    ],
)
def test_invalid_line_settings_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DeviceConfig.model_validate(tcp_meter(driver="eredes_han", **overrides))


async def test_build_devices_refuses_duplicate_names_and_shared_coils() -> None:
    relay = tcp_meter(driver="modbus_relay", coil=3, name="a")
    cfgs = [
        DeviceConfig.model_validate(tcp_meter()),
        DeviceConfig.model_validate(tcp_meter()),
        DeviceConfig.model_validate(relay),
        DeviceConfig.model_validate(relay | {"name": "b"}),
    ]
    async with BusPool() as pool:
        with pytest.raises(DeviceError) as info:
            build_devices(cfgs, pool)
    assert "'meter' is used twice" in str(info.value)
    assert "'a' and 'b' switch the same coil" in str(info.value)
