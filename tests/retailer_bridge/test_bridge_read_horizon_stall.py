"""A bridge whose read markers stop coming back (a broker queue that stays full drops each one; here a link that
accepts every publish and delivers nothing back) still judges its commands, at most ``ReadHorizon.max_lag_s``
behind the clock: a silent gateway's command is re-sent and then ends (``unreachable`` or ``expired``), it is not
left ``sending`` for ever. Real SQLite store, the relay's own dispatch rounds. Found in review of the read horizon:
before the lag bound the command below was still ``sending`` 1.4 s past its deadline after one marker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from mhp_wire import topics
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.store import BridgeStore, NewCommand


class DroppingLink:
    """Connected; every publish goes out, and nothing of ours ever comes back."""

    connected = True

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def publish(self, topic: str, payload: bytes, **_: object) -> None:
        self.sent.append(topic)


async def test_markers_that_never_come_back_delay_the_verdict_by_the_lag_bound_not_for_ever(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        relay = BridgeRelay("r1", {"c1": "gw-1"}, store, gateway_ack_timeout_s=0.3, gateway_retry_s=0.05)
        relay.probe_topic = topics.bridge_probe("bridge")
        relay.read_horizon.max_lag_s = 0.4
        link = DroppingLink()
        relay.local = link  # type: ignore[assignment]
        relay.local_connected()
        now = time.time()
        await store.accept_request([NewCommand("q", "c1", "gw-1", "cmd1", b"command", now, now + 0.6)], [])
        until = time.monotonic() + 2.0  # above the ack timeout, the deadline and the lag bound
        while time.monotonic() < until and (await store.commands_of("q"))[0]["state"] == "sending":
            await asyncio.wait_for(relay.dispatch_gateways(), 1)
            await asyncio.sleep(0.02)
        row = (await store.commands_of("q"))[0]
        assert row["state"] != "sending", row
        assert link.sent.count(topics.down("gateways", "gw-1")) >= 2, "re-sent before its verdict"
        assert link.sent.count(relay.probe_topic) >= 1 and relay.read_horizon.stalls == 1
    finally:
        await store.close()
