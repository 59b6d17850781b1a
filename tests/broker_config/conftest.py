"""Fixtures of the broker configuration tests: the shared broker fixtures, MQTT test clients, a leak check."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import pytest

from tests.broker_fixtures import *  # noqa: F403
from tests.broker_fixtures import BrokerHandle

from .paho_client import TestClient


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
