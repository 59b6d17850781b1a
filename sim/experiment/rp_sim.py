"""RP simulator (the paper's "RP Simulator"): retailer platforms without gateways, one or several per process.

Each simulated retailer has its own MQTT connection to the hub broker (as the retailer's identity, with its
presence topic) and its own counters, and:

* acknowledges every message the hub sends (application-level ``ack``) as soon as it has read it;
* for a ``request``, after an artificial delay drawn uniformly from ``[delay_min_ms, delay_max_ms)`` per client,
  answers each client with its terminal outcome: ``executed`` (emergency, load reduction), ``acknowledged``
  (load shift), ``available`` with ``available_kw`` (availability); ``retailer_ms`` in the outcome's trace is the
  time from receipt to sending;
* answers as the real bridge does (``--outcomes batches``, the default): the clients of one request whose delays
  fall in the same ``--batch-window-ms`` window go in one ``outcomes`` message (at most ``OUTCOMES_MAX`` each),
  sent when the window's last delay has passed; a window with a single client goes as a plain ``outcome``.
  ``--outcomes per-client`` is the paper's simulator: one ``outcome`` message per client, at its own delay;
* ``billing_data``, ``tariff`` and ``cancel`` get only the ``ack``;
* publishes with back-pressure: when the MQTT in-flight window (the broker's receive maximum) is full, it waits
  for room instead of dropping the message, so a request for 10,000 clients is answered at full speed;
* re-sends every outcome the hub has not acknowledged, with back-off, like a real bridge's outbox (in memory
  here: the simulator is not crash-safe, it does not need to be);
* a request delivered again (the hub re-sends until acked) is acked again but answered only once per client
  (per phase: a load reduction's availability and disconnect phases share one request id).

    python -m sim.experiment.rp_sim --port 1883 --retailer r1 --password PW [--stats-file F] [--ready-file F]
    python -m sim.experiment.rp_sim --port 1883 --identities FILE --stats-file 'rp-{retailer}.stats.json' ...

``--identities`` names a JSON file ``{"r1": "password", ...}`` (keep it private: mode 0600) with every retailer
the process hosts. The ready file is written once every retailer is connected. On SIGTERM each retailer's
counters go to ``--stats-file`` (JSON; ``{retailer}`` in the path is replaced by the retailer id, and is required
when the process hosts several) and the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
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
from mhp_wire.logsafe import outside
from mhp_wire.loopwatch import LoopWatch
from mhp_wire.messages import (
    ACK_QOS,
    BRIDGE_OUTCOME_BYTES,
    OUTCOMES_MAX,
    Ack,
    BillingData,
    Cancel,
    ClientState,
    ErrorReply,
    Outcome,
    OutcomeReport,
    Outcomes,
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
    """Clients answered (one outcome each, whether sent alone or in an ``outcomes`` message)."""
    outcome_messages: int = 0
    """Messages that carried them (first sends): as many as ``outcomes`` with ``--outcomes per-client``."""
    outcome_resends: int = 0
    """Messages re-sent."""
    outcomes_acked: int = 0
    """Clients whose outcome's message the hub acknowledged."""
    errors_from_hub: int = 0
    unacked_at_exit: int = 0


def retry_delay_s(attempts: int) -> float:
    """Back-off before re-sending an outcome for the ``attempts``-th time (as the bridge does)."""
    return float(min(30.0, 0.5 * 2 ** max(0, attempts - 1)))


RESEND_QUIET_S = 5.0
"""Re-sends wait until the hub has acknowledged nothing for this long."""
BATCH_WINDOW_MS = 20.0
"""Clients of one request whose delays fall within this window of the window's first one share a message."""
OUTCOME_MODES = ("batches", "per-client")
"""How outcomes are sent: ``outcomes`` batches as the real bridge (the default), or one ``outcome`` per client."""
PUBLISH_WAIT_S = 30.0
"""How long a publish waits for room in the in-flight window; past it the outcome stays in the re-send queue."""


