"""Hostile tests of MQTT client-id takeover on a broker started by the broker CLI, attacked with Mosquitto's CLI.

The broker is the production path: ``python -m broker_config run`` with its defaults (not the stack's spec, not
a test fixture's). The attacker is Debian's ``mosquitto_sub`` logging in with a gateway's real credentials and the
bridge's client id, on a persistent session (``-c -x``): before the fix, Mosquitto handed it the bridge's session,
disconnected the bridge, and the bridge's queued messages were gone when it came back.
"""

from __future__ import annotations

import json
import os
import queue
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker_config import generate_password
from broker_config.launcher import die_with_parent
from mhp_wire import topics
from mhp_wire.ports import free_port
from tests.broker_config.paho_client import TestClient

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 15.0
CLI_TIMEOUT_S = 10.0
OWASP_PBKDF2_SHA512 = 210_000
"""OWASP's iteration count for PBKDF2-HMAC-SHA512 password hashes."""

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_sub") is None or shutil.which("mosquitto_pub") is None,
                                reason="mosquitto-clients is not installed (scripts/setup.sh installs it)")


@dataclass
class CliBroker:
    """A retailer broker run by ``python -m broker_config run`` on 127.0.0.1."""

    port: int
    passwords: dict[str, str]
    data_dir: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        """The broker's log so far."""
        path = self.data_dir / "mosquitto.log"
        return path.read_text("utf-8", errors="replace") if path.exists() else ""

    def client(self, username: str, **kw: object) -> TestClient:
        """A paho MQTT 5 client logged in as ``username`` (not yet connected)."""
        return TestClient("127.0.0.1", self.port, username, self.passwords[username], **kw)  # type: ignore[arg-type]

    def cli(self, tool: str, username: str, *args: str) -> list[str]:
        """The argument list of ``mosquitto_sub``/``mosquitto_pub`` logged in as ``username`` (MQTT 5)."""
        return [tool, "-h", "127.0.0.1", "-p", str(self.port), "-V", "mqttv5", "-u", username,
                "-P", self.passwords[username], *args]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def cli_broker(tmp_path: Path) -> Iterator[CliBroker]:
    """A retailer broker (``bridge`` privileged; gateways ``gw-1``, ``gw-2``) started by the broker CLI's ``run``."""
    passwords = {name: generate_password() for name in ("bridge", "gw-1", "gw-2")}
    ids = tmp_path / "identities.json"
    ids.write_text(json.dumps({
        "privileged": {"username": "bridge", "password": passwords["bridge"]},
        "parties": [{"username": g, "password": passwords[g]} for g in ("gw-1", "gw-2")],
    }))
    os.chmod(ids, 0o600)
    port, data_dir = free_port(), tmp_path / "retailer-broker"
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker_config", "run", "--kind", "retailer", "--port", str(port),
         "--data-dir", str(data_dir), "--identities-json", str(ids)],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent(),
    )
    broker = CliBroker(port, passwords, data_dir, proc)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (" running" in broker.log() and _accepts(port)):
            assert proc.poll() is None, f"the broker CLI exited with {proc.returncode}:\n{broker.log()}"
            assert time.monotonic() < deadline, f"the broker did not start:\n{broker.log()}"
            time.sleep(0.02)
        yield broker
    finally:
        proc.terminate()
        proc.wait(10)


