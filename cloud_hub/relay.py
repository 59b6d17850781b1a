"""The hub's MQTT side: the request book's outbox sent until each retailer acknowledges it, and what comes back.

Zero loss does not come from the broker (its persistence is a snapshot, ``reference/delivery.md``): a message
stays in the request's stored outbox, and is re-sent with back-off, until the retailer's bridge answers with an
application-level ``ack``. Outcomes and measurements are acknowledged only after they are committed, so the bridge
re-sends them until then. Every incoming message is checked against the retailer the topic (and so the broker
ACL) names; a bridge that comes back online is sent at once everything it has not acknowledged. With several hub
replicas (``cloud_hub.replicas``) an outcome for another replica's request, or an ack of another replica's
message, is forwarded to it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloud_hub.authz import Action, Context, Decision, Principal, decide
from cloud_hub.book import OutboxItem, OutcomeVerdict, ReportedOutcome, RequestBook
from cloud_hub.lifecycle import retry_delay_s
from cloud_hub.metrics import HubMetrics
from cloud_hub.replicas import Replicas, TooBigToForward
from cloud_hub.service import tariff_message
from cloud_hub.storage import StoreUnavailable
from cloud_hub.store import AuditEntry
from mhp_wire import fastwire, topics
from mhp_wire.fastwire import OutcomesIn
from mhp_wire.groupcommit import GroupCommit
from mhp_wire.logsafe import Once, outside
from mhp_wire.messages import (
    SEND_PAYLOAD_BYTES,
    Ack,
    ConsentDecision,
    ConsentQuery,
    ConsentView,
    ErrorReply,
    Measurements,
    Message,
    Outcome,
    OutcomeReport,
    Outcomes,
    Presence,
    WireError,
    decode,
    encode,
    publish_qos,
)
from mhp_wire.mqtt import MqttError, MqttLink, PacketTooLarge, Republisher
from mhp_wire.outbox import Outbox, Pending
from mhp_wire.process import wait_or_timeout
from mhp_wire.ratelimit import RateLimiter
from mhp_wire.router import Inbound, InboundRouter, Refusal

log = logging.getLogger(__name__)

PUBLISH_WAIT_S = 5.0
"""How long a publish may wait for room in the MQTT in-flight window (the broker's receive maximum) before it
gives up; the outbox, or the retailer's re-send, brings what was given up again."""
ACK_IDS_MAX = 2_000
"""Message ids per ``ack``: 2,000 ids of at most 64 characters stay well under the 256 KiB payload limit."""
PRESENCE_CHANGES_PER_S = 0.1
"""Presence changes (``online``/``offline``) per second a retailer may sustain (settings override it)."""
PRESENCE_CHANGES_BURST = 10
"""Presence changes a retailer may make at once before :data:`PRESENCE_CHANGES_PER_S` applies."""
OUTCOME_PACE_S = 0.15
"""After an outcome commit carrying :data:`OUTCOME_PACE_MIN_REPORTS` reports of one request (a fan-out's), the next
starts no sooner than this after it started: fewer, larger commits, each paying its fixed part once (the request's
meta and counts, its change-feed event, the reads, the sync): ~5 µs per client less for the hub at a
10,000-gateway fan-out (three pairs); never applied to ordinary traffic, whose latency it would add to
(docs/decisions.md, "Outcome commits paced after a fan-out's")."""
OUTCOME_PACE_MIN_REPORTS = 1_000
"""Reports of one request in one outcome commit that make it a fan-out's (a request at 12,000/min has 100)."""


@dataclass(slots=True)
class _Reported:
    """One retailer message of outcomes in the hub's group commit: an ``outcome`` (one report) or an ``outcomes``
    message (its valid reports, and the entries that are not valid reports with why): as the models decode it, or
    an ``outcomes`` as :func:`mhp_wire.fastwire.read_outcomes` reads its plain shape (an :class:`OutcomesIn` has
    only valid reports: a message with an entry that is not one is decoded by the models)."""

    retailer_id: str
    msg: Outcome | Outcomes | OutcomesIn
    reports: list[ReportedOutcome]
    positions: list[int] = field(default_factory=lambda: [0])
    """The entry of ``msg`` each report is (``outcomes``: the index in its ``reports``)."""
    invalid: list[tuple[int, str]] = field(default_factory=list)

    @classmethod
    def of(cls, retailer_id: str, msg: Outcome | Outcomes | OutcomesIn) -> _Reported:
        if isinstance(msg, Outcome):
            return cls(retailer_id, msg, [ReportedOutcome(retailer_id, msg.request_id, msg.client_id, msg.state,
                                                          msg.detail, msg.trace, msg.revision)])
        if isinstance(msg, OutcomesIn):
            request_id = msg.request_id
            return cls(retailer_id, msg, [ReportedOutcome(retailer_id, request_id, *r) for r in msg.reports],
                       list(range(len(msg.reports))))
        reports, positions, invalid = [], [], []
        for i, r in enumerate(msg.reports):
            if isinstance(r, OutcomeReport):
                reports.append(ReportedOutcome(retailer_id, msg.request_id, r.client_id, r.state, r.detail, r.trace,
                                               r.revision))
                positions.append(i)
            else:
                invalid.append((i, msg.invalid_reason(i)))
        return cls(retailer_id, msg, reports, positions, invalid)

    def weight(self) -> int:
        return max(1, len(self.reports) + len(self.invalid))


def fanout_sized(items: list[_Reported]) -> bool:
    """Whether a committed batch of outcome messages carried at least :data:`OUTCOME_PACE_MIN_REPORTS` reports of one
    request: a fan-out's, after which the hub paces its outcome commits (:data:`OUTCOME_PACE_S`)."""
    per_request: dict[str, int] = {}
    for item in items:
        rid = item.msg.request_id
        n = per_request[rid] = per_request.get(rid, 0) + len(item.reports)
        if n >= OUTCOME_PACE_MIN_REPORTS:
            return True
    return False


class HubRelay:
    """Dispatches the outbox and applies what retailers send back."""

    def __init__(self, book: RequestBook, metrics: HubMetrics, *, sweep_interval_s: float = 0.25,
                 clock: Callable[[], float] = time.time, limiter: RateLimiter | None = None,
                 presence_limiter: RateLimiter | None = None) -> None:
        self.book = book
        self.metrics = metrics
        self.clock = clock
        """Wall-clock time (seconds since the epoch) of dispatch, back-off and deadlines."""
        self.link: MqttLink | None = None
        self.failure: str | None = None
        """Why the relay last ended, until it is connected again (shown by ``/readyz``)."""
        self._wake = asyncio.Event()
        self._sweep_interval_s = sweep_interval_s
        self.presence: dict[str, str] = {}
        self.presence_since: dict[str, float] = {}
        """When (``clock``) each retailer's presence last changed, as this hub heard it (``GET /v1/status``)."""
        self.on_measurements: Callable[[str, Measurements], Awaitable[list[str]]] | None = None
        self.on_consent: Callable[[str, ConsentQuery | ConsentDecision],
                                  Awaitable[list[Ack | ErrorReply | ConsentView]]] | None = None
        """Set by the app: a customer's consent query or decision relayed by a retailer (docs/consent.md)."""
        self.on_phase_due: Callable[[str], Awaitable[None]] | None = None
        self.presence_limiter = (presence_limiter if presence_limiter is not None
                                 else RateLimiter(PRESENCE_CHANGES_PER_S, PRESENCE_CHANGES_BURST))
        """One token bucket per retailer for presence changes: a bridge flapping online/offline would otherwise
        have all its unacknowledged messages re-sent at every ``online``. Changes beyond it are ignored and
        counted (``presence_rate_limited``); those messages are then re-sent on their back-off."""
        self._presence_muted: set[str] = set()
        self.limiter = limiter if limiter is not None else RateLimiter(200.0, 400)
        """One token bucket per retailer: messages beyond it are refused (unread) with an error answer."""
        self.inbound = InboundRouter("retailers", {
            Ack: self._ack_in, Outcome: self._outcome_in, Outcomes: self._outcomes_in, OutcomesIn: self._outcomes_in,
            Measurements: self._measurements_in,
            ConsentQuery: self._consent_in, ConsentDecision: self._consent_in, ErrorReply: self._error_in},
            on_refused=self._refused, limiter=lambda: self.limiter,
            on_presence=self._presence_in, on_decoded=self._count_received,
            decode=fastwire.reader(decode, fastwire.read_outcomes))
        """Retailers' messages: topic → rate limit (one token bucket per retailer: messages beyond it are refused
        unread, with an error answer) → decode → the handler of its type. An ``outcomes`` message in its plain shape
        is read by hand into light values (:func:`mhp_wire.fastwire.read_outcomes`: a subset of what the models
        accept, with the same values); anything else by the models, which refuse it with their error."""
        self.outcomes: GroupCommit[_Reported, None] = GroupCommit(
            self._settled(self._commit_outcomes), max_batch=5_000, name="hub-outcome-commit",
            weight=_Reported.weight, pace_s=OUTCOME_PACE_S, pace_after=fanout_sized)
        """5,000 client reports at most per storage batch (an ``outcomes`` message counts its entries): its column
        list stays well inside SQLite's limits. A message is never split across two batches, so its one ``ack``
        follows the commit of all of it. After a commit carrying a fan-out's worth of one request's reports
        (:func:`fanout_sized`) the next waits until :data:`OUTCOME_PACE_S` after it started."""
        self.acks: GroupCommit[tuple[str, list[str]], None] = GroupCommit(
            self._settled(self._commit_acks), max_batch=1_000, name="hub-ack-commit")
        self._received: dict[str, Any] = {}
        self.replicas: Replicas | None = None
        """Set when the hub runs as several replicas."""
        self._claims_logged = Once()
        self.tariff = Republisher(self.republish_tariff, "the current tariff", retry_on=(StoreUnavailable,))
        """At every connection to the hub broker the stored current tariff is published again, retained: the store
        is its source, and a broker restarted without (or with an old) persistence snapshot has lost it."""
        self.on_published: Callable[[list[OutboxItem]], Awaitable[None]] | None = None
        """Awaited with each round of published messages before the book records them as sent: the window in which
        a message is at the broker while its targets still read ``pending`` (a test holds a round there)."""
        book.kick = self.kick
        self.parked: dict[str, OutboxItem] = {}
        """Messages the link refused as too large (``_BookOutbox.parked``): never sent, their targets not ``sent``,
        due again at the next connection (:meth:`link_connected`)."""
        self.outbox = Outbox(_BookOutbox(self), self._publish_down, clock=lambda: self.clock(), limit=1000,
                             retry_s=retry_delay_s, resend_from="read")
        """The book's outbox: requests, deliveries and notices to retailers, re-sent until acknowledged."""

    async def _publish_down(self, topic: str, payload: bytes, retain: bool) -> None:
        if self.link is None:
            raise MqttError("the hub broker link is not open")
        try:
            await self.link.publish(topic, payload, retain=retain, wait_s=PUBLISH_WAIT_S)
        except PacketTooLarge:  # not sent; the outbox parks it (``_BookOutbox.parked``) and the round goes on
            raise
        except MqttError as exc:
            log.warning("outbox send paused: %s", exc)
            raise
        self.metrics.outbox_sent.inc()

    @staticmethod
    def _settled(commit: Callable[[list[Any]], Awaitable[None]]) -> Callable[[list[Any]], Awaitable[list[None]]]:
        """A hub commit for :class:`GroupCommit`: it answers (or not) the retailers itself and handles its own
        errors, so every caller is released once it has ended, whatever happened (one failed commit must not strand
        the items queued behind it, nor fail the MQTT handler that waits)."""
        name = getattr(commit, "__name__", "commit")

        async def run(batch: list[Any]) -> list[None]:
            try:
                await commit(batch)
            except Exception:
                log.exception("%s: a commit of %d item(s) failed", name, len(batch))
            return [None] * len(batch)

        return run

    def deliver_to(self, on_measurements: Callable[[str, Measurements], Awaitable[list[str]]],
                   on_phase_due: Callable[[str], Awaitable[None]]) -> None:
        """Hand retailers' measurements and due availability phases to the use cases: the one edge back from the
        relay to the use cases, which are built after it (the tariffs use case publishes through the relay)."""
        self.on_measurements = on_measurements
        self.on_phase_due = on_phase_due

    def use_replicas(self, replicas: Replicas) -> None:
        """Run as one of several replicas: forward what another replica owns, apply what they forward."""
        self.replicas = replicas
        replicas.on_outcome = self.apply_forwarded_outcome

    def presence_now(self) -> dict[str, tuple[str, float | None]]:
        """Each retailer's presence as this hub heard it, with when it last changed (``GET /v1/status``)."""
        return {rid: (state, self.presence_since.get(rid)) for rid, state in self.presence.items()}

    def kick(self) -> None:
        """Wake the dispatcher: a message is due."""
        self._wake.set()

    async def run(self) -> None:
        """Dispatch and sweep until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._dispatch_loop(), name="hub-dispatch")
            tg.create_task(self._sweep_loop(), name="hub-sweep")
            tg.create_task(self.tariff.run(), name="hub-tariff-republish")

    async def drain(self) -> None:
        """Wait until the outcome and acknowledgement commits handed in so far have ended (at shutdown, once the
        MQTT side has stopped and before the store closes: a commit still running would meet a closed store, and
        the outcomes its retailers sent would be lost until they re-send them). The first sends' ``sent`` marks
        still waiting to settle are written then too (:meth:`RequestBook.settle_all`)."""
        await self.outcomes.drain()
        await self.acks.drain()
        await self.book.settle_all()

    def link_connected(self) -> None:
        """The link to the hub broker is up (the first time or again): republish the stored tariff; what was parked
        as too large is due again (this broker's limit may differ)."""
        self.tariff.connected()
        for item in self.parked.values():
            item.next_at = 0.0
        self.parked.clear()

    async def republish_tariff(self) -> bool:
        """Publish the stored current tariff, retained, on ``public/tariff``; False when none was published.
        Looks at storage again after publishing, so that a tariff posted meanwhile is what stays retained."""
        published = None
        while True:
            stored = await self.book.store.current_tariff()
            if stored is None:
                return False
            if published == (stored["tariff_id"], stored["version"]):
                return True
            if self.link is None or not self.link.connected:
                raise MqttError("the hub broker link is down")
            payload = encode(tariff_message(stored))
            published = (stored["tariff_id"], stored["version"])
            if len(payload) > SEND_PAYLOAD_BYTES:  # stored before tariffs were sized: it would cut this link
                log.error("tariff %s v%d is %d bytes, over the %d the brokers pass: not republished; publish a newer "
                          "version that fits", published[0], published[1], len(payload), SEND_PAYLOAD_BYTES)
                continue
            await self.link.publish(topics.TARIFF, payload, retain=True, wait_s=PUBLISH_WAIT_S)
            log.info("tariff %s v%d republished from storage, retained", published[0], published[1])

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            wait_s = 1.0
            try:
                wait_s = await self.dispatch_once()
                for request_id in self.book.phases_due(self.clock()):
                    if self.on_phase_due is not None:
                        await self.on_phase_due(request_id)
            except StoreUnavailable as exc:
                log.warning("dispatch paused: %s", exc)
            await wait_or_timeout(self._wake, wait_s)

    async def dispatch_once(self) -> float:
        """Write the first sends' marks that have settled, send what is due; returns how long to sleep before the
        next attempt (or the next mark's settling)."""
        await self.book.settle_due(self.clock())
        settle = self.book.next_settle()
        link = self.link
        if link is None or not link.connected:
            return 0.2 if settle is None else max(0.01, min(0.2, settle - self.clock()))
        await self.outbox.send_due()
        nxt = self.book.next_due()
        phase = min((p.due for p in self.book.phases.values()), default=None)
        candidates = [t for t in (nxt, phase, self.book.next_settle()) if t is not None]
        return 1.0 if not candidates else max(0.01, min(1.0, min(candidates) - self.clock()))

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            try:
                closed = await self.book.expire_due(self.clock())
                if closed:
                    log.info("%d request(s) reached their deadline", len(closed))
                self.metrics.open_requests.set(len(self.book.deadlines))
            except StoreUnavailable as exc:
                log.warning("sweep paused: %s", exc)

    async def publish_tariff(self, payload: bytes) -> None:
        """Publish the current tariff, retained, for every retailer that connects later."""
        if self.link is not None:
            try:
                await self.link.publish(topics.TARIFF, payload, retain=True)
            except MqttError as exc:
                log.warning("retained tariff not published now (%s); retailers still get it from the outbox", exc)

    async def handle(self, topic: str, payload: bytes, retained: bool) -> None:
        """Apply one message from a retailer; refuse and count anything wrong, keep serving the rest."""
        if self.replicas is not None:
            replica = topics.parse_replica(topic)
            if replica is not None:
                if replica[1] == "status":
                    await self.replicas.on_status(replica[0], payload)
                elif replica[0] == self.replicas.me:
                    await self.replicas.on_message(payload)
                return
        await self.inbound.route(topic, payload, retained)

    async def _refused(self, r: Refusal) -> None:
        """What the router did not hand on: counted, logged and answered by the hub's rules."""
        if r.reason == "topic":
            # The rate limit first (a flood of strange topics is a flood of log lines), then the log line.
            if self.limiter.take(r.party_id or "") > 0:
                self.metrics.mqtt_rejected.labels("rate_limited").inc()
                return
            self.metrics.mqtt_rejected.labels("topic").inc()
            log.warning("ignored a message on unexpected topic %s", outside(r.topic))
        elif r.reason == "kind":
            self.metrics.mqtt_rejected.labels("topic").inc()
        elif r.reason == "rate_limited":
            self.metrics.mqtt_rejected.labels("rate_limited").inc()
            log.debug("rate limit: refused a message from retailer %s", r.party_id)
            await self._reply(str(r.party_id), ErrorReply(code="invalid", message="rate limit: message refused "
                                                                                 "unread, send it again later"))
        elif r.reason == "invalid":
            self.metrics.mqtt_rejected.labels("invalid").inc()
            log.warning("refused a message from retailer %s: %s", r.party_id, outside(r.error, 300))
            await self._reply(str(r.party_id), ErrorReply(code="invalid", message=r.error))
        else:
            self.metrics.mqtt_rejected.labels("unexpected").inc()
            await self._reply(str(r.party_id), ErrorReply(
                ref_msg_id=r.msg.msg_id, code="invalid", message=f"a retailer may not send {r.msg.type!r} messages"))

    def _count_received(self, msg: Message) -> None:
        received = self._received.get(msg.type)
        if received is None:  # labels() costs more than the rest of a small message's handling: look it up once
            received = self._received[msg.type] = self.metrics.mqtt_received.labels(msg.type)
        received.inc()

    async def _presence_in(self, source: Inbound, msg: Presence) -> None:
        self._on_presence(source.party_id, msg.state)

    async def _ack_in(self, source: Inbound, msg: Ack) -> None:
        if self.replicas is not None:
            foreign = [m for m in msg.ack_ids if m not in self.book.outbox]
            if foreign:
                await self.replicas.forward_acks(source.party_id, foreign, msg.partition)
        ids = self.book.acked_by_retailer(source.party_id, msg.ack_ids, msg.partition)
        if ids:  # a partition's ack of a message other partitions have not acked yet is only recorded
            await self.acks.submit((source.party_id, ids))

    async def _outcome_in(self, source: Inbound, msg: Outcome) -> None:
        if self.replicas is not None and not await self._owned_here(source.party_id, msg, source.payload):
            return
        # Waiting for the commit keeps the MQTT-level PUBACK after it (and the broker's window as back-pressure).
        await self.outcomes.submit(_Reported.of(source.party_id, msg))

    async def _outcomes_in(self, source: Inbound, msg: Outcomes | OutcomesIn) -> None:
        reported = _Reported.of(source.party_id, msg)
        if self.replicas is not None and not await self._batch_owned_here(reported, source.payload):
            return
        await self.outcomes.submit(reported)

    async def _measurements_in(self, source: Inbound, msg: Measurements) -> None:
        await self._on_measurements(source.party_id, msg)

    async def _consent_in(self, source: Inbound, msg: ConsentQuery | ConsentDecision) -> None:
        if self.on_consent is None:
            await self._refused(Refusal("unexpected", source.topic, source.party_id, msg=msg))
            return
        for answer in await self.on_consent(source.party_id, msg):
            await self._reply(source.party_id, answer)

    async def _error_in(self, source: Inbound, msg: ErrorReply) -> None:
        log.warning("retailer %s reported an error about %s: %s", source.party_id, outside(msg.ref_msg_id),
                    outside(msg.message, 300))

    def _on_presence(self, retailer_id: str, state: str) -> None:
        """Record a retailer's presence; one coming online is re-sent what it has not acknowledged. Changes beyond
        the retailer's presence rate are ignored and counted: a flapping bridge cannot flood the dispatcher."""
        if self.presence.get(retailer_id) == state:
            return
        if self.presence_limiter.take(retailer_id) > 0:
            self.metrics.mqtt_rejected.labels("presence_rate_limited").inc()
            if retailer_id in self._presence_muted:
                log.debug("retailer %s: presence %s ignored (rate limit)", retailer_id, state)
            else:
                self._presence_muted.add(retailer_id)
                log.warning("retailer %s changes its presence too often: changes ignored (its unacknowledged "
                            "messages are re-sent on their back-off)", retailer_id)
            return
        self._presence_muted.discard(retailer_id)
        self.presence[retailer_id] = state
        self.presence_since[retailer_id] = self.clock()
        if state == "online":
            n = self.book.retailer_online(retailer_id, self.clock())
            log.info("retailer %s online: %d unacknowledged message(s) re-sent now", retailer_id, n)

    async def apply_forwarded_outcome(self, retailer_id: str, payload: bytes) -> None:
        """An outcome another replica received for a request this replica owns (read as the inbound router reads
        it: the retailer's payload, unchanged)."""
        try:
            msg = self.inbound.decode(payload)
        except WireError as exc:
            log.warning("ignored an invalid forwarded outcome of retailer %s: %s", retailer_id, outside(exc, 300))
            return
        if isinstance(msg, Outcome) and await self._owned_here(retailer_id, msg, payload, forwarded=True):
            await self.outcomes.submit(_Reported.of(retailer_id, msg))
        elif isinstance(msg, Outcomes | OutcomesIn):
            reported = _Reported.of(retailer_id, msg)
            if await self._batch_owned_here(reported, payload, forwarded=True):
                await self.outcomes.submit(reported)

    async def _batch_owned_here(self, reported: _Reported, payload: bytes, forwarded: bool = False) -> bool:
        """:meth:`_owned_here` for an ``outcomes`` message, decided once for its request (one owner per request):
        forwarded whole to a live owner; otherwise applied here, where the book holds (unanswered) the reports for
        a request another replica owns and refuses the others, as it does for single outcomes."""
        assert self.replicas is not None
        if not reported.reports:
            return True  # nothing to apply: only refusals, answered here
        msg = reported.msg
        try:
            _, owner = await self.book.route(msg.request_id, reported.reports[0].client_id)
        except StoreUnavailable as exc:
            log.debug("outcomes for %s held, storage unavailable: %s", outside(msg.request_id), exc)
            self.metrics.replica_held.inc(len(reported.reports))
            return False
        if (not forwarded and owner is not None and owner != self.replicas.me and self.replicas.is_live(owner)):
            await self._forward(owner, reported.retailer_id, msg, payload)
            return False
        return True

    async def _owned_here(self, retailer_id: str, msg: Outcome, payload: bytes, forwarded: bool = False) -> bool:
        """With replicas: whether this replica owns the outcome's request and has loaded its book, so that it may
        apply the outcome (only the owner writes the request's row). Otherwise the outcome is forwarded to a live
        owner, or held: not acknowledged, so that the retailer sends it again once the owner is back or a survivor
        has adopted the request. An outcome naming no such request and client is applied here, where the group
        commit refuses it with its error answer, and so is one for another retailer's client (neutral: held, it would
        be answered differently from an unknown one)."""
        assert self.replicas is not None
        try:
            addressed, owner = await self.book.route(msg.request_id, msg.client_id)
        except StoreUnavailable as exc:
            log.debug("outcome for %s held, storage unavailable: %s", outside(msg.request_id), exc)
            self.metrics.replica_held.inc()
            return False
        if (addressed is None or not self._may_report(retailer_id, addressed)
                or (owner == self.replicas.me and self.replicas.ready.is_set())):
            return True  # a refusal is answered here and now, the same whether the pair exists or not
        if not forwarded and owner is not None and owner != self.replicas.me and self.replicas.is_live(owner):
            await self._forward(owner, retailer_id, msg, payload)
        else:
            self.metrics.replica_held.inc()
        return False

    async def _forward(self, owner: str, retailer_id: str, msg: Outcome | Outcomes | OutcomesIn,
                       payload: bytes) -> None:
        """Forward a retailer's outcome(s) to the replica that owns the request. One too big to forward (over
        :data:`~mhp_wire.messages.BRIDGE_OUTCOME_BYTES`: a bridge of an earlier release, which split only at 256 KiB of
        payload, or another retailer's own) is held, as for an owner away: not acknowledged, so the
        retailer sends it again, and a copy that lands on the owner (the shared subscription takes turns) is applied
        there. It is counted (``too_big_to_forward``), logged, and the retailer told by an ``error`` without
        ``ref_msg_id`` (one naming it would make the bridge drop it: its outcomes lost; docs/decisions.md, "An
        outcome forwarded between hub replicas fits the packet")."""
        assert self.replicas is not None
        try:
            await self.replicas.forward_outcome(owner, retailer_id, payload)
        except TooBigToForward as exc:
            self.metrics.mqtt_rejected.labels("too_big_to_forward").inc()
            self.metrics.replica_held.inc()
            log.warning("held retailer %s's %s %s for request %s, owned by replica %s: %s", retailer_id, msg.type,
                        outside(msg.msg_id), outside(msg.request_id), owner, exc)
            await self._reply(retailer_id, ErrorReply(code="invalid", message=(
                f"message {msg.msg_id} held, not acknowledged: {exc}")))

    async def _commit_acks(self, batch: list[tuple[str, list[str]]]) -> None:
        """Apply retailers' acks in one group commit; when storage is unavailable the messages stay in the outbox
        and are sent again (the retailer acknowledges them again)."""
        try:
            await self.book.on_acks(batch)
        except StoreUnavailable as exc:
            log.warning("%d ack(s) not applied now (the messages will be sent again): %s", len(batch), exc)

    async def _commit_outcomes(self, batch: list[_Reported]) -> None:
        """Store outcomes in one group commit; then each retailer gets one ``ack`` naming all of its messages of
        the commit. When storage is unavailable nothing is acknowledged, so the bridges re-send them."""
        try:
            await self._commit_batch(batch)
        except StoreUnavailable as exc:
            log.warning("%d outcome message(s) not stored, so not acknowledged (their senders re-send them): %s",
                        len(batch), exc)
        except Exception:
            if len(batch) == 1:
                raise
            # Something in one outcome broke the whole commit: apply them one by one, so that it fails alone
            # (unacknowledged) and the rest of the batch, from every retailer, goes through.
            log.exception("a group commit of %d outcome messages failed; applying them one by one", len(batch))
            for item in batch:
                await self._commit_outcomes([item])

    @staticmethod
    def _may_report(retailer_id: str, addressed: list[str]) -> bool:
        """The authorization of one outcome, asked by the book before the outcome changes anything."""
        return _report_decision(retailer_id, tuple(addressed)).allowed

    async def _commit_batch(self, batch: list[_Reported]) -> None:
        if self.replicas is not None and not self.replicas.ready.is_set():
            # This replica lost the broker and is joining again since the outcomes were queued: not its to apply
            # now (unacknowledged, they come again).
            self.metrics.replica_held.inc(sum(len(item.reports) for item in batch))
            return
        flat = [r for item in batch for r in item.reports]
        verdicts = await self.book.apply(flat, self._may_report)
        self.metrics.outcome_batch_size.observe(len(flat))
        acks: dict[str, list[str]] = {}
        refused: list[tuple[_Reported, ReportedOutcome, str]] = []
        answers: list[tuple[str, ErrorReply]] = []
        at = 0
        for item in batch:
            held, item_refused = self._judge(item, verdicts[at:at + len(item.reports)])
            at += len(item.reports)
            refused.extend((item, report, reason) for _, report, reason in item_refused)
            answers.extend((item.retailer_id, answer) for answer in self._answers(item, held, item_refused))
            if not held and (isinstance(item.msg, Outcomes | OutcomesIn) or not item_refused):
                acks.setdefault(item.retailer_id, []).append(item.msg.msg_id)
        if refused:
            # In the data access log before anyone is answered (if it cannot be written, nothing of the batch is
            # acknowledged and the retailers send it again).
            await self.book.store.audit([
                AuditEntry(f"retailer:{item.retailer_id}", report.client_id, Action.REPORT_OUTCOME.value, "none",
                           False, report.request_id) for item, report, _ in refused])
        for retailer_id, answer in answers:
            if answer.code == "forbidden":
                self.metrics.mqtt_rejected.labels("forbidden").inc()
            await self._reply(retailer_id, answer)
        for retailer_id, ids in acks.items():
            for i in range(0, len(ids), ACK_IDS_MAX):
                await self._reply(retailer_id, Ack(ack_ids=ids[i:i + ACK_IDS_MAX]))

    def _judge(self, item: _Reported, verdicts: list[OutcomeVerdict]
               ) -> tuple[bool, list[tuple[int, ReportedOutcome, str]]]:
        """Whether some of ``item`` is held (another replica's request), and its refused reports with why."""
        held = False
        item_refused: list[tuple[int, ReportedOutcome, str]] = []
        retailer_id = item.retailer_id
        for pos, report, v in zip(item.positions, item.reports, verdicts, strict=True):
            if v.held:
                self.metrics.replica_held.inc()
                held = True
                continue
            if v.refused_claim is not None:
                self.metrics.claims_refused.inc()
                if self._claims_logged.first((retailer_id, report.client_id)):
                    log.warning("retailer %s claimed %s kW available for client %s, more than its contracted "
                                "power (%s kW): not believed (logged once per client, counted in "
                                "mhp_claims_refused)", retailer_id, f"{v.refused_claim[0]:g}",
                                report.client_id, f"{v.refused_claim[1]:g}")
            if v.superseded:
                self.metrics.outcomes_superseded.inc()
                log.info("request %s client %s: unreachable replaced by the home's own outcome %s (retailer %s)",
                         outside(report.request_id), outside(report.client_id), report.state.value, retailer_id)
            # Applied: the book asked the same decision (``book.apply(flat, self._may_report)`` in
            # ``_commit_batch``, which is ``_report_decision(...).allowed``) before it changed anything. Give the
            # book another check and this skip must go.
            if v.changed:
                continue
            verdict = _report_decision(retailer_id, tuple(v.addressed))
            if v.known and verdict.allowed:
                continue
            item_refused.append((pos, report, verdict.reason))
            log.warning("refused an outcome from retailer %s for request %s client %s: %s", retailer_id,
                        outside(report.request_id), outside(report.client_id),
                        verdict.reason if v.known else "no such request and client")
        return held, item_refused

    def _answers(self, item: _Reported, held: bool, item_refused: list[tuple[int, ReportedOutcome, str]]
                 ) -> list[ErrorReply]:
        """The refusals of ``item``'s bad reports and entries."""
        msg = item.msg
        if isinstance(msg, Outcome):
            # Neutral: one answer, code and text, whether the request and client exist or were addressed to
            # another retailer; only the log above and the data access log tell them apart.
            return [ErrorReply(ref_msg_id=msg.msg_id, code="forbidden", message=reason)
                    for _, _, reason in item_refused]
        # An ``outcomes`` message: each bad entry is refused alone, naming it; the message is acknowledged once all
        # of it is handled. While some of it is held (another replica's request), the refusals name no message (a
        # bridge drops a message it is refused) and nothing is acknowledged: it comes again.
        ref = None if held else msg.msg_id
        answers = [ErrorReply(ref_msg_id=ref, code="forbidden",
                              message=outside(f"outcomes entry {pos} (client {report.client_id}): {reason}", 1900))
                   for pos, report, reason in item_refused]
        if item.invalid:
            self.metrics.mqtt_rejected.labels("invalid").inc(len(item.invalid))
            log.warning("refused %d invalid entries of an outcomes message from retailer %s", len(item.invalid),
                        item.retailer_id)
        answers.extend(ErrorReply(ref_msg_id=ref, code="invalid", message=f"outcomes entry {pos}: {why}")
                       for pos, why in item.invalid)
        return answers

    async def _on_measurements(self, retailer_id: str, msg: Measurements) -> None:
        if self.on_measurements is None:
            return
        refused = await self.on_measurements(retailer_id, msg)
        if refused:
            self.metrics.mqtt_rejected.labels("forbidden").inc(len(refused))
            log.warning("refused measurements from retailer %s for %s", retailer_id, ", ".join(refused[:10]))
            await self._reply(retailer_id, ErrorReply(
                ref_msg_id=msg.msg_id, code="forbidden",
                message=f"not your client(s) at that time: {', '.join(refused[:20])}; the others were stored"))
        await self._reply(retailer_id, Ack(ack_ids=[msg.msg_id]))

    async def _reply(self, retailer_id: str, msg: Ack | ErrorReply | ConsentView) -> None:
        if self.link is None:
            return
        try:
            await self.link.publish(topics.down("retailers", retailer_id), encode(msg), qos=publish_qos(msg),
                                    wait_s=PUBLISH_WAIT_S)
        except MqttError as exc:
            log.warning("could not answer retailer %s: %s", retailer_id, exc)


@functools.lru_cache(maxsize=4096)
def _report_decision(retailer_id: str, addressed: tuple[str, ...]) -> Decision:
    """:func:`~cloud_hub.authz.decide` on a retailer reporting an outcome for a client addressed to ``addressed``:
    pure, so its answer is kept per pair (a few retailers, a few combinations) instead of building the principal
    and context again for each of thousands of outcomes a second (it was a third of applying one)."""
    return decide(Principal("retailer", retailer_id), Action.REPORT_OUTCOME, Context(addressed_retailers=addressed))


class _BookOutbox:
    """The request book's outbox (in memory, stored in each request's row) as an :class:`OutboxStorage`."""

    def __init__(self, relay: HubRelay) -> None:
        self.relay = relay

    async def due(self, now: float, limit: int) -> list[Pending]:
        return [Pending(i.msg_id, topics.down("retailers", i.retailer_id), i.payload, i.attempts, row=i)
                for i in self.relay.book.due(now, limit)]

    async def sent(self, sent: Sequence[tuple[Pending, float]], dropped: Sequence[Pending], now: float) -> None:
        items: list[OutboxItem] = [p.row for p, _ in sent]
        if not items:
            return
        if self.relay.on_published is not None:
            await self.relay.on_published(items)
        await self.relay.book.mark_sent(items, now, [at for _, at in sent])

    async def parked(self, parked: Sequence[tuple[Pending, float, PacketTooLarge]], now: float) -> None:
        """Messages over the hub broker's packet (the book's guards keep its own under it): not sent, so neither
        recorded as sent (targets, audit, ``on_published``) nor counted as an attempt; they stay in the book, out
        of the rounds until the next connection (in memory: a restart tries them again too). Logged by the
        outbox, counted in ``mhp_outbox_parked``."""
        for p, _, _ in parked:
            item: OutboxItem = p.row
            item.next_at = math.inf
            self.relay.parked[item.msg_id] = item
        self.relay.metrics.outbox_parked.inc(len(parked))
