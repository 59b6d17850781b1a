"""The gateway's TOML configuration: a ``[gateway]`` table and a ``[[devices]]`` array (DESIGN.md's contract)."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from device_drivers.config import DeviceConfig
from mhp_wire.production import production_error, production_problems
from mhp_wire.topics import check_id


class ConfigError(ValueError):
    """The configuration file is missing or invalid; the message lists every problem."""


DEVICE_NAME_MAX_CHARS = 64
"""The longest device name a configuration may give (:data:`DEVICE_NAME`)."""
DEVICE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{DEVICE_NAME_MAX_CHARS - 1}}}")
"""What a device name is: an ASCII letter or digit, then letters, digits, ``.``, ``_`` or ``-``, at most
:data:`DEVICE_NAME_MAX_CHARS` in all. Names go into every telemetry report (its ``devices`` keys, a failsafe's
``shed``), outcomes' details, the events of the field testers' page and the logs: no spaces, quotes, control or
non-ASCII characters, nothing a topic level or a log line would have to escape."""
MAX_DEVICES = 64
"""The most devices a gateway is configured with: as many as a failsafe report's ``shed`` holds on the wire
(:class:`mhp_wire.messages.FailsafeReport`). With :data:`DEVICE_NAME_MAX_CHARS`, a telemetry report of every device
(all readings of the widest driver, a failsafe shedding them all) stays far under the brokers' packet
(:data:`mhp_wire.messages.SEND_PAYLOAD_BYTES`; ``tests/hems_firmware/test_device_names.py`` builds the largest)."""


class Uplink(BaseModel):
    """The retailer broker this gateway talks to."""

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    """Defaults to the gateway id (the broker's ACL binds topics to it)."""
    password: str = ""
    tls_ca_file: str | None = None


class FlexibleSchedule(BaseModel):
    """The consumer's schedule for one flexible appliance: how long it must run each day, and when it may."""

    model_config = ConfigDict(extra="forbid")
    device: str
    run_s: float = Field(gt=0, le=86_400)
    """Running time needed per day."""
    allowed: list[tuple[str, str]] = Field(default_factory=lambda: [("00:00", "24:00")])
    """Windows ``("HH:MM", "HH:MM")`` in the gateway's time zone; a window may wrap past midnight."""

    @field_validator("allowed")
    @classmethod
    def _times(cls, v: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for a, b in v:
            for t in (a, b):
                hh, _, mm = t.partition(":")
                if not (hh.isdigit() and mm.isdigit() and 0 <= int(hh) <= 24 and 0 <= int(mm) < 60):
                    raise ValueError(f"{t!r} is not HH:MM")
        return v


class FailsafeSettings(BaseModel):
    """The ``[gateway.failsafe]`` table: the import limit the gateway applies on its own when it loses its bridge."""

    model_config = ConfigDict(extra="forbid")
    after_s: float = Field(gt=0, le=7 * 86_400)
    """How long the uplink must be down before the failsafe limit applies."""
    limit_kw: float = Field(ge=0, le=10_000)
    """The failsafe import limit."""
    duration_s: float = Field(gt=0, le=7 * 86_400)
    """How long it holds at most (it ends earlier when the uplink comes back)."""
    floor_kw: float = Field(0.0, ge=0, le=10_000)
    """The legal floor: the import a home must always be allowed; ``limit_kw`` below it is refused."""

    @model_validator(mode="after")
    def _not_below_floor(self) -> FailsafeSettings:
        if self.limit_kw < self.floor_kw:
            raise ValueError(f"limit_kw ({self.limit_kw:g} kW) is below the legal floor floor_kw "
                             f"({self.floor_kw:g} kW)")
        return self


class GatewaySection(BaseModel):
    """The ``[gateway]`` table."""

    model_config = ConfigDict(extra="forbid")
    id: str
    client_id: str
    environment: Literal["development", "production"] = "development"
    """``production`` refuses a plain uplink (no ``uplink.tls_ca_file``), an empty password, and the field
    testers' page (plain HTTP) off the loopback address."""
    uplink: Uplink = Field(default_factory=lambda: Uplink())
    state_dir: Path = Path("/var/lib/hems-gateway")
    poll_interval_s: float = Field(1.0, gt=0)
    telemetry_interval_s: float = Field(5.0, gt=0)
    web_port: int | None = Field(default=None, ge=0, le=65535)
    """The field testers' live page (``hems_firmware.web``); ``None``: no page, 0: any free port."""
    web_host: str = "127.0.0.1"
    web_hosts: list[str] = Field(default_factory=list)
    """Other host names the page answers to (besides loopback names, IP addresses and ``web_host``), e.g. the
    box's name on the home network; any other ``Host`` is refused (DNS rebinding)."""
    web_max_streams: int = Field(8, ge=1, le=256)
    """Live event streams the page serves at once (503 beyond)."""
    telemetry_buffer_max: int = Field(100_000, ge=10)
    """Telemetry kept on disk while the uplink is down (the oldest goes first beyond this)."""
    contracted_power_kw: float | None = Field(None, gt=0)
    """The home's contracted power; a meter that reports it (E-Redes HAN) takes precedence."""
    restore_band_kw: float = Field(0.5, ge=0)
    """Hysteresis: a shed load comes back only if the home then stays this far under its cap."""
    restore_interval_s: float = Field(5.0, ge=0)
    """At most one shed load comes back per interval."""
    outcome_settle_s: float = Field(3.0, ge=0)
    """After shedding, how long the meter may take to show it before the outcome says ``limit_not_met``: the meter
    is read again every ``outcome_poll_s`` until the limit or target is met or this has passed (a real meter
    averages over a second or more; the outcome is sent as soon as a reading shows the limit met)."""
    outcome_poll_s: float = Field(0.25, gt=0)
    ack_hold_s: float = Field(0.2, ge=0, le=1.0)
    """How long the ``ack`` of a stored command waits for the command's outcome: an outcome stored within it (an
    emergency that starts now, a load shift, a refusal of an expired command) stands for the ack, which is then
    not sent (one uplink message per command instead of two); otherwise the ack goes at the hold's end. 0: every
    ack at once, as before. Kept well under the bridge's first re-send (``gateway_retry_s``, 0.5 s by default) and
    far under its ``gateway_ack_timeout_s`` (10 s), hence at most 1 s (docs/decisions.md, "An outcome stands for
    its ack")."""
    timezone: str = "UTC"
    failsafe: FailsafeSettings | None = None
    """``None``: no failsafe (the home runs freely while the bridge is away)."""
    flexible: list[FlexibleSchedule] = Field(default_factory=list)

    @field_validator("id", "client_id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        return check_id(v)

    @model_validator(mode="after")
    def _production_profile(self) -> GatewaySection:
        if self.environment == "production":
            problems = production_problems(secrets={"uplink.password": self.uplink.password},
                                           mqtt_ca_files={"uplink.tls_ca_file": self.uplink.tls_ca_file})
            if self.web_port is not None and not _is_loopback(self.web_host):
                problems.append("web_host must be a loopback address: the field testers' page has no TLS "
                                "(reach it through an SSH tunnel)")
            if problems:
                raise ValueError(production_error(problems))
        return self


def _shown(name: str) -> str:
    """A refused device name for the error: escaped (``ascii``), its first 40 characters and its length if longer."""
    return ascii(name) if len(name) <= 40 else f"{name[:40]!a}... ({len(name)} characters)"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class GatewayConfig(BaseModel):
    """A whole gateway configuration file."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    gateway: GatewaySection
    devices: list[DeviceConfig] = Field(default_factory=list, max_length=MAX_DEVICES)

    @model_validator(mode="after")
    def _unique_names(self) -> GatewayConfig:
        names = [d.name for d in self.devices]
        bad = [n for n in names if not DEVICE_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"device names must be 1 to {DEVICE_NAME_MAX_CHARS} characters: ASCII letters, digits, "
                             f"'.', '_' or '-', starting with a letter or digit; not {', '.join(map(_shown, bad[:5]))}"
                             + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"device names must be unique: {', '.join(dupes)}")
        unknown = sorted({f.device for f in self.gateway.flexible} - set(names))
        if unknown:
            raise ValueError(f"flexible schedule for unknown device(s): {', '.join(unknown)}")
        return self

    @classmethod
    def load(cls, path: Path) -> GatewayConfig:
        """Read and validate a TOML file; :class:`ConfigError` names every problem at once."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
            raise ConfigError(f"{path}: invalid configuration:\n" + "\n".join(lines)) from None
