"""Configuration of one device: one ``[[devices]]`` entry of the gateway's TOML file."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DriverName = Literal["eastron_sdm630", "eastron_sdm120", "modbus_relay", "eredes_han", "dsmr_p1"]
TransportName = Literal["modbus-tcp", "modbus-rtu", "modbus-rtu-over-tcp", "serial"]

#: Transports that reach the device over a TCP connection (host and port needed).
TCP_TRANSPORTS: frozenset[str] = frozenset({"modbus-tcp", "modbus-rtu-over-tcp"})
#: Transports that open a local serial device (serial_port needed).
SERIAL_TRANSPORTS: frozenset[str] = frozenset({"modbus-rtu", "serial"})
#: Drivers that speak Modbus (any transport but plain "serial").
MODBUS_DRIVERS: frozenset[str] = frozenset({"eastron_sdm630", "eastron_sdm120", "modbus_relay", "eredes_han"})
#: Defaults that differ by driver, applied only to fields the entry leaves out.
#: DSMR 5 P1 ports run at 115200 baud; the E-Redes HAN port wants a quiet line between requests (field
#: configurations throttle it at 200 ms per command).
DRIVER_DEFAULTS: dict[str, dict[str, Any]] = {
    "dsmr_p1": {"baudrate": 115200},
    "eredes_han": {"gap_ms": 100.0},
}


class DeviceConfig(BaseModel):
    """One device the gateway reads or switches, and how to reach it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    driver: DriverName
    transport: TransportName
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    unit_id: int = Field(default=1, ge=1, le=247)
    serial_port: str | None = None
    baudrate: int = Field(default=9600, gt=0)
    #: Data bits: 8, or 7 for the 7E1 line of DSMR 2.2/3 (and some DSMR 4) P1 ports; Modbus needs 8.
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = Field(default=1, ge=1, le=2)
    coil: int | None = Field(default=None, ge=0, le=65535)
    #: A finite rating, at most 10,000 kW (the wire's bound on a measured power): the gateway's claim of what the
    #: home can shed is the sum of these, so an ``inf`` in the TOML must not become an infinite claim.
    rated_power_kw: float = Field(default=0.0, ge=0, le=10_000, allow_inf_nan=False)
    priority: int = 100
    sheddable: bool = False
    timeout_s: float = Field(default=1.0, gt=0)
    gap_ms: float = Field(default=0.0, ge=0)
    #: How old the newest reading of a push device (dsmr_p1) may be before the device counts as unavailable.
    max_age_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _driver_defaults(cls, data: Any) -> Any:
        """Fill the fields whose default depends on the driver, where the entry leaves them out."""
        if isinstance(data, dict):
            defaults = DRIVER_DEFAULTS.get(str(data.get("driver")), {})
            missing = {k: v for k, v in defaults.items() if k not in data}
            if missing:
                return {**data, **missing}
        return data

    @model_validator(mode="after")
    def _check_connection(self) -> DeviceConfig:
        """Report every field the transport and driver need but miss, at once."""
        problems: list[str] = []
        if self.transport in TCP_TRANSPORTS:
            missing = [f for f in ("host", "port") if getattr(self, f) in (None, "")]
            if missing:
                problems.append(f"transport {self.transport!r} needs {' and '.join(missing)}")
        if self.transport in SERIAL_TRANSPORTS and not self.serial_port:
            problems.append(f"transport {self.transport!r} needs serial_port")
        if self.driver == "modbus_relay" and self.coil is None:
            problems.append("driver 'modbus_relay' needs coil (the relay channel, 0-based)")
        if self.driver in MODBUS_DRIVERS and self.transport == "serial":
            problems.append(f"driver {self.driver!r} speaks Modbus: use a modbus-* transport, not 'serial'")
        if self.driver == "dsmr_p1" and self.transport != "serial":
            problems.append("driver 'dsmr_p1' reads P1 telegrams: use transport 'serial'")
        if self.driver in MODBUS_DRIVERS and self.bytesize != 8:
            problems.append(f"driver {self.driver!r} speaks Modbus RTU, which needs bytesize 8")
        if problems:
            raise ValueError(f"device {self.name!r}: " + "; ".join(problems))
        return self

    @property
    def is_modbus(self) -> bool:
        """Whether this device is reached over a Modbus bus."""
        return self.transport != "serial"
