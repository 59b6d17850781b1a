"""The bridge's relay: hub requests become gateway commands, gateway outcomes go back to the hub.

Both directions use stored outboxes and application-level acknowledgements (``reference/delivery.md``): a hub
request is acknowledged to the hub only once its commands are committed; a command is re-sent until its gateway
acknowledges it, and reported ``unreachable`` when the gateway stays silent past ``gateway_ack_timeout_s``; an
outcome is re-sent to the hub until the hub acknowledges it. A gateway may only report for its own client.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from mhp_wire import fastwire, topics
from mhp_wire.backoff import RoundTrip, delay_s
from mhp_wire.fastwire import AckIn, AckStamp, CommandTemplate, OutcomeIn, Report
from mhp_wire.groupcommit import Failed, GroupCommit
from mhp_wire.ids import msg_ids
from mhp_wire.logsafe import Once, outside
from mhp_wire.messages import (
    ACK_QOS,
    BRIDGE_OUTCOME_BYTES,
    BRIDGE_TRACE_KEYS,
    Ack,
    AckPartition,
    BillingData,
    Cancel,
    ClientState,
    Command,
    ConsentView,
    Customers,
    ErrorReply,
    Measurement,
    Message,
    Outcome,
    Presence,
    Request,
    RequestKind,
    Schedule,
    Tariff,
    Telemetry,
    WireError,
    decode,
    encode,
    measurements_payloads,
    publish_qos,
    tariff_msg_id,
)
from mhp_wire.mqtt import MqttError, MqttLink, PacketTooLarge, Republisher
from mhp_wire.outbox import Outbox, Pending, ReadHorizon
from mhp_wire.process import wait_or_timeout
from mhp_wire.ratelimit import RateLimiter
from mhp_wire.router import Inbound, InboundRouter, Refusal, TypeTable
from mhp_wire.sqlite import StorageError
from retailer_bridge.billing import BillingReading, readings_of
from retailer_bridge.customers import Announced, CustomerList, periods_of
from retailer_bridge.store import (
    CLOSED,
    COL_FIRST_SENT,
    COL_HANDLING_MS,
    COL_NOT_BEFORE,
    COL_REVISION,
    UNANSWERED,
    BridgeStore,
    Judged,
    NewCommand,
    Refused,
    Verdict,
    delivered_msg_id,
)

log = logging.getLogger(__name__)

STALE_TELEMETRY_S = 60.0
"""Availability is not promised from telemetry older than this."""
CLAIM_TOLERANCE_KW = 0.001
"""Claims and ratings travel rounded to watts: a claim is above its bound only beyond this."""
DISPATCH_BATCH = 10_000
"""Commands, and outcomes for the hub, read and sent per dispatch round (one read, one write each): each round
waits for the group commit in progress, so an emergency to 10,000 gateways goes out in one round, not five."""
MARKER_LAG_S = 0.05
"""A gateways' round woken while it ran sends a read marker only when the horizon lags the clock by more than this:
enough to keep markers going while the bridge is busy, not one per broker round trip while nothing lags."""
PUBLISH_WAIT_S = 5.0
"""How long a publish waits for room in the broker's in-flight window (back-pressure) before the outbox takes
over; a fan-out to 10,000 gateways fills a window of 1,000 many times."""


HUB_FIRST_RETRY_S = 5.0
"""First re-send of an outcome the hub has not acknowledged, and re-sends wait while the hub has acknowledged
anything within this time. The hub acknowledges after its own commit, in order, which takes many seconds when
10,000 outcomes arrive at once: re-sending then only multiplies its work (seen: 4 to 6 copies of each outcome).
A message is lost with a connection, and when the hub is back (its presence says ``online``) everything waiting
for it is re-sent at once; one the hub dropped otherwise is re-sent once the hub has gone quiet."""


OUTCOMES_PER_MESSAGE = 1_000
"""Clients per ``outcomes`` message the bridge sends (the wire allows 2,000); a payload over the wire's limit is
split further."""

GatewayReport = tuple[str, list[str]] | tuple[str, Outcome | OutcomeIn, float]
"""A gateway's report queued for the store (:attr:`BridgeRelay.gateway_reports`): its acknowledgement
``(gateway_id, msg_ids)``, or its outcome ``(gateway_id, outcome, when the bridge took it)``; plain tuples (one is
made per report of a fan-out)."""
ReportResult = tuple[str, int] | Failed | None
"""A report's result from the store: None for an acknowledgement; for an outcome, ``(state, revision)`` of its command
as the reports before it left it, None (no such command) or its :class:`Failed` (a :class:`Refused`: not ours)."""
_GATEWAY_TRACE = frozenset(("gateway_ms", "waited_ms"))
"""The timings of a gateway's outcome that the bridge forwards in its trace."""
_NOT_FINAL = frozenset(s for s in ClientState if not s.terminal)
"""The states an outcome can be followed by another from: ``not in`` this is ``state.terminal`` without the property's
call (asked of each gateway's outcome, twice)."""
_RTT, _RETAILER = BRIDGE_TRACE_KEYS
"""The timings the bridge adds (the gateways leave room for them: :data:`mhp_wire.messages.GATEWAY_OUTCOME_BYTES`)."""


