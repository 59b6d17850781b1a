"""Device interfaces (:class:`Meter`, :class:`Switch`) and the factory from configuration to driver."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Literal, Protocol, runtime_checkable

from .config import DeviceConfig
from .dsmr import DsmrP1Meter
from .eastron import MODELS, EastronMeter
from .eredes import EredesHanMeter
from .errors import DeviceError
from .modbus import BusPool
from .relay import ModbusRelay


@runtime_checkable
class Meter(Protocol):
    """A device that measures: ``read()`` gives the contract's meter readings."""

    @property
    def kind(self) -> Literal["meter"]:
        """Always ``"meter"``."""
        ...

    @property
    def name(self) -> str:
        """The configured device name."""
        ...

    @property
    def config(self) -> DeviceConfig:
        """The device's configuration."""
        ...

    async def read(self) -> dict[str, float]:
        """Read ``active_power_kw``, ``import_energy_kwh``, ``export_energy_kwh``, ``voltage_v``, ``current_a``,
        ``frequency_hz``; a driver may add readings of its own and leave out one its meter lacks (P1 has no
        frequency)."""
        ...


@runtime_checkable
class Switch(Protocol):
    """A device that switches a load: ``read()`` gives ``{"on": bool}``, ``set()`` switches and confirms."""

    @property
    def kind(self) -> Literal["switch"]:
        """Always ``"switch"``."""
        ...

    @property
    def name(self) -> str:
        """The configured device name."""
        ...

    @property
    def config(self) -> DeviceConfig:
        """The device's configuration (rated power, priority, sheddable)."""
        ...

    async def read(self) -> dict[str, bool]:
        """Read ``{"on": bool}``."""
        ...

    async def set(self, on: bool) -> bool:
        """Switch on or off; return the state read back."""
        ...


Device = Meter | Switch


def build_device(cfg: DeviceConfig, pool: BusPool, *, clock: Callable[[], float] = time.monotonic) -> Device:
    """Build the driver for `cfg` on the shared bus from `pool`.

    `clock` (monotonic seconds) drives the device's backoff and, for P1 meters, the age of telegrams; tests
    pass a fake one. A P1 meter claims its serial port from `pool`, which stops its reader when it closes.
    """
    if cfg.driver in MODELS:
        return EastronMeter(cfg, pool.bus_for(cfg), clock=clock)
    if cfg.driver == "modbus_relay":
        return ModbusRelay(cfg, pool.bus_for(cfg), clock=clock)
    if cfg.driver == "eredes_han":
        return EredesHanMeter(cfg, pool.bus_for(cfg), clock=clock)
    if cfg.driver == "dsmr_p1":
        meter = DsmrP1Meter(cfg, clock=clock)
        pool.claim_port(cfg, meter.close)
        return meter
    raise DeviceError(f"device {cfg.name!r}: driver {cfg.driver!r} is not built yet")


def build_devices(
    cfgs: Iterable[DeviceConfig], pool: BusPool, *, clock: Callable[[], float] = time.monotonic
) -> list[Device]:
    """Build every device; refuse duplicate names and two relays on the same coil, reporting all at once."""
    cfgs = list(cfgs)
    problems: list[str] = []
    seen_names: set[str] = set()
    seen_coils: dict[tuple[str, str, int, int], str] = {}
    for cfg in cfgs:
        if cfg.name in seen_names:
            problems.append(f"device name {cfg.name!r} is used twice")
        seen_names.add(cfg.name)
        if cfg.driver == "modbus_relay" and cfg.coil is not None:
            where = (cfg.host or cfg.serial_port or "", str(cfg.port), cfg.unit_id, cfg.coil)
            if where in seen_coils:
                problems.append(f"devices {seen_coils[where]!r} and {cfg.name!r} switch the same coil")
            seen_coils[where] = cfg.name
    if problems:
        raise DeviceError("; ".join(problems))
    return [build_device(cfg, pool, clock=clock) for cfg in cfgs]
