"""Several hub replicas on one shared store: who owns which request, what they forward to each other, adoption.

Each replica keeps the book (outbox, deadlines, phases) of the requests it created; the request row names its
owner (``r:owner``, and ``d:owner`` in the open-requests index), and only the owner writes the row, so the book's
single-writer locking holds across processes. Retailers' messages reach one replica of the shared subscription:

* an outcome for a request another replica owns is forwarded to that owner's inbox, which applies and acknowledges
  it; while the owner is offline it is left unacknowledged (the retailer's outbox sends it again). It goes as the
  retailer's bytes, unchanged, after a one-line header (:func:`mhp_wire.messages.replica_outcome_header`), so that it
  fits the brokers' packet whenever the retailer kept to :data:`mhp_wire.messages.BRIDGE_OUTCOME_BYTES`; one that
  would not fit raises :class:`TooBigToForward` (the relay holds it: not acknowledged, the retailer told);
* an ack naming messages that are not in this replica's outbox is forwarded to every other live replica;
* a cancel (HTTP) for a request another replica owns is forwarded to the owner, which answers.

Presence is each replica's retained status with an ``offline`` last will. When one goes offline, the lowest live
replica id adopts its open requests: it rewrites their owner and loads them (unacknowledged messages are sent
again; retailers drop duplicates). A replica starting listens to the retained presence for ``settle_s`` first,
then loads only the requests it owns: by then an adoption of its requests begun while it was offline has been
written (``docs/architecture.md``, scale-out; ``docs/decisions.md``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud_hub.book import RequestBook
from cloud_hub.errors import HubError, OwnerUnavailable
from cloud_hub.metrics import HubMetrics
from cloud_hub.storage import StoreUnavailable
from mhp_wire import topics
from mhp_wire.ids import is_id
from mhp_wire.logsafe import outside
from mhp_wire.messages import (
    SEND_PAYLOAD_BYTES,
    AckPartition,
    Presence,
    WireError,
    decode,
    replica_outcome_header,
)
from mhp_wire.mqtt import MqttError, MqttLink
from mhp_wire.process import wait_or_timeout

log = logging.getLogger(__name__)

ACK_IDS_PER_FORWARD = 2_000
"""Acknowledged ids per forwarded ``ack``: 2,000 ids of at most 64 characters are ~134 KB with their quotes and
commas, well within the packet (``mhp_wire.messages.SEND_PAYLOAD_BYTES``) with the message around them."""


class ReplicaMessage(BaseModel):
    """What one replica sends another on its inbox (``mhp/v1/hub/replicas/{id}/in``): the whole message, or (an
    ``outcome``) the header line before the retailer's payload (:func:`read_inbox`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["outcome", "ack", "cancel", "cancel_result"]
    sender: str
    retailer_id: str | None = None
    payload: str | None = None
    """``outcome`` from a replica of the release before the framing: the retailer's message as a JSON string (read
    for one release, written no more: :func:`read_inbox`)."""
    ack_ids: list[str] = Field(default_factory=list)
    partition: AckPartition | None = None
    """``ack``: the partition of the retailer's bridge that sent it (absent: an unpartitioned bridge)."""
    request_id: str | None = None
    principal: str | None = None
    """``cancel``: who asked (already authorized by the sender; the owner authorizes again)."""
    corr: str | None = None
    """``cancel``/``cancel_result``: pairs an answer with its question."""
    status: int | None = None
    """``cancel_result``: unused since the owner answers with ``error`` (kept so the message's shape only grows)."""
    body: dict[str, Any] | None = None
    """``cancel_result``: the owner's answer when the cancel was done."""
    error: str | None = None
    """``cancel_result``: the owner refused: the :class:`cloud_hub.errors.HubError` ``code`` it raised."""
    message: str | None = None
    """``cancel_result``: that error's message."""


class TooBigToForward(Exception):
    """A retailer's outcome that, with the forwarding header, would not fit the brokers' packet: only one over
    :data:`~mhp_wire.messages.BRIDGE_OUTCOME_BYTES` (a bridge not built here). ``str()`` is the retailer's answer."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes too big to forward to the hub replica that owns its request "
                         f"(at most {limit} bytes): split it into smaller messages or cut its detail")
        self.size = size
        self.limit = limit


def outcome_frame(sender: str, retailer_id: str, payload: bytes) -> bytes:
    """What a replica publishes on the owner's inbox for a retailer's ``outcome``/``outcomes``: the header line and
    the retailer's bytes as received."""
    return replica_outcome_header(sender, retailer_id) + payload


