"""The one durable outbox of the platform: store → send → re-send with back-off → application-level ack → drop.

Zero loss comes from here, not from the broker (its persistence is a snapshot, ``reference/delivery.md``): a
message is stored before anyone is told it was accepted, sent, and sent again on a back-off until the receiver
answers with an application-level ``ack`` naming it, then dropped. The hub (its request book), the bridge (commands
to gateways, notices, outcomes to the hub) and the gateway (outcomes, telemetry) each keep their own storage — SQL
tables, storage cells — behind :class:`OutboxStorage`, and their own rules in a ``check`` (a command whose gateway
stayed silent too long becomes ``unreachable`` instead of being sent again); :class:`Outbox` is the sending round
they share, over an injected clock and the one back-off (:func:`mhp_wire.backoff.delay_s`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from mhp_wire.backoff import delay_s
from mhp_wire.logsafe import outside
from mhp_wire.mqtt import MqttError, PacketTooLarge

log = logging.getLogger(__name__)

PARK_S = 3600.0
"""How long an outbox leaves a message its link refused as too large before trying it again (:attr:`Outbox.park_s`)."""


@dataclass(slots=True)
class Pending:
    """One stored message whose next attempt is due. Not frozen: a frozen dataclass's ``__init__`` sets each field
    through ``object.__setattr__`` (1.1 against 0.24 µs for five fields), and one is made per message of a fan-out;
    no one changes it after."""

    key: Hashable
    """What the storage knows it by (a ``msg_id``, a sequence number, its own record)."""
    topic: str
    payload: bytes
    attempts: int
    """Sends so far (0: never sent)."""
    retain: bool = False
    row: Any = None
    """The storage's own record of it, for the owner's ``check``."""


class OutboxStorage(Protocol):
    """Where one outbox keeps its messages; each component implements it over its own storage."""

    async def due(self, now: float, limit: int) -> Sequence[Pending]:
        """Messages whose next attempt is due at ``now``, in the order to send them, at most ``limit``."""
        ...

    async def sent(self, sent: Sequence[tuple[Pending, float]], dropped: Sequence[Pending], now: float) -> None:
        """Record one round: each sent message with its next attempt time, and what ``check`` dropped (``now``:
        when the round read what was due)."""
        ...

    async def parked(self, parked: Sequence[tuple[Pending, float, PacketTooLarge]], now: float) -> None:
        """Messages the link refused as too large for the broker's packet (nothing written), each with when it may
        be tried again (``now`` + :attr:`Outbox.park_s`) and the refusal: not an attempt (no sent mark, no
        attempt counted); the owner closes it, drops it or leaves it due then, by its own rules."""
        ...


Publish = Callable[[str, bytes, bool], Awaitable[None]]
"""``publish(topic, payload, retain)``; raises :class:`MqttError` when the link is down or stays full."""
Check = Callable[[Pending], Awaitable[bool]]
"""The owner's rule before a send: True sends it, False drops it from this round (the owner has dealt with it)."""


class Outbox:
    """Sends what is due, in rounds; the owner's loop calls :meth:`send_due` when woken or when the next message
    is due. A publish that fails ends the round: the rest stays due and goes in the next one; one the link refuses as
    too large for the broker's packet (:class:`~mhp_wire.mqtt.PacketTooLarge`, nothing written) is parked and the
    round goes on."""

    def __init__(self, storage: OutboxStorage, publish: Publish, *, clock: Callable[[], float] = time.time,
                 retry_s: Callable[[int], float] = delay_s, limit: int = 500,
                 resend_from: Literal["read", "sent"] = "sent", park_s: float = PARK_S) -> None:
        self.storage = storage
        self.publish = publish
        self.clock = clock
        self.retry_s = retry_s
        """The delay before try number ``n`` (the one back-off with the owner's first and longest delay)."""
        self.limit = limit
        self.resend_from = resend_from
        """``"sent"``: re-sends count from the end of the round (thousands of publishes take a while); ``"read"``:
        from when the round read what was due."""
        self.sends = 0
        """Messages published, re-sends included."""
        self.round_at = 0.0
        """When (``clock``) the current round read what was due: the time the owner's ``check`` judges by."""
        self.park_s = park_s
        """How long a message the link refuses as too large (:class:`~mhp_wire.mqtt.PacketTooLarge`) waits before it
        is tried again: handed to :meth:`OutboxStorage.parked` (not recorded as sent) with that time, so that it
        neither cuts the link nor comes back every round."""
        self.parked = 0
        """Messages parked so (one per refusal), logged each time."""

    async def send_due(self, check: Check | None = None) -> int:
        """One round: read what is due, publish it in order, record it; returns how many were published."""
        now = self.round_at = self.clock()
        rows = await self.storage.due(now, self.limit)
        return await self._send(rows, check, now)

    async def send_stored(self, rows: Sequence[Pending], check: Check | None = None) -> int:
        """A round over messages the owner has just stored (committed) and still holds, instead of reading them
        back: published at once, in order, after the owner's ``check`` as in :meth:`send_due`, and recorded as any
        round's (re-sends then come from storage as usual). The owner's loop calls it, like :meth:`send_due`, so
        that the two never send the same message at once; what a failed publish leaves unsent is still due in
        storage. Returns how many were published."""
        now = self.round_at = self.clock()
        return await self._send(rows, check, now)

    async def _send(self, rows: Sequence[Pending], check: Check | None, now: float) -> int:
        if not rows:
            return 0
        sent: list[Pending] = []
        dropped: list[Pending] = []
        parked: list[tuple[Pending, float, PacketTooLarge]] = []
        for p in rows:
            if check is not None and not await check(p):
                dropped.append(p)
                continue
            try:
                await self.publish(p.topic, p.payload, p.retain)
            except PacketTooLarge as exc:  # nothing was written; the link goes on with the next message
                self.parked += 1
                parked.append((p, now + self.park_s, exc))
                log.error("outbox: message %s parked for %.0f s, not sent: %s", outside(str(p.key)), self.park_s, exc)
                continue
            except MqttError:
                break
            sent.append(p)
        base = self.clock() if self.resend_from == "sent" else now
        if sent or dropped:
            delays: dict[int, float] = {}  # one back-off figure per attempt count in a round, not one per message
            for p in sent:
                if p.attempts not in delays:
                    delays[p.attempts] = self.retry_s(p.attempts + 1)
            await self.storage.sent([(p, base + delays[p.attempts]) for p in sent], dropped, now)
        if parked:  # never recorded as sent: nothing left (docs/decisions.md, "A link refuses a packet ...")
            await self.storage.parked(parked, now)
        self.sends += len(sent)
        return len(sent)


