"""Hostile tests of the production profile: ``environment = "production"`` refuses to run anything in plain text.

Real parts throughout: certificates from ``broker_config.tls``, Mosquitto with TLS listeners from ``broker_config``,
the bridge with its personal area, the DSO page under uvicorn, the real command lines as subprocesses, and
VictoriaMetrics serving InfluxDB's write API over HTTPS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from broker_config.errors import BrokerConfigError
from broker_config.render import BrokerSpec, BrokerTls, Identity, render
from broker_config.tls import Pki, create_pki
from cloud_hub.settings import HubSettings
from dso_console.app import ConsoleSettings, DsoConsole
from hems_firmware.config import GatewayConfig
from mhp_wire.ports import free_port
from retailer_bridge.accounts import hash_password
from retailer_bridge.service import Bridge
from retailer_bridge.settings import BridgeSettings
from retailer_bridge.telemetry import InfluxPointStore, Point, TelemetryStoreError
from tests.broker_fixtures import BrokerHandle, MosquittoFactory

HOSTS = ["127.0.0.1", "localhost"]
PRODUCTION_REFUSAL = 'environment "production" refuses'


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """The platform's CA with server certificates for the brokers and every web listener."""
    return create_pki(tmp_path / "tls", HOSTS, servers=["broker", "hub", "web", "influx"])


@pytest.fixture
def foreign(tmp_path: Path) -> Pki:
    """Another CA with certificates for the same names and hosts: an impostor's."""
    return create_pki(tmp_path / "foreign", HOSTS, servers=["web", "influx"])


