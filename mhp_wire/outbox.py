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

import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from mhp_wire.backoff import delay_s
from mhp_wire.mqtt import MqttError


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


Publish = Callable[[str, bytes, bool], Awaitable[None]]
"""``publish(topic, payload, retain)``; raises :class:`MqttError` when the link is down or stays full."""
Check = Callable[[Pending], Awaitable[bool]]
"""The owner's rule before a send: True sends it, False drops it from this round (the owner has dealt with it)."""


class Outbox:
    """Sends what is due, in rounds; the owner's loop calls :meth:`send_due` when woken or when the next message
    is due. A publish that fails ends the round: the rest stays due and goes in the next one."""

    def __init__(self, storage: OutboxStorage, publish: Publish, *, clock: Callable[[], float] = time.time,
                 retry_s: Callable[[int], float] = delay_s, limit: int = 500,
                 resend_from: Literal["read", "sent"] = "sent") -> None:
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
        for p in rows:
            if check is not None and not await check(p):
                dropped.append(p)
                continue
            try:
                await self.publish(p.topic, p.payload, p.retain)
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
        self.sends += len(sent)
        return len(sent)