class RpSimulator:
    """One simulated retailer platform."""

    def __init__(self, retailer_id: str, endpoint: MqttEndpoint, *, delay_min_ms: float = 100.0,
                 delay_max_ms: float = 110.0, available_kw: float = 2.0, seed: int | None = None,
                 outcomes: str = "batches", batch_window_ms: float = BATCH_WINDOW_MS) -> None:
        if outcomes not in OUTCOME_MODES:
            raise ValueError(f"outcomes must be one of {OUTCOME_MODES}, not {outcomes!r}")
        if batch_window_ms < 0:
            raise ValueError("batch_window_ms must be >= 0")
        self.retailer_id = retailer_id
        self.delay = (delay_min_ms / 1000.0, delay_max_ms / 1000.0)
        self.batches = outcomes == "batches"
        self.batch_window = batch_window_ms / 1000.0
        self.batch_max = OUTCOMES_MAX
        """Clients per ``outcomes`` message at most."""
        self.available_kw = available_kw
        self.rng = random.Random(seed)
        self.stats = RpStats()
        self.answered: dict[tuple[str, str], set[str]] = {}
        """Clients answered per ``(request_id, kind)``: a load reduction's two phases share one request id."""
        self.unacked: dict[str, tuple[bytes, int, int, float, int]] = {}
        """Outcome messages sent and not yet acknowledged: ``msg_id -> (payload, attempts, send sequence number,
        sent at, clients in it)``."""
        self._seq = 0
        self.acked_seq = 0
        """The highest send sequence number the hub has acknowledged."""
        self.last_ack = 0.0
        """When the hub last acknowledged something (monotonic)."""
        self._resend_at: list[tuple[float, str]] = []
        """A heap of ``(when, msg_id)``: the next re-send of each unacknowledged outcome."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._topic = topics.up("retailers", retailer_id)
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
            self.last_ack = time.monotonic()
            for mid in msg.ack_ids:
                sent = self.unacked.pop(mid, None)
                if sent is not None:
                    self.stats.outcomes_acked += sent[4]
                    self.acked_seq = max(self.acked_seq, sent[2])
            return
        if isinstance(msg, ErrorReply):
            self.stats.errors_from_hub += 1
            log.warning("the hub refused %s: %s", outside(msg.ref_msg_id), outside(msg.message, 300))
            return
        if isinstance(msg, Request):
            self.stats.requests += 1
            done = self.answered.setdefault((msg.request_id, msg.kind.value), set())
            fresh = [c for c in msg.client_ids if c not in done]
            if len(fresh) < len(msg.client_ids):
                self.stats.redelivered_requests += 1
            done.update(fresh)
            received = time.perf_counter()
            await self._publish(encode(Ack(ack_ids=[msg.msg_id])), qos=ACK_QOS)
            if fresh:
                task = asyncio.create_task(self._answer(msg, fresh, received))
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
        await self._publish(encode(Ack(ack_ids=[msg.msg_id])), qos=ACK_QOS)

    async def _answer(self, req: Request, clients: list[str], received: float) -> None:
        """Answer each client after its own delay (one task per request, in delay order, not one per client): one
        message per client, or one per window of delays (:meth:`windows`)."""
        detail: dict[str, object] = {"simulated": True}
        if req.kind is RequestKind.AVAILABILITY:
            state = ClientState.AVAILABLE
            detail["available_kw"] = self.available_kw
        elif req.kind is RequestKind.LOAD_SHIFT:
            state = ClientState.ACKNOWLEDGED
        else:
            state = ClientState.EXECUTED
        timed = sorted((self.rng.uniform(*self.delay), c) for c in clients)
        groups = self.windows(timed) if self.batches else [[t] for t in timed]
        for group in groups:
            wait = received + group[-1][0] - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            trace = {"retailer_ms": round((time.perf_counter() - received) * 1000, 3)}
            for msg in self._messages(req.request_id, [c for _, c in group], state, detail, trace):
                payload = encode(msg)
                n = len(msg.reports) if isinstance(msg, Outcomes) else 1
                self._seq += 1
                self.unacked[msg.msg_id] = (payload, 1, self._seq, time.monotonic(), n)
                heapq.heappush(self._resend_at, (time.monotonic() + retry_delay_s(1), msg.msg_id))
                self.stats.outcomes += n
                self.stats.outcome_messages += 1
                await self._publish(payload)

    @staticmethod
    def _messages(request_id: str, clients: list[str], state: ClientState, detail: dict[str, object],
                  trace: dict[str, float]) -> list[Outcome | Outcomes]:
        """One window's clients as messages: a plain ``outcome`` for one client, else ``outcomes``, halved while
        its packet would not fit the brokers' (as the bridge splits)."""
        if len(clients) == 1:
            return [Outcome(request_id=request_id, client_id=clients[0], state=state, detail=detail, trace=trace)]
        msg = Outcomes(request_id=request_id, reports=[
            OutcomeReport(client_id=c, state=state, detail=detail, trace=trace) for c in clients])
        if len(encode(msg)) <= BRIDGE_OUTCOME_BYTES:
            return [msg]
        half = len(clients) // 2
        return [*RpSimulator._messages(request_id, clients[:half], state, detail, trace),
                *RpSimulator._messages(request_id, clients[half:], state, detail, trace)]

    def windows(self, timed: list[tuple[float, str]]) -> list[list[tuple[float, str]]]:
        """``(delay, client)`` pairs sorted by delay, cut into messages: a message holds the clients whose delay is
        within ``batch_window`` of its first one, at most ``batch_max`` of them."""
        groups: list[list[tuple[float, str]]] = []
        for item in timed:
            if groups and item[0] - groups[-1][0][0] <= self.batch_window and len(groups[-1]) < self.batch_max:
                groups[-1].append(item)
            else:
                groups.append([item])
        return groups

    async def _publish(self, payload: bytes, qos: int = 1) -> None:
        try:
            await self.link.publish(self._topic, payload, qos=qos, wait_s=PUBLISH_WAIT_S)
        except MqttError as exc:  # the link is down: the re-send loop (or the hub's outbox) brings it again
            log.debug("publish deferred: %s", exc)

    async def resend_loop(self) -> None:
        """Re-send unacknowledged outcomes with back-off, until cancelled.

        The hub acknowledges in the order it received (one group commit after the other), so an outcome sent
        after the last one acknowledged is most likely still in its backlog: it is re-sent only once it has waited
        ``RESEND_QUIET_S`` and the hub has acknowledged nothing for as long (a re-send would only add to the
        backlog). One sent before an acknowledged one was lost (a hub restart, a storage outage) and is re-sent
        when due."""
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            quiet = now - self.last_ack >= RESEND_QUIET_S
            held: list[tuple[float, str]] = []
            while self._resend_at and self._resend_at[0][0] <= now:
                item = heapq.heappop(self._resend_at)
                mid = item[1]
                if mid not in self.unacked:
                    continue
                payload, attempts, seq, sent_at, n = self.unacked[mid]
                if seq > self.acked_seq and (not quiet or now - sent_at < RESEND_QUIET_S):
                    held.append(item)
                    continue
                self._seq += 1
                self.unacked[mid] = (payload, attempts + 1, self._seq, now, n)
                heapq.heappush(self._resend_at, (now + retry_delay_s(attempts + 1), mid))
                self.stats.outcome_resends += 1
                await self._publish(payload)
            for item in held:
                heapq.heappush(self._resend_at, item)


