"""RP simulator (the paper's "RP Simulator"): a retailer platform without gateways, one process per retailer.

It connects to the hub broker as the retailer's identity, with its presence topic, and:

* acknowledges every message the hub sends (application-level ``ack``) as soon as it has read it;
* for a ``request``, after an artificial delay drawn uniformly from ``[delay_min_ms, delay_max_ms)`` per client,
  answers each client with its terminal outcome: ``executed`` (emergency, load reduction), ``acknowledged``
  (load shift), ``available`` with ``available_kw`` (availability); ``retailer_ms`` in the outcome's trace is the
  time from receipt to sending;
* ``billing_data``, ``tariff`` and ``cancel`` get only the ``ack``;
* re-sends every outcome the hub has not acknowledged, with back-off, like a real bridge's outbox (in memory
  here: the simulator is not crash-safe, it does not need to be);
* a request delivered again (the hub re-sends until acked) is acked again but answered only once per client
  (per phase: a load reduction's availability and disconnect phases share one request id).

    python -m sim.experiment.rp_sim --port 1883 --retailer r1 --password PW [--stats-file F] [--ready-file F]

On SIGTERM it writes its counters to ``--stats-file`` (JSON) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mhp_wire import topics
from mhp_wire.messages import (
    Ack,
    BillingData,
    Cancel,
    ClientState,
    ErrorReply,
    Outcome,
    Request,
    RequestKind,
    Tariff,
    WireError,
    decode,
    encode,
)
from mhp_wire.mqtt import MqttEndpoint, MqttError, MqttLink

log = logging.getLogger(__name__)


@dataclass
class RpStats:
    """What one RP simulator saw and did."""

    requests: int = 0
    redelivered_requests: int = 0
    """Requests received again (the hub re-sends until acked): acked again, answered once."""
    billing: int = 0
    tariffs: int = 0
    cancels: int = 0
    other: int = 0
    outcomes: int = 0
    outcome_resends: int = 0
    outcomes_acked: int = 0
    errors_from_hub: int = 0
    unacked_at_exit: int = 0


def retry_delay_s(attempts: int) -> float:
    """Back-off before re-sending an outcome for the ``attempts``-th time (as the bridge does)."""
    return float(min(30.0, 0.5 * 2 ** max(0, attempts - 1)))


class RpSimulator:
    """One simulated retailer platform."""

    def __init__(self, retailer_id: str, endpoint: MqttEndpoint, *, delay_min_ms: float = 100.0,
                 delay_max_ms: float = 110.0, available_kw: float = 2.0, seed: int | None = None) -> None:
        self.retailer_id = retailer_id
        self.delay = (delay_min_ms / 1000.0, delay_max_ms / 1000.0)
        self.available_kw = available_kw
        self.rng = random.Random(seed)
        self.stats = RpStats()
        self.answered: set[tuple[str, str, str]] = set()
        """``(request_id, kind, client_id)`` answered: a load reduction's two phases share one request id."""
        self.unacked: dict[str, tuple[bytes, float, int]] = {}
        """Outcomes sent and not yet acknowledged: ``msg_id -> (payload, next resend at, attempts)``."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.link = MqttLink(endpoint, client_id=retailer_id, subscriptions=[topics.down("retailers", retailer_id)],
                             handler=self.on_message, status_topic=topics.status("retailers", retailer_id),
                             clean_start=True, session_expiry_s=0)

    async def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """Acknowledge at once; schedule the outcomes of a request."""
        try:
            msg = decode(payload)
        except WireError as exc:
            log.warning("undecodable message from the hub: %s", exc)
            return
        if isinstance(msg, Ack):
            for mid in msg.ack_ids:
                if self.unacked.pop(mid, None) is not None:
                    self.stats.outcomes_acked += 1
            return
        if isinstance(msg, ErrorReply):
            self.stats.errors_from_hub += 1
            log.warning("the hub refused %s: %s", msg.ref_msg_id, msg.message)
            return
        if isinstance(msg, Request):
            self.stats.requests += 1
            fresh = [c for c in msg.client_ids if (msg.request_id, msg.kind.value, c) not in self.answered]
            if len(fresh) < len(msg.client_ids):
                self.stats.redelivered_requests += 1
            self.answered.update((msg.request_id, msg.kind.value, c) for c in fresh)
            received = time.perf_counter()
            await self._send(Ack(ack_ids=[msg.msg_id]))
            for cid in fresh:
                task = asyncio.create_task(self._answer(msg, cid, received))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        if isinstance(msg, BillingData):
            self.stats.billing += 1
        elif isinstance(msg, Tariff):
            self.stats.tariffs += 1
        elif isinstance(msg, Cancel):
            self.stats.cancels += 1
        else:
            self.stats.other += 1
        await self._send(Ack(ack_ids=[msg.msg_id]))

    async def _answer(self, req: Request, client_id: str, received: float) -> None:
        await asyncio.sleep(self.rng.uniform(*self.delay))
        detail: dict[str, object] = {"simulated": True}
        if req.kind is RequestKind.AVAILABILITY:
            state = ClientState.AVAILABLE
            detail["available_kw"] = self.available_kw
        elif req.kind is RequestKind.LOAD_SHIFT:
            state = ClientState.ACKNOWLEDGED
        else:
            state = ClientState.EXECUTED
        out = Outcome(request_id=req.request_id, client_id=client_id, state=state, detail=detail,
                      trace={"retailer_ms": round((time.perf_counter() - received) * 1000, 3)})
        payload = encode(out)
        self.unacked[out.msg_id] = (payload, time.monotonic() + retry_delay_s(1), 1)
        self.stats.outcomes += 1
        await self._publish(payload)

    async def _send(self, msg: Ack) -> None:
        await self._publish(encode(msg))

    async def _publish(self, payload: bytes) -> None:
        with contextlib.suppress(MqttError):  # the outbox re-sends outcomes; the hub re-sends what we did not ack
            await self.link.publish(topics.up("retailers", self.retailer_id), payload)

    async def resend_loop(self) -> None:
        """Re-send unacknowledged outcomes with back-off, until cancelled."""
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for mid, (payload, due, attempts) in list(self.unacked.items()):
                if due <= now and mid in self.unacked:
                    self.unacked[mid] = (payload, now + retry_delay_s(attempts + 1), attempts + 1)
                    self.stats.outcome_resends += 1
                    await self._publish(payload)


async def run(sim: RpSimulator, ready_file: Path | None, stop: asyncio.Event) -> None:
    """Connect, say so in ``ready_file``, serve until ``stop`` is set."""
    async with sim.link:
        resend = asyncio.create_task(sim.resend_loop())
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"retailer_id": sim.retailer_id, "pid": os.getpid()}))
            os.replace(tmp, ready_file)
        try:
            await stop.wait()
        finally:
            resend.cancel()
            for t in list(sim._tasks):
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await resend
    sim.stats.unacked_at_exit = len(sim.unacked)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m sim.experiment.rp_sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--retailer", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--delay-min-ms", type=float, default=100.0)
    parser.add_argument("--delay-max-ms", type=float, default=110.0)
    parser.add_argument("--available-kw", type=float, default=2.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument("--stats-file", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s rp-sim: %(message)s")
    sim = RpSimulator(args.retailer, MqttEndpoint(args.host, args.port, args.retailer, args.password),
                      delay_min_ms=args.delay_min_ms, delay_max_ms=args.delay_max_ms,
                      available_kw=args.available_kw, seed=args.seed)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(sim, args.ready_file, stop)

    asyncio.run(go())
    if args.stats_file is not None:
        args.stats_file.write_text(json.dumps(asdict(sim.stats), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
