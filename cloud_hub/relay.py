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
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from cloud_hub.authz import Action, Context, Principal, decide
from cloud_hub.book import RequestBook
from cloud_hub.metrics import HubMetrics
from cloud_hub.replicas import Replicas
from cloud_hub.storage import StoreUnavailable
from mhp_wire import topics
from mhp_wire.messages import Ack, ErrorReply, Measurements, Outcome, WireError, decode, encode
from mhp_wire.mqtt import MqttError, MqttLink
from mhp_wire.process import wait_or_timeout
from mhp_wire.ratelimit import RateLimiter

log = logging.getLogger(__name__)


class HubRelay:
    """Dispatches the outbox and applies what retailers send back."""

    def __init__(self, book: RequestBook, metrics: HubMetrics, *, sweep_interval_s: float = 0.25) -> None:
        self.book = book
        self.metrics = metrics
        self.link: MqttLink | None = None
        self._wake = asyncio.Event()
        self._sweep_interval_s = sweep_interval_s
        self.presence: dict[str, str] = {}
        self.on_measurements: Callable[[str, Measurements], Awaitable[list[str]]] | None = None
        self.on_phase_due: Callable[[str], Awaitable[None]] | None = None
        self.limiter = RateLimiter(200.0, 400)
        """One token bucket per retailer: messages beyond it are refused (unread) with an error answer."""
        self.replicas: Replicas | None = None
        """Set when the hub runs as several replicas."""
        book.kick = self.kick

    def use_replicas(self, replicas: Replicas) -> None:
        """Run as one of several replicas: forward what another replica owns, apply what they forward."""
        self.replicas = replicas
        replicas.on_outcome = self.apply_forwarded_outcome

    def kick(self) -> None:
        """Wake the dispatcher: a message is due."""
        self._wake.set()

    async def run(self) -> None:
        """Dispatch and sweep until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._dispatch_loop(), name="hub-dispatch")
            tg.create_task(self._sweep_loop(), name="hub-sweep")

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            wait_s = 1.0
            try:
                wait_s = await self.dispatch_once()
                for request_id in self.book.phases_due(time.time()):
                    if self.on_phase_due is not None:
                        await self.on_phase_due(request_id)
            except StoreUnavailable as exc:
                log.warning("dispatch paused: %s", exc)
            await wait_or_timeout(self._wake, wait_s)

    async def dispatch_once(self) -> float:
        """Send what is due; returns how long to sleep before the next attempt."""
        link = self.link
        now = time.time()
        if link is None or not link.connected:
            return 0.2
        sent = []
        for item in self.book.due(now):
            try:
                await link.publish(topics.down("retailers", item.retailer_id), item.payload)
            except MqttError as exc:
                log.warning("outbox send paused: %s", exc)
                break
            self.metrics.outbox_sent.inc()
            sent.append(item)
        if sent:
            await self.book.mark_sent(sent, now)
        nxt = self.book.next_due()
        phase = min((p.due for p in self.book.phases.values()), default=None)
        candidates = [t for t in (nxt, phase) if t is not None]
        return 1.0 if not candidates else max(0.01, min(1.0, min(candidates) - time.time()))

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            try:
                closed = await self.book.expire_due(time.time())
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
        try:
            parsed = topics.parse_up(topic)
        except topics.TopicError:
            self.metrics.mqtt_rejected.labels("topic").inc()
            log.warning("ignored a message on unexpected topic %s", topic)
            return
        if parsed.kind != "retailers":
            self.metrics.mqtt_rejected.labels("topic").inc()
            return
        retailer_id = parsed.party_id
        if self.limiter.take(retailer_id) > 0:
            self.metrics.mqtt_rejected.labels("rate_limited").inc()
            log.debug("rate limit: refused a message from retailer %s", retailer_id)
            await self._reply(retailer_id, ErrorReply(code="invalid", message="rate limit: message refused unread, "
                                                                               "send it again later"))
            return
        try:
            msg = decode(payload)
        except WireError as exc:
            self.metrics.mqtt_rejected.labels("invalid").inc()
            log.warning("refused a message from retailer %s: %s", retailer_id, exc)
            await self._reply(retailer_id, ErrorReply(code="invalid", message=str(exc)))
            return
        self.metrics.mqtt_received.labels(msg.type).inc()
        if parsed.channel == "status":
            if msg.type == "presence":
                before = self.presence.get(retailer_id)
                self.presence[retailer_id] = msg.state
                if msg.state == "online" and before != "online":
                    n = self.book.retailer_online(retailer_id)
                    log.info("retailer %s online: %d unacknowledged message(s) re-sent now", retailer_id, n)
            return
        if isinstance(msg, Ack):
            if self.replicas is not None:
                foreign = [m for m in msg.ack_ids if m not in self.book.outbox]
                if foreign:
                    await self.replicas.forward_acks(retailer_id, foreign)
            await self.book.on_ack(retailer_id, msg.ack_ids)
        elif isinstance(msg, Outcome):
            await self._on_outcome(retailer_id, msg, payload)
        elif isinstance(msg, Measurements):
            await self._on_measurements(retailer_id, msg)
        elif isinstance(msg, ErrorReply):
            log.warning("retailer %s reported an error about %s: %s", retailer_id, msg.ref_msg_id, msg.message)
        else:
            self.metrics.mqtt_rejected.labels("unexpected").inc()
            await self._reply(retailer_id, ErrorReply(
                ref_msg_id=msg.msg_id, code="invalid", message=f"a retailer may not send {msg.type!r} messages"))

    async def apply_forwarded_outcome(self, retailer_id: str, payload: bytes) -> None:
        """An outcome another replica received for a request this replica owns."""
        try:
            msg = decode(payload)
        except WireError as exc:
            log.warning("ignored an invalid forwarded outcome of retailer %s: %s", retailer_id, exc)
            return
        if isinstance(msg, Outcome):
            await self._on_outcome(retailer_id, msg, payload, forwarded=True)

    async def _on_outcome(self, retailer_id: str, msg: Outcome, payload: bytes, forwarded: bool = False) -> None:
        owner = None
        if self.replicas is None:
            addressed = await self.book.addressed(msg.request_id, msg.client_id)
        else:
            addressed, owner = await self.book.route(msg.request_id, msg.client_id)
        verdict = decide(Principal("retailer", retailer_id), Action.REPORT_OUTCOME,
                         Context(addressed_retailers=tuple(addressed or ())))
        if not verdict.allowed:
            reason: Literal["unknown_client", "forbidden"] = "unknown_client" if addressed is None else "forbidden"
            self.metrics.mqtt_rejected.labels(reason).inc()
            log.warning("refused an outcome from retailer %s for request %s client %s: %s",
                        retailer_id, msg.request_id, msg.client_id, verdict.reason)
            text = (verdict.reason if addressed is not None
                    else f"request {msg.request_id} has no client {msg.client_id}")
            await self._reply(retailer_id, ErrorReply(ref_msg_id=msg.msg_id, code=reason, message=text))
            return
        if self.replicas is not None and (owner != self.replicas.me or not self.replicas.ready.is_set()):
            # Only the owner writes the request's row, once it has loaded its book. Not acknowledged here: the owner
            # acknowledges it, or, while the owner is offline or joining (until it has loaded its requests, or a
            # survivor has adopted them), the retailer sends it again.
            if not forwarded and owner != self.replicas.me and self.replicas.is_live(owner) and owner is not None:
                await self.replicas.forward_outcome(owner, retailer_id, payload)
            else:
                self.metrics.replica_held.inc()
            return
        await self.book.on_outcome(retailer_id, msg.request_id, msg.client_id, msg.state, msg.detail, msg.trace)
        await self._reply(retailer_id, Ack(ack_ids=[msg.msg_id]))

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

    async def _reply(self, retailer_id: str, msg: Ack | ErrorReply) -> None:
        if self.link is None:
            return
        try:
            await self.link.publish(topics.down("retailers", retailer_id), encode(msg))
        except MqttError as exc:
            log.warning("could not answer retailer %s: %s", retailer_id, exc)
