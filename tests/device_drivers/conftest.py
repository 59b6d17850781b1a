"""Fixtures for the device driver tests: free TCP ports and a manual clock (the leak check is the suite's,
in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest

from device_drivers.sim import ManualClock
from mhp_wire.ports import free_port as pick_free_port


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return pick_free_port()


@pytest.fixture
def clock() -> ManualClock:
    """A manual monotonic clock for backoff and energy integration."""
    return ManualClock()


@pytest.fixture
def make_cfg() -> object:
    """Factory of DeviceConfig for a device on 127.0.0.1 (TCP) with short timeouts."""
    from device_drivers import DeviceConfig

    def make(port: int, name: str = "dev", driver: str = "eastron_sdm630", **fields: object) -> DeviceConfig:
        entry: dict[str, object] = {
            "name": name,
            "driver": driver,
            "transport": "modbus-tcp",
            "host": "127.0.0.1",
            "port": port,
            "timeout_s": 0.5,
        }
        entry.update(fields)
        if entry["transport"] == "modbus-rtu":
            entry.pop("host")
            entry.pop("port")
        return DeviceConfig.model_validate(entry)

    return make
