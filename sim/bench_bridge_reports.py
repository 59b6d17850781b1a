"""Bridge benchmark: N gateways' acknowledgements and outcomes arriving together, through the relay's own handlers
into a real SQLite store, without MQTT (the relay has no links, so its answers to gateways are not sent).

    python -m sim.bench_bridge_reports 10000 [--outcome-only]

``--outcome-only``: each gateway sends its outcome alone, which stands for its ack (a gateway whose outcome is ready
within its ``ack_hold_s``, and the simulated fleet, since issue 14's seventh round).

Prints the process CPU (``time.process_time``: the event loop and the SQLite thread) per gateway, and the store
writes and commits it took. It uses only handlers that older bridges have too, so it also runs against another
checkout (``PYTHONPATH=<checkout>``) for a before/after on the same machine.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mhp_wire.messages import Ack, ClientState, Command, EmergencyParams, Outcome, RequestKind, encode
from retailer_bridge.relay import BridgeRelay
from retailer_bridge.store import BridgeStore, NewCommand


async def bench(n: int, outcome_only: bool = False) -> None:
    """Store N commands, then feed every gateway's acknowledgement (unless ``outcome_only``) and outcome in waves
    of 500 gateways."""
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
        outs = [Outcome(request_id="q", client_id=c.client_id, state=ClientState.EXECUTED) for c in cmds]
        w0, c0 = store.group.writes, store.group.commits
        t0 = time.process_time()
        reports: list[Awaitable[None]] = []
        for i in range(n):  # in waves of 500 gateways, as they arrive over MQTT
            if not outcome_only:
                reports.append(relay._on_gateway_ack(f"gw-{i}", acks[i]))
            reports.append(relay._on_gateway_outcome(f"gw-{i}", outs[i]))
            if i % 500 == 499:
                await asyncio.gather(*reports)
                reports = []
        await asyncio.gather(*reports)
        cpu = time.process_time() - t0
        print(f"{n} gateways{' (outcome only)' if outcome_only else ''}: {cpu / n * 1000:.4f} ms CPU per gateway; "
              f"store writes {store.group.writes - w0}, commits {store.group.commits - c0}")
        await store.close()

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--outcome-only"]
    asyncio.run(bench(int(args[0]) if args else 10_000, outcome_only="--outcome-only" in sys.argv[1:]))
