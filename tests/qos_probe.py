"""Read wire messages with the QoS the broker delivered them at (a raw paho party sees the PUBLISH packet's QoS)."""

from __future__ import annotations

import queue
import time

from mhp_wire.messages import Message, decode
from tests.mqtt_party import Party


async def next_with_qos(party: Party, msg_type: str, timeout: float = 5.0) -> tuple[Message, int]:
    """The next message of ``msg_type`` that ``party`` receives, with the QoS of the PUBLISH that carried it."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {msg_type} within {timeout} s")
        try:
            got = await party.raw(left)
        except queue.Empty:
            continue
        msg = decode(got.payload)
        if msg.type == msg_type:
            return msg, got.qos
