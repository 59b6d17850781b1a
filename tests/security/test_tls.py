"""Hostile tests of the production TLS configuration: brokers and the hub's HTTPS refuse what they must.

Everything is real: certificates from ``broker_config.tls``, Mosquitto rendered from ``broker_config`` with a TLS
listener, the hub under uvicorn with HTTPS, gmqtt through ``MqttLink``, paho, httpx, and the whole stack.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import stat
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
import uvicorn
from paho.mqtt.enums import CallbackAPIVersion

from broker_config.__main__ import main as broker_config_main
from broker_config.render import BrokerSpec, BrokerTls, Identity, conf_text
from broker_config.tls import Pki, TlsError, create_pki, issue_server
from cloud_hub.app import create_app
from cloud_hub.settings import HubSettings
from cloud_hub.tokens import TokenBook
from mhp_wire.mqtt import MqttEndpoint, MqttError, MqttLink
from sim.stack.stack import Stack
from tests.broker_fixtures import BrokerHandle, MosquittoFactory, free_port
from tests.mqtt_party import ignore_messages

HOSTS = ["127.0.0.1", "localhost"]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """The platform's CA with a broker, a hub (HTTPS) and a client certificate for ``r1``."""
    return create_pki(tmp_path / "tls", HOSTS, servers=["broker", "hub"], clients=["r1"])


@pytest.fixture
def foreign(tmp_path: Path) -> Pki:
    """Another CA, with certificates for the same names and hosts: an impostor's."""
    return create_pki(tmp_path / "foreign", HOSTS, servers=["broker", "hub"], clients=["r1"])


def tls_broker(factory: MosquittoFactory, pki: Pki, server: str = "broker", *,
               require_certificate: bool = False) -> BrokerHandle:
    pair = pki.servers[server]
    return factory("hub", ["r1", "r2"], "hub",
                   tls=BrokerTls(pki.ca_file, pair.certfile, pair.keyfile, require_certificate))


