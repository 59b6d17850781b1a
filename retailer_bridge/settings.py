"""The bridge's settings: environment variables ``MHP_BRIDGE_*``, optionally a TOML file."""

from __future__ import annotations

import ipaddress
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mhp_wire.loopwatch import valid_threshold
from mhp_wire.production import production_error, production_problems
from mhp_wire.topics import check_id


class BridgeSettings(BaseSettings):
    """Everything one retailer's bridge needs to start."""

    # hide_input_in_errors: a validation error never echoes a value (a password next to a bad port).
    model_config = SettingsConfigDict(env_prefix="MHP_BRIDGE_", extra="forbid", hide_input_in_errors=True)

    environment: Literal["development", "production"] = "development"
    retailer_id: str
    hub_mqtt_host: str = "127.0.0.1"
    hub_mqtt_port: int = Field(1883, ge=1, le=65535)
    hub_mqtt_password: str = ""
    hub_mqtt_username: str | None = None
    """The login at the hub broker; None: ``retailer_id``. A partition other than the first logs in under a
    second identity of the retailer (``broker_config.render.Delegate``), since one login holds one connection."""
    hub_mqtt_tls_ca_file: str | None = None
    local_mqtt_host: str = "127.0.0.1"
    local_mqtt_port: int = Field(1884, ge=1, le=65535)
    local_mqtt_username: str = "bridge"
    local_mqtt_password: str = ""
    local_mqtt_tls_ca_file: str | None = None
    db_path: Path = Path("state/bridge.db")
    instance_lock_path: Path | None = None
    """Several bridge processes of this retailer on one host (same ``db_path``, same file here): the one holding
    this file's lock is active, the others wait as standbys and take over when it dies (``retailer_bridge/
    instance_lock.py``). None: one process, no lock."""
    partitions: int = Field(1, ge=1, le=64)
    """Bridge processes sharing this retailer's gateways by a hash of the gateway id (``retailer_bridge/
    partition.py``); each is given the whole ``customers`` list, its own ``partition``, store, lock and logins."""
    partition: int = Field(0, ge=0)
    """Which of the ``partitions`` this process is (0 to partitions - 1)."""
    customers: dict[str, str] = Field(default_factory=dict)
    """``client_id -> gateway_id`` of this retailer's customers (the installation record; ``retailer-bridge run``
    re-reads it, with ``customers_file`` and ``customer_sheddable_kw``, on SIGHUP)."""
    customers_file: Path | None = None
    """A JSON object ``client_id -> gateway_id`` merged under ``customers`` (re-read on SIGHUP)."""
    customer_sheddable_kw: dict[str, Annotated[float, Field(ge=0, le=10_000, allow_inf_nan=False)]] = Field(
        default_factory=dict)
    """``client_id -> kW``: the rated power of each customer's sheddable loads, from the installation record. A
    gateway claiming more is not believed (its home answers ``unavailable``); for a customer missing here the bound
    is what its gateway declares (``rated_sheddable_kw`` of its telemetry)."""
    gateway_ack_timeout_s: float = Field(10.0, gt=0)
    gateway_retry_s: float = Field(0.5, gt=0)
    """The first re-send delay of a command a gateway has not acknowledged (doubling up to 30 s): short, so that a
    command lost on the way is sent again soon; a gateway answers a repeat without acting again. It is the
    floor: when gateways' measured acknowledgements take longer (a busy broker or fleet), the first re-send waits
    for them (``srtt + 4 * rttvar``, RFC 6298), up to ``gateway_retry_max_s``."""
    gateway_retry_max_s: float = Field(4.0, gt=0)
    """The longest the measured round trips may stretch a command's first re-send delay (never below
    ``gateway_retry_s``)."""
    measurement_interval_s: float = Field(5.0, gt=0)
    gateway_rate_limit_per_s: float = Field(50.0, gt=0)
    """MQTT messages per second each gateway may sustain; beyond it they are refused with an error answer."""
    gateway_rate_limit_burst: int = Field(200, ge=1)
    """How often active-power measurements of the customers are forwarded to the hub."""
    loop_stall_s: Annotated[float, AfterValidator(valid_threshold)] = 0.25
    """The event loop's stall watchdog (``mhp_wire.loopwatch``): a heartbeat of the loop more than this late is
    logged as one warning per stall, with the loop thread's stack and CPU time (``Bridge.loop_watch`` counts them).
    0: off."""
    hub_outcome_batches: bool = True
    """Send the outcomes of one batch of gateways' reports as one ``outcomes`` message per request (docs/protocol.md);
    False: one ``outcome`` per client, for a hub that does not know ``outcomes`` yet (it refuses that type)."""
    telemetry_store: Literal["sqlite", "influxdb", "none"] = "sqlite"
    """Where the customers' telemetry is kept: the embedded SQLite file, or an InfluxDB (v2 write API)."""
    telemetry_db_path: Path = Path("state/telemetry.db")
    influx_url: str | None = None
    influx_token: str = ""
    influx_org: str = "mhp"
    influx_bucket: str = "telemetry"
    influx_ca_file: str | None = None
    """CA that signed an ``https://`` InfluxDB's certificate (the system's CAs when None)."""
    telemetry_batch_size: int = Field(500, ge=1)
    telemetry_flush_interval_s: float = Field(1.0, gt=0)
    telemetry_spool_max: int = Field(1_000_000, ge=1000)
    """Points kept on disk while the telemetry store is down (the oldest go first beyond this)."""
    personal_area_host: str = "127.0.0.1"
    personal_area_port: int | None = None
    """The customers' personal area (web); None: not served."""
    personal_area_secure_cookies: bool = False
    """Mark session cookies Secure (set it when the personal area is behind HTTPS); implied by TLS or a proxy."""
    personal_area_trusted_proxies: list[str] = Field(default_factory=list)
    """Addresses or networks (``10.0.0.0/8``) of reverse proxies whose ``X-Forwarded-For`` names the customer's
    address; empty: the socket peer is the customer's address and the header is ignored."""
    personal_area_form_rate_per_s: float = Field(0.2, gt=0)
    """Form posts per second each account may sustain (sign-ins per e-mail address, changes per customer)."""
    personal_area_form_burst: int = Field(10, ge=1)
    personal_area_address_rate_per_s: float = Field(1.0, gt=0)
    """Form posts per second each client address may sustain (several customers may share one address)."""
    personal_area_address_burst: int = Field(30, ge=1)
    personal_area_scrypt_n: int = Field(2**17, ge=2**10)
    """scrypt's cost N for new personal-area passwords (r=8, p=1); below 2**17 only in development (tests)."""
    personal_area_tls_certfile: Path | None = None
    """With ``personal_area_tls_keyfile``: the personal area is served over HTTPS only (certificate chain, PEM)."""
    personal_area_tls_keyfile: Path | None = None
    personal_area_behind_tls_proxy: bool = False
    """Served plain to a TLS-terminating proxy: Secure cookies; list the proxy in ``personal_area_trusted_proxies``
    so that X-Forwarded-Proto/For are honoured (from it only)."""

    @field_validator("retailer_id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        return check_id(v)

    @field_validator("personal_area_trusted_proxies")
    @classmethod
    def _valid_proxies(cls, v: list[str]) -> list[str]:
        bad = []
        for proxy in v:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                bad.append(proxy)
        if bad:
            raise ValueError(f"not an IP address or network: {', '.join(bad)}")
        return v

    @field_validator("personal_area_scrypt_n")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("scrypt's N must be a power of two")
        return v

    @model_validator(mode="after")
    def _production_profile(self) -> BridgeSettings:
        if (self.personal_area_tls_certfile is None) != (self.personal_area_tls_keyfile is None):
            raise ValueError("the personal area's HTTPS needs both personal_area_tls_certfile and "
                             "personal_area_tls_keyfile (or neither)")
        https = self.personal_area_tls_certfile is not None
        if https or self.personal_area_behind_tls_proxy:
            self.personal_area_secure_cookies = True
        if self.environment == "production":
            listeners = {} if self.personal_area_port is None else {
                "personal area (personal_area_tls_certfile and personal_area_tls_keyfile, or "
                "personal_area_behind_tls_proxy = true)": https or self.personal_area_behind_tls_proxy}
            problems = production_problems(
                secrets={"hub_mqtt_password": self.hub_mqtt_password, "local_mqtt_password": self.local_mqtt_password},
                mqtt_ca_files={"hub_mqtt_tls_ca_file": self.hub_mqtt_tls_ca_file,
                               "local_mqtt_tls_ca_file": self.local_mqtt_tls_ca_file},
                listeners=listeners,
                https_urls={"influx_url": self.influx_url if self.telemetry_store == "influxdb" else None})
            if self.personal_area_scrypt_n < 2**17:
                problems.append("personal_area_scrypt_n below 2**17 is for development only")
            if problems:
                raise ValueError(production_error(problems))
        return self

    @model_validator(mode="after")
    def _check(self) -> BridgeSettings:
        if self.environment == "production" and not (self.hub_mqtt_password and self.local_mqtt_password):
            raise ValueError("MQTT passwords must be set outside development")
        if self.telemetry_store == "influxdb" and not self.influx_url:
            raise ValueError("telemetry_store 'influxdb' needs influx_url")
        if self.customers_file is not None:
            self.customers = {**json.loads(self.customers_file.read_text()), **self.customers}
        for cid, gid in self.customers.items():
            check_id(cid)
            check_id(gid)
        if self.partition >= self.partitions:
            raise ValueError(f"partition must be between 0 and {self.partitions - 1} (partitions "
                             f"{self.partitions}), not {self.partition}")
        if self.partitions > 1 and self.personal_area_port is not None:
            raise ValueError("the personal area is served by an unpartitioned bridge only (partitions = 1): a "
                             "customer's schedule is sent and acknowledged through the partition of its gateway")
        if self.partitions > 1 and self.partition > 0 and self.hub_mqtt_username in (None, self.retailer_id):
            raise ValueError("a partition other than 0 needs hub_mqtt_username, a login of its own at the hub "
                             "broker (a second login of the retailer: one login holds one connection)")
        if self.partitions > 1 and self.partition > 0 and self.local_mqtt_username == "bridge":
            raise ValueError("a partition other than 0 needs local_mqtt_username, a privileged login of its own at "
                             "the retailer broker ('bridge' is partition 0's)")
        strangers = sorted(set(self.customer_sheddable_kw) - set(self.customers))
        if strangers:
            raise ValueError(f"customer_sheddable_kw names clients that are not customers: {', '.join(strangers[:20])}")
        return self

    @classmethod
    def load(cls, toml_file: Path | None = None, **overrides: Any) -> BridgeSettings:
        """Settings from an optional TOML file (a ``[bridge]`` table or top-level keys), the environment, overrides."""
        values: dict[str, Any] = {}
        if toml_file is not None:
            data = tomllib.loads(Path(toml_file).read_text())
            values.update(data.get("bridge", data))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
