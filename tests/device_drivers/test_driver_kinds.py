"""Each driver says what it is (``kind``): the one list of meters the gateway sorts its devices by."""

from __future__ import annotations

from typing import get_args

import pytest

from device_drivers.config import DeviceConfig, DriverName
from device_drivers.modbus import BusPool
from device_drivers.registry import Meter, Switch, build_device

KINDS = {"eastron_sdm630": "meter", "eastron_sdm120": "meter", "eredes_han": "meter", "dsmr_p1": "meter",
         "modbus_relay": "switch"}


def config(driver: str) -> DeviceConfig:
    if driver == "dsmr_p1":
        return DeviceConfig(name=driver, driver="dsmr_p1", transport="serial", serial_port="/dev/null")
    return DeviceConfig.model_validate({"name": driver, "driver": driver, "transport": "modbus-tcp",
                                        "host": "127.0.0.1", "port": 1502, "coil": 0})


def test_every_driver_is_in_the_table() -> None:
    assert set(get_args(DriverName)) == set(KINDS)


@pytest.mark.parametrize(("driver", "kind"), sorted(KINDS.items()))
async def test_a_built_device_says_its_kind_and_its_class_declares_it(driver: str, kind: str) -> None:
    async with BusPool() as pool:
        device: Meter | Switch = build_device(config(driver), pool)
        assert device.kind == kind
        assert type(device).kind == kind  # declared by the driver's class, known before any read