def problems_of(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    text = str(exc.value)
    assert text.count(PRODUCTION_REFUSAL) == 1, "every problem in one message"
    return text


# -- the settings of each service -------------------------------------------------------------------------------


def test_hub_in_production_refuses_plain_mqtt_and_plain_http_at_once() -> None:
    with pytest.raises(ValidationError) as err:
        HubSettings(environment="production", mqtt_password="pw")
    text = problems_of(err)
    assert "mqtt_tls_ca_file must be set" in text and "HTTP API" in text and "served over TLS" in text
    with pytest.raises(ValidationError) as err:
        HubSettings(environment="production")
    assert "mqtt_password must be set" in problems_of(err) and "mqtt_tls_ca_file" in str(err.value)


def test_hub_in_production_runs_with_tls_or_behind_a_tls_proxy(pki: Pki) -> None:
    hub = pki.servers["hub"]
    HubSettings(environment="production", mqtt_password="pw", mqtt_tls_ca_file=str(pki.ca_file),
                tls_certfile=hub.certfile, tls_keyfile=hub.keyfile)
    behind = HubSettings(environment="production", mqtt_password="pw", mqtt_tls_ca_file=str(pki.ca_file),
                         behind_tls_proxy=True, forwarded_allow_ips=["10.0.0.1"])
    assert behind.forwarded_allow_ips == ["10.0.0.1"]
    assert HubSettings().environment == "development", "development stays plain on 127.0.0.1"


def test_hub_command_refuses_to_start_in_production_without_tls(tmp_path: Path) -> None:
    env = {**os.environ, "MHP_HUB_ENVIRONMENT": "production", "MHP_HUB_MQTT_PASSWORD": "pw",
           "MHP_HUB_HTTP_PORT": str(free_port()), "MHP_HUB_DB_PATH": str(tmp_path / "hub.db"),
           "MHP_HUB_TOKENS_FILE": str(tmp_path / "tokens.json")}
    try:
        out = subprocess.run([sys.executable, "-m", "cloud_hub.cli", "serve"], capture_output=True, text=True,
                             env=env, timeout=30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail("cloud-hub serve started in production without TLS")
    assert out.returncode == 2, out.stderr
    assert PRODUCTION_REFUSAL in out.stderr and "mqtt_tls_ca_file" in out.stderr and "HTTP API" in out.stderr


def bridge_settings(**over: Any) -> BridgeSettings:
    base: dict[str, Any] = {"retailer_id": "r1", "environment": "production", "hub_mqtt_password": "a",
                            "local_mqtt_password": "b", "personal_area_port": 0}
    return BridgeSettings(**{**base, **over})


def test_bridge_in_production_refuses_every_plain_link_at_once() -> None:
    with pytest.raises(ValidationError) as err:
        bridge_settings(telemetry_store="influxdb", influx_url="http://influx.example:8086")
    text = problems_of(err)
    for what in ("hub_mqtt_tls_ca_file", "local_mqtt_tls_ca_file", "personal area", "influx_url must be an https"):
        assert what in text, (what, text)


def test_bridge_in_production_behind_a_proxy_marks_cookies_secure(pki: Pki) -> None:
    ca = str(pki.ca_file)
    s = bridge_settings(hub_mqtt_tls_ca_file=ca, local_mqtt_tls_ca_file=ca, personal_area_behind_tls_proxy=True)
    assert s.personal_area_secure_cookies
    web = pki.servers["web"]
    s = bridge_settings(hub_mqtt_tls_ca_file=ca, local_mqtt_tls_ca_file=ca, personal_area_tls_certfile=web.certfile,
                        personal_area_tls_keyfile=web.keyfile, telemetry_store="influxdb",
                        influx_url="https://influx.example:8086", influx_ca_file=ca)
    assert s.personal_area_secure_cookies
    with pytest.raises(ValidationError, match="personal_area_tls_keyfile"):
        bridge_settings(hub_mqtt_tls_ca_file=ca, local_mqtt_tls_ca_file=ca, personal_area_tls_certfile=web.certfile)


def test_gateway_in_production_refuses_a_plain_uplink_and_an_open_page() -> None:
    with pytest.raises(ValidationError) as err:
        GatewayConfig.model_validate({"gateway": {"id": "gw-1", "client_id": "c1", "environment": "production",
                                                  "web_port": 8080, "web_host": "0.0.0.0"}})
    text = problems_of(err)
    for what in ("uplink.password must be set", "uplink.tls_ca_file must be set", "web_host must be a loopback"):
        assert what in text, (what, text)


def test_dso_page_in_production_refuses_a_plain_listener_and_a_plain_hub(pki: Pki) -> None:
    with pytest.raises(ValueError) as err:
        ConsoleSettings(hub_url="http://hub.example:8080", token="t", environment="production")
    assert str(err.value).count(PRODUCTION_REFUSAL) == 1
    assert "DSO page" in str(err.value) and "hub URL must be an https" in str(err.value)
    web = pki.servers["web"]
    s = ConsoleSettings(hub_url="https://hub.example", token="t", environment="production",
                       tls_certfile=web.certfile, tls_keyfile=web.keyfile)
    assert s.secure_cookies


# -- brokers ----------------------------------------------------------------------------------------------------


def test_broker_command_refuses_a_production_broker_without_tls(tmp_path: Path, pki: Pki) -> None:
    ids = tmp_path / "ids.json"
    ids.write_text('{"privileged": {"username": "hub", "password": "pw"}, "parties": []}')
    cmd = [sys.executable, "-m", "broker_config", "render", "--kind", "hub", "--port", str(free_port()),
           "--identities-json", str(ids), "--environment", "production"]
    out = subprocess.run([*cmd, "--data-dir", str(tmp_path / "plain")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "refuses a plain MQTT listener" in out.stderr, out.stderr
    assert not (tmp_path / "plain" / "mosquitto.conf").exists(), "nothing rendered"
    broker = pki.servers["broker"]
    out = subprocess.run([*cmd, "--data-dir", str(tmp_path / "tls"), "--tls-cafile", str(pki.ca_file),
                          "--tls-certfile", str(broker.certfile), "--tls-keyfile", str(broker.keyfile)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "certfile" in (tmp_path / "tls" / "mosquitto.conf").read_text()


def test_broker_launcher_refuses_a_production_spec_without_tls(tmp_path: Path) -> None:
    spec = BrokerSpec(kind="retailer", port=free_port(), data_dir=tmp_path / "b", privileged=Identity("bridge", "pw"),
                      environment="production")
    with pytest.raises(BrokerConfigError, match="plain MQTT listener"):
        render(spec)


# -- a production bridge: TLS brokers, the personal area over HTTPS ---------------------------------------------


def tls_broker(factory: MosquittoFactory, pki: Pki, kind: str, parties: list[str], privileged: str) -> BrokerHandle:
    pair = pki.servers["broker"]
    return factory(kind, parties, privileged, tls=BrokerTls(pki.ca_file, pair.certfile, pair.keyfile),  # type: ignore[arg-type]
                   environment="production")


@contextlib.asynccontextmanager
async def running_bridge(settings: BridgeSettings) -> AsyncIterator[Bridge]:
    bridge = Bridge(settings)
    task = asyncio.create_task(bridge.run(), name="test-production-bridge")
    try:
        deadline = time.monotonic() + 10
        while bridge.personal_area is None or bridge.personal_area.address is None:
            if task.done():
                task.result()
            assert time.monotonic() < deadline, "the personal area did not start"
            await asyncio.sleep(0.02)
        yield bridge
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_production_bridge_serves_its_personal_area_over_https_only(
        tmp_path: Path, mosquitto_factory: MosquittoFactory, pki: Pki, foreign: Pki) -> None:
    hub_broker = tls_broker(mosquitto_factory, pki, "hub", ["r1"], "hub")
    local = tls_broker(mosquitto_factory, pki, "retailer", ["gw-1"], "bridge")
    web = pki.servers["web"]
    settings = BridgeSettings(
        environment="production", retailer_id="r1", hub_mqtt_host=hub_broker.host, hub_mqtt_port=hub_broker.port,
        hub_mqtt_password=hub_broker.identities["r1"].password, hub_mqtt_tls_ca_file=str(pki.ca_file),
        local_mqtt_host=local.host, local_mqtt_port=local.port,
        local_mqtt_password=local.identities["bridge"].password, local_mqtt_tls_ca_file=str(pki.ca_file),
        db_path=tmp_path / "bridge.db", customers={"c1": "gw-1"}, telemetry_store="none", personal_area_port=0,
        personal_area_tls_certfile=web.certfile, personal_area_tls_keyfile=web.keyfile)
    async with running_bridge(settings) as bridge:
        assert bridge.personal_area is not None
        url = bridge.personal_area.url
        assert url.startswith("https://")
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(pki.ca_file))) as ok:
            page = await ok.get(f"{url}/login")
        assert page.status_code == 200 and "csrf" in page.text
        cookie = page.headers["set-cookie"]
        assert cookie.startswith("__Host-mhp_login=") and "Secure" in cookie and "HttpOnly" in cookie
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(foreign.ca_file))) as impostor:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await impostor.get(f"{url}/login")
        plain_url = url.replace("https://", "http://")
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"{plain_url}/login")


# -- the DSO page: HTTPS, and behind a TLS proxy -----------------------------------------------------------------


async def test_dso_page_serves_https_with_secure_cookies(pki: Pki, foreign: Pki) -> None:
    web = pki.servers["web"]
    settings = ConsoleSettings(hub_url="https://127.0.0.1:9", token="t", port=0, environment="production",
                              password_hash=hash_password("operator password"), tls_certfile=web.certfile,
                              tls_keyfile=web.keyfile)
    async with DsoConsole(settings).serving() as page:
        assert page.url.startswith("https://")
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(pki.ca_file))) as ok:
            login = await ok.get(f"{page.url}/login")
        assert login.status_code == 200
        assert login.headers["set-cookie"].startswith("__Host-dso_login=") and "Secure" in login.headers["set-cookie"]
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(foreign.ca_file))) as impostor:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await impostor.get(f"{page.url}/login")


