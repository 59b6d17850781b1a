"""The whole platform on one machine: brokers, hub, bridges, gateways and simulated devices as real processes.

Every process is the real command (``cloud-hub serve``, ``retailer-bridge run``, ``hems-gateway run``,
``mosquitto``); several simulated homes share one gateway process (each with its own MQTT identity, config and
devices) so that 100 homes fit a 2-core machine. ``stack.json`` in the state directory says what runs where.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from broker_config.launcher import find_mosquitto
from broker_config.render import (
    GENERATED_PASSWORD_ITERATIONS,
    BrokerSpec,
    BrokerTls,
    Delegate,
    Identity,
    generate_password,
    render,
)
from broker_config.tls import Pki, create_pki
from cloud_hub.tokens import TokenBook
from dso_console.app import is_loopback
from mhp_wire import topics
from mhp_wire.messages import Presence, Tariff, WireError, decode
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from mhp_wire.passwords import hash_password
from mhp_wire.ports import free_port
from mhp_wire.secretfile import write_private
from retailer_bridge.partition import MAX_PARTITIONS, partition_logins
from sim.stack.supervisor import Child, Supervisor

log = logging.getLogger(__name__)

# One home: base load plus four plugs on relay coils 0..3 (name, coil, rated kW, priority, sheddable).
PLUGS: list[dict[str, Any]] = [
    {"name": "water-heater", "coil": 0, "rated_kw": 2.0, "priority": 1, "sheddable": True},
    {"name": "ev-charger", "coil": 1, "rated_kw": 3.7, "priority": 2, "sheddable": True},
    {"name": "washing-machine", "coil": 2, "rated_kw": 1.2, "priority": 3, "sheddable": True},
    {"name": "fridge", "coil": 3, "rated_kw": 0.15, "priority": 9, "sheddable": False},
]
HOME_SHEDDABLE_KW = round(sum(p["rated_kw"] for p in PLUGS if p["sheddable"]), 3)
"""Rated power of a home's sheddable plugs: its bridge's installation record."""
BASE_LOAD_KW = 0.3
CONTRACTED_POWER_KW = 6.9
HOMES_PER_GATEWAY_PROCESS = 25


def bridge_process(rid: str, partition: int, partitions: int) -> str:
    """The supervised name of a bridge process: ``bridge-{rid}``, or ``bridge-{rid}-p{k}`` when partitioned (as in
    ``mhp-sim experiment fanout --bridge-partitions``)."""
    return f"bridge-{rid}" if partitions == 1 else f"bridge-{rid}-p{partition}"


class StackError(Exception):
    """The stack could not start; the message says which part and where its log is."""


@dataclass
class Home:
    """One simulated home: its client, retailer, gateway and device ports."""

    client_id: str
    retailer_id: str
    gateway_id: str
    feeder_id: str
    password: str = field(default_factory=generate_password)
    meter_port: int = 0
    relay_port: int = 0


class Stack:
    """Start with :meth:`start`, stop with :meth:`stop`; :attr:`info` is what ``stack.json`` holds."""

    def __init__(self, state_dir: Path, *, retailers: int = 2, homes: int = 4, host: str = "127.0.0.1",
                 hub_port: int | None = None, log_level: str = "INFO", tls: bool = False,
                 bridge_partitions: int = 1) -> None:
        if retailers < 1 or homes < 1:
            raise ValueError("a stack needs at least one retailer and one home")
        if not 1 <= bridge_partitions <= MAX_PARTITIONS:
            raise ValueError(f"bridge partitions must be between 1 and {MAX_PARTITIONS}, not {bridge_partitions}")
        self.bridge_partitions = bridge_partitions
        """Each retailer's bridge runs as this many processes, partitioned by gateway (``retailer_bridge.partition``),
        each with its own store and logins; 1: one process, as before."""
        self.dir = Path(state_dir).resolve()
        self.host = host
        self.log_level = log_level
        self.retailer_ids = [f"r{i + 1}" for i in range(retailers)]
        self.homes = [
            Home(client_id=f"client-{i + 1:04d}", retailer_id=self.retailer_ids[i % retailers],
                 gateway_id=f"gw-{i + 1}", feeder_id=f"feeder-{i % 3 + 1}")
            for i in range(homes)
        ]
        self.hub_port = hub_port or free_port(host)
        self.tls = tls
        """Every broker listens with TLS only, the hub serves HTTPS, every client verifies with ``self.pki``'s CA."""
        self.pki: Pki | None = None
        self.sup = Supervisor(on_change=self.write_info)
        self.info: dict[str, Any] = {}
        self.tokens: dict[str, Any] = {}
        self.brokers: dict[str, dict[str, Any]] = {}
        self._observers: list[MqttLink] = []
        self.presence: dict[str, str] = {}
        self.tariffs: dict[str, tuple[str, int, float]] = {}
        """The tariff each broker holds retained: ``broker name -> (tariff id, version, seen at)``."""
        self._watch_task: asyncio.Task[None] | None = None
        self.console_port = 0
        self.console_password: str | None = None
        """The DSO console's operator password (``None`` on loopback, where it runs without sign-in)."""

    # -- layout -------------------------------------------------------------------------------------------

    def _python(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    def _broker(self, name: str, kind: str, privileged: str, parties: list[Identity], *,
                extra_privileged: tuple[Identity, ...] = (), delegates: tuple[Delegate, ...] = ()) -> dict[str, Any]:
        port = free_port(self.host)
        priv = Identity(privileged, generate_password())
        observer = Identity("stack", generate_password())
        tls = None
        if self.pki is not None:
            server = self.pki.servers[f"broker-{name}"]
            tls = BrokerTls(self.pki.ca_file, server.certfile, server.keyfile)
        spec = BrokerSpec(kind=kind, port=port, data_dir=self.dir / "brokers" / name, privileged=priv,  # type: ignore[arg-type]
                          parties=parties, extra_privileged=[observer, *extra_privileged], host=self.host,
                          delegates=list(delegates),
                          use_username_as_clientid=True, tls=tls,
                          password_iterations=GENERATED_PASSWORD_ITERATIONS)  # every password is generated
        conf = render(spec)
        self.sup.start(Child(f"broker-{name}", [find_mosquitto(), "-c", str(conf)],
                             self.dir / "logs" / f"broker-{name}.log"))
        idents = [priv, observer, *parties, *extra_privileged, *(d.identity for d in delegates)]
        creds = {i.username: {"username": i.username, "password": i.password} for i in idents}
        return {"host": self.host, "port": port, "credentials": creds, "tls": tls is not None}

    def _write_toml(self, name: str, data: dict[str, Any]) -> Path:
        path = self.dir / "config" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_private(path, tomli_w.dumps(data))

    # -- start --------------------------------------------------------------------------------------------

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start every part, register retailers and clients with the hub, and wait until all are online."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        (self.dir / "logs").mkdir(exist_ok=True)
        deadline = time.monotonic() + timeout_s
        if self.tls:  # a CA and server certificates for every broker and the hub's HTTPS, in the state dir
            hosts = list(dict.fromkeys([self.host, "localhost", "127.0.0.1"]))
            servers = ["hub", "broker-hub", *(f"broker-{r}" for r in self.retailer_ids)]
            self.pki = await asyncio.get_running_loop().run_in_executor(
                None, lambda: create_pki(self.dir / "tls", hosts, servers=servers))
        # Brokers: the hub broker (hub + retailers) and one broker per retailer (its bridge + its gateways).
        # A partitioned bridge's partition k > 0 logs in as {rid}.p{k} (a delegate of the retailer) at the hub
        # broker and as bridge.p{k} (privileged) at its retailer's broker.
        parts = range(1, self.bridge_partitions)
        self.brokers["hub"] = self._broker(
            "hub", "hub", "hub", [Identity(r, generate_password()) for r in self.retailer_ids],
            delegates=tuple(Delegate(Identity(partition_logins(r, k)[0], generate_password()), r)
                            for r in self.retailer_ids for k in parts))
        for rid in self.retailer_ids:
            gws = [Identity(h.gateway_id, h.password) for h in self.homes if h.retailer_id == rid]
            self.brokers[rid] = self._broker(
                rid, "retailer", "bridge", gws,
                extra_privileged=tuple(Identity(partition_logins(rid, k)[1], generate_password()) for k in parts))
        # Simulated devices: they pick their own ports and say which.
        spec = {"homes": [{"gateway_id": h.gateway_id, "base_load_kw": BASE_LOAD_KW, "plugs": PLUGS}
                          for h in self.homes]}
        (self.dir / "config").mkdir(exist_ok=True)
        spec_path, ports_path = self.dir / "config" / "homes.json", self.dir / "devices-ports.json"
        ports_path.unlink(missing_ok=True)
        spec_path.write_text(json.dumps(spec, indent=1))
        events = str(self.dir / "device-events.jsonl")
        self.sup.start(Child("devices", self._python("sim.devices", "--spec", str(spec_path), "--ports",
                                                      str(ports_path), "--events", events),
                             self.dir / "logs" / "devices.log"))
        # The hub, with a bearer token per principal.
        book = TokenBook(self.dir / "hub-tokens.json")
        if book.path.exists():
            book.path.unlink()
        self.tokens = {"dso": book.issue("dso"), "admin": book.issue("admin"),
                       "retailers": {r: book.issue(f"retailer:{r}") for r in self.retailer_ids}}
        hub_cfg = self._write_toml("hub.toml", {"hub": {
            "http_host": self.host, "http_port": self.hub_port, "db_path": str(self.dir / "hub.db"),
            "tokens_file": str(book.path), "mqtt_host": self.host, "mqtt_port": self.brokers["hub"]["port"],
            "mqtt_username": "hub", "mqtt_password": self.brokers["hub"]["credentials"]["hub"]["password"],
            **self._hub_tls_settings()}})
        self.sup.start(Child("hub", self._python("cloud_hub.cli", "--log-level", self.log_level, "serve",
                                                 "--config", str(hub_cfg)), self.dir / "logs" / "hub.log"))
        await self._wait_tcp(self.brokers["hub"]["port"], deadline, "broker-hub")
        await self._watch_presence()
        await self._wait_ready(deadline)
        await self._register()
        self._start_console()
        # Bridges: one process per retailer, or one per partition.
        for rid in self.retailer_ids:
            for k in range(self.bridge_partitions):
                name = bridge_process(rid, k, self.bridge_partitions)
                cfg = self._write_toml(f"{name}.toml", {"bridge": self.bridge_config(rid, k)})
                self.sup.start(Child(name, self._python("retailer_bridge.cli", "--log-level", self.log_level,
                                                        "run", "--config", str(cfg)),
                                     self.dir / "logs" / f"{name}.log"))
        # Gateways, several homes per process, once the devices say where they listen.
        ports = await self._wait_file(ports_path, deadline, "devices")
        configs = []
        for h in self.homes:
            h.meter_port, h.relay_port = ports[h.gateway_id]["meter_port"], ports[h.gateway_id]["relay_port"]
            configs.append(self._write_toml(f"gateway-{h.gateway_id}.toml", self.gateway_config(h)))
        for i in range(0, len(configs), HOMES_PER_GATEWAY_PROCESS):
            group = configs[i:i + HOMES_PER_GATEWAY_PROCESS]
            name = f"gateways-{i // HOMES_PER_GATEWAY_PROCESS + 1}"
            args = [a for c in group for a in ("--config", str(c))]
            self.sup.start(Child(name, self._python("hems_firmware.cli", "--log-level", self.log_level, "run", *args),
                                 self.dir / "logs" / f"{name}.log"))
        await self._wait_online(deadline)
        await self._wait_tcp(self.console_port, deadline, "dso-console")
        self.write_info()

    def bridge_config(self, rid: str, partition: int) -> dict[str, Any]:
        """The ``[bridge]`` table of retailer ``rid``'s bridge (of one of its partitions when partitioned)."""
        customers = {h.client_id: h.gateway_id for h in self.homes if h.retailer_id == rid}
        hub_login, local_login = partition_logins(rid, partition)
        name = bridge_process(rid, partition, self.bridge_partitions)
        cfg: dict[str, Any] = {
            "retailer_id": rid, "hub_mqtt_host": self.host, "hub_mqtt_port": self.brokers["hub"]["port"],
            "hub_mqtt_password": self.brokers["hub"]["credentials"][hub_login]["password"],
            "local_mqtt_host": self.host, "local_mqtt_port": self.brokers[rid]["port"],
            "local_mqtt_username": local_login,
            "local_mqtt_password": self.brokers[rid]["credentials"][local_login]["password"],
            "db_path": str(self.dir / f"{name}.db"), "customers": customers,
            # The installation record: what each home could shed at most (a claim above it is not believed).
            "customer_sheddable_kw": {c: HOME_SHEDDABLE_KW for c in customers},
            **self._ca_settings("hub_mqtt_tls_ca_file", "local_mqtt_tls_ca_file")}
        if self.bridge_partitions > 1:
            cfg.update({"partitions": self.bridge_partitions, "partition": partition})
            if partition > 0:
                cfg["hub_mqtt_username"] = hub_login
        return cfg

    def _start_console(self) -> None:
        """The DSO's console (``dso-console``, package ``dso_console``), holding the DSO's token; with an operator
        password off loopback."""
        token_file = self.dir / "dso-token"
        write_private(token_file, self.tokens["dso"])
        self.console_port = free_port(self.host)
        args = ["--hub-url", self.hub_url, "--token-file", str(token_file), "--host", self.host,
                "--port", str(self.console_port), "--log-level", self.log_level]
        if is_loopback(self.host):
            args.append("--no-login")
        else:
            self.console_password = generate_password()
            hash_file = self.dir / "dso-console-password.hash"
            write_private(hash_file, hash_password(self.console_password))
            args += ["--password-hash-file", str(hash_file)]
        if self.pki is not None:
            args += ["--ca-file", str(self.pki.ca_file)]
        self.sup.start(Child("dso-console", self._python("dso_console", *args), self.dir / "logs" / "dso-console.log"))

    @property
    def console_url(self) -> str:
        """Where the DSO's console listens."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.console_port}/"

    def gateway_config(self, h: Home) -> dict[str, Any]:
        """The TOML configuration of one home's gateway."""
        broker = self.brokers[h.retailer_id]
        devices: list[dict[str, Any]] = [{"name": "meter", "driver": "eastron_sdm630", "transport": "modbus-tcp",
                                          "host": self.host, "port": h.meter_port, "unit_id": 1, "timeout_s": 1.0}]
        for p in PLUGS:
            devices.append({"name": p["name"], "driver": "modbus_relay", "transport": "modbus-tcp", "host": self.host,
                            "port": h.relay_port, "unit_id": 1, "coil": p["coil"], "rated_power_kw": p["rated_kw"],
                            "priority": p["priority"], "sheddable": p["sheddable"], "timeout_s": 1.0})
        return {"gateway": {"id": h.gateway_id, "client_id": h.client_id,
                            "state_dir": str(self.dir / "gateways"), "poll_interval_s": 1.0,
                            "telemetry_interval_s": 5.0,
                            "uplink": {"host": broker["host"], "port": broker["port"], "username": h.gateway_id,
                                       "password": h.password, **self._ca_settings("tls_ca_file")}},
                "devices": devices}

    def _ca_settings(self, *keys: str) -> dict[str, str]:
        """``{key: CA file}`` for each key when the stack runs TLS, else nothing."""
        return {k: str(self.pki.ca_file) for k in keys} if self.pki is not None else {}

    def _hub_tls_settings(self) -> dict[str, str]:
        if self.pki is None:
            return {}
        https = self.pki.servers["hub"]
        return {**self._ca_settings("mqtt_tls_ca_file"), "tls_certfile": str(https.certfile),
                "tls_keyfile": str(https.keyfile)}

    @property
    def http_verify(self) -> ssl.SSLContext | bool:
        """What an HTTP client of the hub verifies its certificate with (``True``, the system's CAs, when plain)."""
        if self.pki is None:
            return True
        return ssl.create_default_context(cafile=str(self.pki.ca_file))

    def http_client(self, timeout: float = 10) -> httpx.AsyncClient:
        """An HTTP client of the hub that trusts the stack's CA when it runs TLS."""
        return httpx.AsyncClient(base_url=self.hub_url, timeout=timeout, verify=self.http_verify)

    async def _register(self) -> None:
        async with self.http_client() as http:
            for rid in self.retailer_ids:
                r = await http.put(f"/v1/retailers/{rid}", json={"name": f"Retailer {rid.upper()}"},
                                   headers={"Authorization": f"Bearer {self.tokens['admin']}"})
                r.raise_for_status()
            for h in self.homes:
                dso = {"Authorization": f"Bearer {self.tokens['dso']}"}
                r = await http.put(f"/v1/clients/{h.client_id}", headers=dso,
                                   json={"retailer_id": h.retailer_id, "contracted_power_kw": CONTRACTED_POWER_KW,
                                         "feeder_id": h.feeder_id, "valid_from": "2020-01-01T00:00:00+00:00"})
                r.raise_for_status()

    @property
    def hub_url(self) -> str:
        """Where the hub's HTTP API listens."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.hub_port}"

    # -- waiting ------------------------------------------------------------------------------------------

    def _died(self, name: str) -> StackError:
        return StackError(f"{name} did not come up; see {self.dir / 'logs' / (name + '.log')}")

    async def _wait_tcp(self, port: int, deadline: float, name: str) -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_connection(self.host, port)
                w.close()
                return
            await asyncio.sleep(0.05)
        raise self._died(name)

    async def _wait_file(self, path: Path, deadline: float, name: str) -> dict[str, Any]:
        while time.monotonic() < deadline:
            if path.exists():
                data: dict[str, Any] = json.loads(path.read_text())
                return data
            await asyncio.sleep(0.05)
        raise self._died(name)

    async def _wait_ready(self, deadline: float) -> None:
        async with self.http_client(timeout=2) as http:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise self._died("hub")

    async def _watch_presence(self) -> None:
        """Follow every party's retained presence on every broker, as the stack's observer identity."""

        def on_message_of(broker_name: str) -> Callable[[str, bytes, bool], Awaitable[None]]:
            async def on_message(topic: str, payload: bytes, retained: bool) -> None:
                with contextlib.suppress(topics.TopicError, WireError):
                    msg = decode(payload)
                    if topic == topics.TARIFF and isinstance(msg, Tariff):
                        self.tariffs[broker_name] = (msg.tariff_id, msg.version, time.time())
                        return
                    parsed = topics.parse_up(topic)
                    if isinstance(msg, Presence):
                        self.presence[parsed.party_id] = msg.state

            return on_message

        for name, broker in self.brokers.items():
            await self._wait_tcp(broker["port"], time.monotonic() + 15, f"broker-{name}")
            kind: topics.PartyKind = "retailers" if name == "hub" else "gateways"
            creds = broker["credentials"]["stack"]
            ca = str(self.pki.ca_file) if self.pki is not None else None
            link = MqttLink(MqttEndpoint(broker["host"], broker["port"], creds["username"], creds["password"], ca),
                            client_id=f"stack-observer-{name}",
                            subscriptions=[f"{topics.PREFIX}/{kind}/+/up/status", topics.TARIFF],
                            handler=on_message_of(name), clean_start=True, session_expiry_s=0)
            self._observers.append(await link.__aenter__())

    async def _wait_online(self, deadline: float) -> None:
        wanted = set(self.retailer_ids) | {h.gateway_id for h in self.homes}
        while time.monotonic() < deadline:
            missing = sorted(p for p in wanted if self.presence.get(p) != "online")
            if not missing:
                return
            self.sup.check()
            await asyncio.sleep(0.1)
        raise StackError(f"not online after start: {', '.join(missing[:10])}; logs in {self.dir / 'logs'}")

    # -- running ------------------------------------------------------------------------------------------

    def write_info(self) -> None:
        """Write ``stack.json``: URLs, tokens, brokers and credentials, homes, processes and their pids."""
        self.info = {
            "hub_url": self.hub_url,
            "console_url": self.console_url if self.console_port else None,
            "console_password": self.console_password,
            # The names of before the console was its own package (mhp-sim dso-web), for scripts that read them.
            "dso_web_url": self.console_url if self.console_port else None,
            "dso_web_password": self.console_password,
            "tokens": self.tokens,
            "brokers": {"hub": self.brokers.get("hub", {}),
                        "retailers": {r: self.brokers[r] for r in self.retailer_ids if r in self.brokers}},
            "homes": [{"client_id": h.client_id, "retailer_id": h.retailer_id, "gateway_id": h.gateway_id,
                       "feeder_id": h.feeder_id, "meter": {"host": self.host, "port": h.meter_port, "unit_id": 1},
                       "relay": {"host": self.host, "port": h.relay_port, "unit_id": 1}} for h in self.homes],
            "processes": {name: pid for name, pid in self.sup.pids().items()},
            "logs": str(self.dir / "logs"),
            "device_events": str(self.dir / "device-events.jsonl"),
            "plugs": PLUGS,
            "restarts": self.sup.events[-50:],
            "tls": {"ca_file": str(self.pki.ca_file)} if self.pki is not None else None,
            "bridge_partitions": self.bridge_partitions,
        }
        path = self.dir / "stack.json"
        write_private(path, json.dumps(self.info, indent=2))

    async def supervise(self) -> None:
        """Restart whatever dies, until cancelled."""
        while True:
            self.sup.check()
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        """Stop every process of the stack."""
        for link in self._observers:
            with contextlib.suppress(Exception):
                await link.__aexit__(None, None, None)
        self._observers.clear()
        await asyncio.get_running_loop().run_in_executor(None, self.sup.stop_all)
