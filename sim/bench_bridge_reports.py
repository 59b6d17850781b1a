"""Bridge benchmark: N gateways' acknowledgements and outcomes arriving together, through the relay's own handlers
into a real SQLite store, without MQTT (the relay has no links, so its answers to gateways are not sent).

    python -m sim.bench_bridge_reports 10000 [--outcome-only] [--wire]

``--outcome-only``: each gateway sends its outcome alone, which stands for its ack (a gateway whose outcome is ready
within its ``ack_hold_s``, and the simulated fleet, since issue 14's seventh round).

``--wire``: the reports arrive as the retailer broker's link hands them over in a fan-out: encoded payloads on each
gateway's ``up`` topic, 500 per turn, through :meth:`BridgeRelay.on_local_batch` (the topic, the rate limit, the
decoding, the queueing, the answers); without it each report goes to the relay's handler of its type, a task each.

Prints the process CPU (``time.process_time``) per gateway, split into the event loop's thread (``time.thread_time``
in it) and the rest (the SQLite thread), and the store writes and commits it took. It uses only handlers that older
bridges have too, so it also runs against another checkout for a before/after on the same machine
(``PYTHONPATH=<checkout> python <this file>``).
"""

from __future__ import annotations

import asyncio
import sys
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


async def bench(n: int, outcome_only: bool = False, wire: bool = False) -> None:
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
        w0, c0 = store.group.writes, store.group.commits
        t0, l0 = time.process_time(), time.thread_time()
        if wire:
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
        print(f"{n} gateways{' (outcome only)' if outcome_only else ''}{' (wire)' if wire else ''}: "
              f"{cpu / n * 1e6:.2f} µs CPU per gateway (event loop {loop_cpu / n * 1e6:.2f}, "
              f"other threads {(cpu - loop_cpu) / n * 1e6:.2f}); store writes {store.group.writes - w0}, "
              f"commits {store.group.commits - c0}; closed {closed}, refused {sum(relay.rejected.values())}")
        await store.close()

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    asyncio.run(bench(int(args[0]) if args else 10_000, outcome_only="--outcome-only" in sys.argv[1:],
                      wire="--wire" in sys.argv[1:]))