async def proxied_sign_in(client: httpx.AsyncClient, url: str, client_address: str, password: str) -> httpx.Response:
    """Sign in as the TLS proxy forwards it: plain HTTP from 127.0.0.1 with X-Forwarded-Proto/For. The proxy
    passes the browser's cookies along (they are Secure, so httpx would not send them over plain HTTP itself)."""
    forwarded = {"x-forwarded-proto": "https", "x-forwarded-for": client_address}
    form = await client.get(f"{url}/login", headers=forwarded)
    cookie = form.headers["set-cookie"].split(";", 1)[0]
    csrf = cookie.split("=", 1)[1]
    return await client.post(f"{url}/login", data={"csrf": csrf, "password": password},
                             headers={**forwarded, "cookie": cookie})


async def test_dso_page_behind_a_tls_proxy_tells_operators_apart(tmp_path: Path) -> None:
    """Behind the proxy every connection comes from the proxy's address: without X-Forwarded-For, one attacker's
    failed guesses lock every operator out. With ``behind_tls_proxy`` the lock-out is per real client."""
    settings = ConsoleSettings(hub_url="https://127.0.0.1:9", token="t", port=0, environment="production",
                              password_hash=hash_password("operator password"), behind_tls_proxy=True)
    async with DsoConsole(settings).serving() as page, httpx.AsyncClient(follow_redirects=False) as proxy:
        guesses = [(await proxied_sign_in(proxy, page.url, "203.0.113.7", f"guess {i}")).status_code
                   for i in range(6)]
        assert guesses[-1] == 429 and guesses[0] == 401, guesses
        operator = await proxied_sign_in(proxy, page.url, "198.51.100.9", "operator password")
        assert operator.status_code == 303, operator.text
        session = operator.headers["set-cookie"]
        assert session.startswith("__Host-dso_session=") and "Secure" in session


