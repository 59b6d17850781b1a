"""A simulated home: one SDM630 meter whose power follows the plugs switched on one relay board."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple

from ..config import DeviceConfig, TransportName
from .base import SimulatedDevice
from .meter import MeterSim, MeterState
from .relay import RelayBoardSim


class Plug(NamedTuple):
    """A load switched by one coil of the home's relay board; a plain ``(coil, rated_power_kw)`` also works."""

    coil: int
    rated_power_kw: float
    name: str | None = None
    priority: int = 100
    sheddable: bool = True


class SimulatedHome:
    """Base load plus plugs; the meter reads base + the rated power of every plug that is on.

    Power is split evenly over three phases at 230 V and 50 Hz; current is ``|P| / V`` per phase. Import
    (or, for a negative total, export) energy integrates the power over monotonic time. Every coil starts on.
    """

    # Complexity (PLR0913): a simulated home's physical parameters, each a keyword with a default.
    def __init__(  # noqa: PLR0913
        self,
        base_load_kw: float,
        plugs: Iterable[Plug | tuple[int, float]] = (),
        *,
        n_coils: int = 8,
        meter_unit: int = 1,
        relay_unit: int = 2,
        voltage_v: float = 230.0,
        frequency_hz: float = 50.0,
        clock: Callable[[], float] = time.monotonic,
        meter_lag_s: float = 0.0,
    ) -> None:
        """Build the home; plug coils must be distinct, and the board grows to hold the highest one.

        ``meter_lag_s``: the meter shows a switch this long after it happened (a real meter averages its power over
        a second or more), so that a gateway judging what its shedding achieved can be tested against it."""
        self.plugs: dict[int, Plug] = {}
        for entry in plugs:
            plug = entry if isinstance(entry, Plug) else Plug(*entry)
            if plug.coil in self.plugs:
                raise ValueError(f"two plugs on coil {plug.coil}")
            if plug.coil < 0 or plug.rated_power_kw < 0:
                raise ValueError(f"plug {plug}: coil and rated power must be >= 0")
            self.plugs[plug.coil] = plug
        if meter_unit == relay_unit:
            raise ValueError("meter and relay board need different unit ids")
        self.meter_unit = meter_unit
        self.relay_unit = relay_unit
        self.voltage_v = voltage_v
        self.frequency_hz = frequency_hz
        self._clock = clock
        self.meter_lag_s = meter_lag_s
        self._base_load_kw = base_load_kw
        self._import_kwh = 0.0
        self._export_kwh = 0.0
        self._last = clock()
        self._held_kw = base_load_kw + sum(p.rated_power_kw for p in self.plugs.values())
        size = max([n_coils, *(c + 1 for c in self.plugs)])
        self.relays = RelayBoardSim(size, initial=True, on_change=self._on_coil_change)
        self.meter = MeterSim("sdm630", self.meter_state)
        #: The last coil changes as (time, coil, on), newest last.
        self.changes: deque[tuple[float, int, bool]] = deque(maxlen=1000)

    @property
    def units(self) -> dict[int, SimulatedDevice]:
        """The devices to serve, by unit id (meter and relay board)."""
        return {self.meter_unit: self.meter, self.relay_unit: self.relays}

    def coil_state(self, coil: int) -> bool:
        """Whether the relay `coil` is on."""
        return self.relays.coil_state(coil)

    def total_power_kw(self) -> float:
        """Base load plus the rated power of every plug that is on."""
        return self._base_load_kw + sum(
            plug.rated_power_kw for coil, plug in self.plugs.items() if self.relays.coil_state(coil)
        )

    @property
    def base_load_kw(self) -> float:
        """The load that no plug switches."""
        return self._base_load_kw

    def set_base_load_kw(self, kw: float) -> None:
        """Change the base load from now on (negative for a PV surplus)."""
        self._integrate()
        self._base_load_kw = kw
        self._held_kw = self.total_power_kw()

    def shown_power_kw(self) -> float:
        """What the meter's power reading shows now: the power of ``meter_lag_s`` ago (switches since then are not
        in it yet)."""
        if self.meter_lag_s <= 0:
            return self.total_power_kw()
        since = self._clock() - self.meter_lag_s
        on = {coil: self.relays.coil_state(coil) for coil in self.plugs}
        for at, coil, was_on in reversed(self.changes):
            if at <= since:
                break
            if coil in on:
                on[coil] = not was_on
        return self._base_load_kw + sum(plug.rated_power_kw for coil, plug in self.plugs.items() if on[coil])

    def meter_state(self) -> MeterState:
        """What the meter measures now (its power ``meter_lag_s`` late; its energy integrates the true power)."""
        self._integrate()
        phase_w = self.shown_power_kw() * 1000.0 / 3
        amps = abs(phase_w) / self.voltage_v
        return MeterState(
            voltage_v=(self.voltage_v,) * 3,
            current_a=(amps,) * 3,
            power_w=(phase_w,) * 3,
            frequency_hz=self.frequency_hz,
            import_kwh=self._import_kwh,
            export_kwh=self._export_kwh,
        )

    def _integrate(self) -> None:
        """Add the energy of the power held since the last call, then hold the power of now."""
        now = self._clock()
        hours = max(0.0, now - self._last) / 3600.0
        self._last = now
        kw = self._held_kw
        self._held_kw = self.total_power_kw()
        if kw >= 0:
            self._import_kwh += kw * hours
        else:
            self._export_kwh += -kw * hours

    def _on_coil_change(self, coil: int, on: bool) -> None:
        """Close the energy interval at the power held until this change."""
        self._integrate()
        self.changes.append((self._clock(), coil, on))

    def device_configs(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        transport: TransportName = "modbus-tcp",
        serial_port: str | None = None,
        prefix: str = "",
        timeout_s: float = 1.0,
    ) -> list[DeviceConfig]:
        """The gateway's device entries for this home served at `host`:`port` (or on `serial_port`)."""
        conn = DeviceConfig(
            name=f"{prefix}meter",
            driver="eastron_sdm630",
            transport=transport,
            host=host,
            port=port,
            serial_port=serial_port,
            unit_id=self.meter_unit,
            timeout_s=timeout_s,
        )
        cfgs = [conn]
        for coil, plug in sorted(self.plugs.items()):
            cfgs.append(
                DeviceConfig.model_validate(
                    conn.model_dump()
                    | {
                        "name": f"{prefix}{plug.name or f'plug{coil}'}",
                        "driver": "modbus_relay",
                        "unit_id": self.relay_unit,
                        "coil": coil,
                        "rated_power_kw": plug.rated_power_kw,
                        "priority": plug.priority,
                        "sheddable": plug.sheddable,
                    }
                )
            )
        return cfgs


def split_device_entries(home: SimulatedHome, host: str, meter_port: int, relay_port: int, *,
                         timeout_s: float = 0.5) -> list[dict[str, object]]:
    """The gateway's ``[[devices]]`` entries for a home whose meter and relay board each have their own Modbus TCP
    server (both at unit 1), as a KMtronic board and a meter behind a TCP gateway would."""
    entries: list[dict[str, object]] = [{"name": "meter", "driver": "eastron_sdm630", "transport": "modbus-tcp",
                                         "host": host, "port": meter_port, "unit_id": 1, "timeout_s": timeout_s}]
    for p in home.plugs.values():
        entries.append({"name": p.name or f"plug{p.coil}", "driver": "modbus_relay", "transport": "modbus-tcp",
                        "host": host, "port": relay_port, "unit_id": 1, "coil": p.coil,
                        "rated_power_kw": p.rated_power_kw, "priority": p.priority, "sheddable": p.sheddable,
                        "timeout_s": timeout_s})
    return entries
