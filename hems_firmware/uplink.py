"""The gateway's uplink: MQTT to its retailer's bridge.

It owns the link, the dispatch of the bridge's messages by type (the commands, cancels and schedules go to the
handlers the daemon gives it; acknowledgements and error answers it applies to the outboxes itself), the answers
it sends (``ack``, ``error``) and the two stored outboxes (outcomes, telemetry), re-sent on the shared back-off
until the bridge acknowledges them. A command's ``ack`` is held briefly (``ack_hold_s``): an outcome of it stored
meanwhile stands for it (:class:`hems_firmware.controller.AckHold`). It decides nothing about the home.
May import: :mod:`mhp_wire` (topics, messages, the MQTT link, the outbox and router cores),
:mod:`hems_firmware.store`, :mod:`hems_firmware.config` and the pure :class:`~hems_firmware.controller.AckHold`;
never the control loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Literal

from hems_firmware.config import Uplink as UplinkSettings
from hems_firmware.controller import AckHold
from hems_firmware.store import GatewayStore, OutcomeTable, TelemetryTable
from mhp_wire import topics
from mhp_wire.backoff import delay_s
from mhp_wire.logsafe import outside
from mhp_wire.messages import (
    GATEWAY_OUTCOME_BYTES,
    Ack,
    ErrorReply,
    Outcome,
    Tariff,
    Telemetry,
    WireError,
    decode,
    encode,
    oversize_detail,
    publish_qos,
)
from mhp_wire.mqtt import MqttEndpoint, MqttError, MqttLink
from mhp_wire.outbox import Outbox
from mhp_wire.process import wait_or_timeout
from mhp_wire.router import TypeTable
from mhp_wire.sqlite import StorageError

log = logging.getLogger("hems_firmware.daemon")
"""The gateway's one log (operators filter on it), whichever of its modules writes."""
OUTBOX_ROUND = 10_000
"""Outcomes read and sent per outbox round (a gateway holds a handful; the bound only keeps one read small)."""
TELEMETRY_ROUND = 500
"""Buffered telemetry reports sent per round."""