# -- hems-gateway provision: no password on argv, a CA for the uplink --------------------------------------------


def provision(tmp_path: Path, *extra: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hems_firmware.cli", "provision", "--output",
                           str(tmp_path / "gateway.toml"), "--id", "gw-9", "--client-id", "c9", "--broker",
                           "broker.example:8883", "--state-dir", str(tmp_path / "state"), *extra],
                          capture_output=True, text=True, timeout=60, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def test_provision_refuses_a_password_on_the_command_line(tmp_path: Path) -> None:
    out = provision(tmp_path, "--password", "visible-in-ps")
    assert out.returncode == 2 and "--password-file" in out.stderr and "--password-stdin" in out.stderr, out.stderr
    assert "visible-in-ps" not in out.stderr
    assert not (tmp_path / "gateway.toml").exists()


def test_provision_reads_the_password_from_stdin_or_a_file_and_takes_a_ca(tmp_path: Path, pki: Pki) -> None:
    out = provision(tmp_path, "--password-stdin", "--ca-file", str(pki.ca_file), "--production",
                    stdin="from-stdin\n")
    assert out.returncode == 0, out.stderr
    cfg = GatewayConfig.load(tmp_path / "gateway.toml")
    assert cfg.gateway.uplink.password == "from-stdin" and cfg.gateway.environment == "production"
    assert cfg.gateway.uplink.tls_ca_file == str(pki.ca_file.resolve())
    pw = tmp_path / "pw"
    pw.write_text("from-a-file\n")
    out = provision(tmp_path, "--password-file", str(pw), "--force")
    assert out.returncode == 0, out.stderr
    assert GatewayConfig.load(tmp_path / "gateway.toml").gateway.uplink.password == "from-a-file"


