"""Pytest fixtures running real Mosquitto brokers from the project's own ``broker_config``.

Load with ``pytest_plugins = ["tests.broker_fixtures"]`` in the root ``tests/conftest.py``. Every broker is
started in the test's ``tmp_path`` on a free port and stopped at teardown, whatever the test did to it.

* ``hub_broker``: a hub broker; identities ``hub`` (privileged) and retailers ``r1``, ``r2``.
* ``retailer_broker``: a retailer broker; identities ``bridge`` (privileged) and gateways ``gw-1``, ``gw-2``.
* ``mosquitto_factory(kind, parties, privileged, *, extra_privileged=(), **tuning)``: any number of brokers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from broker_config import (
    GENERATED_PASSWORD_ITERATIONS,
    BrokerKind,
    BrokerSpec,
    BrokerStartError,
    Identity,
    MosquittoProcess,
    generate_password,
)
from mhp_wire.ports import free_port

__all__ = [
    "BrokerHandle",
    "MosquittoFactory",
    "free_port",
    "hub_broker",
    "mosquitto_factory",
    "retailer_broker",
]


@dataclass
class BrokerHandle:
    """A started broker: where it listens, who may log in, and its process (to stop, kill or restart it)."""

    host: str
    port: int
    identities: dict[str, Identity]
    process: MosquittoProcess

    @property
    def spec(self) -> BrokerSpec:
        """The spec the broker was rendered from."""
        return self.process.spec

    @property
    def privileged(self) -> Identity:
        """The hub (hub broker) or the bridge (retailer broker)."""
        return self.spec.privileged

    @property
    def data_dir(self) -> Path:
        """Configuration, log and persistence files of the broker."""
        return self.spec.data_dir


class MosquittoFactory(Protocol):
    """Signature of the ``mosquitto_factory`` fixture."""

    def __call__(
        self,
        kind: BrokerKind,
        parties: Sequence[str],
        privileged: str,
        *,
        extra_privileged: Sequence[str] = (),
        **tuning: Any,
    ) -> BrokerHandle: ...


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[MosquittoFactory]:
    """Start real brokers on free ports with generated passwords; all are stopped at teardown.

    ``tuning`` goes to ``BrokerSpec`` (e.g. ``autosave_interval=3600``, ``max_queued_messages=10``).
    """
    started: list[MosquittoProcess] = []

    def start(
        kind: BrokerKind,
        parties: Sequence[str],
        privileged: str,
        *,
        extra_privileged: Sequence[str] = (),
        **tuning: Any,
    ) -> BrokerHandle:
        spec = BrokerSpec(
            kind=kind,
            port=free_port(),
            data_dir=tmp_path / f"{kind}-broker-{len(started)}",
            privileged=Identity(privileged, generate_password()),
            parties=[Identity(name, generate_password()) for name in parties],
            extra_privileged=[Identity(name, generate_password()) for name in extra_privileged],
            **{"password_iterations": GENERATED_PASSWORD_ITERATIONS, **tuning},  # every password is generated
        )
        process = MosquittoProcess(spec)
        started.append(process)
        for attempt in range(3):
            try:
                process.start()
                break
            except BrokerStartError as exc:  # another process took the free port in the meantime
                if "in use" not in str(exc) or attempt == 2:
                    raise
                spec.port = free_port()
        return BrokerHandle(spec.host, spec.port, spec.identities, process)

    try:
        yield start
    finally:
        for process in reversed(started):
            process.stop()


@pytest.fixture
def hub_broker(mosquitto_factory: MosquittoFactory) -> BrokerHandle:
    """A running hub broker with ``hub`` (privileged) and retailers ``r1``, ``r2``."""
    return mosquitto_factory("hub", ["r1", "r2"], "hub")


@pytest.fixture
def retailer_broker(mosquitto_factory: MosquittoFactory) -> BrokerHandle:
    """A running retailer broker with ``bridge`` (privileged) and gateways ``gw-1``, ``gw-2``."""
    return mosquitto_factory("retailer", ["gw-1", "gw-2"], "bridge")


BROKER_DEBUG_LOG = ("error", "warning", "notice", "information", "debug")
"""A broker's ``log_types`` with each packet it sends or receives logged (``Sending PUBLISH to``, ``Received PUBACK
from``), written as it happens: what the broker knows of a client's deliveries, read by :func:`deliveries`."""


def deliveries(broker_log: Path, client_id: str) -> tuple[int, set[int]]:
    """From a broker's debug log (:data:`BROKER_DEBUG_LOG`): how many QoS 1 PUBLISHes it sent ``client_id``, and the
    packet ids of those it has no PUBACK of (in flight: the broker sends them again when the client's session
    resumes)."""
    sent_re = re.compile(rf"Sending PUBLISH to {re.escape(client_id)} \(d\d, q1, r\d, m(\d+),")
    puback_re = re.compile(rf"Received PUBACK from {re.escape(client_id)} \(Mid: (\d+),")
    sent, in_flight = 0, set[int]()
    for line in broker_log.read_text().splitlines():
        if (m := sent_re.search(line)) is not None:
            sent += 1
            in_flight.add(int(m[1]))
        elif (m := puback_re.search(line)) is not None:
            in_flight.discard(int(m[1]))
    return sent, in_flight


def all_acknowledged(broker_log: Path, client_id: str, since: int) -> bool:
    """Whether the broker sent ``client_id`` a QoS 1 PUBLISH after its first ``since`` and has the client's PUBACK of
    every one it sent (:func:`deliveries`)."""
    sent, in_flight = deliveries(broker_log, client_id)
    return sent > since and not in_flight