def read_inbox(data: bytes) -> tuple[ReplicaMessage, bytes | None]:
    """A message on a replica's inbox, and the retailer's payload when it is an ``outcome``. An ``outcome`` is a
    header line then the retailer's bytes (:func:`outcome_frame`); every other message is one JSON object, which
    has no newline (compact JSON escapes it inside strings). The whole-JSON ``outcome`` of the release before, its
    payload a JSON string, is read too, for one release (docs/decisions.md, "An outcome forwarded between hub
    replicas fits the packet"). Raises :class:`ValueError` (a :class:`ValidationError`) on anything else."""
    head, newline, rest = data.partition(b"\n")
    msg = ReplicaMessage.model_validate_json(head)
    if newline:
        if msg.type != "outcome" or msg.payload is not None:
            raise ValueError(f"a {msg.type} message with a payload line after it")
        return msg, rest
    if msg.type == "outcome" and msg.payload is not None:
        return msg, msg.payload.encode()
    return msg, None


CancelHandler = Callable[[str, str], Awaitable[dict[str, Any]]]
"""``(principal, request_id) -> answer``: the owner's cancel; raises a :class:`HubError` when it refuses."""


class Replicas:
    """This replica's view of the others, and the forwarding and adoption between them."""

    def __init__(self, replica_id: str, book: RequestBook, metrics: HubMetrics, *, settle_s: float = 1.0,
                 scan_s: float = 10.0, forward_timeout_s: float = 5.0) -> None:
        self.me = replica_id
        self.book = book
        self.metrics = metrics
        self.settle_s = settle_s
        self.scan_s = scan_s
        self.forward_timeout_s = forward_timeout_s
        self.link: MqttLink | None = None
        self.presence: dict[str, str] = {}
        """Other replicas' last known presence (``online``/``offline``), from their retained status."""
        self.ready = asyncio.Event()
        """Set once this replica has loaded the requests it owns."""
        self.on_outcome: Callable[[str, bytes], Awaitable[None]] | None = None
        """Set by the relay: apply an outcome forwarded by another replica."""
        self.on_cancel: CancelHandler | None = None
        self._answers: dict[str, asyncio.Future[ReplicaMessage]] = {}
        self._wake = asyncio.Event()
        self._adopting = asyncio.Lock()

    # -- who is there ---------------------------------------------------------------------------------------

    def is_live(self, replica_id: str | None) -> bool:
        """Whether ``replica_id`` is this replica or another one currently online."""
        return replica_id == self.me or (replica_id is not None and self.presence.get(replica_id) == "online")

    def peers(self) -> list[str]:
        """The other replicas online now."""
        return sorted(r for r, state in self.presence.items() if state == "online" and r != self.me)

    def adopter(self) -> str:
        """The replica that adopts offline replicas' requests: the lowest live id."""
        return min([self.me, *self.peers()])

    def subscriptions(self) -> list[str]:
        """What a replica subscribes to: retailers' messages shared with the group, presence and its inbox not."""
        return [topics.shared(topics.all_up_msg("retailers")), topics.all_status("retailers"),
                topics.REPLICA_STATUS_ALL, topics.replica_in(self.me)]

    async def on_status(self, replica_id: str, payload: bytes) -> None:
        """Another replica's retained presence (or last will) changed."""
        if replica_id == self.me:
            return
        try:
            msg = decode(payload)
        except WireError as exc:
            log.warning("ignored an invalid presence of replica %s: %s", replica_id, outside(exc, 300))
            return
        if not isinstance(msg, Presence):
            return
        before = self.presence.get(replica_id)
        self.presence[replica_id] = msg.state
        if msg.state != before:
            log.info("hub replica %s is %s", replica_id, msg.state)
        if msg.state == "offline":
            self._wake.set()

    # -- start-up and adoption ------------------------------------------------------------------------------

    async def run(self) -> None:
        """After the link is up: join (settle, load this replica's requests), then adopt orphans until cancelled;
        after a lost connection, join again."""
        if self.book.deadlines or self.book.outbox:  # the relay was restarted: as after a lost connection, rejoin
            self.ready.clear()
            log.warning("replica %s restarts its relay: dropped its %d open request(s) until it rejoins", self.me,
                        self.book.forget())
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._adopt_loop(), name="hub-replica-adopt")
            tg.create_task(self._join_loop(), name="hub-replica-join")

    async def _join(self) -> None:
        await asyncio.sleep(self.settle_s)
        while True:
            try:
                n = await self.book.load()
                break
            except StoreUnavailable as exc:
                log.warning("replica %s cannot load its requests yet: %s", self.me, exc)
                await asyncio.sleep(1.0)
        if n:
            log.info("replica %s resumed %d unfinished request(s) it owns", self.me, n)
        self.book.kick()
        self.ready.set()
        self._wake.set()

    async def _join_loop(self) -> None:
        await self._join()
        while True:
            await asyncio.sleep(0.1)
            if self.link is None or self.link.connected:
                continue
            # Our last will has told the others we are offline, and the adopter may be taking our requests: stop
            # acting on them and, once connected again, take back only those still ours.
            self.ready.clear()
            dropped = self.book.forget()
            log.warning("replica %s lost the broker: dropped its %d open request(s) until it rejoins", self.me,
                        dropped)
            await self.link.wait_connected()
            await self._join()

    async def _adopt_loop(self) -> None:
        await self.ready.wait()
        while True:
            self._wake.clear()
            try:
                if self.ready.is_set():
                    await self.adopt_orphans()
            except StoreUnavailable as exc:
                log.warning("adoption paused: %s", exc)
            await wait_or_timeout(self._wake, self.scan_s)

    def check_ready(self) -> None:
        """Raise :class:`OwnerUnavailable` while this replica is (re)joining: it must not take new work."""
        if not self.ready.is_set():
            raise OwnerUnavailable(f"hub replica {self.me} is joining the others; retry shortly")

    async def adopt_orphans(self) -> int:
        """If this replica is the adopter, adopt every open request whose owner is not live; returns how many."""
        async with self._adopting:
            if self.adopter() != self.me:
                return 0
            n = 0
            dead: set[str] = set()
            for request_id, owner in await self.book.store.open_request_owners():
                # Checked again for every row: a replica that comes back stops the adoption of its requests.
                if self.is_live(owner) or self.adopter() != self.me:
                    continue
                if await self.book.adopt(request_id):
                    n += 1
                    dead.add(owner or "(no owner)")
            if n:
                self.metrics.replica_adopted.inc(n)
                log.warning("replica %s adopted %d open request(s) of offline replica(s) %s", self.me, n,
                            ", ".join(sorted(dead)))
            return n

    # -- forwarding -----------------------------------------------------------------------------------------

    async def _send(self, replica_id: str, msg: ReplicaMessage) -> None:
        await self._publish(replica_id, msg.model_dump_json(exclude_none=True).encode())

    async def _publish(self, replica_id: str, data: bytes) -> None:
        if self.link is None:
            raise MqttError("the MQTT link is not up")
        await self.link.publish(topics.replica_in(replica_id), data, wait_s=self.forward_timeout_s)

    async def forward_outcome(self, owner: str, retailer_id: str, payload: bytes) -> None:
        """Hand a retailer's ``outcome``/``outcomes`` to the replica that owns its request (which acknowledges it to
        the retailer), its bytes unchanged after :func:`outcome_frame`'s header. Raises :class:`TooBigToForward`,
        sending nothing, when that would not fit :data:`~mhp_wire.messages.SEND_PAYLOAD_BYTES` (its packet would
        not fit the broker's, which would cut this replica's link at each re-send of it, for good)."""
        frame = outcome_frame(self.me, retailer_id, payload)
        if len(frame) > SEND_PAYLOAD_BYTES:
            raise TooBigToForward(len(payload), SEND_PAYLOAD_BYTES - (len(frame) - len(payload)))
        try:
            await self._publish(owner, frame)
            self.metrics.replica_forwarded.labels("outcome").inc()
        except MqttError as exc:  # the retailer sends it again: it was not acknowledged
            log.warning("could not forward an outcome to replica %s: %s", owner, exc)

    async def forward_acks(self, retailer_id: str, ack_ids: list[str], partition: AckPartition | None = None) -> None:
        """Acks of messages this replica did not send: every other live replica may have sent them. ``partition``:
        which partition of the retailer's bridge acknowledged (the owner waits for all of them). Only ids of the
        platform's form are forwarded (no replica's message has another), :data:`ACK_IDS_PER_FORWARD` to a message,
        so that each fits the packet: an ``ack`` filling the retailer's packet with one long id, or with many, grew
        past it once wrapped, and cut this replica's link (review of s11-rep)."""
        ids = [m for m in ack_ids if is_id(m)]
        for i in range(0, len(ids), ACK_IDS_PER_FORWARD):
            part = ids[i:i + ACK_IDS_PER_FORWARD]
            for peer in self.peers():
                try:
                    await self._send(peer, ReplicaMessage(type="ack", sender=self.me, retailer_id=retailer_id,
                                                          ack_ids=part, partition=partition))
                    self.metrics.replica_forwarded.labels("ack").inc()
                except MqttError as exc:  # the owner sends the message again and the retailer acks it again
                    log.warning("could not forward acks to replica %s: %s", peer, exc)

    def serve_cancels(self, handler: CancelHandler) -> None:
        """Answer other replicas' cancels with ``handler`` (the flexibility use case's, built after the replicas
        because it forwards cancels through them: the one edge back from the replicas to the use cases)."""
        self.on_cancel = handler

    async def forward_cancel(self, owner: str, principal: str, request_id: str) -> dict[str, Any]:
        """Ask the owner of a request to cancel it: its answer, or the :class:`HubError` it refused with."""
        if not self.is_live(owner):
            raise OwnerUnavailable(f"replica {owner} that owns request {request_id} is offline; another replica "
                                   "is adopting its requests, retry shortly")
        corr = uuid.uuid4().hex
        fut: asyncio.Future[ReplicaMessage] = asyncio.get_running_loop().create_future()
        self._answers[corr] = fut
        try:
            await self._send(owner, ReplicaMessage(type="cancel", sender=self.me, request_id=request_id,
                                                   principal=principal, corr=corr))
            self.metrics.replica_forwarded.labels("cancel").inc()
            answer = await asyncio.wait_for(fut, self.forward_timeout_s)
        except (MqttError, TimeoutError) as exc:
            raise OwnerUnavailable(f"replica {owner} that owns request {request_id} did not answer ({exc or 'timeout'})"
                                   "; retry shortly") from None
        finally:
            self._answers.pop(corr, None)
        if answer.error is not None or answer.body is None:
            raise HubError.from_code(answer.error or "", answer.message or "the owner replica gave no answer")
        return answer.body

    async def on_message(self, payload: bytes) -> None:
        """Apply what another replica sent this one."""
        try:
            msg, outcome = read_inbox(payload)
        except (ValueError, ValidationError) as exc:
            log.warning("ignored an invalid message on replica %s's inbox: %s", self.me, outside(exc, 300))
            return
        if msg.type == "outcome" and msg.retailer_id and outcome is not None and self.on_outcome is not None:
            await self.on_outcome(msg.retailer_id, outcome)
        elif msg.type == "ack" and msg.retailer_id:
            ids = self.book.acked_by_retailer(msg.retailer_id, msg.ack_ids, msg.partition)
            if ids:
                await self.book.on_ack(msg.retailer_id, ids)
        elif msg.type == "cancel" and msg.corr and msg.request_id and msg.principal and self.on_cancel is not None:
            answer = ReplicaMessage(type="cancel_result", sender=self.me, corr=msg.corr)
            try:
                answer.body = await self.on_cancel(msg.principal, msg.request_id)
            except HubError as exc:  # the asking replica raises the same error to its client
                answer.error, answer.message = exc.code, str(exc)
            except ValueError as exc:  # a stored row this replica cannot read: another replica may, later
                answer.error, answer.message = OwnerUnavailable.code, str(exc)
            try:
                await self._send(msg.sender, answer)
            except MqttError as exc:  # the asking replica answers 503 after its timeout
                log.warning("could not answer replica %s's cancel: %s", msg.sender, exc)
        elif msg.type == "cancel_result" and msg.corr:
            fut = self._answers.get(msg.corr)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        else:
            log.warning("ignored an incomplete %s message from replica %s", msg.type, outside(msg.sender))
