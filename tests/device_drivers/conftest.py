"""Fixtures for the device driver tests: free TCP ports, a manual clock, and a leak check on every test."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

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


@pytest.fixture(autouse=True)
async def no_leaks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks or threads behind."""
    threads_before = set(threading.enumerate())
    yield
    for _ in range(3):  # closing transports finish on the next loop turns
        await asyncio.sleep(0)
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    for task in tasks:
        task.cancel()
    assert not tasks, f"leaked tasks: {tasks}"
    assert not threads, f"leaked threads: {threads}"


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