async def run(sims: list[RpSimulator], ready_file: Path | None, stop: asyncio.Event) -> None:
    """Connect every simulator, say so in ``ready_file``, serve until ``stop`` is set."""
    async with contextlib.AsyncExitStack() as stack:
        for sim in sims:
            await stack.enter_async_context(sim.link)
        resend = [asyncio.create_task(sim.resend_loop(), name=f"rp-resend-{sim.retailer_id}") for sim in sims]
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"retailers": [s.retailer_id for s in sims], "pid": os.getpid()}))
            os.replace(tmp, ready_file)
        try:
            await stop.wait()
        finally:
            for t in [*resend, *(t for s in sims for t in s._tasks)]:
                t.cancel()
            await asyncio.gather(*resend, return_exceptions=True)
    for sim in sims:
        sim.stats.unacked_at_exit = len(sim.unacked)


def identities(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, str]:
    """The retailers to host and their passwords, from ``--identities`` or ``--retailer`` / ``--password``."""
    ids: dict[str, str] = {}
    if args.identities is not None:
        try:
            raw = json.loads(args.identities.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--identities {args.identities}: {exc}")
        if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            parser.error(f"--identities {args.identities}: expected a JSON object retailer id -> password")
        ids.update(raw)
    if len(args.retailer) != len(args.password):
        parser.error("give one --password per --retailer")
    ids.update(zip(args.retailer, args.password, strict=True))
    if not ids:
        parser.error("no retailer: give --retailer and --password, or --identities")
    if len(ids) > 1 and args.stats_file is not None and "{retailer}" not in str(args.stats_file):
        parser.error("--stats-file must contain {retailer} when the process hosts several retailers")
    return ids


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m sim.experiment.rp_sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--retailer", action="append", default=[], help="a retailer to host (repeatable)")
    parser.add_argument("--password", action="append", default=[], help="its password (one per --retailer)")
    parser.add_argument("--identities", type=Path, help='JSON file {"retailer id": "password", ...}')
    parser.add_argument("--delay-min-ms", type=float, default=100.0)
    parser.add_argument("--delay-max-ms", type=float, default=110.0)
    parser.add_argument("--available-kw", type=float, default=2.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--outcomes", choices=OUTCOME_MODES, default="batches",
                        help="outcomes batches as the real bridge sends them (default), or the paper's one outcome "
                             "message per client")
    parser.add_argument("--batch-window-ms", type=float, default=BATCH_WINDOW_MS,
                        help="clients whose delays fall within this window share one outcomes message")
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument("--stats-file", type=Path, help="per retailer; {retailer} is replaced by its id")
    args = parser.parse_args(argv)
    ids = identities(args, parser)
    if args.batch_window_ms < 0:
        parser.error("--batch-window-ms must be >= 0")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s rp-sim: %(message)s")
    sims = [RpSimulator(rid, MqttEndpoint(args.host, args.port, rid, pw), delay_min_ms=args.delay_min_ms,
                        delay_max_ms=args.delay_max_ms, available_kw=args.available_kw,
                        seed=None if args.seed is None else args.seed + i, outcomes=args.outcomes,
                        batch_window_ms=args.batch_window_ms)
            for i, (rid, pw) in enumerate(ids.items())]

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        with LoopWatch(name="rp-sim"):  # a stall here adds to the hub_added the experiment charges to the hub
            await run(sims, args.ready_file, stop)

    asyncio.run(go())
    if args.stats_file is not None:
        for sim in sims:
            Path(str(args.stats_file).replace("{retailer}", sim.retailer_id)).write_text(
                json.dumps(asdict(sim.stats), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
