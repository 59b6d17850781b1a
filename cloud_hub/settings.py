"""The hub's settings: environment variables ``MHP_HUB_*``, optionally a TOML file, errors reported all at once."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mhp_wire.loopwatch import valid_threshold
from mhp_wire.production import production_error, production_problems
from mhp_wire.topics import check_id


class HubSettings(BaseSettings):
    """Everything the hub needs to start."""

    # hide_input_in_errors: a validation error never echoes a value (a password next to a bad port).
    model_config = SettingsConfigDict(env_prefix="MHP_HUB_", extra="forbid", hide_input_in_errors=True)

    environment: Literal["development", "production"] = "development"
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    db_path: Path = Path("state/hub.db")
    tokens_file: Path = Path("state/hub-tokens.json")
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(1883, ge=1, le=65535)
    mqtt_username: str = "hub"
    mqtt_password: str = ""
    mqtt_client_id: str = "hub-1"
    mqtt_tls_ca_file: str | None = None
    """CA that signed the hub broker's certificate: with it the MQTT link is TLS and verifies chain and host."""
    tls_certfile: Path | None = None
    """With ``tls_keyfile``: the HTTP API is served over HTTPS only, with this certificate (chain) in PEM."""
    tls_keyfile: Path | None = None
    behind_tls_proxy: bool = False
    """The HTTP API is served plain to a TLS-terminating proxy: its X-Forwarded-Proto/For are honoured (only from
    ``forwarded_allow_ips``). In production the API needs this or ``tls_certfile``/``tls_keyfile``."""
    forwarded_allow_ips: list[str] = Field(default_factory=lambda: ["127.0.0.1"])
    """Addresses of the TLS proxy whose X-Forwarded-* headers are believed (``behind_tls_proxy``)."""
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    """The largest HTTP request body (413 beyond it), except for ``max_client_list_body_bytes``'s routes."""
    max_client_list_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    """The largest body of a request that names its clients (``POST`` of an emergency, load shift, load reduction,
    billing data, and a revision): the API takes up to 100,000 client ids of up to 64 characters (~6.7 MB), so 1 MiB
    refused requests the API documents as valid. Never below ``max_body_bytes``."""
    expose_docs: bool | None = None
    """Serve ``/docs``, ``/redoc`` and ``/openapi.json``; unset: only in development (not on a production listener)."""
    expose_metrics: bool | None = None
    """Serve ``/metrics``; unset: only in development (in production set it where the listener is private)."""
    storage: Literal["embedded", "hbase"] = "embedded"
    """``embedded``: SQLite in ``db_path``; ``hbase``: an HBase cluster through its Thrift gateways."""
    hbase_hosts: list[str] = Field(default_factory=list)
    """Thrift gateway addresses ``host:port``, tried in turn (failover)."""
    hbase_table_prefix: str = "mhp"
    hbase_pool_size: int = Field(4, ge=1, le=64)
    hbase_timeout_ms: int = Field(2000, ge=100)
    sqlite_busy_timeout_ms: int = Field(1000, ge=0)
    expand_after_accept_min_clients: int = Field(1000, ge=0)
    """A client request naming at least this many clients is answered after one compact write and expanded to its
    per-client entries right after (``cloud_hub/fanout.py``); a smaller one is stored whole in its one accepting
    write (one transaction, one disk sync, where two would cost more than they save)."""
    sent_settle_s: float = Field(2.0, ge=0, le=60)
    """How long a message's ``pending`` -> ``sent`` marks wait before they are written; a client answered meanwhile
    gets none (``cloud_hub.book.SENT_SETTLE_S``, docs/decisions.md "The first sends' marks settle"). 0: at once."""
    rate_limit_per_s: float = Field(200.0, gt=0)
    """HTTP requests per second each principal (token holder) may sustain; beyond it: 429 with Retry-After."""
    rate_limit_burst: int = Field(400, ge=1)
    """HTTP requests a principal may send at once before the sustained rate applies."""
    mqtt_rate_limit_per_s: float = Field(200.0, gt=0)
    """MQTT messages per second each retailer may sustain; beyond it they are refused with an error answer."""
    mqtt_rate_limit_burst: int = Field(400, ge=1)
    presence_rate_limit_per_s: float = Field(0.1, gt=0)
    """Presence changes (online/offline) per second each retailer may sustain; beyond it a change is ignored and
    counted, and the retailer's unacknowledged messages are re-sent on their back-off instead of at once."""
    presence_rate_limit_burst: int = Field(10, ge=1)
    replica_id: str | None = None
    """Run as one of several hub replicas on one shared store (``docs/architecture.md``, scale-out); None: the
    single hub. Each replica needs its own MQTT identity; ``mqtt_client_id`` defaults to ``hub-<replica_id>``."""
    replica_settle_s: float = Field(1.0, ge=0)
    """After connecting, how long a replica listens to the retained presence of the others before it loads its
    requests and adopts those of offline replicas."""
    replica_scan_s: float = Field(10.0, gt=0)
    """How often the adopting replica looks for open requests whose owner is offline."""
    replica_session_expiry_s: int = Field(0, ge=0)
    """MQTT session expiry of a replica. 0 (default): a replica's shared subscription ends with its connection;
    Mosquitto 2.0 hands a stored offline session its share of the group's messages (``docs/decisions.md``)."""
    replica_forward_timeout_s: float = Field(5.0, gt=0)
    """How long a replica waits for the owner's answer to a forwarded cancel before answering 503."""
    feed_keepalive_s: float = Field(15.0, gt=0)
    """A change-feed stream (Server-Sent Events) sends a comment line after this long without an event."""
    feed_replay_s: float = Field(86_400.0, gt=0)
    """How long the change feed keeps events: a follower resuming from an older id gets a ``reset`` event."""
    feed_queue_max: int = Field(1000, ge=1)
    """Events queued for one live follower; beyond it its stream is closed (it resumes with Last-Event-ID)."""
    webhook_allow_private: bool = False
    """Allow webhook targets that resolve to loopback, private, link-local, multicast or reserved addresses (tests,
    a receiver on the hub's own network); refused otherwise, at creation and again at each delivery."""
    webhook_timeout_s: float = Field(10.0, gt=0)
    """How long one webhook delivery may take."""
    webhook_retry_initial_s: float = Field(1.0, gt=0)
    """The first pause before a failed webhook delivery is tried again; it doubles up to ``webhook_retry_max_s``."""
    webhook_retry_max_s: float = Field(300.0, gt=0)
    webhook_max_age_s: float = Field(86_400.0, gt=0)
    """How long an event is retried to a webhook before it is dropped (and counted in ``mhp_webhook_dropped``)."""
    loop_stall_s: Annotated[float, AfterValidator(valid_threshold)] = 0.25
    """The event loop's stall watchdog (``mhp_wire.loopwatch``): a heartbeat of the loop more than this late is
    logged as one warning per stall, with the loop thread's stack and CPU time, and counted in
    ``mhp_loop_stall_seconds``. 0: off."""

    @model_validator(mode="after")
    def _production_profile(self) -> HubSettings:
        if self.environment == "production":
            problems = production_problems(
                secrets={"mqtt_password": self.mqtt_password},
                mqtt_ca_files={"mqtt_tls_ca_file": self.mqtt_tls_ca_file},
                listeners={"HTTP API (tls_certfile and tls_keyfile, or behind_tls_proxy = true)":
                           self.behind_tls_proxy or (self.tls_certfile is not None and self.tls_keyfile is not None)})
            if problems:
                raise ValueError(production_error(problems))
        return self

    @model_validator(mode="after")
    def _no_default_secrets(self) -> HubSettings:
        if self.environment == "production" and not self.mqtt_password:
            raise ValueError("mqtt_password must be set outside development")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("HTTPS needs both tls_certfile and tls_keyfile (or neither for plain HTTP)")
        if self.replica_id is not None:
            check_id(self.replica_id)  # a topic level of the replica's presence and inbox
            if "mqtt_client_id" not in self.model_fields_set:
                self.mqtt_client_id = f"hub-{self.replica_id}"
        if self.storage == "hbase" and not self.hbase_hosts:
            raise ValueError("storage 'hbase' needs hbase_hosts (Thrift gateway addresses host:port)")
        return self

    @model_validator(mode="after")
    def _exposure(self) -> HubSettings:
        development = self.environment == "development"
        if self.expose_docs is None:
            self.expose_docs = development
        if self.expose_metrics is None:
            self.expose_metrics = development
        return self

    @classmethod
    def load(cls, toml_file: Path | None = None, **overrides: Any) -> HubSettings:
        """Settings from an optional TOML file (a ``[hub]`` table or top-level keys), the environment, overrides."""
        values: dict[str, Any] = {}
        if toml_file is not None:
            data = tomllib.loads(Path(toml_file).read_text())
            values.update(data.get("hub", data))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
