"""A burst of commands whose acknowledgements keep arriving, slower than the re-send timer, is not sent again
(issue 14, twelfth round: 193 commands delivered twice in a 10,000-gateway fan-out).

Every command of a sending round carries the round's send time. While its answers come in, the measured round trip
(:class:`mhp_wire.backoff.RoundTrip`) follows the age of the burst: each batch of answers teaches "about as old as
the burst", with almost no variance, so the timeout is hardly more than the burst's age, and the commands still queued
behind the answered ones (at the broker, in the fleet's socket) became due with the next pause in the answers.
Now a first re-send waits one whole timeout of silence from the latest answer to a command sent no later than it
(RFC 6298, 5.3: the timer restarts at each acknowledgement of new data). A gateway that never answers is still sent
its command again once the others' answers stop.

Real SQLite store, the relay's own dispatch rounds and its batches of reports, a link that records each publish,
and the clock driven by the test (no sleeping)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mhp_wire import topics
from mhp_wire.messages import Ack
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.store import BridgeStore, NewCommand
from tests.retailer_bridge.test_bridge_read_horizon_stall import DroppingLink

N = 120
BATCH = 20
STEP_S = 0.3
"""Acknowledgements of ``BATCH`` commands every ``STEP_S``: the burst drains in 1.8 s, the timer (floor 0.5 s) would
fire after 0.5 s without them."""


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def _burst(tmp_path: Path, silent: set[int]) -> tuple[Counter[str], list[float], BridgeStore]:
    """Send ``N`` commands in one round, acknowledge all but ``silent`` in batches every ``STEP_S``, dispatching
    between batches and for 3 s after; returns the sends per gateway topic and the timer after each batch."""
    store = BridgeStore(tmp_path / "b.db")
    await store.open()
    clock = Clock(1_000_000.0)
    relay = BridgeRelay("r1", {f"c{i}": f"gw-{i}" for i in range(N)}, store, gateway_ack_timeout_s=60,
                        gateway_retry_s=0.5)
    relay.commands_out.clock = clock
    link = DroppingLink()  # records every publish; the test hands the acks to the relay
    relay.local = link  # type: ignore[assignment]
    relay.local_connected()
    await store.accept_request([NewCommand("q", f"c{i}", f"gw-{i}", f"cmd{i}", b"command", clock.t, clock.t + 3600)
                                for i in range(N)], [])
    await relay.dispatch_gateways()
    assert len(link.sent) == N
    answering = [i for i in range(N) if i not in silent]
    timeouts = []
    for start in range(0, len(answering), BATCH):
        clock.t += STEP_S
        await relay.dispatch_gateways()  # a round before this batch's answers are read
        for i in answering[start:start + BATCH]:
            await relay._on_gateway_ack(f"gw-{i}", Ack(ack_ids=[f"cmd{i}"]))
        timeouts.append(relay.gateway_rtt.timeout_s())
    for _ in range(30):
        clock.t += 0.1
        await relay.dispatch_gateways()
    return Counter(link.sent), timeouts, store


async def test_a_burst_whose_acks_keep_coming_slower_than_the_timer_is_sent_once(tmp_path: Path) -> None:
    sends, timeouts, store = await _burst(tmp_path, silent=set())
    try:
        # After the first batch the timer said 0.5 s, and stayed below the age of the burst: alone it would fire.
        assert timeouts[0] == 0.5 and all(t < (k + 2) * STEP_S for k, t in enumerate(timeouts)), timeouts
        again = sorted(t for t, n in sends.items() if n > 1)
        assert again == [], f"{len(again)} commands sent twice, e.g. {again[:3]}"
        states = await store.sql.read(lambda db: Counter(r[0] for r in db.execute("SELECT state FROM commands")))
        assert states == {"delivered": N}
    finally:
        await store.close()


async def test_a_gateway_that_never_answers_is_still_sent_its_command_again(tmp_path: Path) -> None:
    sends, _, store = await _burst(tmp_path, silent={7, N - 1})
    try:
        assert sends[topics.down("gateways", "gw-7")] >= 2
        assert sends[topics.down("gateways", f"gw-{N - 1}")] >= 2
        assert [t for t, n in sends.items() if n > 1] == [topics.down("gateways", "gw-7"),
                                                          topics.down("gateways", f"gw-{N - 1}")]
    finally:
        await store.close()
