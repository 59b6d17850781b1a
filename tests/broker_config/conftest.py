"""Fixtures of the broker configuration tests: the shared broker fixtures, MQTT test clients, a leak check."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import pytest

from broker_config import live_processes
from tests.broker_fixtures import *  # noqa: F403
from tests.broker_fixtures import BrokerHandle

from .paho_client import TestClient


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a Mosquitto process or a thread running after its teardown."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while True:
        threads = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        brokers = live_processes()
        if not (threads or brokers) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not brokers, f"leaked brokers: {brokers}"
    assert not threads, f"leaked threads: {threads}"


class ConnectAs(Protocol):
    """Signature of the ``connect_as`` fixture."""

    def __call__(
        self, broker: BrokerHandle, username: str, *, password: str | None = None, connect: bool = True, **kw: Any
    ) -> TestClient: ...


@pytest.fixture
def connect_as() -> Iterator[ConnectAs]:
    """Make MQTT 5 test clients logged in as one of a broker's identities; all are closed at teardown.

    ``password`` overrides the identity's password (wrong-password tests); ``connect=False`` leaves the client
    unconnected; other keywords go to ``TestClient`` (``client_id``, ``clean_start``, ``session_expiry``).
    """
    clients: list[TestClient] = []

    def make(
        broker: BrokerHandle, username: str, *, password: str | None = None, connect: bool = True, **kw: Any
    ) -> TestClient:
        if password is None:
            password = broker.identities[username].password
        client = TestClient(broker.host, broker.port, username, password, **kw)
        clients.append(client)
        if connect:
            rc = client.connect()
            assert not rc.is_failure, f"{username} refused: {rc}"
        return client

    yield make
    for client in clients:
        client.close()