def paho_outcome(broker: BrokerHandle, *, ca: Path | None, cert: Path | None = None, key: Path | None = None,
                 timeout: float = 3.0) -> str:
    """Log in as ``r1`` with paho on this thread: ``connected``, or why not (handshake error, connection closed)."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"tls-test-{time.monotonic_ns()}",
                         protocol=mqtt.MQTTv5)
    client.username_pw_set("r1", broker.identities["r1"].password)
    if ca is not None:
        client.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None, keyfile=str(key) if key else None)
    result: dict[str, Any] = {}
    client.on_connect = lambda c, u, flags, rc, props: result.setdefault("rc", rc)
    try:
        client.connect(broker.host, broker.port, keepalive=10)
        deadline = time.monotonic() + timeout
        while "rc" not in result and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                return "connection closed by the broker"
    except (OSError, ssl.SSLError) as exc:
        return f"handshake failed: {exc}"
    finally:
        client.disconnect()
        client.loop(timeout=0.01)
        sock = client.socket()
        if sock is not None:  # a failed handshake leaves paho's socket open
            sock.close()
    rc = result.get("rc")
    if rc is None:
        return "no CONNACK"
    return "connected" if not rc.is_failure else f"refused: {rc}"


async def link_outcome(broker: BrokerHandle, ca: Path | None, timeout: float = 6.0) -> str:
    """Connect ``MqttLink`` (gmqtt, the platform's adapter) as ``r1``: ``connected`` or the error."""
    endpoint = MqttEndpoint(broker.host, broker.port, "r1", broker.identities["r1"].password,
                            str(ca) if ca else None)
    link = MqttLink(endpoint, client_id=f"tls-link-{time.monotonic_ns()}", subscriptions=[],
                    handler=ignore_messages, clean_start=True, session_expiry_s=0, connect_timeout_s=2.0)
    try:
        async with asyncio.timeout(timeout):
            async with link:
                return "connected"
    except (MqttError, TimeoutError) as exc:
        return f"failed: {exc!r}"


# --- certificates and rendering -----------------------------------------------------------------------------


def test_pki_keys_are_private_and_chains_verify(pki: Pki, foreign: Pki) -> None:
    for pair in [pki.ca, *pki.servers.values(), *pki.clients.values()]:
        assert stat.S_IMODE(pair.keyfile.stat().st_mode) == 0o600, pair.keyfile
    ours = ssl.create_default_context(cafile=str(pki.ca_file))
    ours.load_verify_locations(cafile=str(pki.ca_file))
    from cryptography import x509

    server = x509.load_pem_x509_certificate(pki.servers["broker"].certfile.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert pki.ca_file.read_bytes() != foreign.ca_file.read_bytes()


def test_keys_never_go_into_the_repository() -> None:
    repo = Path(__file__).resolve().parents[2]
    with pytest.raises(TlsError, match="git work tree"):
        create_pki(repo / "tests" / "security" / "no-keys-here", HOSTS)
    assert not (repo / "tests" / "security" / "no-keys-here").exists()


def test_tls_command_writes_a_ca_and_certificates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    code = broker_config_main(["tls", "--out", str(out), "--hosts", "127.0.0.1,localhost", "--servers",
                               "broker-hub,hub", "--names", "hub,bridge-r1"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ca_file"] == str(out / "ca.crt")
    assert set(printed["servers"]) == {"broker-hub", "hub"} and set(printed["clients"]) == {"hub", "bridge-r1"}
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    assert broker_config_main(["tls", "--out", str(out), "--hosts", "not a host"]) == 2


def test_rendered_tls_listener(tmp_path: Path, pki: Pki) -> None:
    pair = pki.servers["broker"]
    spec = BrokerSpec(kind="hub", port=18883, data_dir=tmp_path / "b", privileged=Identity("hub", "pw"),
                      tls=BrokerTls(pki.ca_file, pair.certfile, pair.keyfile, require_certificate=True))
    text = conf_text(spec)
    lines = text.splitlines()
    at = lines.index("listener 18883 127.0.0.1")
    assert f"cafile {pki.ca_file}" in lines[at:] and f"certfile {pair.certfile}" in lines[at:]
    assert f"keyfile {pair.keyfile}" in lines and "tls_version tlsv1.2" in lines
    assert "require_certificate true" in lines
    assert sum(1 for line in lines if line.startswith("listener ")) == 1, "no plain listener beside the TLS one"
    spec.tls = None
    plain = conf_text(spec).splitlines()
    assert not any(line.startswith(("cafile", "certfile", "keyfile", "tls_version")) for line in plain)


# --- brokers ------------------------------------------------------------------------------------------------


async def test_tls_broker_accepts_our_ca_and_refuses_another(mosquitto_factory: MosquittoFactory, pki: Pki,
                                                             foreign: Pki) -> None:
    broker = tls_broker(mosquitto_factory, pki)
    assert await link_outcome(broker, pki.ca_file) == "connected"
    refused = await link_outcome(broker, foreign.ca_file)
    assert refused.startswith("failed") and "CERTIFICATE_VERIFY_FAILED" in refused, refused
    assert paho_outcome(broker, ca=pki.ca_file) == "connected"
    assert paho_outcome(broker, ca=foreign.ca_file).startswith("handshake failed")


async def test_tls_broker_with_a_certificate_for_another_host_is_refused(
        mosquitto_factory: MosquittoFactory, pki: Pki) -> None:
    """Same CA, but the broker's certificate names another host: the client checks the host name."""
    issue_server(pki.ca, pki.ca_file.parent, "elsewhere", ["mqtt.example.org"])
    pki.servers["elsewhere"] = type(pki.ca)(pki.ca_file.parent / "elsewhere.crt", pki.ca_file.parent / "elsewhere.key")
    broker = tls_broker(mosquitto_factory, pki, "elsewhere")
    refused = await link_outcome(broker, pki.ca_file)
    assert "CERTIFICATE_VERIFY_FAILED" in refused and "127.0.0.1" in refused, refused


async def test_a_plain_client_cannot_talk_to_a_tls_listener(mosquitto_factory: MosquittoFactory, pki: Pki) -> None:
    broker = tls_broker(mosquitto_factory, pki)
    assert paho_outcome(broker, ca=None) == "connection closed by the broker"
    # gmqtt sends CONNECT in clear, the broker drops the connection and gmqtt waits for a CONNACK that never comes.
    assert (await link_outcome(broker, None, timeout=2.0)).startswith("failed")


def test_mutual_tls_needs_a_client_certificate_of_our_ca(mosquitto_factory: MosquittoFactory, pki: Pki,
                                                         foreign: Pki) -> None:
    broker = tls_broker(mosquitto_factory, pki, require_certificate=True)
    ours, theirs = pki.clients["r1"], foreign.clients["r1"]
    assert paho_outcome(broker, ca=pki.ca_file, cert=ours.certfile, key=ours.keyfile) == "connected"
    assert paho_outcome(broker, ca=pki.ca_file) != "connected"
    assert paho_outcome(broker, ca=pki.ca_file, cert=theirs.certfile, key=theirs.keyfile) != "connected"


# --- the hub's HTTPS ----------------------------------------------------------------------------------------


@pytest.fixture
async def https_hub(tmp_path: Path, mosquitto_factory: MosquittoFactory, pki: Pki) -> AsyncIterator[str]:
    """The hub on HTTPS, its MQTT link to a TLS hub broker verified with the CA; yields its URL."""
    broker = tls_broker(mosquitto_factory, pki)
    book = TokenBook(tmp_path / "tokens.json")
    book.issue("dso")
    port = free_port()
    https = pki.servers["hub"]
    settings = HubSettings(http_port=port, db_path=tmp_path / "hub.db", tokens_file=book.path,
                           mqtt_host=broker.host, mqtt_port=broker.port, mqtt_username="hub",
                           mqtt_password=broker.identities["hub"].password, mqtt_tls_ca_file=str(pki.ca_file),
                           tls_certfile=https.certfile, tls_keyfile=https.keyfile)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           ssl_certfile=settings.tls_certfile, ssl_keyfile=settings.tls_keyfile))
    task = asyncio.create_task(server.serve(), name="test-https-hub")
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_hub_https_is_verified_with_our_ca_and_refused_with_another(https_hub: str, pki: Pki,
                                                                         foreign: Pki) -> None:
    ours = ssl.create_default_context(cafile=str(pki.ca_file))
    async with httpx.AsyncClient(base_url=https_hub, verify=ours, timeout=5) as http:
        ready = None
        for _ in range(100):
            ready = await http.get("/readyz")
            if ready.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert ready is not None and ready.status_code == 200, "ready: its MQTT link to the TLS broker is up"
    theirs = ssl.create_default_context(cafile=str(foreign.ca_file))
    async with httpx.AsyncClient(base_url=https_hub, verify=theirs, timeout=5) as http:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await http.get("/readyz")
    async with httpx.AsyncClient(base_url=https_hub.replace("https", "http"), timeout=5) as http:
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the HTTPS port gets no answer it can read
            r = await http.get("/readyz")
            r.raise_for_status()


def test_hub_settings_need_both_tls_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_certfile and tls_keyfile"):
        HubSettings(tls_certfile=tmp_path / "hub.crt")


# --- the whole stack ----------------------------------------------------------------------------------------


async def test_the_whole_stack_runs_an_emergency_over_tls(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "stack", retailers=1, homes=2, log_level="WARNING", tls=True)
    try:
        await stack.start(timeout_s=30)
        info = json.loads((stack.dir / "stack.json").read_text())
        assert stack.hub_url.startswith("https://") and info["hub_url"] == stack.hub_url
        ca = Path(info["tls"]["ca_file"])
        assert ca.is_file() and ca.is_relative_to(stack.dir)
        brokers = [info["brokers"]["hub"], *info["brokers"]["retailers"].values()]
        assert all(b["tls"] for b in brokers)
        for name in ["hub", *stack.retailer_ids]:
            conf = (stack.dir / "brokers" / name / "mosquitto.conf").read_text().splitlines()
            assert "tls_version tlsv1.2" in conf and any(line.startswith("certfile ") for line in conf)
        clients = [h["client_id"] for h in info["homes"]]
        req = await run_emergency_over(stack, clients)
        assert req["state"] == "completed", req
        assert {c["state"] for c in req["clients"].values()} == {"executed"}
        async with httpx.AsyncClient(base_url=stack.hub_url, timeout=5) as http:  # the system's CAs only
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get("/readyz")
    finally:
        await stack.stop()


async def run_emergency_over(stack: Stack, clients: list[str]) -> dict[str, Any]:
    """Post an emergency as the DSO through the stack's verifying HTTPS client; follow it until it ends."""
    dso = {"Authorization": f"Bearer {stack.tokens['dso']}"}
    start = datetime.now(UTC) + timedelta(seconds=1)
    async with stack.http_client() as http:
        r = await http.post("/v1/emergencies", headers=dso, json={
            "client_ids": clients, "start": start.isoformat(), "duration_s": 60, "power_limit_kw": 1.0})
        assert r.status_code == 202, r.text
        req: dict[str, Any] = {}
        for _ in range(150):
            req = (await http.get(f"/v1/requests/{r.json()['request_id']}", headers=dso)).json()
            if req["state"] not in ("accepted", "dispatching"):
                break
            await asyncio.sleep(0.1)
    return req
