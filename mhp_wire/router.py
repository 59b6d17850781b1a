"""The one inbound dispatch point for what parties send up: topic → rate limit → decode → ``{message type:
handler}``.

The hub (from retailers' bridges) and a bridge (from its gateways) receive the same shape of traffic: a party's
``up`` topic, whose party id the broker's ACL ties to the MQTT username. :class:`InboundRouter` reads the party
from the topic, takes one token from that party's bucket, decodes the payload once with the wire models, hands a
``presence`` on the ``status`` channel to the presence handler, and everything else to the handler registered for
its type. Anything it refuses goes, with the reason, to the owner's ``on_refused`` (which counts, logs and answers
by its own rules); the router itself never answers, so each side keeps its own replies and counters.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mhp_wire import topics
from mhp_wire.messages import Message, Presence, WireError, decode
from mhp_wire.ratelimit import RateLimiter

Reason = Literal["topic", "kind", "rate_limited", "invalid", "unexpected"]
"""``topic``: not a v1 ``up`` topic; ``kind``: another kind of party's; ``rate_limited``: over the party's rate,
refused unread; ``invalid``: not a valid message; ``unexpected``: a valid message this side does not take."""


@dataclass(slots=True)
class Inbound:
    """Where a message came from. Not frozen: a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__`` (1.1 against 0.24 µs for five fields), and one is made per message of a fan-out; no one
    changes it after."""

    party_id: str
    channel: Literal["msg", "telemetry", "status"]
    topic: str
    retained: bool
    payload: bytes
    """As received (to forward it unchanged)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A message the router did not hand to a handler, and why."""

    reason: Reason
    topic: str
    party_id: str | None
    """The sender when the topic names one (for a refused topic: :func:`mhp_wire.topics.sender_of`)."""
    error: str = ""
    msg: Any = None
    """The decoded message (``unexpected`` only)."""


@dataclass(slots=True)
class Routed:
    """A message that passed :meth:`InboundRouter.screen`, with where it came from."""

    source: Inbound
    msg: Any


Handler = Callable[[Inbound, Any], Awaitable[None]]

TOPICS_KEPT = 65_536
"""``up`` topics whose parse an :class:`InboundRouter` keeps (one per party: a bridge's gateways, the hub's
retailers); when it is full it starts over."""


class InboundRouter:
    """Routes one party kind's ``up`` messages; give it to the MQTT link as its handler (or call :meth:`route`)."""

    def __init__(self, kind: topics.PartyKind, handlers: Mapping[type, Handler], *,
                 on_refused: Callable[[Refusal], Awaitable[None]],
                 limiter: Callable[[], RateLimiter] | None = None,
                 on_presence: Handler | None = None, on_decoded: Callable[[Any], None] | None = None,
                 decode: Callable[[bytes], Any] = decode) -> None:
        self.kind = kind
        self.decode = decode
        """Payload → message, raising :class:`WireError` for an invalid one: the models' :func:`decode`, or an
        owner's faster reader of some plain shapes that falls back to it (the bridge's
        :func:`mhp_wire.fastwire.reader`)."""
        self.handlers = dict(handlers)
        self.on_refused = on_refused
        self.limiter = limiter
        """The owner's current per-party limiter (read at each message: settings may replace it)."""
        self.on_presence = on_presence
        """Called with a ``presence`` on the ``status`` channel; anything else there is ignored."""
        self.on_decoded = on_decoded
        """Called with every message decoded from a party within its rate (counters), before its handler."""
        self._parsed: dict[str, topics.ParsedTopic] = {}
        """Each topic's parse, kept (:data:`TOPICS_KEPT`): its regular expression and the id check cost 0.75 µs per
        message, 10,000 times in a fan-out, a lookup 0.05. A :class:`~mhp_wire.topics.ParsedTopic` is immutable, so
        the parse kept is the parse; a topic that fails is not kept (it is refused every time)."""

    async def route(self, topic: str, payload: bytes, retained: bool) -> None:
        """Route one message."""
        screened = self.screen(topic, payload, retained)
        if isinstance(screened, Refusal):
            await self.on_refused(screened)
            return
        await self.dispatch(screened.source, screened.msg)

    def screen(self, topic: str, payload: bytes, retained: bool) -> Routed | Refusal:
        """What :meth:`route` does before a handler, at once (no ``await``): the topic, the party's rate, the
        decoding and ``on_decoded``; the message with its source, or the :class:`Refusal` to hand to
        ``on_refused``. An owner that handles a turn's messages together (:meth:`dispatch` for the others) uses it."""
        parsed = self._parsed.get(topic)
        if parsed is None:
            try:
                parsed = topics.parse_up(topic)
            except topics.TopicError:
                return Refusal("topic", topic, topics.sender_of(topic))
            if len(self._parsed) >= TOPICS_KEPT:
                self._parsed.clear()
            self._parsed[topic] = parsed
        if parsed.kind != self.kind:
            return Refusal("kind", topic, parsed.party_id)
        party = parsed.party_id
        if self.limiter is not None and self.limiter().take(party) > 0:
            return Refusal("rate_limited", topic, party)
        try:
            msg = self.decode(payload)
        except WireError as exc:
            return Refusal("invalid", topic, party, str(exc))
        if self.on_decoded is not None:
            self.on_decoded(msg)
        return Routed(Inbound(party, parsed.channel, topic, retained, payload), msg)

    async def dispatch(self, source: Inbound, msg: Any) -> None:
        """The second half of :meth:`route`: a presence to ``on_presence``, anything else to its type's handler."""
        if source.channel == "status":
            if isinstance(msg, Presence) and self.on_presence is not None:
                await self.on_presence(source, msg)
            return
        handler = self.handlers.get(type(msg))
        if handler is None:
            await self.on_refused(Refusal("unexpected", source.topic, source.party_id, msg=msg))
            return
        await handler(source, msg)


class TypeTable:
    """``{message type: handler}`` for the traffic from one's own upstream (a bridge's from the hub, a gateway's
    from its bridge), whose topic names no party to rate: the dispatch half of :class:`InboundRouter`."""

    def __init__(self, handlers: Mapping[type, Callable[[Any], Awaitable[None]]]) -> None:
        self.handlers = dict(handlers)

    async def dispatch(self, msg: Message) -> bool:
        """Hand ``msg`` to the handler of its type; False when there is none (the caller refuses it)."""
        handler = self.handlers.get(type(msg))
        if handler is None:
            return False
        await handler(msg)
        return True