class BridgeRelay:
    """Relays between the hub broker and this retailer's broker."""

    # Long (71 lines): it wires the relay's collaborators and dispatch tables, each attribute with its docstring;
    # no logic to split out (PLR0915 is excepted for this file in pyproject.toml for the same reason).
    def __init__(self, retailer_id: str, customers: dict[str, str], store: BridgeStore, *,
                 gateway_ack_timeout_s: float = 10.0, measurement_interval_s: float = 5.0,
                 gateway_retry_s: float = 0.5, rated_sheddable_kw: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.retailer_id = retailer_id
        self.customer_list = CustomerList(customers)
        """Who is a customer when (the hub's ``customers`` announcements) and each home's gateway (the
        installation record); :meth:`load_customers` adds what the store kept."""
        self.customers = self.customer_list.gateways
        """``client_id -> gateway_id``: the installation record."""
        self.gateway_of_client = self.customers
        self.clock = clock
        """Wall-clock time (epoch seconds) against which customers' periods are checked."""
        self.local_up_since = 0.0
        """When the link to the retailer broker last connected (the command outbox's clock; 0 before it ever did)."""
        self.customer_changes_applied = 0
        """Clients whose announcement from the hub was newer than the one held, and so taken (a re-send is not)."""
        self.store = store
        self.gateway_ack_timeout_s = gateway_ack_timeout_s
        self.hub: MqttLink | None = None
        self.local: MqttLink | None = None
        self.rejected: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.latest_telemetry: dict[str, Telemetry] = {}
        self.gateway_presence: dict[str, str] = {}
        self.hub_presence: str | None = None
        self.last_hub_ack = float("-inf")
        """When (monotonic) the hub last acknowledged something."""
        self.hub_retry_s = HUB_FIRST_RETRY_S
        """``HUB_FIRST_RETRY_S`` (tests shorten it)."""
        self.measurement_interval_s = measurement_interval_s
        self.hub_outcome_batches = True
        """Send a report batch's outcomes as one ``outcomes`` message per request (settings
        ``hub_outcome_batches``); False: one ``outcome`` per client, for a hub that does not know ``outcomes``."""
        self.telemetry_sinks: list[Callable[[Telemetry], None]] = []
        """Called with every accepted telemetry message (the telemetry export); must not block."""
        self.billing_sinks: list[Callable[[str, list[BillingReading]], Awaitable[None]]] = []
        """Awaited with the ``msg_id`` and the intervals of every billing delivery once it is stored, before the
        hub is acknowledged (the telemetry export's ``billing`` measurement)."""
        self._pending_measurements: dict[tuple[str, float], Measurement] = {}
        self._last_measurements = 0.0
        self._wake_gateways = asyncio.Event()
        self._wake_hub = asyncio.Event()
        self.gateway_limiter = RateLimiter(50.0, 200)
        """One token bucket per gateway: messages beyond it are refused (unread) with an error answer."""
        self.gateway_reports: GroupCommit[GatewayReport, ReportResult] = GroupCommit(
            self._reports_batch, name="bridge-gateway-reports")
        """Gateways' acknowledgements and outcomes (:data:`GatewayReport`), batched: the reports that arrive during a
        batch are applied in one store write with a few statements, not a few per report, and a command acknowledged
        and closed in the same batch sends the hub no ``delivered``. The reports read in one turn of the loop are
        queued together (:meth:`GroupCommit.submit_many`: one future per turn, not per report); ``writes`` counts
        reports."""
        self.gateway_acks = self.gateway_reports
        """The name of :attr:`gateway_reports` from when it took acknowledgements only."""
        self.gateways_back: GroupCommit[str, None] = GroupCommit(self._resend_batch, name="bridge-gateways-back")
        """Gateways that came online, batched: what waits for them is due now, one store write per batch."""
        self.from_hub = TypeTable({
            Request: self._on_request, Cancel: self._on_cancel, BillingData: self._on_billing,
            Tariff: self._tariff_from_hub, Customers: self._on_customers, ConsentView: self._consent_view,
            Ack: self._hub_ack, ErrorReply: self._hub_error})
        """The hub's messages on our ``down`` topic, by type."""
        self._reports_started: dict[type, Callable[[str, Any], GatewayReport | Awaitable[None]]] = {
            Ack: self._ack_report, AckIn: self._ack_report, Outcome: self._outcome_report,
            OutcomeIn: self._outcome_report}
        """A gateway's reports by type, taken at once in :meth:`on_local_batch`: the report to queue with the turn's
        others, or an answer to await (a refusal)."""
        self.local_gate: Callable[[str], bool] | None = None
        """Set on a partitioned bridge (:meth:`retailer_bridge.partition.PartitionGate.install`): whether a message on
        this topic of the retailer broker is this partition's to read (:meth:`on_local_batch` asks it first)."""
        self.inbound = InboundRouter("gateways", {
            Telemetry: self._gateway_telemetry, Ack: self._gateway_ack, Outcome: self._gateway_outcome,
            AckIn: self._gateway_ack, OutcomeIn: self._gateway_outcome,
            ErrorReply: self._gateway_error}, on_refused=self._refused, limiter=lambda: self.gateway_limiter,
            on_presence=self._gateway_presence, on_decoded=self._count_gateway_message,
            decode=fastwire.reader(decode))
        """Gateways' messages: topic → rate limit (one token bucket per gateway: messages beyond it are refused
        unread, with an error answer) → decode → the handler of its type. An ``ack`` or ``outcome`` in its plain
        shape is read into plain values (:func:`mhp_wire.fastwire.read_report`); anything else, and anything
        invalid, through the models (:func:`mhp_wire.messages.decode`, whose error the refusal carries)."""
        self.rated_sheddable_kw = dict(rated_sheddable_kw or {})
        """``client_id -> kW`` from the installation record (settings ``customer_sheddable_kw``)."""
        self._claims_logged = Once()
        self.on_consent_view: Callable[[ConsentView], None] | None = None
        """Set by the personal area: a customer's permissions and access log from the hub (docs/consent.md)."""
        self.tariff = Republisher(self.republish_tariff, "the stored tariff for our gateways",
                                  retry_on=(StorageError,))
        """At every connection to the retailer broker the stored tariff is published again, retained."""
        self._down_topics: dict[str, str] = {}
        self.gateway_rtt = RoundTrip(floor_s=gateway_retry_s)
        """The gateways' measured acknowledgement times: a command's first re-send waits ``timeout_s()``, at
        least ``gateway_retry_s`` and at most its ``max_s`` (settings ``gateway_retry_max_s``; docs/architecture.md,
        step 5)."""
        self.fresh_commands: list[Pending] = []
        """A request's commands just committed, for the gateways' loop to send first thing in its next round
        (:meth:`Outbox.send_stored`) instead of reading them back; held (:attr:`held_commands`) until then."""
        self.held_commands: set[str] = set()
        """``msg_id`` of the commands of :attr:`fresh_commands` (and of those being committed to join them): the
        gateways' loop's reads of due commands leave them out, so that no command goes out twice."""
        self.committing: list[list[Pending]] = []
        """The hand-overs of requests whose commit is under way: a cancellation, revision or supplier change handled
        meanwhile (the hub's messages are handled concurrently) withdraws from them too (:meth:`_withdraw_fresh`)."""
        self.handing_over: list[Pending] = []
        """The hand-over the gateways' loop is sending (taken from :attr:`fresh_commands`), for
        :meth:`_withdraw_fresh` to release what a later commit closes while it goes out."""
        self.commands_out = Outbox(_Commands(store, self.gateway_topic, self.gateway_rtt, self.read_up_to,
                                             self.held_commands, resend_by_s=gateway_ack_timeout_s / 2,
                                             too_large=self._too_large, unsendable=self._unsendable),
                                   self._to_local,
                                   limit=DISPATCH_BATCH, retry_s=lambda n: delay_s(n, self.gateway_rtt.timeout_s()))
        """Commands to gateways, re-sent until each gateway acknowledges (or it is ``unreachable``)."""
        self.probe_topic: str | None = None
        """Set by the service (:func:`mhp_wire.topics.bridge_probe` of our login, which the local link subscribes
        to): the topic of our read marker. None (a relay without it): re-sends are judged by the clock alone."""
        self.read_horizon = ReadHorizon(lambda: self.commands_out.clock(), nonce=secrets.token_hex(6))
        """How far we have read the retailer broker: a gateway's silence is counted up to there (:meth:`read_up_to`),
        so a command whose answer waits in our own backlog is not sent again (docs/architecture.md, step 5)."""
        self.notices_out = Outbox(_Notices(store, self.gateway_topic), self._to_local, resend_from="read")
        """Notices to gateways (cancellations, schedules), re-sent until acknowledged or past their deadline."""
        self.ack_partition: AckPartition | None = None
        """Set on a partitioned bridge (:meth:`retailer_bridge.partition.PartitionGate.install`): each ``ack`` to the
        hub says which partition of how many stored the message, and the hub waits for all of them."""
        self.hub_order = SendOrder()
        """The order of our last sends to the hub, against its acknowledgements (which of our re-sends wait)."""
        self.hub_out = Outbox(_ToHub(store, topics.up("retailers", retailer_id), self.hub_order), self._to_hub_link,
                              limit=DISPATCH_BATCH, retry_s=lambda n: delay_s(n, self.hub_retry_s))
        """Outcomes and measurements to the hub, re-sent until the hub acknowledges them."""
        self._oversize: dict[tuple[str, str, int, str], int] = {}
        """Outcomes whose detail :meth:`_pack_for_hub` cut, with their size: counted after their batch's write."""
        self.fresh_to_hub: dict[str, bytes] = {}
        """Outcomes a batch of gateways' reports has just committed for the hub, ``msg_id -> payload``: the loop
        towards the hub sends them first thing in its next round (:meth:`Outbox.send_stored`), without waiting for
        a read of the outbox behind the next batch's commit on the one SQLite thread."""

    def local_connected(self) -> None:
        """The link to this retailer's broker is up (the first time or again): republish the stored tariff, which
        a broker restarted without (or with an old) persistence snapshot no longer holds; and give each command
        still unanswered its ack timeout again from now (see :meth:`_command_due`)."""
        self.local_up_since = self.commands_out.clock()  # the clock the commands' rounds are judged by
        self.read_horizon.lost()
        self.tariff.connected()
        self._wake_gateways.set()  # a marker goes now if re-sends wait for one

    def read_up_to(self) -> float:
        """The time up to which a gateway's silence is known: everything our retailer broker received before it has
        been read and applied (:class:`mhp_wire.outbox.ReadHorizon`); without a marker topic, no limit."""
        return math.inf if self.probe_topic is None else self.read_horizon.known(self.commands_out.clock())

    async def _probe_read(self, payload: bytes) -> None:
        """Our marker came back: once what was read before it is applied (the reports queued so far are committed),
        the gateways' silence is known up to its send time, and the re-sends that waited for that are judged."""
        await self.gateway_reports.settled()
        if self.read_horizon.returned(payload):
            self._wake_gateways.set()

    async def _send_probe(self) -> None:
        """Publish a read marker unless one is in flight (a lost one goes again after ``ReadHorizon.retry_s``)."""
        if self.probe_topic is None or self.local is None:
            return
        payload = self.read_horizon.probe()
        if payload is None:
            return
        try:
            await self.local.publish(self.probe_topic, payload, wait_s=PUBLISH_WAIT_S)
        except MqttError as exc:
            self.read_horizon.lost()
            log.debug("read marker not sent: %s", exc)

    async def republish_tariff(self) -> bool:
        """Publish the stored tariff, retained, for our gateways; False when none is stored."""
        payload = await self.store.current_tariff()
        if payload is None:
            return False
        if self.local is None or not self.local.connected:
            raise MqttError("the retailer broker link is down")
        await self.local.publish(topics.TARIFF, payload, retain=True, wait_s=PUBLISH_WAIT_S)
        log.info("stored tariff republished to our gateways, retained")
        return True

    def kick(self) -> None:
        """Wake the dispatchers."""
        self._wake_gateways.set()
        self._wake_hub.set()

    # -- from the hub -------------------------------------------------------------------------------------

    async def on_hub_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """Apply one message from the hub broker."""
        if topic == topics.PUBLIC_STATUS:
            await self._on_hub_presence(payload)
            return
        try:
            msg = decode(payload)
        except WireError as exc:
            self.rejected["hub_invalid"] += 1
            log.warning("refused a message from the hub: %s", outside(exc, 300))
            if topic != topics.TARIFF:
                await self._to_hub(ErrorReply(code="invalid", message=str(exc)))
            return
        self.received[f"hub_{msg.type}"] += 1
        if topic == topics.TARIFF:
            if isinstance(msg, Tariff):
                await self._on_tariff(msg, ack=False)
            return
        if not await self.from_hub.dispatch(msg):
            self.rejected["hub_unexpected"] += 1
            await self._to_hub(ErrorReply(ref_msg_id=msg.msg_id, code="invalid",
                                          message=f"the bridge does not handle {msg.type!r} messages yet"))

    async def _tariff_from_hub(self, msg: Tariff) -> None:
        await self._on_tariff(msg, ack=True)

    async def _consent_view(self, msg: ConsentView) -> None:
        if self.on_consent_view is not None:
            self.on_consent_view(msg)

    async def _hub_ack(self, msg: Ack) -> None:
        self.last_hub_ack = time.monotonic()
        for m in msg.ack_ids:
            self.fresh_to_hub.pop(m, None)
        self.hub_order.acked(msg.ack_ids)
        await self.store.ack_outbox(msg.ack_ids)

    async def _hub_error(self, msg: ErrorReply) -> None:
        log.warning("the hub refused our message %s: %s", outside(msg.ref_msg_id), outside(msg.message, 300))
        if msg.ref_msg_id:
            self.hub_order.acked([msg.ref_msg_id])
            await self.store.ack_outbox([msg.ref_msg_id])

    async def _on_hub_presence(self, payload: bytes) -> None:
        try:
            msg = decode(payload)
        except WireError:
            return
        if not isinstance(msg, Presence):
            return
        state = msg.state
        before, self.hub_presence = self.hub_presence, state
        if state == "online" and before != "online":
            await self.store.resend_to_hub_now()
            self.kick()

    async def _on_request(self, req: Request) -> None:
        now = time.time()
        commands: list[NewCommand] = []
        answers: list[tuple[str, bytes]] = []
        if not req.client_ids or await self.store.is_cancelled(req.request_id):
            # None of the request's clients is ours (a partition's share can be empty): nothing to store, and the
            # hub waits for every partition's acknowledgement.
            await self._to_hub(Ack(ack_ids=[req.msg_id]))
            return
        at = req.params.start.timestamp()
        # One command validated for the request; each client's is a copy with its own client and message ids (the
        # request validated the client ids already): 19 instead of 31 µs per command with its encoding.
        # The command is encoded once and each client's ``msg_id`` and ``client_id`` spliced into its bytes
        # (:class:`CommandTemplate`: the same payload as an encoded copy, docs/performance.md "fourth round").
        template = CommandTemplate(Command(request_id=req.request_id, client_id=req.client_ids[0], kind=req.kind,
                                           params=req.params, expires_at=req.expires_at, revision=req.revision))
        expires_at, not_before = req.expires_at.timestamp(), req.params.start.timestamp()
        for cid in req.client_ids:
            gid = self.customer_list.gateway_of(cid)
            why = self.not_customer(cid, at)
            if why is None and gid is None:
                why = f"no gateway is recorded yet for {cid}, a customer of retailer {self.retailer_id}"
            if why is not None or gid is None:
                out = Outcome(request_id=req.request_id, client_id=cid, state=ClientState.REFUSED,
                              detail={"reason": why}, revision=req.revision)
                answers.append((out.msg_id, encode(out)))
            elif req.kind is RequestKind.AVAILABILITY:
                out = self.availability(req.request_id, cid, gid).model_copy(update={"revision": req.revision})
                answers.append((out.msg_id, encode(out)))
            else:
                mid = msg_ids()
                commands.append(NewCommand(req.request_id, cid, gid, mid, template.payload(mid, cid), now,
                                           expires_at, not_before, req.revision))
        # The hand-over built before the commit: nothing between the commit and the ``try`` below can raise and
        # leave the ids held for ever.
        handover = [Pending(c.msg_id, self.gateway_topic(c.gateway_id), c.payload, 0, row={
            "request_id": c.request_id, "client_id": c.client_id, "gateway_id": c.gateway_id,
            "first_sent_at": None, "not_before": c.not_before, "deadline": c.deadline, "handling_ms": 0.0,
            "revision": c.revision}) for c in commands]
        if commands:  # a newer revision replaces an older one's command that may still wait for its hand-over
            clients = {c.client_id for c in commands}
            self._withdraw_fresh(lambda r: r["request_id"] == req.request_id and r["client_id"] in clients
                                 and r["revision"] < req.revision)
        held = {c.msg_id for c in commands}
        self.held_commands |= held  # before the commit: a round reading due commands after it leaves them out
        self.committing.append(handover)
        try:
            added = await self.store.accept_request(commands, answers, template.parts)
        except BaseException:
            self.held_commands -= held
            raise
        finally:
            self.committing.remove(handover)
        if commands and added == len(commands):  # every command stored is one of these (not a redelivery)
            # Less what was withdrawn while the commit ran (released: if its row stayed open it is due in the store).
            self.fresh_commands.extend(p for p in handover if str(p.key) in self.held_commands)
        else:  # a redelivered request: what it holds already goes out from the store's rounds
            self.held_commands -= held
        await self._to_hub(Ack(ack_ids=[req.msg_id]))
        # The loop towards the hub only when answers were queued for it: woken for nothing, its reads of the
        # outbox took turns on the SQLite thread with the commands' first round.
        self._wake_gateways.set()
        if answers:
            self._wake_hub.set()

    def availability(self, request_id: str, client_id: str, gateway_id: str) -> Outcome:
        """Whether a client could shed load now, from its gateway's presence and latest telemetry."""
        tel = self.latest_telemetry.get(gateway_id)
        reason = None
        if self.gateway_presence.get(gateway_id) != "online":
            reason = "the home's gateway is offline"
        elif tel is None or tel.at.timestamp() < time.time() - STALE_TELEMETRY_S:
            reason = "no recent telemetry from the home's gateway"
        if reason or tel is None:
            return Outcome(request_id=request_id, client_id=client_id, state=ClientState.UNAVAILABLE,
                           detail={"reason": reason, "available_kw": 0.0})
        kw = round(tel.sheddable_kw or 0.0, 3)
        bound = self.claim_bound(tel)
        if bound is not None and kw > bound + CLAIM_TOLERANCE_KW:
            return Outcome(request_id=request_id, client_id=client_id, state=ClientState.UNAVAILABLE,
                           detail={"reason": f"the home's gateway claims {kw:g} kW sheddable, more than its rated "
                                             f"sheddable loads ({bound:g} kW): not believed",
                                   "available_kw": 0.0, "claimed_kw": kw, "rated_sheddable_kw": bound})
        if kw <= 0:
            return Outcome(request_id=request_id, client_id=client_id, state=ClientState.UNAVAILABLE,
                           detail={"reason": "no sheddable load is on", "available_kw": 0.0})
        return Outcome(request_id=request_id, client_id=client_id, state=ClientState.AVAILABLE,
                       detail={"available_kw": kw, "active_power_kw": tel.active_power_kw})

    def claim_bound(self, tel: Telemetry) -> float | None:
        """The most a home may claim it can shed: the rated power of its sheddable loads in the installation
        record, else as its gateway declares them; None when neither is known (a gateway older than
        ``rated_sheddable_kw``: the hub still bounds the claim by the client's contracted power)."""
        known = self.rated_sheddable_kw.get(tel.client_id)
        return known if known is not None else tel.rated_sheddable_kw

    def _check_claim(self, gid: str, tel: Telemetry) -> None:
        """Count (and log once per gateway) a claim above its bound; :meth:`availability` does not believe it."""
        bound = self.claim_bound(tel)
        if tel.sheddable_kw is None or bound is None or tel.sheddable_kw <= bound + CLAIM_TOLERANCE_KW:
            return
        self.rejected["gateway_claim_refused"] += 1
        if self._claims_logged.first(gid):
            log.warning("gateway %s claims %s kW sheddable, more than its rated sheddable loads (%s kW): not "
                        "believed (logged once per gateway, counted as gateway_claim_refused)", gid,
                        outside(tel.sheddable_kw), outside(bound))

    async def _on_cancel(self, msg: Cancel) -> None:
        now = time.time()
        if msg.revision is not None:  # a revision removed these clients: only they stop
            ours = [c for c in msg.client_ids if c in self.gateway_of_client]
            removal = []
            for cmd in await self.store.commands_of(msg.request_id):
                if cmd["client_id"] in ours and cmd["revision"] <= msg.revision:
                    notice = Cancel(request_id=msg.request_id, client_ids=[cmd["client_id"]], revision=msg.revision)
                    removal.append((notice.msg_id, cmd["gateway_id"], encode(notice), now + 24 * 3600))
            removed, revision = set(ours), msg.revision
            self._withdraw_fresh(lambda r: r["request_id"] == msg.request_id and r["client_id"] in removed
                                 and r["revision"] <= revision)
            await self.store.remove_clients(msg.request_id, ours, msg.revision, removal)
            await self._to_hub(Ack(ack_ids=[msg.msg_id]))
            self.kick()
            return
        notices = []
        for cmd in await self.store.commands_of(msg.request_id):
            notice = Cancel(request_id=msg.request_id, client_ids=[cmd["client_id"]])
            notices.append((notice.msg_id, cmd["gateway_id"], encode(notice), now + 24 * 3600))
        self._withdraw_fresh(lambda r: r["request_id"] == msg.request_id)
        await self.store.cancel(msg.request_id, now, notices)
        await self._to_hub(Ack(ack_ids=[msg.msg_id]))
        self.kick()

    def _withdraw_fresh(self, gone: Callable[[dict[str, Any]], bool]) -> None:
        """Take the commands for which ``gone(row)`` holds off the hand-over (:attr:`fresh_commands`) and release
        their ids: a cancellation, a revision or a supplier change is about to close or replace them in the store.

        Called just before that commit, so that no round after it can send them from the hand-over. A withdrawn
        command whose row stays open (that commit failed, or the store judged otherwise) is not lost: released, it is
        due in the store and the next round reads and sends it. One in a list the gateways' loop has already taken
        is skipped by :meth:`_handover_due` if it has not been published yet; one already published went before
        the commit, so before its notice (``notices_out`` is read after it), as with a round of ``send_due``."""
        # Taken by the loop (released: :meth:`_handover_due` skips it) or still being committed (released: it is not
        # handed over).
        for p in itertools.chain(self.handing_over, *self.committing):
            if gone(p.row):
                self.held_commands.discard(str(p.key))
        if not self.fresh_commands:
            return
        keep = []
        for p in self.fresh_commands:
            if gone(p.row):
                self.held_commands.discard(str(p.key))
            else:
                keep.append(p)
        self.fresh_commands = keep

    def not_customer(self, client_id: str, at: float) -> str | None:
        """None when ``client_id`` is a customer at ``at``, else why not (for a refusal)."""
        if self.customer_list.is_customer(client_id, at):  # the usual answer, without a Status object
            return None
        status = self.customer_list.status(client_id, at)
        when = _instant(at)
        if status.standing == "moved" and status.since is not None:
            return (f"{client_id} is not a customer of retailer {self.retailer_id} at {when}: it moved to another "
                    f"supplier at {_instant(status.since)}")
        if status.standing == "not_yet" and status.until is not None:
            return (f"{client_id} is not a customer of retailer {self.retailer_id} at {when}: its supply here "
                    f"starts at {_instant(status.until)}")
        return f"{client_id} is not a customer of retailer {self.retailer_id}"

    async def load_customers(self) -> None:
        """Take the hub's announcements kept in the store (after a restart)."""
        for cid, (revision, periods) in (await self.store.customers()).items():
            self.customer_list.announced[cid] = Announced(
                revision, tuple((float(f), None if u is None else float(u)) for f, u in json.loads(periods)))

    async def _on_customers(self, msg: Customers) -> None:
        """The hub says which clients this retailer gains and loses, and from when: kept (before the ack), and
        every open command of a client for a time it is no longer ours is withdrawn (``refused`` to the hub, a
        ``cancel`` to the gateway)."""
        changes = self.customer_list.newer(msg.items)
        if changes:
            after = CustomerList(self.customer_list.gateways, {
                **self.customer_list.announced, **{c.client_id: Announced(c.revision, periods_of(c)) for c in changes}})
            now = self.clock()

            def stale(cmd: dict[str, Any]) -> tuple[tuple[str, bytes], tuple[str, str, bytes, float]] | None:
                status = after.status(cmd["client_id"], cmd["not_before"])
                if status.standing == "customer":
                    return None
                out = Outcome(request_id=cmd["request_id"], client_id=cmd["client_id"], state=ClientState.REFUSED,
                              detail={"reason": f"{cmd['client_id']} is not a customer of retailer "
                                                f"{self.retailer_id} when the request starts (supplier change)",
                                      "gateway_id": cmd["gateway_id"]},
                              trace={"retailer_ms": round(cmd["handling_ms"], 3)}, revision=cmd["revision"])
                notice = Cancel(request_id=cmd["request_id"], client_ids=[cmd["client_id"]])
                return (out.msg_id, encode(out)), (notice.msg_id, cmd["gateway_id"], encode(notice), now + 24 * 3600)

            rows = [(c.client_id, c.revision, json.dumps(periods_of(c))) for c in changes]
            changed = {c.client_id for c in changes}
            self._withdraw_fresh(lambda r: r["client_id"] in changed
                                 and after.status(r["client_id"], r["not_before"]).standing != "customer")
            closed = await self.store.put_customers(rows, now, stale)
            self.customer_changes_applied += len(self.customer_list.apply(changes))
            log.info("hub announced supplier changes of %d client(s) (%s); %d open command(s) withdrawn",
                     len(changes), ", ".join(outside(c.client_id) for c in changes[:10]), closed)
            if closed:
                self.kick()
        await self._to_hub(Ack(ack_ids=[msg.msg_id]))

    async def _on_billing(self, msg: BillingData) -> None:
        rows = []
        for c in msg.clients:
            if not self.customer_list.known(c.client_id):
                log.warning("billing data for %s, who is not our customer, refused", outside(c.client_id))
                self.rejected["hub_foreign_client"] += 1
                continue
            rows.append((c.client_id, c.period_start.isoformat(), c.period_end.isoformat(),
                         json.dumps([b.model_dump(mode="json") for b in c.readings])))
        received_at = time.time()
        await self.store.store_billing(msg.request_id, rows, received_at)
        if self.billing_sinks:
            readings = [r for c in msg.clients if c.client_id in self.customers
                        for r in readings_of(msg.request_id, c.client_id, c.period_start, c.period_end,
                                             [b.model_dump(mode="json") for b in c.readings], received_at)]
            for sink in self.billing_sinks:
                try:
                    await sink(msg.msg_id, readings)
                except Exception:  # the billing data is stored above: ``billing export`` still has it
                    log.exception("billing data of request %s not exported to the telemetry store",
                                  outside(msg.request_id))
        await self._to_hub(Ack(ack_ids=[msg.msg_id]))

    async def _on_tariff(self, msg: Tariff, *, ack: bool) -> None:
        public = msg.model_copy(update={"msg_id": tariff_msg_id(msg.tariff_id, msg.version)})
        if await self.store.put_tariff(msg.tariff_id, msg.version, encode(public), msg.published) \
                and self.local is not None:
            try:
                await self.local.publish(topics.TARIFF, encode(public), retain=True, wait_s=PUBLISH_WAIT_S)
                log.info("tariff %s v%d published to our gateways", msg.tariff_id, msg.version)
            except MqttError as exc:
                log.warning("tariff not republished now: %s", exc)
        if ack:
            await self._to_hub(Ack(ack_ids=[msg.msg_id]))

    # -- from gateways ------------------------------------------------------------------------------------

    async def on_local_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """Apply one message from a gateway; the gateway id comes from the topic, which the broker ACL binds."""
        await self.inbound.route(topic, payload, retained)

    async def on_local_batch(self, messages: list[tuple[str, bytes, bool]]) -> None:
        """Apply the gateways' messages read in one turn of the loop (the retailer broker link's batch handler),
        in their order, and return once each is handled, so that the link acknowledges them all after.

        A gateway's ``ack`` or ``outcome`` (nearly all of the traffic of a fan-out) is screened by the router and
        taken as a plain :data:`GatewayReport`, without a task of its own; the turn's reports are queued for the next
        batch together once all are read (one future for the turn), and answered, in their order, once stored. Every
        other message, refusals included, goes to the router's handler of its type (:meth:`InboundRouter.dispatch`)
        or ``on_refused`` in a task of its own, as each message did before. A partition's gate (:attr:`local_gate`)
        is asked first."""
        pending: list[Awaitable[None]] = []
        reports: list[GatewayReport] = []
        try:
            for topic, payload, retained in messages:
                if topic == self.probe_topic:  # our read marker: after what came before it (before the gate)
                    pending.append(self._probe_read(payload))  # (awaited after the turn's reports are queued)
                    continue
                try:
                    started = self._start_local(topic, payload, retained, reports)
                except Exception:  # one message's failure is that message's: the others go on
                    log.exception("a gateway's message failed (%s)", outside(topic))
                    continue
                if started is not None:
                    pending.append(started)
            if reports:  # queued now, before anything is awaited (a read marker's barrier counts them)
                pending.append(self._queue_reports(reports))
            for answer in pending:
                try:
                    await answer
                except Exception:
                    log.exception("a gateway's message failed")
        finally:
            for answer in pending:  # cancelled (the bridge stops): nothing left un-awaited
                if asyncio.iscoroutine(answer):
                    answer.close()

    def _start_local(self, topic: str, payload: bytes, retained: bool,
                     reports: list[GatewayReport]) -> Awaitable[None] | None:
        """One message of :meth:`on_local_batch` started: what to await for it, None when the gate drops it or it
        is a report, which joins ``reports``."""
        if self.local_gate is not None and not self.local_gate(topic):
            return None
        screened = self.inbound.screen(topic, payload, retained)
        if isinstance(screened, Refusal):
            return asyncio.ensure_future(self.inbound.on_refused(screened))
        start = self._reports_started.get(type(screened.msg)) if screened.source.channel == "msg" else None
        if start is not None:
            report = start(screened.source.party_id, screened.msg)
            if type(report) is tuple:
                reports.append(report)
                return None
            return report  # type: ignore[return-value]  # not a tuple: the answer to await
        # The router's handler of its type (or the presence handler), in a task of its own.
        return asyncio.ensure_future(self.inbound.dispatch(screened.source, screened.msg))

    async def _refused(self, r: Refusal) -> None:
        """What the router did not hand on: counted, logged and answered by the bridge's rules."""
        gid = str(r.party_id)
        if r.reason == "topic":
            self.rejected["local_topic"] += 1
        elif r.reason == "rate_limited":
            self.rejected["gateway_rate_limited"] += 1
            log.debug("rate limit: refused a message from gateway %s", gid)
            await self._to_gateway(gid, ErrorReply(code="invalid", message="rate limit: message refused unread, "
                                                                           "send it again later"))
        elif r.reason == "invalid":
            self.rejected["gateway_invalid"] += 1
            log.warning("refused a message from gateway %s: %s", gid, outside(r.error, 300))
            await self._to_gateway(gid, ErrorReply(code="invalid", message=r.error))
        elif r.reason == "unexpected":
            self.rejected["gateway_unexpected"] += 1
            await self._to_gateway(gid, ErrorReply(ref_msg_id=r.msg.msg_id, code="invalid",
                                                   message=f"a gateway may not send {r.msg.type!r} messages"))
        # "kind": another kind of party's topic on our broker: not ours to read

    def _count_gateway_message(self, msg: Message | AckIn | OutcomeIn) -> None:
        self.received[f"gateway_{msg.type}"] += 1

    async def _gateway_presence(self, source: Inbound, msg: Presence) -> None:
        gid = source.party_id
        before = self.gateway_presence.get(gid)
        self.gateway_presence[gid] = msg.state
        if msg.state == "online" and before != "online":
            await self.gateways_back.submit(gid)
            self.kick()

    async def _gateway_telemetry(self, source: Inbound, msg: Telemetry) -> None:
        gid, retained = source.party_id, source.retained
        if self.gateway_of_client.get(msg.client_id) != gid or msg.gateway_id != gid:
            self.rejected["gateway_foreign_client"] += 1
            return
        why = self.not_customer(msg.client_id, msg.at.timestamp())
        if why is not None:  # its home has moved to another supplier (or not yet come here)
            self.rejected["gateway_not_customer"] += 1
            if not retained:
                await self._to_gateway(gid, ErrorReply(ref_msg_id=msg.msg_id, code="forbidden", message=why))
            return
        if not retained:
            await self._ack_gateway(gid, msg.msg_id)
        self._check_claim(gid, msg)
        latest = self.latest_telemetry.get(gid)
        if latest is None or msg.seq >= latest.seq:
            self.latest_telemetry[gid] = msg
        for sink in self.telemetry_sinks:
            sink(msg)
        if msg.active_power_kw is not None:
            self._pending_measurements[(msg.client_id, msg.at.timestamp())] = Measurement(
                client_id=msg.client_id, at=msg.at, active_power_kw=msg.active_power_kw)

    async def _gateway_error(self, source: Inbound, msg: ErrorReply) -> None:
        log.warning("gateway %s refused %s: %s", source.party_id, outside(msg.ref_msg_id), outside(msg.message, 300))

    async def _gateway_ack(self, source: Inbound, msg: Ack | AckIn) -> None:
        await self._on_gateway_ack(source.party_id, msg)

    async def _gateway_outcome(self, source: Inbound, msg: Outcome | OutcomeIn) -> None:
        await self._on_gateway_outcome(source.party_id, msg)

    async def _on_gateway_ack(self, gid: str, msg: Ack | AckIn) -> None:
        await self._gateway_ack_started(gid, msg)

    def _gateway_ack_started(self, gid: str, msg: Ack | AckIn) -> Awaitable[None]:
        """One gateway's acknowledgement queued for the next batch of reports now, alone (:meth:`on_local_batch`
        queues a turn's together); its answer (once it is stored) to await."""
        return self._queue_reports([self._ack_report(gid, msg)])

    @staticmethod
    def _ack_report(gid: str, msg: Ack | AckIn) -> GatewayReport:
        return gid, msg.ack_ids

    async def _resend_batch(self, gids: list[str]) -> list[None]:
        """The gateways that came online during the previous batch: what waits for them is due now."""
        await self.store.resend_now_many(gids)
        return [None] * len(gids)

    async def _reports_batch(self, items: list[GatewayReport]) -> list[ReportResult]:
        """The gateways' acknowledgements and outcomes that arrived during the previous batch, applied in one
        store write (the outcomes judged together by :meth:`_judge_outcomes`); see :data:`ReportResult`."""
        acks: list[tuple[str, list[str]]] = []
        outcomes: list[tuple[str, Outcome | OutcomeIn, float]] = []
        for i in items:
            if len(i) == 2:
                acks.append(i)
            else:
                outcomes.append(i)
        judged = Judged([(m.request_id, m.client_id) for _, m, _ in outcomes],
                        lambda rows: self._judge_outcomes(outcomes, rows))
        applied = await self.store.apply_reports(acks, judged, _delivered, self._pack_for_hub)
        if self._oversize:
            self._count_oversize()
        for m in applied.withdrawn:
            self.fresh_to_hub.pop(m, None)
        if applied.queued:
            self.fresh_to_hub.update(applied.queued)
            self._wake_hub.set()
        if applied.first_sent_at:
            # A command sent before the link's last (re)connection was answered across the outage (its QoS 1
            # outcome waited in our session, and no re-send went while the link was down, so it was still sent
            # once): its round trip is the outage's length, not the gateways' pace.
            up = self.local_up_since
            self.gateway_rtt.answered([s for s in applied.first_sent_at if s >= up], self.commands_out.clock())
        closed = iter(applied.closed)
        return [next(closed) if len(i) == 3 else None for i in items]

    def _pack_for_hub(self, outcomes: Sequence[Outcome | Report]) -> list[tuple[str, bytes]]:
        """A batch's outcomes for the hub (on the store's thread): :func:`pack_outcomes`, one ``outcome`` per client
        without ``hub_outcome_batches``; an outcome too big for the hub broker's packet has its detail cut to a
        marker and is noted for :meth:`_count_oversize`."""
        return pack_outcomes(outcomes, OUTCOMES_PER_MESSAGE if self.hub_outcome_batches else 1,
                             oversize=self._note_oversize)

    def _note_oversize(self, r: Report, size: int) -> None:
        """On the store's thread (which may run a batch's write twice): noted by its client's outcome, once."""
        self._oversize[(r.request_id, r.client_id, r.revision, r.state.value)] = size

    def _count_oversize(self) -> None:
        """The outcomes of the last batch whose detail was cut (:meth:`_pack_for_hub`): counted and logged."""
        seen, self._oversize = self._oversize, {}
        for (request_id, client_id, revision, state), size in seen.items():
            self.rejected["gateway_detail_oversize"] += 1
            log.warning("gateway %s's outcome for request %s (client %s, revision %d) is %d bytes with the bridge's "
                        "trace, over the %d the hub broker's packet takes (once a hub replica forwards it): forwarded "
                        "as %s with its detail cut to its small fields and an 'oversize' marker (counted as "
                        "gateway_detail_oversize)",
                        self.customers.get(client_id), outside(request_id), outside(client_id), revision, size,
                        BRIDGE_OUTCOME_BYTES, state)

    def _judge_outcomes(self, outcomes: list[tuple[str, Outcome | OutcomeIn, float]],
                        commands: list[Any]) -> list[Verdict]:
        """The relay's rules for a batch of gateways' outcomes against their commands as stored (rows of
        :data:`retailer_bridge.store.REPORT_COLUMNS`; None: no such command), on the store's thread: a client that
        was not our customer at the command's start is refused; an outcome that is not terminal, or answers a
        revision since replaced, leaves the command as it is (it is not the client's outcome any more); any other
        closes it, with the gateway's timings and ours in its trace."""
        verdicts: list[Verdict] = []
        verdict = verdicts.append
        not_customer = self.not_customer
        for (_, msg, t0), cmd in zip(outcomes, commands, strict=True):
            if cmd is None:
                verdict(None)
                continue
            try:
                why = not_customer(msg.client_id, cmd[COL_NOT_BEFORE])
                if why is not None:
                    verdict(Refused(why))
                elif msg.state in _NOT_FINAL or msg.revision < cmd[COL_REVISION]:
                    verdict(None)
                else:
                    # The usual gateway's trace holds only the timings forwarded: copied whole (a set test and a
                    # copy in C), else filtered key by key.
                    trace: dict[str, float] = dict(msg.trace) if msg.trace.keys() <= _GATEWAY_TRACE else {
                        k: v for k, v in msg.trace.items() if k in _GATEWAY_TRACE}
                    # Milliseconds to the microsecond: round(ms * 1000) / 1000 is the float round(ms, 3) gives (the
                    # one nearest to the same whole number of microseconds, but at a tie within a float's error), in
                    # a quarter of its time (0.07 against 0.3 µs, twice per outcome).
                    if cmd[COL_FIRST_SENT] is not None:
                        trace[_RTT] = round((t0 - cmd[COL_FIRST_SENT]) * 1000 * 1000) / 1000
                    trace[_RETAILER] = round((cmd[COL_HANDLING_MS] + (time.time() - t0) * 1000) * 1000) / 1000
                    # Plain values from a validated outcome (no model to validate again): encoded, or packed with
                    # others, by the store.
                    verdict(Report(msg.request_id, msg.client_id, msg.state, msg.detail, trace, msg.revision))
            except Exception as exc:  # this report fails alone (its gateway sends it again), not the batch
                verdict(exc)
        return verdicts

    async def _on_gateway_outcome(self, gid: str, msg: Outcome | OutcomeIn) -> None:
        await self._gateway_outcome_started(gid, msg)

    def _gateway_outcome_started(self, gid: str, msg: Outcome | OutcomeIn) -> Awaitable[None]:
        """One gateway's outcome checked and queued for the next batch of reports now, alone
        (:meth:`on_local_batch` queues a turn's together); its answer (once stored) to await."""
        report = self._outcome_report(gid, msg)
        return self._queue_reports([report]) if type(report) is tuple else report  # type: ignore[return-value]

    def _outcome_report(self, gid: str, msg: Outcome | OutcomeIn) -> GatewayReport | Awaitable[None]:
        """A gateway's outcome as the report to queue, or, when it reports for another gateway's client, the refusal
        to await."""
        if self.gateway_of_client.get(msg.client_id) != gid:
            self.rejected["gateway_foreign_client"] += 1
            log.warning("gateway %s reported for client %s, which is not its own", gid, outside(msg.client_id))
            return self._to_gateway(gid, ErrorReply(ref_msg_id=msg.msg_id, code="forbidden",
                                                    message=f"gateway {gid} may not report for {msg.client_id}"))
        return gid, msg, time.time()

    def _queue_reports(self, reports: list[GatewayReport]) -> Awaitable[None]:
        """Queue ``reports`` for the next batch together, now (not when awaited: a read marker read after them takes
        its barrier before awaiting them, :meth:`_probe_read`); their answers to await."""
        return self._reports_stored(reports, self.gateway_reports.submit_many(reports))

    async def _reports_stored(self, reports: list[GatewayReport], stored: Awaitable[list[ReportResult | Failed]]
                              ) -> None:
        """Once ``reports`` are stored, answer each outcome's gateway in their order (its ``ack``, or an ``error``:
        not ours, unknown) and wake the loop towards the hub if it has work."""
        results = await stored
        wake = False
        # The answers' one ``sent_at``, taken at the first ack: acks are QoS 0 and do not suspend, so those that follow
        # go in the same turn; anything else awaited here can suspend (an ``error`` reply is QoS 1 and waits for room
        # in the window), so after it the next ack takes a new time.
        acks: AckStamp | None = None
        for report, result in zip(reports, results, strict=True):
            if len(report) == 2:
                # Only the hub's loop has work now (a ``delivered`` outcome): waking the gateways' loop too made it
                # read the store for due commands after every batch of reports, a read each report commit then
                # queued behind.
                wake = True
                continue
            gid, msg, _ = report  # an outcome's (narrowed by its length)
            try:
                if type(result) is tuple and msg.revision >= result[1]:  # the usual: stored, its ack follows
                    if result[0] != CLOSED and msg.state not in _NOT_FINAL:
                        wake = True  # its outcome is queued for the hub; nothing became due for the gateways
                    if acks is None:
                        acks = AckStamp()
                    await self._ack_gateway(gid, msg.msg_id, acks)
                else:
                    acks = None
                    await self._outcome_not_taken(gid, msg, result)
            except Exception:  # one report's failure is that report's: the others are answered
                # Not acknowledged: its gateway sends it again. Counted, since one that fails every time loops there.
                self.rejected["gateway_report_failed"] += 1
                log.exception("gateway %s's outcome for request %s (client %s) failed", gid, outside(msg.request_id),
                              outside(msg.client_id))
        if wake:
            self._wake_hub.set()

    async def _outcome_not_taken(self, gid: str, msg: Outcome | OutcomeIn, result: ReportResult) -> None:
        """The answer to an outcome the store refused (not our customer then), found no command for, or found
        answering a revision since replaced (acknowledged all the same: its gateway need not send it again)."""
        if isinstance(result, Failed):
            if not isinstance(result.error, Refused):
                raise result.error
            self.rejected["gateway_not_customer"] += 1
            log.warning("gateway %s reported for request %s: %s", gid, outside(msg.request_id), result.error)
            await self._to_gateway(gid, ErrorReply(ref_msg_id=msg.msg_id, code="forbidden", message=str(result.error)))
            return
        if result is None:
            self.rejected["gateway_unknown_request"] += 1
            await self._to_gateway(gid, ErrorReply(ref_msg_id=msg.msg_id, code="unknown_client",
                                                   message=f"no request {msg.request_id} for {msg.client_id}"))
            return
        self.rejected["gateway_stale_revision"] += 1
        log.info("gateway %s answered revision %d of request %s, which revision %d replaced: not forwarded", gid,
                 msg.revision, outside(msg.request_id), result[1])
        await self._ack_gateway(gid, msg.msg_id)

    # -- sending ------------------------------------------------------------------------------------------

    async def _to_hub(self, msg: Ack | ErrorReply) -> None:
        if self.hub is None:
            return
        if isinstance(msg, Ack) and self.ack_partition is not None:
            msg = msg.model_copy(update={"partition": self.ack_partition})
        try:
            await self.hub.publish(topics.up("retailers", self.retailer_id), encode(msg), qos=publish_qos(msg),
                                   wait_s=PUBLISH_WAIT_S)
        except MqttError as exc:
            log.warning("could not answer the hub: %s", exc)

    def gateway_topic(self, gid: str) -> str:
        """``topics.down("gateways", gid)``, checked and built once per gateway (a fan-out sends each gateway a
        command and an acknowledgement; the id check was ~2 % of the bridge's CPU)."""
        topic = self._down_topics.get(gid)
        if topic is None:
            topic = self._down_topics[gid] = topics.down("gateways", gid)
        return topic

    async def _ack_gateway(self, gid: str, msg_id: str, acks: AckStamp | None = None) -> None:
        """Acknowledge one message to its gateway: :meth:`_to_gateway` with an ``ack``, built without a model
        (:class:`mhp_wire.fastwire.AckStamp`, the same payload; ``acks``: the one of the answers sent in this turn,
        which share its ``sent_at``)."""
        if self.local is None:
            return
        payload = (acks or AckStamp()).ack(msg_id)
        try:
            await self.local.publish(self.gateway_topic(gid), payload, qos=ACK_QOS, wait_s=PUBLISH_WAIT_S)
        except MqttError as exc:
            log.warning("could not answer gateway %s: %s", gid, exc)

    async def _to_gateway(self, gid: str, msg: Ack | ErrorReply) -> None:
        if self.local is None:
            return
        try:
            await self.local.publish(self.gateway_topic(gid), encode(msg), qos=publish_qos(msg), wait_s=PUBLISH_WAIT_S)
        except MqttError as exc:
            log.warning("could not answer gateway %s: %s", gid, exc)

    async def run(self) -> None:
        """Dispatch until cancelled, in two loops: towards the gateways (commands, notices) and towards the hub
        (outcomes, measurements). Sending thousands of commands takes seconds; in one loop the outcomes the first
        gateways already answered waited behind the last commands (an emergency to 10,000 gateways reached the hub
        in bursts, seconds late)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._loop(self._wake_gateways, self.dispatch_gateways), name="bridge-to-gateways")
            tg.create_task(self._loop(self._wake_hub, self.dispatch_hub), name="bridge-to-hub")
            tg.create_task(self.tariff.run(), name="bridge-tariff-republish")

    @staticmethod
    async def _loop(wake: asyncio.Event, step: Callable[[], Awaitable[float]]) -> None:
        while True:
            wake.clear()
            wait_s = 1.0
            try:
                wait_s = await step()
            except StorageError as exc:
                log.warning("dispatch paused: %s", exc)
            await wait_or_timeout(wake, wait_s)

    async def dispatch_once(self) -> float:
        """Send what is due in both directions once; returns how long to sleep."""
        return min(await self.dispatch_gateways(), await self.dispatch_hub())

    async def _to_local(self, topic: str, payload: bytes, retain: bool) -> None:
        if self.local is None:
            raise MqttError("the retailer broker link is not open")
        await self.local.publish(topic, payload, retain=retain, wait_s=PUBLISH_WAIT_S)

    async def _to_hub_link(self, topic: str, payload: bytes, retain: bool) -> None:
        if self.hub is None:
            raise MqttError("the hub broker link is not open")
        await self.hub.publish(topic, payload, retain=retain, wait_s=PUBLISH_WAIT_S)

    async def _command_due(self, p: Pending) -> bool:
        """The bridge's rule before (re-)sending a command: a gateway silent past the ack timeout, or a request
        past its deadline, gets its outcome instead."""
        cmd, now = p.row, self.commands_out.round_at
        # A gateway's ack is QoS 0 (docs/protocol.md): one sent while this bridge was offline is not queued for it.
        # So the silence counts from the link's last (re)connection too: the command is sent once more after it,
        # and only a gateway silent for a whole timeout since then is unreachable.
        waited_from = max(cmd["first_sent_at"] or now, cmd["not_before"], self.local_up_since)
        # The silence is known up to what we have read (asked only of a command sent before, not of a first send).
        if cmd["first_sent_at"] is not None and min(now, self.read_up_to()) - waited_from > self.gateway_ack_timeout_s:
            await self._unreachable(cmd, "no acknowledgement from the gateway in time")
            return False
        if cmd["deadline"] <= now:
            await self._unreachable(cmd, "the request expired before the gateway acknowledged it", ClientState.EXPIRED)
            return False
        return True

    async def _handover_due(self, p: Pending) -> bool:
        """:meth:`_command_due` for a command of the hand-over, which checks the copy made at its commit: first,
        that it is still held, i.e. not withdrawn since (:meth:`_withdraw_fresh`: cancelled, replaced by a newer
        revision, or its client's supplier changed). A withdrawn one is neither sent nor judged: its row is closed
        or replaced (an ``unreachable`` for the old copy would close the newer revision's command), or, left open,
        due in the store. A first send before its deadline (nearly every one) has nothing for
        :meth:`_command_due` to judge (no silence yet, not expired), so it is passed here without calling
        :meth:`_command_due`: the coroutine object that call made and ran, one per command, is what was removed;
        this method's own coroutine (awaited by :meth:`~mhp_wire.outbox.Outbox.send_stored`) remains."""
        if str(p.key) not in self.held_commands:
            return False
        row = p.row
        return (row["first_sent_at"] is None and row["deadline"] > self.commands_out.round_at) \
            or await self._command_due(p)

    async def _notice_due(self, p: Pending) -> bool:
        """A notice past its deadline is dropped, not sent."""
        return bool(p.row["deadline"] > self.notices_out.round_at)

    async def dispatch_gateways(self) -> float:
        """Send the commands and notices that are due to gateways; returns how long to sleep."""
        # Every hand-over first, those made while one goes out included: the hub sends a large request to a bridge
        # in several messages, and a later one's commands go before the re-sends below, as they did when this loop
        # read them from the store (ordered by next attempt). Disconnected, a hand-over is released (due in the
        # store) without an await, so nothing is handed over meanwhile and the loop ends.
        while self.fresh_commands:
            fresh, self.fresh_commands = self.fresh_commands, []
            self.handing_over = fresh
            try:
                if self.local is not None and self.local.connected:
                    await self.commands_out.send_stored(fresh, self._handover_due)
            finally:  # sent and recorded, or left due in the store for the rounds below
                self.handing_over = []
                self.held_commands.difference_update(str(p.key) for p in fresh)
        if self.local is not None and self.local.connected:
            await self.commands_out.send_due(self._command_due)
            await self.notices_out.send_due(self._notice_due)
        if self.local is None or not self.local.connected:
            return 0.2  # what is due waits for the retailer broker; do not poll the store meanwhile
        now = self.commands_out.clock()
        if self._wake_gateways.is_set():  # woken during the round: the next round starts at once
            if now - self.read_up_to() > MARKER_LAG_S:  # busy: keep a read marker going (one in flight) so that
                await self._send_probe()  # re-sends are judged, but not one per round trip while nothing lags
            return 0.0
        nxt, behind = await self.store.next_gateway_due(now, self.read_up_to())
        if behind:  # re-sends wait for us to read further: a marker tells when we have (it wakes this loop)
            await self._send_probe()
        return 1.0 if nxt is None else max(0.01, min(1.0, nxt - now))

    async def dispatch_hub(self) -> float:
        """Send the outcomes and measurements that are due to the hub; returns how long to sleep."""
        now = time.time()
        if self._pending_measurements and now - self._last_measurements >= self.measurement_interval_s:
            self._last_measurements = now
            items = list(self._pending_measurements.values())
            self._pending_measurements.clear()
            await self.store.queue_for_hub(measurements_payloads(items))
        fresh, self.fresh_to_hub = self.fresh_to_hub, {}
        if self.hub is not None and self.hub.connected:
            if fresh:  # first, before the reads below: one not sent (the link went down) is still due in the store
                topic = topics.up("retailers", self.retailer_id)
                await self.hub_out.send_stored([Pending(m, topic, payload, 0) for m, payload in fresh.items()
                                                if not self.hub_order.sent_here(m)])
            busy = time.monotonic() - self.last_hub_ack < self.hub_retry_s
            if busy:  # the hub is acknowledging, in order: what was sent after its last acknowledgement is queued
                await self.store.postpone_hub_resends(now, now + self.hub_retry_s, self.hub_order.maybe_queued)
            await self.hub_out.send_due()
        if self.hub is None or not self.hub.connected:
            return 0.2  # what is due waits for the hub broker (measurements are still queued on time)
        if self._wake_hub.is_set():
            return 0.0  # woken during the round (more outcomes stored): the next round starts at once
        nxt = await self.store.next_hub_due()
        wait = 1.0 if nxt is None else max(0.01, min(1.0, nxt - time.time()))
        if self._pending_measurements:
            wait = min(wait, max(0.01, self._last_measurements + self.measurement_interval_s - time.time()))
        return wait

    async def _unreachable(self, cmd: dict[str, Any], reason: str,
                           state: ClientState = ClientState.UNREACHABLE) -> None:
        out = Outcome(request_id=cmd["request_id"], client_id=cmd["client_id"], state=state,
                      detail={"reason": reason, "gateway_id": cmd["gateway_id"]},
                      trace={"retailer_ms": round(cmd["handling_ms"], 3)}, revision=cmd["revision"])
        # ``unreachable`` is an inference: the command may still reach the gateway from the broker's queue, and the
        # gateway's outcome then still goes to the hub (UNANSWERED, not CLOSED); an expired command is closed.
        closed = UNANSWERED if state is ClientState.UNREACHABLE else CLOSED
        await self.store.set_state(cmd["request_id"], cmd["client_id"], closed, (out.msg_id, encode(out)))
        self._wake_hub.set()  # the outcome goes to the hub from the other loop
        log.warning("client %s %s for request %s: %s", cmd["client_id"], state, outside(cmd["request_id"]), reason)

    async def _too_large(self, cmd: dict[str, Any], exc: PacketTooLarge) -> None:
        """A command its link refused as too large for the retailer broker (never sent, nor ever sendable there):
        closed as ``refused``, its reason the size, for the hub."""
        await self._unreachable(cmd, f"the command was not sent to the gateway: its packet of {exc.size} bytes is "
                                     f"over the {exc.limit} the retailer broker takes", ClientState.REFUSED)

    async def _unsendable(self, cmd: dict[str, Any]) -> None:
        """A due command without its payload (neither its ``command_payloads`` row nor its request's template in
        ``command_templates``: the store's invariant broken, a damaged database): it can never be sent, so it is
        closed as ``refused`` (as one too large to send) instead of being read as due again and again."""
        log.error("command %s of client %s for request %s has no payload in the bridge's store (damaged database?): "
                  "closed as refused", cmd["msg_id"], cmd["client_id"], outside(cmd["request_id"]))
        await self._unreachable(cmd, "the command was not sent to the gateway: its payload is missing from the "
                                     "retailer bridge's store", ClientState.REFUSED)

    async def push_schedule(self, gateway_id: str, schedule: Schedule) -> None:
        """Send a customer's schedule to its gateway through the stored outbox (re-sent until acknowledged)."""
        await self.store.queue_for_gateway(schedule.msg_id, gateway_id, encode(schedule), time.time() + 7 * 86_400)
        self.kick()


class _Commands:
    """The store's ``commands`` (those still being sent) as an :class:`OutboxStorage`. A command sent once whose
    first re-send falls due before the gateways' measured round trip (``rtt``) says it could have been answered
    waits until then: its delay was fixed when it was sent, before the acknowledgements of a busy link came in; and
    it waits while answers to commands sent no later than it keep coming (:meth:`RoundTrip.quiet_since`), but never
    past ``resend_by_s`` after its send (its ack timeout's half), so that it is re-sent once before the silence
    since that send makes its gateway ``unreachable``."""

    def __init__(self, store: BridgeStore, topic_of: Callable[[str], str], rtt: RoundTrip,
                 read_up_to: Callable[[], float] = lambda: math.inf, held: set[str] | None = None,
                 resend_by_s: float = math.inf, *,
                 too_large: Callable[[dict[str, Any], PacketTooLarge], Awaitable[None]],
                 unsendable: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.store = store
        self.topic_of = topic_of
        self.rtt = rtt
        self.read_up_to = read_up_to
        """How far the bridge has read its broker: a command already sent is judged at that time, not at now."""
        self.held = held if held is not None else set()
        """Commands the relay sends from their commit (:attr:`BridgeRelay.held_commands`): not read as due here."""
        self.too_large = too_large
        """Closes a command its link refused as too large (:meth:`parked`)."""
        self.unsendable = unsendable
        """Closes a due command read without its payload (:meth:`due`): it could never be sent."""
        self.resend_by_s = resend_by_s
        """The latest a first re-send is postponed to, after the command's first send (unless the measured round
        trip alone says later): ``BridgeRelay`` gives half the ack timeout, which ``_command_due`` counts from the
        first send, so the re-send has the other half to be answered."""

    async def due(self, now: float, limit: int) -> list[Pending]:
        topic_of = self.topic_of
        horizon = self.read_up_to()
        rows = await self.store.due_commands(now, limit, horizon)
        if any(c["payload"] is None for c in rows):  # never, unless the store was damaged: closed, not due for ever
            for c in rows:
                if c["payload"] is None:
                    await self.unsendable(c)
            rows = [c for c in rows if c["payload"] is not None]
        if self.held:
            rows = [c for c in rows if c["msg_id"] not in self.held]
        now = min(now, horizon)  # what a re-send is judged by
        wait_s = self.rtt.timeout_s()
        # A first re-send waits one timeout of the link's silence towards it (``RoundTrip.quiet_since``: answers to
        # commands sent no later than it still coming in mean it is queued behind them). Not one made due at once
        # (next_attempt_at 0: its gateway came back online, ``resend_now_many``). Never past ``resend_by_s`` after
        # the send: answers to others that trickle in longer than that must not use up its own ack timeout.
        quiet: dict[float, float] = {}
        early = []
        for c in rows:
            sent_at = c["first_sent_at"]
            if c["attempts"] == 1 and c["next_attempt_at"] > 0 and sent_at is not None:
                due_at = quiet.get(sent_at)
                if due_at is None:
                    due_at = quiet[sent_at] = min(self.rtt.quiet_since(sent_at) + wait_s,
                                                  sent_at + max(wait_s, self.resend_by_s))
                if now < due_at:
                    early.append((due_at, c["msg_id"]))
        if early:
            await self.store.postpone_commands(early)
            later = {m for _, m in early}
            rows = [c for c in rows if c["msg_id"] not in later]
        if any(c["attempts"] == 1 and c["next_attempt_at"] > 0 for c in rows):
            self.rtt.timed_out()  # first re-sends going out: wait longer for the next ones, until a sample
        return [Pending(c["msg_id"], topic_of(c["gateway_id"]), c["payload"], c["attempts"], row=c) for c in rows]

    async def sent(self, sent: Sequence[tuple[Pending, float]], dropped: Sequence[Pending], now: float) -> None:
        if sent:  # a dropped command has its outcome already (``_unreachable``)
            await self.store.mark_sent([(str(p.key), at) for p, at in sent], now)

    async def parked(self, parked: Sequence[tuple[Pending, float, PacketTooLarge]], now: float) -> None:
        """A command over the broker's packet was not sent: it is closed (``too_large``), its first send and
        attempts left as they were."""
        for p, _, exc in parked:
            await self.too_large(p.row, exc)


class _Notices:
    """The store's ``gateway_outbox`` (cancellations, schedules) as an :class:`OutboxStorage`."""

    def __init__(self, store: BridgeStore, topic_of: Callable[[str], str]) -> None:
        self.store = store
        self.topic_of = topic_of

    async def due(self, now: float, limit: int) -> list[Pending]:
        return [Pending(r["msg_id"], self.topic_of(r["gateway_id"]), r["payload"], r["attempts"], row=r)
                for r in (await self.store.due_gateway_outbox(now))[:limit]]

    async def sent(self, sent: Sequence[tuple[Pending, float]], dropped: Sequence[Pending], now: float) -> None:
        await self.store.mark_gateway_outbox([(str(p.key), at) for p, at in sent], [str(p.key) for p in dropped])

    async def parked(self, parked: Sequence[tuple[Pending, float, PacketTooLarge]], now: float) -> None:
        """A notice over the packet waits for the park, unsent (then dropped past its deadline, or tried again)."""
        await self.store.postpone_gateway_outbox([(at, str(p.key)) for p, at, _ in parked])


class SendOrder:
    """Which messages sent to the hub may still be in its backlog. The hub acknowledges in the order it received
    (one group commit after the other), so a message sent *after* the last one it acknowledged may still be queued
    there (a re-send would only add to its backlog), while one sent *before* it was lost (not stored: a storage
    outage, a hub restart) and is re-sent when due, even while the hub keeps acknowledging newer ones. A message
    sent before this process started has no number and counts as lost (it is re-sent when due)."""

    def __init__(self) -> None:
        self._seq = 0
        self._sent: dict[str, int] = {}
        self._acked = 0
        """The highest send number the hub has acknowledged."""

    def sent(self, msg_ids: Sequence[str]) -> None:
        """These went out now, in this order (a re-send gets a new number)."""
        for m in msg_ids:
            self._seq += 1
            self._sent[m] = self._seq

    def acked(self, msg_ids: Sequence[str]) -> None:
        """The hub acknowledged these."""
        for m in msg_ids:
            seq = self._sent.pop(m, None)
            if seq is not None and seq > self._acked:
                self._acked = seq

    def sent_here(self, msg_id: str) -> bool:
        """Whether this process sent ``msg_id`` and the hub has not acknowledged it yet."""
        return msg_id in self._sent

    def maybe_queued(self, msg_id: str) -> bool:
        """Whether ``msg_id`` was sent after the newest message the hub has acknowledged."""
        return self._sent.get(msg_id, 0) > self._acked


class _ToHub:
    """The store's ``hub_outbox`` (outcomes, measurements) as an :class:`OutboxStorage`."""

    def __init__(self, store: BridgeStore, topic: str, order: SendOrder) -> None:
        self.store = store
        self.topic = topic
        self.order = order

    async def due(self, now: float, limit: int) -> list[Pending]:
        return [Pending(r["msg_id"], self.topic, r["payload"], r["attempts"])
                for r in await self.store.due_outbox(now, limit)]

    async def sent(self, sent: Sequence[tuple[Pending, float]], dropped: Sequence[Pending], now: float) -> None:
        if sent:
            self.order.sent([str(p.key) for p, _ in sent])
            await self.store.mark_outbox_sent([(str(p.key), at) for p, at in sent])

    async def parked(self, parked: Sequence[tuple[Pending, float, PacketTooLarge]], now: float) -> None:
        """A message over the hub broker's packet waits for the park, unsent: no send number, no attempt."""
        await self.store.postpone_outbox([(at, str(p.key)) for p, at, _ in parked])


def _instant(at: float) -> str:
    """An instant (epoch seconds) for a refusal's text: ISO 8601 in UTC, or the number where ``datetime`` cannot hold
    it (a start the models accept, ``9999-12-31T23:59:59.99999Z``, is 253402300800.0 as a float: year 10000)."""
    try:
        return datetime.fromtimestamp(at, UTC).isoformat()
    except (OverflowError, ValueError, OSError):
        return f"{at} (seconds since the epoch)"


def _delivered(cmd: dict[str, Any]) -> Report:
    """The ``delivered`` outcome of a command its gateway acknowledged, for the hub (encoded, or packed with
    others, by the store), under its fixed ``msg_id`` (:func:`delivered_msg_id`)."""
    return Report(cmd["request_id"], cmd["client_id"], ClientState.DELIVERED, {},
                  {"retailer_ms": round(cmd["handling_ms"], 3)}, cmd["revision"], delivered_msg_id(cmd["msg_id"]))


def pack_outcomes(outcomes: Sequence[Outcome | Report], per_message: int = OUTCOMES_PER_MESSAGE, *,
                  oversize: fastwire.Oversize | None = None) -> list[tuple[str, bytes]]:
    """One batch's outcomes for the hub as outbox messages ``(msg_id, payload)``: one ``outcomes`` per request (of
    at most ``per_message`` clients, and split further while its packet would not fit the hub broker's, also once a
    hub replica forwards it: :data:`~mhp_wire.messages.BRIDGE_OUTCOME_BYTES`), a request
    with one outcome in the batch as a plain ``outcome`` (its detail cut to a marker, and ``oversize`` told, if even
    alone it would not fit). Each client's outcomes keep their order. Built from validated values without models
    (:func:`mhp_wire.fastwire.pack_reports`; the hub validates what it receives)."""
    return fastwire.pack_reports([o if isinstance(o, Report) else _report(o) for o in outcomes], per_message,
                                 oversize=oversize)


def _report(o: Outcome) -> Report:
    return Report(o.request_id, o.client_id, o.state, o.detail, o.trace, o.revision, o.msg_id)
