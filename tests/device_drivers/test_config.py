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


async def test_drivers_of_a_later_issue_are_refused_clearly() -> None:
    async with BusPool() as pool:
        for driver, transport in (("eredes_han", "modbus-rtu"), ("dsmr_p1", "serial")):
            cfg = DeviceConfig.model_validate(
                {"name": "x", "driver": driver, "transport": transport, "serial_port": "/dev/null"}
            )
            with pytest.raises(DeviceError, match=f"driver '{driver}' is not built yet"):
                build_device(cfg, pool)


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
