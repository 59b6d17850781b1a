"""The hub's MQTT side: a stored outbox re-sent until each retailer acknowledges it, and outcomes coming back.

Zero loss does not come from the broker (its persistence is a snapshot, ``reference/delivery.md``): a request
message stays in the hub's outbox, and is re-sent with back-off, until the retailer's bridge answers with an
application-level ``ack``. Outcomes are acknowledged only after they are committed, so the bridge re-sends them
until then. Every incoming message is checked against the retailer the topic (and so the broker ACL) names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Literal, TypeVar

from cloud_hub.authz import Action, Context, Principal, decide
from cloud_hub.lifecycle import retry_delay_s
from cloud_hub.metrics import HubMetrics
from cloud_hub.store import HubStore, StoreUnavailable
from mhp_wire import topics
from mhp_wire.messages import Ack, ErrorReply, Outcome, WireError, decode, encode
from mhp_wire.mqtt import MqttError, MqttLink

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")


class BoundedDict(OrderedDict[K, V]):
    """A dict that forgets its oldest entries beyond ``limit`` (in-memory figures that must not grow forever)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        while len(self) > self.limit:
            self.popitem(last=False)


class HubRelay:
    """Dispatches the outbox and applies what retailers send back."""

    def __init__(self, store: HubStore, metrics: HubMetrics, *, sweep_interval_s: float = 0.5) -> None:
        self.store = store
        self.metrics = metrics
        self.link: MqttLink | None = None
        self._wake = asyncio.Event()
        self._sweep_interval_s = sweep_interval_s
        self.storage_ms: BoundedDict[str, float] = BoundedDict(20_000)
        self.presence: dict[str, str] = {}

    def kick(self) -> None:
        """Wake the dispatcher: a new message is in the outbox."""
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
            except StoreUnavailable as exc:
                log.warning("dispatch paused: %s", exc)
            try:
                await asyncio.wait_for(self._wake.wait(), wait_s)
            except TimeoutError:
                pass

    async def dispatch_once(self) -> float:
        """Send what is due; returns how long to sleep before the next attempt."""
        link = self.link
        now = time.time()
        if link is None or not link.connected:
            return 0.2
        sent: list[tuple[str, str, str, float]] = []
        for row in await self.store.due_outbox(now):
            try:
                await link.publish(topics.down("retailers", row["retailer_id"]), row["payload"])
            except MqttError as exc:
                log.warning("outbox send paused: %s", exc)
                break
            self.metrics.outbox_sent.inc()
            sent.append((row["msg_id"], row["request_id"], row["retailer_id"],
                         now + retry_delay_s(row["attempts"] + 1)))
        if sent:
            await self.store.mark_sent(sent, now)
        nxt = await self.store.next_outbox_due()
        if nxt is None:
            return 1.0
        return max(0.01, min(1.0, nxt - time.time()))

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            try:
                changed = await self.store.expire_due(time.time())
                if changed:
                    log.info("%d request(s) reached their deadline", len(changed))
                self.metrics.open_requests.set(await self.store.open_request_count())
            except StoreUnavailable as exc:
                log.warning("sweep paused: %s", exc)

    async def handle(self, topic: str, payload: bytes, retained: bool) -> None:
        """Apply one message from a retailer; refuse and count anything wrong, keep serving the rest."""
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
                self.presence[retailer_id] = msg.state
            return
        if isinstance(msg, Ack):
            await self.store.ack_outbox(retailer_id, msg.ack_ids)
        elif isinstance(msg, Outcome):
            await self._on_outcome(retailer_id, msg)
        elif isinstance(msg, ErrorReply):
            log.warning("retailer %s reported an error about %s: %s", retailer_id, msg.ref_msg_id, msg.message)
        else:
            self.metrics.mqtt_rejected.labels("unexpected").inc()
            await self._reply(retailer_id, ErrorReply(
                ref_msg_id=msg.msg_id, code="invalid", message=f"a retailer may not send {msg.type!r} messages"))

    async def _on_outcome(self, retailer_id: str, msg: Outcome) -> None:
        addressed = await self.store.addressed_retailer(msg.request_id, msg.client_id)
        verdict = decide(Principal("retailer", retailer_id), Action.REPORT_OUTCOME,
                         Context(addressed_retailer=addressed))
        if not verdict.allowed:
            reason: Literal["unknown_client", "forbidden"] = "unknown_client" if addressed is None else "forbidden"
            self.metrics.mqtt_rejected.labels(reason).inc()
            log.warning("refused an outcome from retailer %s for request %s client %s: %s",
                        retailer_id, msg.request_id, msg.client_id, verdict.reason)
            text = verdict.reason if addressed else f"request {msg.request_id} has no client {msg.client_id}"
            await self._reply(retailer_id, ErrorReply(ref_msg_id=msg.msg_id, code=reason, message=text))
            return
        result = await self.store.record_outcome(
            msg.request_id, msg.client_id, retailer_id, msg.state, msg.detail, msg.trace, time.time()
        )
        if result.request_state is not None and result.request_state.terminal and result.changed:
            self.metrics.requests_finished.labels("emergency", result.request_state.value).inc()
        await self._reply(retailer_id, Ack(ack_ids=[msg.msg_id]))

    async def _reply(self, retailer_id: str, msg: Ack | ErrorReply) -> None:
        if self.link is None:
            return
        try:
            await self.link.publish(topics.down("retailers", retailer_id), encode(msg))
        except MqttError as exc:
            log.warning("could not answer retailer %s: %s", retailer_id, exc)
