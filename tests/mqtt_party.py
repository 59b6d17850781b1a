"""A test party on a real broker (a retailer on the hub broker, a gateway or bridge on a retailer broker).

It wraps the threaded paho test client so that async tests can wait for decoded wire messages without blocking
the event loop in which the component under test runs.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mhp_wire.messages import Message, decode, encode
from tests.broker_config.paho_client import Received, TestClient
from tests.broker_fixtures import BrokerHandle


class Party:
    """One MQTT identity driven by a test."""

    def __init__(self, broker: BrokerHandle, username: str, *subscriptions: str) -> None:
        ident = broker.identities[username]
        self.client = TestClient(broker.host, broker.port, username, ident.password)
        rc = self.client.connect()
        assert not rc.is_failure, f"{username} refused: {rc}"
        for topic in subscriptions:
            granted = self.client.subscribe(topic)
            assert not granted.is_failure, f"{username} may not subscribe to {topic}: {granted}"

    async def publish(self, topic: str, payload: Any, *, retain: bool = False) -> None:
        """Publish a message model (encoded) or raw bytes, QoS 1, waiting for the broker's PUBACK."""
        data = payload if isinstance(payload, bytes) else encode(payload)
        await asyncio.to_thread(self.client.publish, topic, data, 1, retain)

    def publish_nowait(self, topic: str, payload: Any) -> None:
        """Publish a message model (encoded) or raw bytes, QoS 1, without waiting for the PUBACK: messages published
        one after the other reach the broker back to back, as from a party that does not wait for each."""
        data = payload if isinstance(payload, bytes) else encode(payload)
        info = self.client._client.publish(topic, data, qos=1)
        assert info.rc == 0, f"publish on {topic} failed: {info.rc}"

    async def raw(self, timeout: float = 5.0) -> Received:
        """The next message as received."""
        return await asyncio.to_thread(self.client.next_message, timeout)

    async def next(self, msg_type: str | None = None, timeout: float = 5.0) -> Message:
        """The next decoded message (of ``msg_type`` when given; others are skipped)."""
        msg, _ = await self.next_with_qos(msg_type, timeout)
        return msg

    async def next_with_qos(self, msg_type: str | None = None, timeout: float = 5.0) -> tuple[Message, int]:
        """:meth:`next`, with the QoS the broker delivered the message at (the PUBLISH packet's)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {msg_type or 'message'} within {timeout} s")
            try:
                got = await self.raw(left)
            except queue.Empty:
                continue
            msg = decode(got.payload)
            if msg_type is None or msg.type == msg_type:
                return msg, got.qos

    async def nothing(self, msg_type: str, within: float) -> None:
        """Assert that no message of ``msg_type`` arrives within ``within`` seconds."""
        try:
            msg = await self.next(msg_type, within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected {msg_type}: {msg}")

    def close(self) -> None:
        """Disconnect and stop the client's thread."""
        self.client.close()


async def ignore_messages(topic: str, payload: bytes, retained: bool) -> None:
    """An ``MqttLink`` handler for a link whose incoming messages the test does not read."""


@contextmanager
def parties(*made: Party) -> Iterator[tuple[Party, ...]]:
    """Close every party at the end of the block."""
    try:
        yield made
    finally:
        for p in made:
            p.close()