class Attacker:
    """``mosquitto_sub -d`` run with a gateway's credentials and someone else's client id, on a persistent session.

    ``-d`` makes it print the MQTT packets it exchanges; the attack is in place once it printed its CONNACK.
    """

    def __init__(self, broker: CliBroker, username: str, client_id: str, topic: str) -> None:
        # stdbuf -oL: line-buffered output through the pipe; -W: it ends itself even if the test dies.
        args = ["stdbuf", "-oL", *broker.cli("mosquitto_sub", username, "-d", "-i", client_id, "-c", "-x", "3600",
                                             "-q", "1", "-v", "-C", "1", "-W", "60", "-t", topic)]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
        self.lines: list[str] = []
        self._partial = b""
        self.wait_for("received CONNACK")  # any takeover happens at the CONNECT

    def _read(self, timeout: float) -> bool:
        """Read what it printed within ``timeout`` into ``lines``; False at the end of its output."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        chunk = os.read(fd, 65536) if ready else b""
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        self.lines += [line.decode("utf-8", errors="replace") for line in complete]
        return bool(chunk)

    def wait_for(self, text: str) -> None:
        """Read its output until a line contains ``text`` (a failure naming what it printed if it never does)."""
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while not any(text in line for line in self.lines):
            if not self._read(deadline - time.monotonic()):
                self.stop()
                raise AssertionError(
                    f"mosquitto_sub never printed {text!r} (exit {self.proc.returncode}): {self.lines}")

    def finish(self) -> tuple[int, list[str]]:
        """Wait for it to exit (``-C 1``: after one message) and return its exit code and every line it printed."""
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while self._read(deadline - time.monotonic()):
            pass
        self.proc.wait(CLI_TIMEOUT_S)
        return self.proc.returncode, self.lines

    def received(self) -> list[str]:
        """The messages it printed (``topic payload``), without its debug lines."""
        return [line for line in self.lines if line and not line.startswith(("Client ", "Subscribed (mid"))]

    def stop(self) -> None:
        """End it if it still runs."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(CLI_TIMEOUT_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _publish(broker: CliBroker, username: str, topic: str, payload: str) -> None:
    result = subprocess.run(broker.cli("mosquitto_pub", username, "-q", "1", "-t", topic, "-m", payload),
                            capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert result.returncode == 0, f"mosquitto_pub as {username} failed: {result.stderr}"


def _next(client: TestClient) -> bytes:
    """The next message the victim receives (a clear failure when it lost it or was disconnected)."""
    try:
        return client.next_message().payload
    except queue.Empty:
        raise AssertionError(f"{client.client_id} received nothing (disconnected: {client.disconnected.is_set()};"
                             " its queued messages are gone or it was kicked)") from None


def _bridge(broker: CliBroker) -> TestClient:
    """The victim: the bridge on its persistent session (client id ``bridge``), listening to every gateway."""
    bridge = broker.client("bridge", client_id="bridge", clean_start=False, session_expiry=3600)
    assert not bridge.connect().is_failure
    assert not bridge.subscribe(topics.all_up("gateways")).is_failure
    return bridge


def test_a_gateway_reusing_the_bridges_client_id_cannot_take_its_queued_messages(cli_broker: CliBroker) -> None:
    bridge = _bridge(cli_broker)
    try:
        bridge.disconnect()  # offline: what gw-2 reports now is queued in the bridge's session
        queued = [f"queued-{n}" for n in range(3)]
        for payload in queued:
            _publish(cli_broker, "gw-2", topics.up("gateways", "gw-2"), payload)

        attacker = Attacker(cli_broker, "gw-1", "bridge", topics.down("gateways", "gw-1"))
        try:
            assert not bridge.connect().is_failure  # the bridge comes back...
            got = [_next(bridge).decode() for _ in queued]
            assert got == queued, "the bridge lost what was queued for it"  # ...and gets everything
            assert bridge.session_present is True

            # The attacker was never in the bridge's session: it is still connected to its own, and gets its own.
            attacker.wait_for("received SUBACK")
            _publish(cli_broker, "bridge", topics.down("gateways", "gw-1"), "for gw-1")
            code, lines = attacker.finish()
        finally:
            attacker.stop()
        assert (code, attacker.received()) == (0, [f"{topics.down('gateways', 'gw-1')} for gw-1"]), lines
        assert not any("queued-" in line for line in lines)
    finally:
        bridge.close()


def test_a_gateway_reusing_the_bridges_client_id_does_not_kick_the_bridge(cli_broker: CliBroker) -> None:
    bridge = _bridge(cli_broker)
    try:
        attacker = Attacker(cli_broker, "gw-1", "bridge", topics.down("gateways", "gw-1"))
        try:
            _publish(cli_broker, "gw-2", topics.up("gateways", "gw-2"), "after the attack")
            assert _next(bridge) == b"after the attack"
            assert not bridge.disconnected.is_set(), "the bridge was disconnected"
            assert "already connected, closing old connection" not in cli_broker.log()
        finally:
            attacker.stop()
        # The attacker's own CLI output: a normal login of its own (no session of the bridge's handed over).
        connack = [line for line in attacker.lines if "received CONNACK" in line]
        assert connack and all("(0)" in line for line in connack), attacker.lines
    finally:
        bridge.close()


def test_the_cli_brokers_password_hashes_use_a_modern_iteration_count_that_mosquitto_accepts(
    cli_broker: CliBroker,
) -> None:
    """Low item of the round: PBKDF2-SHA512 with OWASP's 210,000 iterations (not mosquitto_passwd's 101), and a real
    login against those hashes: the right password is accepted, a wrong one refused."""
    lines = (cli_broker.data_dir / "passwords").read_text().splitlines()
    assert sorted(line.split(":")[0] for line in lines) == ["bridge", "gw-1", "gw-2"]
    assert all(line.split(":", 1)[1].startswith(f"$7${OWASP_PBKDF2_SHA512}$") for line in lines), lines

    _publish(cli_broker, "gw-1", topics.up("gateways", "gw-1"), "logged in")
    wrong = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(cli_broker.port), "-V", "mqttv5", "-u", "gw-1",
         "-P", cli_broker.passwords["gw-2"], "-q", "1", "-t", topics.up("gateways", "gw-1"), "-m", "x"],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert wrong.returncode == 0x87 and "not authorized" in wrong.stderr.lower(), (wrong.returncode, wrong.stderr)
