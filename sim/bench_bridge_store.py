"""Bridge benchmark: the store's part of a fan-out to N gateways, alone, into a real SQLite file.

    python -m sim.bench_bridge_store 10000 [--rounds 3]

What the bridge's store does per gateway in a fan-out, in the order it happens there, each phase timed in process
CPU (``time.process_time``: the event loop and the SQLite thread) and counted in statements SQLite ran (its trace
callback fires once per statement run, each row of an ``executemany`` included):

- ``accept``: a request's N commands stored (``accept_request``);
- ``send``: the sending round's read of what is due and its record of the attempts (``due_commands``,
  ``mark_sent``);
- ``reports``: every gateway's acknowledgement and outcome in batches of 500 gateways, as the relay hands a batch
  of reports to its store (``BridgeRelay._reports_batch``: its judgement of the outcomes, ``store.Judged``, into
  ``apply_reports``, with its ``delivered`` outcome and its packing per request); in every other batch the
  acknowledgements came one batch before their outcomes (the outcome then withdraws the unsent ``delivered``), in
  the others together.

Only entry points that the bridges since issue 14's ninth round have too, so it also runs against another checkout
(``PYTHONPATH=<checkout>``) for a before/after on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mhp_wire.fastwire import OutcomeIn
from mhp_wire.messages import ClientState
from retailer_bridge.relay import BridgeRelay, GatewayReport
from retailer_bridge.store import BridgeStore, NewCommand

WAVE = 500


class Runs:
    """Statements SQLite runs, by their first word."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()

    def __call__(self, sql: str) -> None:
        self.runs[sql.split()[0].upper()] += 1

    def data(self) -> int:
        """Statements that read or write rows."""
        return sum(n for k, n in self.runs.items() if k in ("SELECT", "INSERT", "UPDATE", "DELETE"))


def _reports(commands: list[NewCommand]) -> list[list[GatewayReport]]:
    """The batches of reports, as the relay queues them: per wave of :data:`WAVE` gateways their acknowledgements,
    and in every other wave the outcomes of that wave and the one before."""
    def outcomes(cs: list[NewCommand]) -> list[GatewayReport]:
        t0 = time.time()
        return [(c.gateway_id, OutcomeIn(f"o-{c.msg_id}", c.request_id, c.client_id, ClientState.EXECUTED, {},
                                         {"gateway_ms": 1.0}, c.revision), t0) for c in cs]

    batches: list[list[GatewayReport]] = []
    pending: list[NewCommand] = []  # acknowledged in one batch, their outcomes in the next
    for k, w in enumerate(range(0, len(commands), WAVE)):
        wave = commands[w:w + WAVE]
        acks: list[GatewayReport] = [(c.gateway_id, [c.msg_id]) for c in wave]
        if k % 2 == 0:
            batches.append(acks)
            pending = wave
        else:
            batches.append(acks + outcomes(pending + wave))
            pending = []
    if pending:
        batches.append(outcomes(pending))
    return batches


async def _phase(store: BridgeStore, runs: Runs, step: Callable[[], Any]) -> tuple[float, int]:
    runs.runs.clear()
    t0 = time.process_time()
    await step()
    return time.process_time() - t0, runs.data()


async def bench(n: int) -> dict[str, tuple[float, int]]:
    """Per phase: CPU seconds and statements run."""
    with tempfile.TemporaryDirectory() as d:
        store = BridgeStore(Path(d) / "bridge.db")
        await store.open()
        runs = Runs()
        await store.sql.call(lambda: store.sql.db.set_trace_callback(runs))
        now = time.time()
        commands = [NewCommand("req-1", f"c-{i:06d}", f"gw-{i:06d}", f"m{i:031d}", b"x" * 300, now, now + 3600)
                    for i in range(n)]
        out: dict[str, tuple[float, int]] = {}
        try:
            out["accept"] = await _phase(store, runs, lambda: store.accept_request(commands, []))

            async def send() -> None:
                due = await store.due_commands(now + 1, n)
                await store.mark_sent([(c["msg_id"], now + 2.5) for c in due], now + 1)

            out["send"] = await _phase(store, runs, send)

            relay = BridgeRelay("r1", {c.client_id: c.gateway_id for c in commands}, store)
            batches = _reports(commands)

            async def reports() -> None:
                for batch in batches:
                    await relay._reports_batch(batch)

            out["reports"] = await _phase(store, runs, reports)
            counts = await store.counts()
            if counts.get("closed") != n:
                raise SystemExit(f"the bench closed {counts} of {n} commands")
        finally:
            await store.close()
        return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print CPU ms and statements per gateway."""
    parser = argparse.ArgumentParser(prog="python -m sim.bench_bridge_store", description=__doc__.split("\n\n")[0])
    parser.add_argument("gateways", type=int, nargs="?", default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    n = args.gateways
    for r in range(args.rounds):
        out = asyncio.run(bench(n))
        total = sum(cpu for cpu, _ in out.values())
        parts = ", ".join(f"{k} {cpu / n * 1000:.4f} ms ({stmts / n:.3f} statements)"
                          for k, (cpu, stmts) in out.items())
        print(f"round {r + 1}, {n} gateways, CPU per gateway: {parts}; together {total / n * 1000:.4f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
