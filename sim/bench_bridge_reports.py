"""Bridge benchmark: N gateways' acknowledgements and outcomes arriving together, through the relay's own handlers
into a real SQLite store, without MQTT (the relay has no links, so its answers to gateways are not sent).

    python -m sim.bench_bridge_reports 10000 [--outcome-only] [--wire] [--rate R [--shuffled]]

``--outcome-only``: each gateway sends its outcome alone, which stands for its ack (a gateway whose outcome is ready
within its ``ack_hold_s``, and the simulated fleet, since issue 14's seventh round).

``--wire``: the reports arrive as the retailer broker's link hands them over in a fan-out: encoded payloads on each
gateway's ``up`` topic, 500 per turn, through :meth:`BridgeRelay.on_local_batch` (the topic, the rate limit, the
decoding, the queueing, the answers); without it each report goes to the relay's handler of its type, a task each.

``--rate R`` (implies ``--wire``): the reports arrive at R per second as a fan-out's do, a wave every
:data:`TICK_S` in a task of its own (the link does not wait for one wave's write before it reads the next), so the
relay's group commit forms its batches from what arrived during the write before (a pace of the report writes,
measured with it in issue 14's fourteenth round and not taken, would act here); ``--shuffled``: in a random order
instead of the gateways' (a fixed seed). Prints the report writes' batches too. On a loaded machine the waves fall
behind their ticks and each becomes a batch of its own: compare runs at the same load.

Prints the process CPU (``time.process_time``) per gateway, split into the event loop's thread (``time.thread_time``
in it) and the rest (the SQLite thread), and the store writes and commits it took. It uses only handlers that older
bridges have too, so it also runs against another checkout for a before/after on the same machine
(``PYTHONPATH=<checkout> python <this file>``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mhp_wire import topics
from mhp_wire.messages import Ack, ClientState, Command, EmergencyParams, Outcome, RequestKind, encode
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.store import BridgeStore, NewCommand

WAVE = 500
"""Gateways per wave (per turn of the loop with ``--wire``), as they arrive over MQTT."""
TICK_S = 0.01
"""With ``--rate``: one wave every this many seconds."""


async def arriving(relay: BridgeRelay, messages: list[tuple[str, bytes, bool]], rate: float) -> None:
    """``messages`` handed to the relay at ``rate`` per second, a wave every :data:`TICK_S` in a task of its own;
    returns once every wave is handled."""
    loop = asyncio.get_running_loop()
    per_tick = max(1, round(rate * TICK_S))
    t0 = loop.time()
    waves = []
    for k in range(0, len(messages), per_tick):
        waves.append(asyncio.ensure_future(relay.on_local_batch(messages[k:k + per_tick])))
        await asyncio.sleep(max(0.0, t0 + (k // per_tick + 1) * TICK_S - loop.time()))
    await asyncio.gather(*waves)


async def bench(n: int, outcome_only: bool = False, wire: bool = False, rate: float = 0.0,
                shuffled: bool = False) -> None:
    """Store N commands, then feed every gateway's acknowledgement (unless ``outcome_only``) and outcome in waves
    of :data:`WAVE` gateways."""
    with tempfile.TemporaryDirectory() as d:
        store = BridgeStore(Path(d) / "b.db")
        await store.open()
        start = datetime.now(UTC) + timedelta(minutes=1)
        p = EmergencyParams(start=start, end=start + timedelta(minutes=5), power_limit_kw=1.0)
        cmds = [Command(request_id="q", client_id=f"c{i}", kind=RequestKind.EMERGENCY, params=p, expires_at=p.end)
                for i in range(n)]
        await store.accept_request([NewCommand("q", c.client_id, f"gw-{i}", c.msg_id, encode(c), time.time(),
                                               time.time() + 600) for i, c in enumerate(cmds)], [])
        relay = BridgeRelay("r1", {f"c{i}": f"gw-{i}" for i in range(n)}, store)
        acks = [Ack(ack_ids=[c.msg_id]) for c in cmds]
        outs = [Outcome(request_id="q", client_id=c.client_id, state=ClientState.EXECUTED, trace={"gateway_ms": 0.02})
                for c in cmds]
        wire_in = [(topics.up("gateways", f"gw-{i}"), encode(m), False)
                   for i in range(n) for m in ([outs[i]] if outcome_only else [acks[i], outs[i]])]
        if shuffled:
            random.Random(1).shuffle(wire_in)
        w0, c0 = store.group.writes, store.group.commits
        t0, l0 = time.process_time(), time.thread_time()
        if rate:
            await arriving(relay, wire_in, rate)
        elif wire:
            per_wave = WAVE * (1 if outcome_only else 2)
            for k in range(0, len(wire_in), per_wave):
                await relay.on_local_batch(wire_in[k:k + per_wave])
        else:
            reports: list[Awaitable[None]] = []
            for i in range(n):
                if not outcome_only:
                    reports.append(relay._on_gateway_ack(f"gw-{i}", acks[i]))
                reports.append(relay._on_gateway_outcome(f"gw-{i}", outs[i]))
                if i % WAVE == WAVE - 1:
                    await asyncio.gather(*reports)
                    reports = []
            await asyncio.gather(*reports)
        await relay.gateway_reports.drain()
        cpu, loop_cpu = time.process_time() - t0, time.thread_time() - l0
        closed = (await store.counts()).get("closed", 0)
        shape = f" (at {rate:.0f}/s{', shuffled' if shuffled else ''}; report batches " \
                f"{relay.gateway_reports.commits})" if rate else ""
        print(f"{n} gateways{' (outcome only)' if outcome_only else ''}{' (wire)' if wire else ''}{shape}: "
              f"{cpu / n * 1e6:.2f} µs CPU per gateway (event loop {loop_cpu / n * 1e6:.2f}, "
              f"other threads {(cpu - loop_cpu) / n * 1e6:.2f}); store writes {store.group.writes - w0}, "
              f"commits {store.group.commits - c0}; closed {closed}, refused {sum(relay.rejected.values())}")
        await store.close()

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("gateways", nargs="?", type=int, default=10_000)
    parser.add_argument("--outcome-only", action="store_true")
    parser.add_argument("--wire", action="store_true")
    parser.add_argument("--rate", type=float, default=0.0, help="reports per second, in waves (implies --wire)")
    parser.add_argument("--shuffled", action="store_true", help="with --rate: the gateways answer in random order")
    a = parser.parse_args()
    if a.shuffled and not a.rate:
        parser.error("--shuffled goes with --rate")
    asyncio.run(bench(a.gateways, outcome_only=a.outcome_only, wire=a.wire or a.rate > 0, rate=a.rate,
                      shuffled=a.shuffled))