class ReadHorizon:
    """How far a receiver has read its broker: the time before which everything the broker received for it has been
    read and applied. An outbox whose re-send timer counts the silence of the other side from the send alone takes
    "not yet read" for "not answered": a receiver behind on its inbound (thousands of answers queued at the broker,
    in its socket, or in a commit) re-sends what was answered long ago. The silence is known only up to this
    horizon, so re-sends (and the verdict "unreachable") are judged at ``min(now, at)``.

    The horizon is learnt with a marker: the owner publishes :meth:`probe`'s payload at QoS 1 to a topic only it
    subscribes to, and hands it back to :meth:`returned` once everything read before it is applied. A broker
    delivers one subscriber's messages in the order it received them, so what reached the broker before the marker
    has been read when the marker is; the marker's send time is then the horizon. One marker is in flight at a time;
    another goes when ``retry_s`` has passed without it (a broker may drop a queued message, a session may be lost).
    """

    def __init__(self, clock: Callable[[], float] = time.time, *, retry_s: float = 2.0, max_lag_s: float = 30.0,
                 nonce: str = "") -> None:
        self.clock = clock
        self.retry_s = retry_s
        self.max_lag_s = max_lag_s
        """The most the horizon may lag the clock (:meth:`known`): markers that stop coming back (a broker queue
        that stays full and drops each one, a commit that never ends) delay re-sends, ``unreachable`` and expiry by
        at most this, never for ever."""
        self.stalls = 0
        """Times a marker stayed away longer than ``max_lag_s`` (each logged once)."""
        self._stalled = False
        self._waiting_since: float | None = None
        """When the oldest marker still awaited was sent (None: none is awaited, and an old horizon only means that
        nobody asked; the owner sends a marker when a re-send waits for one)."""
        self.nonce = nonce
        """Tells this process's markers from an earlier one's still queued in the same session (ignored)."""
        self.at = 0.0
        """Everything the broker received for us before this time has been read and applied."""
        self._in_flight: dict[int, float] = {}
        self._seq = 0
        self._last_sent = -math.inf
        self.probes = 0
        """Markers sent."""

    def probe(self) -> bytes | None:
        """The payload of a marker to publish now, or None while one sent less than ``retry_s`` ago is in flight."""
        now = self.clock()
        if self._in_flight and now - self._last_sent < self.retry_s:
            return None
        self._seq += 1
        self._in_flight[self._seq] = self._last_sent = now
        if self._waiting_since is None:
            self._waiting_since = now
        if len(self._in_flight) > 1024:  # none came back for a long while: the oldest are lost, not merely late
            del self._in_flight[min(self._in_flight)]
        self.probes += 1
        return f"{self.nonce}:{self._seq}".encode()

    def returned(self, payload: bytes) -> bool:
        """A marker read back (after what was read before it is applied); True when it moved the horizon. Markers
        of another process, unknown or malformed ones are ignored; those sent before this one are implied by it."""
        nonce, _, seq_text = payload.decode("ascii", "replace").rpartition(":")
        if nonce != self.nonce or not seq_text.isdigit():
            return False
        seq = int(seq_text)
        sent_at = self._in_flight.get(seq)
        if sent_at is None:
            return False
        for s in [s for s in self._in_flight if s <= seq]:
            del self._in_flight[s]
        self._waiting_since = min(self._in_flight.values()) if self._in_flight else None
        if sent_at <= self.at:
            return False
        self.at = sent_at
        return True

    def known(self, now: float) -> float:
        """The time up to which the other side's silence counts at ``now``: the horizon, or ``now - max_lag_s`` when
        a marker has been awaited longer than that (a warning, once per stall)."""
        floor = now - self.max_lag_s
        if self.at >= floor or self._waiting_since is None or self._waiting_since >= floor:
            self._stalled = False
            return self.at
        if not self._stalled:
            self._stalled = True
            self.stalls += 1
            log.warning("no read marker came back for %.0f s: re-sends are judged %.0f s behind the clock until one "
                        "does", now - self._waiting_since, self.max_lag_s)
        return floor

    def lost(self) -> None:
        """The link was (re)connected: a marker in flight may be gone with the old session; the next may go now (and
        the wait for one counts from it)."""
        self._last_sent = -math.inf
        self._waiting_since = None
