"""A silent gateway in a round whose other answers trickle in for longer than gateway_ack_timeout_s got no re-send
at all on e3ac111: postponed by quiet_since until the trickle ended, its first due judgement (_command_due) found it
silent past the ack timeout and declared it unreachable. The postponement is now bounded by half the ack timeout
(docs/decisions.md, "A first re-send waits for the link's silence")."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mhp_wire import topics
from mhp_wire.messages import Ack
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.store import BridgeStore, NewCommand
from tests.retailer_bridge.test_bridge_read_horizon_stall import DroppingLink
from tests.retailer_bridge.test_bridge_resend_queued_burst import Clock

N = 60
STEP_S = 0.4  # one other gateway's ack every 0.4 s: a 24 s trickle, each gap under the 0.5 s floor


async def test_silent_gateway_in_a_slowly_draining_round_is_re_sent_before_its_verdict(tmp_path: Path) -> None:
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    try:
        clock = Clock(1_000_000.0)
        relay = BridgeRelay("r1", {f"c{i}": f"gw-{i}" for i in range(N)}, store)  # defaults: ack timeout 10 s
        relay.commands_out.clock = clock
        link = DroppingLink()
        relay.local = link  # type: ignore[assignment]
        relay.local_connected()
        await store.accept_request([NewCommand("q", f"c{i}", f"gw-{i}", f"cmd{i}", b"command", clock.t,
                                               clock.t + 3600) for i in range(N)], [])
        await relay.dispatch_gateways()
        for i in range(1, N):  # gw-0 is silent; the others answer one at a time
            clock.t += STEP_S
            await relay.dispatch_gateways()
            await relay._on_gateway_ack(f"gw-{i}", Ack(ack_ids=[f"cmd{i}"]))
        for _ in range(100):
            clock.t += 0.1
            await relay.dispatch_gateways()
        sends = Counter(link.sent)
        row = next(c for c in await store.commands_of("q") if c["gateway_id"] == "gw-0")
        assert sends[topics.down("gateways", "gw-0")] >= 2, \
            f"never re-sent before its verdict ({row['state']}, sends {dict(sends)})"
    finally:
        await store.close()