def test_provision_refuses_a_bad_ca_and_a_production_config_without_one(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    not_a_ca = tmp_path / "ca.crt"
    not_a_ca.write_text("hello")
    out = provision(tmp_path, "--password-file", str(pw), "--ca-file", str(not_a_ca))
    assert out.returncode == 2 and "not a readable CA certificate" in out.stderr, out.stderr
    out = provision(tmp_path, "--password-file", str(pw), "--production")
    assert out.returncode == 2 and "uplink.tls_ca_file must be set" in out.stderr, out.stderr
    assert not (tmp_path / "gateway.toml").exists()


# -- the InfluxDB export over HTTPS ------------------------------------------------------------------------------


VM_BINARY = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"


@pytest.fixture
def influx_tls(tmp_path: Path, pki: Pki) -> Iterator[str]:
    """VictoriaMetrics (InfluxDB's v2 write API) serving HTTPS with the platform CA's ``influx`` certificate."""
    if not Path(VM_BINARY).exists():
        pytest.skip("victoria-metrics is not installed (scripts/setup.sh installs it)")
    port = free_port()
    pair = pki.servers["influx"]
    log = (tmp_path / "vm.log").open("wb")
    proc = subprocess.Popen([VM_BINARY, f"-httpListenAddr=127.0.0.1:{port}", f"-storageDataPath={tmp_path / 'vm'}",
                             "-tls", f"-tlsCertFile={pair.certfile}", f"-tlsKeyFile={pair.keyfile}",
                             "-loggerLevel=WARN", "-search.latencyOffset=0s", "-search.disableCache"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"https://127.0.0.1:{port}"
    trusted = ssl.create_default_context(cafile=str(pki.ca_file))
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, (tmp_path / "vm.log").read_text()
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=1, context=trusted) as resp:
                    if resp.status == 200:
                        break
            assert time.monotonic() < deadline, "victoria-metrics did not come up"
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def sample_points() -> list[Point]:
    at = int(datetime.now(UTC).timestamp() * 1000)
    return [Point(at, "gw-1", "c1", "home", "active_power_kw", 1.5)]


async def influx_write(url: str, ca_file: Path | None) -> None:
    store = InfluxPointStore(url, "token", "mhp", "telemetry", timeout_s=3,
                             ca_file=None if ca_file is None else str(ca_file))
    await store.open()
    try:
        await store.write(sample_points())
    finally:
        await store.close()


async def test_influx_export_trusts_the_configured_ca_and_refuses_others(influx_tls: str, pki: Pki,
                                                                         foreign: Pki) -> None:
    with pytest.raises(TelemetryStoreError, match="CERTIFICATE_VERIFY_FAILED") as err:
        await influx_write(influx_tls, None)  # the system's CAs do not know the platform's CA
    assert not err.value.permanent, "a refused certificate is retried (the spool keeps the points)"
    with pytest.raises(TelemetryStoreError, match="CERTIFICATE_VERIFY_FAILED"):
        await influx_write(influx_tls, foreign.ca_file)
    await influx_write(influx_tls, pki.ca_file)


# -- the hub behind a TLS proxy ------------------------------------------------------------------------------------


@contextlib.contextmanager
def hub_process(tmp_path: Path, broker: BrokerHandle, **settings: str) -> Iterator[str]:
    """``cloud-hub serve`` with ``MHP_HUB_*`` settings, until it answers ``/healthz``; yields its URL."""
    port = free_port()
    env = {**os.environ, "MHP_HUB_HTTP_PORT": str(port), "MHP_HUB_MQTT_PORT": str(broker.port),
           "MHP_HUB_MQTT_PASSWORD": broker.identities["hub"].password, "MHP_HUB_DB_PATH": str(tmp_path / "hub.db"),
           "MHP_HUB_TOKENS_FILE": str(tmp_path / "tokens.json"),
           **{f"MHP_HUB_{k.upper()}": v for k, v in settings.items()}}
    log = (tmp_path / "hub.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "cloud_hub.cli", "--log-level", "WARNING", "serve"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "hub.log").read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the hub did not come up"
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def scheme_of_redirect(url: str) -> str:
    """The scheme of the Location the hub answers a trailing slash with, when a client claims to be on HTTPS."""
    answer = httpx.get(f"{url}/healthz/", headers={"x-forwarded-proto": "https", "x-forwarded-for": "203.0.113.7"},
                       follow_redirects=False, timeout=5)
    assert answer.status_code == 307, answer.text
    return answer.headers["location"].split(":", 1)[0]


def test_hub_in_production_behind_a_tls_proxy_answers_with_the_proxys_scheme(
        tmp_path: Path, mosquitto_factory: MosquittoFactory, pki: Pki) -> None:
    """Production behind a TLS proxy: plain HTTP on loopback, TLS MQTT; the proxy's X-Forwarded-Proto is believed."""
    broker = tls_broker(mosquitto_factory, pki, "hub", ["r1"], "hub")
    with hub_process(tmp_path, broker, environment="production", mqtt_tls_ca_file=str(pki.ca_file),
                     behind_tls_proxy="true", forwarded_allow_ips='["127.0.0.1"]') as url:
        assert scheme_of_redirect(url) == "https"


def test_hub_not_behind_a_proxy_ignores_forwarded_headers(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    """Without ``behind_tls_proxy`` any local process could claim another scheme and client address through
    X-Forwarded-* (uvicorn believes them from 127.0.0.1 by default): the hub ignores them."""
    broker = mosquitto_factory("hub", ["r1"], "hub")
    with hub_process(tmp_path, broker) as url:
        assert scheme_of_redirect(url) == "http"