class Uplink:
    """The link to the bridge of gateway ``gateway_id``; ``handlers`` take the bridge's other message types and
    ``on_tariff`` the tariffs published to every party."""

    def __init__(self, cfg: UplinkSettings, gateway_id: str, store: GatewayStore,
                 handlers: Mapping[type, Callable[[Any], Awaitable[None]]],
                 on_tariff: Callable[[Tariff], None], newest_seq: Callable[[], int], *, ack_hold_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.id = gateway_id
        self.store = store
        self.on_tariff = on_tariff
        self.link: MqttLink | None = None
        self.rejected = 0
        """Messages refused: undecodable, of a type a gateway does not handle, for another client, stale."""
        self.oversize = 0
        """Outcomes whose detail was cut to fit :data:`~mhp_wire.messages.GATEWAY_OUTCOME_BYTES` (:meth:`fitted`)."""
        self.from_bridge = TypeTable({**handlers, Ack: self._on_ack, ErrorReply: self._on_error})
        """The bridge's messages on our ``down`` topic, by type."""
        self._wake = asyncio.Event()
        self.clock = clock
        """Monotonic seconds: when a held ack is due (the daemon's clock)."""
        self.acks = AckHold(ack_hold_s)
        """Commands' acks held until their outcome stands for them, or the hold ends (:meth:`hold_ack`)."""
        self._acks_due = asyncio.Event()
        self.outbox = Outbox(OutcomeTable(store, topics.up("gateways", gateway_id)), self._publish,
                             limit=OUTBOX_ROUND, retry_s=lambda n: delay_s(n, 0.5))
        """Outcomes (and other answers) to the bridge, stored, re-sent until the bridge acknowledges them."""
        self.telemetry_outbox = Outbox(TelemetryTable(store, topics.telemetry(gateway_id), newest_seq),
                                       self._publish, limit=TELEMETRY_ROUND, retry_s=lambda n: delay_s(n, 2.0))
        """Buffered telemetry, in order, re-sent until acknowledged (the newest retained)."""

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.connected

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[MqttLink]:
        """Open the link (it reconnects by itself until closed) for the duration of the block."""
        up = self.cfg
        link = MqttLink(
            MqttEndpoint(up.host, up.port, up.username or self.id, up.password, up.tls_ca_file),
            client_id=self.id,
            subscriptions=[topics.down("gateways", self.id), topics.PUBLIC_ALL],
            handler=self.on_message, status_topic=topics.status("gateways", self.id),
            connect_timeout_s=None,
        )
        async with link:
            self.link = link
            yield link

    # -- inbound --------------------------------------------------------------------------------------------

    async def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """Apply one message from the bridge (or a public one)."""
        public = topic.startswith(topics.PREFIX + "/public/")
        try:
            msg = decode(payload)
        except WireError as exc:
            self.rejected += 1
            log.warning("gateway %s refused a message: %s", self.id, outside(exc, 300))
            if not public:
                await self.send(ErrorReply(code="invalid", message=str(exc)))
            return
        if public:
            if isinstance(msg, Tariff):
                self.on_tariff(msg)
            return
        if not await self.from_bridge.dispatch(msg):
            await self.refuse(msg.msg_id, "invalid", f"a gateway does not handle {msg.type!r} messages")

    async def _on_ack(self, msg: Ack) -> None:
        await self.store.drop_acknowledged(msg.ack_ids)

    async def _on_error(self, msg: ErrorReply) -> None:
        log.warning("the bridge refused %s: %s", outside(msg.ref_msg_id), outside(msg.message, 300))
        if msg.ref_msg_id:
            await self.store.drop_outcome(msg.ref_msg_id)

    # -- outbound -------------------------------------------------------------------------------------------

    async def send(self, msg: Ack | ErrorReply) -> None:
        """Send an answer now, once (lost if the link is down: the bridge sends its message again)."""
        if self.link is not None:
            with contextlib.suppress(MqttError):
                await self.link.publish(topics.up("gateways", self.id), encode(msg), qos=publish_qos(msg))

    async def acknowledge(self, msg_id: str) -> None:
        await self.send(Ack(ack_ids=[msg_id]))

    async def hold_ack(self, msg_id: str, request_id: str, revision: int) -> None:
        """Acknowledge a stored command (revision ``revision`` of ``request_id``) at the end of the hold
        (settings ``ack_hold_s``) unless its outcome is stored before (:meth:`report`, :meth:`put_outcome`): the
        outcome then stands for the ack. Without a hold, at once."""
        if self.acks.hold(msg_id, request_id, revision, self.clock()):
            self._acks_due.set()
        else:
            await self.acknowledge(msg_id)

    async def answered_ack(self, msg_id: str) -> None:
        """A command whose outcome is already stored (:meth:`put_outcome`): with a hold, that outcome stands for
        its ack and nothing else is sent; without one (``ack_hold_s`` 0), the ack goes at once, as before."""
        if self.acks.hold_s <= 0:
            await self.acknowledge(msg_id)

    def _answered(self, out: Outcome) -> None:
        """``out`` is stored in the outbox: the held acks of the command it answers are not sent."""
        if out.state.terminal:
            self.acks.answered(out.request_id, out.revision)

    async def ack_loop(self) -> None:
        """Send the held acks whose hold has ended (in one ``ack``), until cancelled.

        The holds are judged on the injected clock (``clock``), but the loop sleeps on the event loop's clock until
        the next hold's end as the injected clock saw it then: that clock must advance in real time (a monotonic
        clock does). A clock moved by hand is looked at again within ``ack_hold_s`` of real time at most (the wait
        is never longer than the hold), or at once when a new ack is held."""
        while True:
            self._acks_due.clear()
            due = self.acks.due(self.clock())
            if due:
                await self.send(Ack(ack_ids=due))
            nxt = self.acks.next_at()
            await wait_or_timeout(self._acks_due, 3600.0 if nxt is None else max(0.0, nxt - self.clock()))

    async def refuse(self, ref_msg_id: str | None, code: Literal["invalid", "forbidden", "stale_revision"],
                     message: str) -> None:
        """Count a refused message and tell the bridge why."""
        self.rejected += 1
        await self.send(ErrorReply(ref_msg_id=ref_msg_id, code=code, message=message))

    @staticmethod
    def fitted(out: Outcome) -> tuple[Outcome, bytes, int | None]:
        """``out`` and its payload, or, when it is over :data:`~mhp_wire.messages.GATEWAY_OUTCOME_BYTES`, ``out`` with
        its detail cut to a marker (:func:`~mhp_wire.messages.oversize_detail`) and its whole size: sent whole it
        would not fit the retailer broker's packet once its bridge adds its trace (or at all), and the broker would
        cut this link at each reconnection, for good; cut, its state still reaches the hub. The payload is what the
        store writes (encoded once)."""
        payload = encode(out)
        if len(payload) <= GATEWAY_OUTCOME_BYTES:
            return out, payload, None
        cut = out.model_copy(update={"detail": oversize_detail(out.detail, len(payload), GATEWAY_OUTCOME_BYTES,
                                                               "gateway")})
        return cut, encode(cut), len(payload)

    def _cut(self, out: Outcome, size: int | None) -> None:
        """Count and log an outcome stored with its detail cut (:meth:`fitted`)."""
        if size is None:
            return
        self.oversize += 1
        log.warning("gateway %s: the outcome of request %s (%s) is %d bytes, over the %d an outcome may take: sent "
                    "with its detail cut to its small fields and an 'oversize' marker", self.id,
                    outside(out.request_id), out.state.value, size, GATEWAY_OUTCOME_BYTES)

    async def report(self, out: Outcome) -> bool:
        """Store a stored command's outcome in the outbox (once per revision, see
        :meth:`GatewayStore.report`), :meth:`fitted`; returns whether it was stored (a cut one counted only then)."""
        out, payload, size = self.fitted(out)
        stored = await self.store.report(out, payload)
        if stored:
            self._cut(out, size)
            self._answered(out)
            self._wake.set()
        return stored

    async def put_outcome(self, out: Outcome) -> None:
        """Store an outcome that answers no stored command (one refused on arrival) in the outbox, :meth:`fitted`."""
        out, payload, size = self.fitted(out)
        await self.store.put_outcome(out, payload)
        self._cut(out, size)
        self._answered(out)
        self._wake.set()

    async def put_telemetry(self, msg: Telemetry, keep: int) -> None:
        """Buffer one telemetry report (the newest ``keep`` are kept) for the outbox loop to send."""
        await self.store.put_telemetry(msg, keep)
        self._wake.set()

    async def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        if self.link is None:
            raise MqttError("the uplink is not open")
        await self.link.publish(topic, payload, retain=retain)

    async def outbox_loop(self) -> None:
        """Send what is due in both outboxes, when woken or every half second, until cancelled."""
        while True:
            self._wake.clear()
            try:
                await self.outbox.send_due()
                await self.telemetry_outbox.send_due()
            except StorageError as exc:
                log.error("gateway %s outbox paused: %s", self.id, exc)
            await wait_or_timeout(self._wake, 0.5)
