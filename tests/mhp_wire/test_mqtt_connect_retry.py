"""A connection attempt the link gives up on is closed before the next one, against a real Mosquitto that cannot
answer (stopped with SIGSTOP: the kernel still completes the TCP handshakes, nobody reads the CONNECTs).

Before: an attempt whose CONNACK did not come in time stayed open, so every retry against a busy broker left one
more socket on both sides, and each CONNECT left behind was served later as a session of its own, replaced by the
next one (Mosquitto: "already connected, closing old connection"; seen by the hundred per broker when 100,000
simulated gateways connected at once).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest

from mhp_wire import topics
from mhp_wire.backoff import jittered
from mhp_wire.mqtt import MqttEndpoint, MqttLink
from tests.broker_fixtures import MosquittoFactory
from tests.mqtt_party import ignore_messages

ESTABLISHED = "01"
"""The TCP state ``ESTABLISHED`` in ``/proc/net/tcp``."""


def open_sockets_to(port: int) -> int:
    """How many TCP connections this process holds open to ``port`` on this machine (its file descriptors against
    ``/proc/net/tcp``)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[2].rsplit(":", 1)[1], 16) == port and f[3] == ESTABLISHED and f[9] in inodes:
                count += 1
    return count


async def test_an_attempt_given_up_is_closed_before_the_next_so_retries_leave_no_sockets_behind(
        mosquitto_factory: MosquittoFactory, caplog: pytest.LogCaptureFixture) -> None:
    broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
    pid = broker.process.pid
    assert pid is not None
    endpoint = MqttEndpoint(broker.host, broker.port, "gw-1", broker.identities["gw-1"].password)
    link = MqttLink(endpoint, client_id="gw-1", subscriptions=[topics.down("gateways", "gw-1")],
                    handler=ignore_messages, status_topic=topics.status("gateways", "gw-1"), clean_start=True,
                    session_expiry_s=0, connect_timeout_s=60, connect_attempt_s=0.3)
    caplog.set_level(logging.WARNING, logger="mhp_wire.mqtt")
    os.kill(pid, signal.SIGSTOP)
    try:
        enter = asyncio.create_task(link.__aenter__())
        for _ in range(600):  # until three attempts have timed out (each 0.3 s, then a back-off of 0.05-0.4 s)
            if sum("retrying in" in r.getMessage() for r in caplog.records) >= 3:
                break
            await asyncio.sleep(0.02)
        assert sum("retrying in" in r.getMessage() for r in caplog.records) >= 3
        # Three attempts given up: at most the one in progress is open.
        assert open_sockets_to(broker.port) <= 1
    finally:
        os.kill(pid, signal.SIGCONT)
    await asyncio.wait_for(enter, 30)
    try:
        assert link.connected and link.stats.connects == 1
        assert open_sockets_to(broker.port) == 1
    finally:
        await link.__aexit__(None, None, None)


@pytest.mark.parametrize(("delay", "u", "expected"), [
    (1.0, 0.0, 0.5),     # at least half the back-off
    (1.0, 0.5, 0.75),
    (1.0, 0.999, 0.9995),
    (4.0, 0.25, 2.5),
    (2.0, -1.0, 1.0),    # a draw out of [0, 1) is clamped, never a negative or a longer delay
    (2.0, 7.0, 2.0),
    (0.0, 0.5, 0.0),
])
def test_jittered_spreads_a_delay_over_its_upper_half(delay: float, u: float, expected: float) -> None:
    assert jittered(delay, u) == pytest.approx(expected)
