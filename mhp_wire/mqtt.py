"""The one MQTT adapter of the project (gmqtt, MQTT 5, asyncio). Nothing else imports gmqtt.

A :class:`MqttLink` is one long-lived connection with a persistent session (clean start off, a session expiry),
QoS 1 subscriptions, a retained presence topic with an ``offline`` last will, and an async message handler that
runs *before* the PUBACK is sent (gmqtt's optimistic acknowledgement is off). gmqtt reconnects by itself after a
drop and re-subscribes; the first connection is retried here with back-off. Errors become :class:`MqttError`.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
import logging
import random
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTCommands, MQTTv50
from gmqtt.mqtt.handler import MQTTConnectError

from mhp_wire.backoff import Backoff, jittered
from mhp_wire.logsafe import outside
from mhp_wire.messages import MAX_PACKET_BYTES, presence_payload

log = logging.getLogger(__name__)
logging.getLogger("gmqtt.mqtt.package").setLevel(logging.WARNING)
"""gmqtt logs every SUBSCRIBE and UNSUBSCRIBE with its whole list of filters at INFO: a bridge partition's thousands
of per-gateway filters would fill its log at each start. This module logs how many it sends instead (DEBUG)."""

CONNECT_ATTEMPT_S = 10.0
"""How long one connection attempt (TCP, TLS and the CONNACK) may take."""
ABANDON_S = 2.0
"""At most this long closing a connection attempt that is given up (DISCONNECT written, socket closed)."""
ROOM_POLL_S = 0.001
SUBSCRIBE_WAIT_S = 30.0
"""How long the subscriptions sent at a connection may wait for free packet ids (:meth:`MqttLink._send_waves`)."""
"""How often a publish waiting for room in the in-flight window looks again."""
FILTERS_PER_PACKET = 500
"""Topic filters per SUBSCRIBE or UNSUBSCRIBE packet: a filter of a 64-character id is under 100 bytes, so a packet
stays well under the brokers' ``max_packet_size`` (256 KiB) however many filters a link holds."""
_AUTH_REFUSALS = frozenset({4, 5, 134, 135, 138, 140})  # CONNACK codes (3.1.1 and 5) that retrying cannot fix

Handler = Callable[[str, bytes, bool], Awaitable[None]]
"""``handler(topic, payload, retained)``; an exception is logged and the message still acknowledged at MQTT
level: redelivery of anything that matters is the sender's application-level outbox's job."""
BATCH_DRAIN_S = 2.0
"""How long closing a link waits for the inbound batches being handled (``batch_handler``) before cancelling them."""
BatchHandler = Callable[[list[tuple[str, bytes, bool]]], Awaitable[None]]
"""``batch_handler([(topic, payload, retained), ...])``: the messages read in one turn of the event loop (QoS 1, and
QoS 0 such as an ``ack``), in the order received, handled in one task; each QoS 1 one is acknowledged (PUBACK) once
it returns, as with :data:`Handler`, on the connection that read it."""


class MqttError(Exception):
    """The broker could not be reached, refused us, or the link is down."""


class MqttAuthError(MqttError):
    """The broker refused our credentials; retrying will not help."""


class PacketTooLarge(MqttError):
    """A publish whose PUBLISH packet would exceed the broker's packet limit, refused by the link before anything is
    written: Mosquitto cuts the connection of a client that sends one (every message queued behind it waits for the
    reconnection) and the session sends a QoS 1 packet again at each reconnection, so one such message cut the link
    for good. Retrying cannot help: an outbox parks the message (:class:`mhp_wire.outbox.Outbox`), a retained
    republisher waits for the next connection (:class:`Republisher`); a caller that sends once catches it as the
    :class:`MqttError` it is (logged, not sent), and the link stays up for everything else."""

    def __init__(self, topic: str, size: int, limit: int) -> None:
        super().__init__(f"publish on {outside(topic)} refused: its packet would be {size} bytes, over the {limit} "
                         "the broker takes")
        self.topic = topic
        self.size = size
        """The whole PUBLISH packet's size, in bytes."""
        self.limit = limit


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    """Where a broker is and who we are on it."""

    host: str
    port: int
    username: str
    password: str
    tls_ca_file: str | None = None


@dataclass(slots=True)
class LinkStats:
    """Counters a component exposes in its metrics."""

    received: int = 0
    published: int = 0
    handler_errors: int = 0
    connects: int = 0
    disconnects: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class CoalescedWrites:
    """The writes of one turn of the event loop, handed to the socket's transport as one (issue 14, fifth round).

    gmqtt writes every packet with a ``transport.write`` of its own, and a write to an empty socket buffer is a
    ``send`` system call at once: a bridge sending 10,000 commands, or the PUBACKs of the gateways' messages read in
    one turn, made a system call per packet (~8 % of the bridge's CPU in its profile), and woke the broker as often.
    This stands in for the transport in gmqtt's connection and protocol: it keeps the packets of the turn, in order,
    and writes them joined at the end of it (``call_soon``), so a packet waits at most for the rest of the turn's
    work. Everything else (``is_closing``, ``get_extra_info``, ...) is the transport's own; ``close`` writes what is
    kept first (a DISCONNECT written just before it goes out), ``abort`` drops it like the transport drops its
    buffer. A packet kept when the connection is lost is lost with it, as one in the transport's buffer is: QoS 1
    publishes are re-sent by gmqtt's session and the senders' outboxes.
    """

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self.wrapped: Any = transport
        """The socket's transport."""
        self._kept: list[bytes | bytearray | memoryview] = []
        self.packets = 0
        """Packets written through this."""
        self.flushes = 0
        """Writes handed to the transport (``packets / flushes`` is the mean coalescing)."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._kept:
            asyncio.get_running_loop().call_soon(self.flush)
        self._kept.append(data)
        self.packets += 1

    def flush(self) -> None:
        """Write what is kept now."""
        if not self._kept:
            return
        kept, self._kept = self._kept, []
        if self.wrapped.is_closing():
            return
        self.flushes += 1
        self.wrapped.write(kept[0] if len(kept) == 1 else b"".join(kept))

    def is_closing(self) -> bool:
        """The transport's own answer; defined here, not through ``__getattr__``, as gmqtt asks it before every
        write (its ``write_data``): the failed lookup and the fallback cost 0.5 µs a packet."""
        return bool(self.wrapped.is_closing())

    def close(self) -> None:
        self.flush()
        self.wrapped.close()

    def abort(self) -> None:
        self._kept.clear()
        self.wrapped.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def coalesce_writes(client: gmqtt.Client) -> CoalescedWrites | None:
    """Put a :class:`CoalescedWrites` between gmqtt's current connection and its socket (once per connection: at
    each CONNACK); None if the client has no connection. gmqtt 0.8.0 keeps the transport in two private attributes,
    ``MQTTConnection._transport`` (packets it builds itself) and ``MQTTProtocol._transport`` (acknowledgements,
    pings); both must be the same object, or packets could overtake each other. ``tests/mhp_wire/
    test_mqtt_write_coalescing.py`` fails if a gmqtt upgrade moves them."""
    connection = getattr(client, "_connection", None)
    if connection is None:
        return None
    current = connection._transport
    if isinstance(current, CoalescedWrites):
        return current
    coalesced = CoalescedWrites(current)
    connection._transport = coalesced
    connection._protocol._transport = coalesced
    return coalesced


PAYLOAD_MAX = 268_435_455
"""The largest payload gmqtt 0.8.0's ``Message`` takes (the MQTT remaining length's limit); larger is a ValueError."""
TOPIC_CACHE = 65_536
"""Topics whose encoded, length-prefixed form a :class:`PublishBuilder` keeps (one per gateway at a bridge; when it is
full its older half is dropped, in the order kept, so its memory stays bounded whatever a link publishes to and the
topics added since stay built)."""
_U16 = struct.Struct("!H")
_MID_PROPS = struct.Struct("!HB")
"""A packet id and MQTT 5's properties length (0)."""
_MQTT_PUBLISH = 0x30
"""The PUBLISH packet type in a fixed header's high nibble (``MQTTCommands.PUBLISH``)."""
_FIRST_BYTE = [bytes((_MQTT_PUBLISH | flags,)) for flags in range(4)]
"""The fixed header's first byte by ``qos << 1 | retain`` (QoS 0 and 1; DUP is never set on a first send)."""
_SHORT_LENGTH = [bytes((n,)) for n in range(128)]
"""Remaining lengths under 128, one byte each."""


def remaining_length(value: int) -> bytes:
    """MQTT's variable byte integer, exactly as gmqtt's ``pack_variable_byte_integer`` packs it (no upper bound:
    gmqtt's ``Message`` refuses a payload over :data:`PAYLOAD_MAX` before)."""
    if value < 128:
        return bytes((value,))
    if value < 16_384:
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while True:
        value, b = divmod(value, 128)
        if value > 0:
            b |= 0x80
        out.append(b)
        if value <= 0:
            return bytes(out)


def publish_size(topic_field_bytes: int, payload_bytes: int, qos: int, mqtt5: bool = True) -> int:
    """The size of a PUBLISH packet without properties (what :func:`publish_packet` builds): the fixed header, the
    remaining length, the topic's field (``topic_field_bytes``, its length prefix included), the packet id at QoS
    1 or 2, the properties' length under MQTT 5, the payload."""
    rest = topic_field_bytes + (2 if qos else 0) + (1 if mqtt5 else 0) + payload_bytes
    return 1 + len(remaining_length(rest)) + rest


def topic_field(topic: str | bytes) -> bytes:
    """A topic as a PUBLISH carries it: UTF-8 (a lone surrogate becomes ``?``, as gmqtt's ``Message`` encodes it)
    after its two-byte length; more than 65,535 bytes is gmqtt's ``struct.error``."""
    raw = topic.encode("utf-8", errors="replace") if isinstance(topic, str) else topic
    return _U16.pack(len(raw)) + raw


def publish_packet(topic: bytes, payload: bytes | bytearray, qos: int, retain: bool, mid: int | None,
                   mqtt5: bool) -> bytes:
    """One PUBLISH packet without properties, byte for byte as gmqtt 0.8.0's ``PublishPacket.build_package`` builds
    it (``tests/mhp_wire/test_mqtt_publish_bytes.py`` compares them): the fixed header (no DUP), the remaining length,
    ``topic`` (a :func:`topic_field`), the packet id (``mid``, QoS 1), the properties' length (0) under MQTT 5, the
    payload."""
    if mid is None:
        tail = b"\x00" if mqtt5 else b""
    else:
        tail = _MID_PROPS.pack(mid, 0) if mqtt5 else _U16.pack(mid)
    size = len(topic) + len(tail) + len(payload)
    if size < 128:
        length = _SHORT_LENGTH[size]
    elif size < 16_384:
        length = bytes((size & 0x7F | 0x80, size >> 7))
    else:
        length = remaining_length(size)
    return b"".join((_FIRST_BYTE[qos << 1 | (retain & 1)], length, topic, tail, payload))


class PublishBuilder:
    """Publishes through gmqtt's session without gmqtt's per-message work (issue 14, seventh round).

    gmqtt 0.8.0 builds each PUBLISH through a ``Message`` (its payload checks, a properties dict), then
    ``PublishPacket.build_package`` (the properties encoded one by one, two ``logger.debug`` calls, a ``bytearray``
    extended six times): about half of a publish's CPU for the packets our links send, which carry no properties.
    This builds the same bytes in one join, with each topic's encoded prefix kept (:data:`TOPIC_CACHE`), and keeps
    gmqtt's session state the source of truth: the packet id comes from the connection's ``id_generator.next_id()``
    (``OverflowError`` when the in-flight window is full, before anything is written), the packet goes out through
    the protocol's ``write_data`` (which the keep-alive reads) and, at QoS 1, into the client's
    ``_persistent_storage`` under its id, which gmqtt re-sends at a reconnection and empties at the PUBACK.
    ``tests/mhp_wire/test_mqtt_fast_publish.py`` fails if a gmqtt upgrade moves any of these."""

    def __init__(self) -> None:
        self._topics: dict[str, bytes] = {}

    def topic(self, topic: str) -> bytes:
        """``topic``'s :func:`topic_field`, built once."""
        field = self._topics.get(topic)
        if field is None:
            field = topic_field(topic)
            if len(self._topics) >= TOPIC_CACHE:
                # The older half (a dict keeps insertion order), not all: a link publishing to a few more topics
                # than the bound does not build every one of them again after each clearing.
                for old in list(itertools.islice(self._topics, len(self._topics) // 2 or 1)):
                    del self._topics[old]
            self._topics[topic] = field
        return field

    def publish(self, client: gmqtt.Client, topic: str, payload: bytes | bytearray, qos: int, retain: bool) -> None:
        """What gmqtt's ``Client.publish(topic, payload, qos=qos, retain=retain)`` does, for QoS 0 or 1."""
        field = self.topic(topic)
        if len(payload) > PAYLOAD_MAX:
            raise ValueError("Payload too large.")
        protocol = client._connection._protocol
        mqtt5 = protocol.proto_ver >= MQTTv50
        if qos:
            mid = protocol.id_generator.next_id()
            packet = publish_packet(field, payload, 1, retain, mid, mqtt5)
            protocol.write_data(packet)
            client._persistent_storage.push_message(mid, packet)
        else:
            protocol.write_data(publish_packet(field, payload, 0, retain, None, mqtt5))


GMQTT_CHECKED = "0.8.0"
"""The gmqtt release whose internals :func:`fast_inbound` and the batched PUBACKs (:meth:`MqttLink._handle_batch`)
were checked against (``tests/mhp_wire/test_mqtt_fast_inbound.py``). With any other release installed a link keeps
gmqtt's own reader and sends each PUBACK through gmqtt: after an upgrade, run those tests and move this."""

GMQTT_VERSION = importlib.metadata.version("gmqtt")
"""The installed gmqtt's version, read once."""

_MQTT_PUBACK = 0x40
"""The PUBACK packet type (``MQTTCommands.PUBACK``)."""
_PUBACK_V5 = struct.Struct("!2sH2s")
"""An MQTT 5 PUBACK as gmqtt 0.8.0's ``CommandWithMidPacket`` builds it for reason code 0: ``\\x40\\x04``, the packet
id, ``\\x00\\x00`` (``pack(b"\\x40\\x04", mid, b"\\x00\\x00")``)."""


def fast_inbound(handler: Any, keep: Callable[[int | None, bytes, str, Any], None]) -> Callable[[int, bytes], None]:
    """gmqtt's ``MqttPackageHandler._handle_packet`` for a link with a batch handler, without gmqtt's per-packet work
    on the two packets a fan-out brings by the thousand (issue 14, session 13): a PUBLISH at QoS 0 or 1 without
    properties goes straight to ``keep(mid, payload, topic, {"dup": …, "retain": …})``
    (:meth:`MqttLink._keep_for_batch`, ``mid`` None at QoS 0), and a PUBACK frees its packet id and drops the stored
    packet, as gmqtt does.

    gmqtt 0.8.0 reads each packet through a ``logger.debug`` whose ``hex(cmd)`` is built whatever the level, a
    handler looked up by name, three ``struct.unpack`` with format strings built per packet and a properties parser
    building a ``defaultdict`` (PUBLISH: 2.2 µs, PUBACK: 0.7 µs; here 0.4 and 0.3). Anything else — another packet
    type, QoS 2, properties present (a topic alias, user properties), MQTT 3.1.1, a topic that is empty or not
    UTF-8, a packet too short — goes to gmqtt's own ``_handle_packet``, which decides as before.
    ``tests/mhp_wire/test_mqtt_fast_inbound.py`` holds the two against each other and fails if a gmqtt upgrade moves
    what this uses."""
    gmqtt_packet = handler._handle_packet  # the class's method, bound: looked up before the instance's is set
    monotonic = time.monotonic

    def handle_packet(cmd: int, packet: bytes) -> None:
        kind = cmd & 0xF0
        if kind == _MQTT_PUBLISH:
            qos = (cmd & 0x06) >> 1
            size = len(packet)
            if qos < 2 and size >= 2 and handler._connection_state.protocol_version >= MQTTv50:
                topic_end = 2 + (packet[0] << 8 | packet[1])
                props = topic_end + 2 if qos else topic_end  # the properties' length (a packet id before it at QoS 1)
                if topic_end > 2 and props < size and packet[props] == 0:  # a topic, and no properties
                    try:
                        topic = packet[2:topic_end].decode("utf-8")
                    except UnicodeDecodeError:
                        topic = ""
                    if topic:
                        keep(packet[topic_end] << 8 | packet[topic_end + 1] if qos else None, packet[props + 1:],
                             topic, {"dup": (cmd & 0x08) >> 3, "retain": cmd & 0x01})
                        handler._last_msg_in = monotonic()
                        return
        elif kind == _MQTT_PUBACK and len(packet) >= 2:
            mid = packet[0] << 8 | packet[1]
            handler.id_generator.free_id(mid)
            handler._remove_message_from_queue(mid)
            handler._last_msg_in = monotonic()
            return
        gmqtt_packet(cmd, packet)

    return handle_packet


class MqttLink:
    """One persistent MQTT 5 session; use as ``async with MqttLink(...) as link``."""

    # Complexity (PLR0913): the MQTT connection's options, each a keyword with a default.
    def __init__(  # noqa: PLR0913
        self,
        endpoint: MqttEndpoint,
        *,
        client_id: str,
        subscriptions: Sequence[str],
        handler: Handler,
        status_topic: str | None = None,
        session_expiry_s: int = 7 * 24 * 3600,
        clean_start: bool = False,
        connect_timeout_s: float | None = 30.0,
        reconnect_delay_s: float = 1.0,
        on_connect: Callable[[], None] | None = None,
        connect_attempt_s: float = CONNECT_ATTEMPT_S,
        batch_handler: BatchHandler | None = None,
        receive_maximum: int | None = None,
        max_packet_bytes: int = MAX_PACKET_BYTES,
    ) -> None:
        self.endpoint = endpoint
        self.max_packet_bytes = max_packet_bytes
        """The largest PUBLISH packet the link sends (:class:`PacketTooLarge` past it): the brokers' limit as
        ``broker_config`` renders it, lowered to the Maximum Packet Size a broker states in its CONNACK."""
        self._configured_max_packet = max_packet_bytes
        self.receive_maximum = receive_maximum
        """MQTT 5's Receive Maximum asked in CONNECT: how many QoS 1 messages the broker may have sent this link and
        not yet had acknowledged. None asks nothing, and Mosquitto then allows its ``max_inflight_messages`` (1,000 as
        ``broker_config`` renders it). A link whose PUBACKs wait for a commit (a ``batch_handler``) and reads much
        more than it sends asks more, so that the broker does not hold its messages back while a commit runs
        (docs/decisions.md, "The bridge asks its broker for a wide receive window")."""
        if receive_maximum is not None and not 1 <= receive_maximum <= 65_535:
            raise ValueError(f"receive_maximum must be 1..65535, not {receive_maximum}")
        self.client_id = client_id
        self._subscriptions = list(subscriptions)
        self._handler = handler
        self._status_topic = status_topic
        self._connect_timeout_s = connect_timeout_s
        self._connect_attempt_s = connect_attempt_s
        self._on_connected = on_connect
        """Called (on the event loop, must not block) after every connection, the first and each reconnection:
        a broker restarted empty has lost what was retained, and the owner of a retained message publishes it
        again."""
        self.stats = LinkStats()
        self.writes: CoalescedWrites | None = None
        """The current connection's writes (:class:`CoalescedWrites`), once connected."""
        self._connected = asyncio.Event()
        self._builder = PublishBuilder()
        """The PUBLISH packets, built without gmqtt's per-message work (:class:`PublishBuilder`)."""
        self._room = asyncio.Lock()
        """Held by the publish that waits for room in the in-flight window; the others wait behind it."""
        self._waiting = 0
        self._replies: dict[int, asyncio.Future[None]] = {}
        self._restoring: asyncio.Task[None] | None = None
        """Subscriptions sent again after a reconnection (:meth:`_restore`)."""
        """SUBSCRIBE/UNSUBSCRIBE packet ids waiting for their SUBACK/UNSUBACK."""
        self._changed_while_down: dict[str, bool] = {}
        """Filters subscribed (True) or unsubscribed (False) while the link was down or unanswered: sent at the next
        connection even when the broker kept our session."""
        will = (
            gmqtt.Message(status_topic, presence_payload("offline"), qos=1, retain=True)
            if status_topic
            else None
        )
        self._client = gmqtt.Client(
            client_id,
            clean_session=clean_start,
            optimistic_acknowledgement=False,
            will_message=will,
            session_expiry_interval=session_expiry_s,
            logger=logging.getLogger("mhp_wire.mqtt.gmqtt"),
            **({} if receive_maximum is None else {"receive_maximum": receive_maximum}),
        )
        self._client.reconnect_delay = reconnect_delay_s
        self._client.set_auth_credentials(endpoint.username, endpoint.password)
        self._client.on_message = self._on_message
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_reply
        self._client.on_unsubscribe = self._on_reply
        self._batch_handler = batch_handler
        self._gmqtt_checked = GMQTT_VERSION == GMQTT_CHECKED  # fast_inbound and the batched PUBACKs' internals
        self._inbox: list[tuple[str, bytes, bool, int | None, Any]] = []
        """Messages read in this turn of the loop, with their packet ids (None at QoS 0) and the connection that read
        them (``batch_handler`` only)."""
        self._batches: set[asyncio.Task[None]] = set()
        self._closing = False
        """Set while the link closes: messages read from then on are not handled (nor acknowledged: the broker
        sends them again to the next session, or their sender's outbox does)."""
        if batch_handler is not None:
            self._read_in_batches()

    def _read_in_batches(self) -> None:
        """Hand the messages a batch handler gets to it a turn at a time (see :meth:`_handle_batch`)."""
        # gmqtt 0.8.0 runs each received QoS 1 PUBLISH's handler in a task of its own and sends the PUBACK from
        # that task's done-callback. With a batch handler the messages of one turn go to one task instead: the
        # client's package handler (``Client._package_handler``, one for all its connections) calls its own
        # ``_handle_qos_1_publish_packet``, looked up on the instance. ``tests/mhp_wire/test_mqtt_batches.py``
        # fails if a gmqtt upgrade moves it.
        self._client._package_handler._handle_qos_1_publish_packet = self._keep_for_batch
        # And the packets a fan-out brings by the thousand (PUBLISH without properties, PUBACK) read without
        # gmqtt's per-packet work (:func:`fast_inbound`); every other packet still goes through gmqtt. Only on
        # the gmqtt release it was checked against (:data:`GMQTT_CHECKED`): on another, gmqtt's own reader.
        if self._gmqtt_checked:
            self._client._package_handler._handle_packet = fast_inbound(self._client._package_handler,
                                                                        self._keep_for_batch)
        # A QoS 0 PUBLISH (an ``ack``: mhp_wire.messages.ACK_QOS) goes to ``on_message``, which gmqtt calls at
        # once when it is a plain function: it joins the same batch, in its order, without a PUBACK.
        self._client.on_message = self._qos0_received

    @property
    def connected(self) -> bool:
        """Whether the link is up right now."""
        return self._connected.is_set()

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Wait until the link is up."""
        await asyncio.wait_for(self._connected.wait(), timeout_s)

    async def __aenter__(self) -> MqttLink:
        self._closing = False
        try:
            await self._connect_first()
        except BaseException:  # never connected (refused, timed out, cancelled): no reconnection may outlive it
            self._client.stop_reconnect()
            self._stop_gmqtt_reconnects()
            raise
        changed, self._changed_while_down = self._changed_while_down, {}
        try:
            await self._send_waves([f for f, sub in changed.items() if not sub], subscribe=False,
                                   timeout_s=SUBSCRIBE_WAIT_S)
            await self._send_waves(self._subscriptions, subscribe=True, timeout_s=SUBSCRIBE_WAIT_S)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        if self._status_topic:
            await self.publish(self._status_topic, presence_payload("online"), retain=True)
        if self.writes is not None:  # the subscriptions and the presence are on the wire when the link is entered
            self.writes.flush()
        return self

    async def _send_waves(self, filters: Sequence[str], *, subscribe: bool, timeout_s: float,
                          replies: bool = False) -> list[tuple[int, asyncio.Future[None]]]:
        """SUBSCRIBE (QoS 1) or UNSUBSCRIBE ``filters``, :data:`FILTERS_PER_PACKET` a packet; with ``replies``, per
        packet its id and a future that its SUBACK/UNSUBACK resolves.

        Each packet takes a packet id from the pool that the broker's receive maximum bounds, shared with the QoS 1
        publishes in flight (Mosquitto's ``max_inflight_messages``; 20 in a stock Mosquitto): when none is free,
        the next packet waits for one (as a publish with ``wait_s`` does), up to ``timeout_s`` in all, then
        :class:`MqttError`. gmqtt's own list of subscriptions is kept here: a filter is added once its packet is
        written (its ``subscribe`` added it before, again at every retry), and an unsubscription prunes it once
        against a set (gmqtt compares each subscription with the packet's list: millions of comparisons for
        thousands of filters)."""
        if not filters:
            return []
        log.debug("MQTT %s %s %d filters", self.client_id, "subscribes to" if subscribe else "unsubscribes from",
                  len(filters))
        if not subscribe:
            gone = set(filters)
            self._client.subscriptions = [sub for sub in self._client.subscriptions if sub.topic not in gone]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        waits: list[tuple[int, asyncio.Future[None]]] = []
        for i in range(0, len(filters), FILTERS_PER_PACKET):
            chunk = list(filters[i:i + FILTERS_PER_PACKET])
            while True:
                try:
                    connection = self._client._connection
                    if subscribe:
                        subs = [gmqtt.Subscription(t, qos=1) for t in chunk]
                        mid = connection.subscribe(subs)
                        self._client.subscriptions.extend(subs)
                    else:
                        mid = connection.unsubscribe(chunk)
                    break
                except OverflowError:  # no packet id free: the in-flight window is full
                    if loop.time() >= deadline:
                        raise MqttError(f"MQTT {self.client_id}: no packet id came free for a subscription change "
                                        f"within {timeout_s:g} s (the in-flight window stayed full)") from None
                    self.stats.extra["subscribe_waits"] = self.stats.extra.get("subscribe_waits", 0) + 1
                    await asyncio.sleep(ROOM_POLL_S)
                except (OSError, AttributeError) as exc:
                    raise MqttError(f"MQTT {self.client_id} could not change its subscriptions: {exc}") from None
            if replies:  # registered before the next await: its reply cannot come first
                waits.append((mid, self._replies.setdefault(mid, loop.create_future())))
        return waits

    @property
    def subscriptions(self) -> list[str]:
        """The topic filters this link holds (and restores at a connection without its session)."""
        return list(self._subscriptions)

    async def subscribe(self, filters: Sequence[str], timeout_s: float = 10.0) -> None:
        """Add ``filters`` (QoS 1) to the link's subscriptions and, while connected, wait for the broker's SUBACK.
        While the link is down they are sent at the next connection. A filter already held is not sent again."""
        held = set(self._subscriptions)
        new = list(dict.fromkeys(f for f in filters if f not in held))
        self._subscriptions.extend(new)
        await self._change(new, subscribe=True, timeout_s=timeout_s)

    async def unsubscribe(self, filters: Sequence[str], timeout_s: float = 10.0) -> None:
        """Remove ``filters`` from the link's subscriptions and from its session at the broker (also one the link
        does not hold, which a persistent session may still have from an earlier run), waiting for the UNSUBACK
        while connected; while the link is down they are sent at the next connection."""
        gone = set(filters)
        self._subscriptions = [f for f in self._subscriptions if f not in gone]
        await self._change(list(dict.fromkeys(filters)), subscribe=False, timeout_s=timeout_s)

    async def _change(self, filters: list[str], *, subscribe: bool, timeout_s: float) -> None:
        if not filters:
            return
        for f in filters:
            self._changed_while_down[f] = subscribe
        if not self.connected:
            return
        waits: list[tuple[int, asyncio.Future[None]]] = []
        try:
            async with asyncio.timeout(timeout_s):
                waits = await self._send_waves(filters, subscribe=subscribe, timeout_s=timeout_s, replies=True)
                await asyncio.gather(*(wait for _, wait in waits))
        except TimeoutError:
            raise MqttError(f"MQTT {self.client_id}: the broker did not answer a subscription change within "
                            f"{timeout_s:g} s (it is sent again at the next connection)") from None
        finally:
            for mid, wait in waits:
                if self._replies.get(mid) is wait:
                    del self._replies[mid]
        for f in filters:
            if self._changed_while_down.get(f) is subscribe:
                del self._changed_while_down[f]

    def _on_reply(self, client: Any, mid: int, *args: Any) -> None:
        """A SUBACK or UNSUBACK: the change with packet id ``mid`` is in the broker's session."""
        waiting = self._replies.get(mid)
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    async def _connect_first(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if self._connect_timeout_s is None else loop.time() + self._connect_timeout_s
        backoff = Backoff(initial_s=0.1, max_s=5.0)
        tls: ssl.SSLContext | bool = False
        if self.endpoint.tls_ca_file:
            tls = ssl.create_default_context(cafile=self.endpoint.tls_ca_file)
        while True:
            try:
                # gmqtt waits for a CONNACK without a time limit (a plain client on a TLS port waits forever).
                async with asyncio.timeout(self._connect_attempt_s):
                    await self._client.connect(self.endpoint.host, self.endpoint.port, ssl=tls, keepalive=30,
                                               version=MQTTv50)
                break
            except MQTTConnectError as exc:
                if getattr(exc, "_code", None) in _AUTH_REFUSALS:
                    raise MqttAuthError(
                        f"{self.endpoint.host}:{self.endpoint.port} refused {self.endpoint.username!r}: {exc}"
                    ) from None
                err: Exception = exc
            except (OSError, TimeoutError) as exc:
                err = exc
            await self._abandon_attempt()
            delay = jittered(backoff.record_failure(loop.time()), random.random())
            if deadline is not None and loop.time() + delay > deadline:
                raise MqttError(
                    f"cannot connect to MQTT broker {self.endpoint.host}:{self.endpoint.port} as "
                    f"{self.endpoint.username!r}: {err}"
                ) from None
            log.warning("MQTT connect to %s:%s failed (%s), retrying in %.1f s",
                        self.endpoint.host, self.endpoint.port, err or type(err).__name__, delay)
            await asyncio.sleep(delay)

    async def _abandon_attempt(self) -> None:
        """Close the connection of an attempt that failed or timed out before its CONNACK. Left open, its CONNECT,
        still queued at a busy broker, would be served later and then either replace the next attempt's session
        or be replaced by it (Mosquitto: "already connected, closing old connection"), and the socket would stay
        open on both sides (one file descriptor each, of a broker's bounded number)."""
        connection = getattr(self._client, "_connection", None)
        if connection is None or connection.is_closing():
            return
        self._client._is_active = False  # the lost connection must not start gmqtt's own reconnection
        try:
            await asyncio.wait_for(self._client.disconnect(), ABANDON_S)
        except (OSError, TimeoutError, AttributeError) as exc:
            log.debug("closing the abandoned attempt of %s ended with %r", self.client_id, exc)
        self._stop_gmqtt_reconnects()

    async def __aexit__(self, *exc: object) -> None:
        if self._restoring is not None:
            self._restoring.cancel()
        self._closing = True  # no new batch from here on
        if self._batches:  # let the batches being handled finish and acknowledge; what is cut short comes again
            _, unfinished = await asyncio.wait(set(self._batches), timeout=BATCH_DRAIN_S)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        try:
            if self._status_topic and self.connected:
                await self.publish(self._status_topic, presence_payload("offline"), retain=True)
            self._client.stop_reconnect()
            self._connected.clear()
            await asyncio.wait_for(self._client.disconnect(), 2.0)
        except (OSError, TimeoutError, MqttError, AttributeError) as exc:
            log.debug("MQTT disconnect of %s ended with %r", self.client_id, exc)
        self._connected.clear()
        self._stop_gmqtt_reconnects()

    def _stop_gmqtt_reconnects(self) -> None:
        """Cancel a reconnection gmqtt started by itself after a lost connection (``ensure_future`` without a
        handle, asleep for its reconnect delay): it would outlive the link."""
        for task in asyncio.all_tasks():
            coro = task.get_coro()
            frame = getattr(coro, "cr_frame", None)
            if (getattr(coro, "__qualname__", "") == "Client.reconnect" and frame is not None
                    and frame.f_locals.get("self") is self._client):
                task.cancel()

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      wait_s: float = 0.0) -> None:
        """Publish; raises :class:`MqttError` while the link is down (the caller's outbox will send it again).

        As many QoS 1 publishes may be in flight (not yet PUBACKed) as the broker's receive maximum (Mosquitto's
        ``max_inflight_messages``) allows. When the window is full, ``wait_s`` > 0 waits up to that long for room
        (back-pressure: waiting publishers go in their order); ``wait_s`` = 0, or a window that stays full, raises
        :class:`MqttError`. A QoS 0 publish takes no packet id, so it never waits in line behind QoS 1 ones. A packet
        over :attr:`max_packet_bytes` raises :class:`PacketTooLarge` (an :class:`MqttError` that retrying cannot
        cure) before anything is written.
        """
        # A quick bound on the packet, in bytes (UTF-8: at most 4 a character, also of a str payload, which callers
        # typed loosely may pass and gmqtt encodes); the exact size only when the bound is over the limit.
        wide = len(payload) * 4 if isinstance(payload, str) else len(payload)
        if wide + len(topic) * 4 + 12 > self.max_packet_bytes:
            self._check_size(topic, payload, qos)
        if qos == 0:
            self._try_publish(topic, payload, qos, retain)  # no packet id: it cannot find the window full
            return
        if not self._waiting and self._try_publish(topic, payload, qos, retain):
            return
        if wait_s <= 0:
            self.stats.extra["inflight_full"] = self.stats.extra.get("inflight_full", 0) + 1
            raise MqttError(f"publish on {topic} deferred: the in-flight window is full")
        self._waiting += 1
        try:
            async with self._room:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + wait_s
                while not self._try_publish(topic, payload, qos, retain):
                    if loop.time() >= deadline:
                        self.stats.extra["inflight_full"] = self.stats.extra.get("inflight_full", 0) + 1
                        raise MqttError(f"publish on {topic} deferred: the in-flight window stayed full for "
                                        f"{wait_s:g} s")
                    self.stats.extra["inflight_waits"] = self.stats.extra.get("inflight_waits", 0) + 1
                    # gmqtt frees a packet id when its PUBACK is read; it has no event for that, so look again soon.
                    await asyncio.sleep(ROOM_POLL_S)
        finally:
            self._waiting -= 1

    @property
    def refused_too_large(self) -> int:
        """Publishes refused as :class:`PacketTooLarge` (``stats.extra["refused_too_large"]``)."""
        return self.stats.extra.get("refused_too_large", 0)

    def _check_size(self, topic: str, payload: bytes | bytearray | str, qos: int) -> None:
        """Raise :class:`PacketTooLarge` when ``topic`` and ``payload`` make a PUBLISH over :attr:`max_packet_bytes`
        (nothing is written: the link stays up for what follows)."""
        body = payload.encode() if isinstance(payload, str) else payload
        size = publish_size(len(self._builder.topic(topic)), len(body), qos)
        if size > self.max_packet_bytes:
            self.stats.extra["refused_too_large"] = self.refused_too_large + 1
            raise PacketTooLarge(topic, size, self.max_packet_bytes)

    def _try_publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        """Publish now; False when no packet id is free (the in-flight window is full)."""
        if not self.connected:
            raise MqttError(f"MQTT link {self.client_id} is down")
        try:
            if qos in (0, 1) and isinstance(payload, (bytes, bytearray)):
                self._builder.publish(self._client, topic, payload, qos, retain)
            else:  # anything else the way gmqtt builds it (the links send bytes at QoS 0 or 1)
                self._client.publish(topic, payload, qos=qos, retain=retain)
        except OverflowError:
            return False
        except (OSError, AttributeError) as exc:
            raise MqttError(f"publish on {topic} failed: {exc}") from None
        self.stats.published += 1
        return True

    def _on_connect(self, client: Any, flags: Any, rc: Any, properties: Any) -> None:
        self.stats.connects += 1
        stated = properties.get("maximum_packet_size") if isinstance(properties, dict) else None
        if isinstance(stated, (list, tuple)):
            stated = stated[0] if stated else None
        self.max_packet_bytes = (min(self._configured_max_packet, stated) if isinstance(stated, int) and stated > 0
                                 else self._configured_max_packet)
        self.writes = coalesce_writes(self._client)
        self._connected.set()
        log.info("MQTT %s connected to %s:%s", self.client_id, self.endpoint.host, self.endpoint.port)
        if self.stats.connects > 1:
            # A reconnect. gmqtt does not subscribe again by itself: a broker that lost our session (restarted
            # from an old snapshot, or after kill -9) must get our subscriptions again. And our last will has
            # marked us offline: say we are back.
            if flags:
                self.stats.extra["sessions_resumed"] = self.stats.extra.get("sessions_resumed", 0) + 1
            changed, self._changed_while_down = self._changed_while_down, {}
            if self._restoring is not None:
                self._restoring.cancel()
            self._restoring = asyncio.get_running_loop().create_task(
                self._restore(bool(flags), changed), name=f"mqtt-restore-{self.client_id}")
        if self._on_connected is not None:
            self._on_connected()

    async def _restore(self, session_kept: bool, changed: dict[str, bool]) -> None:
        """After a reconnection: the subscriptions again (all of them to a broker that lost our session; to one that
        kept it, only what changed while we were away), then the presence. A task of its own: the packets may wait
        for free packet ids (:meth:`_send_waves`)."""
        try:
            if not session_kept:
                self._client.subscriptions = []
                await self._send_waves(self._subscriptions, subscribe=True, timeout_s=SUBSCRIBE_WAIT_S)
            else:
                await self._send_waves([f for f, sub in changed.items() if not sub], subscribe=False,
                                       timeout_s=SUBSCRIBE_WAIT_S)
                await self._send_waves([f for f, sub in changed.items() if sub and f in self._subscriptions],
                                       subscribe=True, timeout_s=SUBSCRIBE_WAIT_S)
            if self._status_topic:
                self._client.publish(self._status_topic, presence_payload("online"), qos=1, retain=True)
        except (MqttError, OSError, AttributeError, OverflowError) as exc:
            # What was not sent waits for the next connection.
            for f, sub in changed.items():
                self._changed_while_down.setdefault(f, sub)
            log.warning("MQTT %s could not restore its subscriptions: %s", self.client_id, exc)

    def _on_disconnect(self, client: Any, packet: Any, exc: Any = None) -> None:
        if self._connected.is_set():
            self.stats.disconnects += 1
            log.warning("MQTT %s lost its connection to %s:%s", self.client_id, self.endpoint.host,
                        self.endpoint.port)
        self._connected.clear()

    def _keep_for_batch(self, mid: int | None, payload: bytes, topic: str, properties: Any) -> None:
        """gmqtt read a PUBLISH (QoS 1 with its packet id, or QoS 0 with ``None``): keep it for this turn's batch (the
        first one of the turn schedules it)."""
        if self._closing:
            return
        retained = bool(properties.get("retain", 0)) if isinstance(properties, dict) else False
        if not self._inbox:
            asyncio.get_running_loop().call_soon(self._start_batch)
        self._inbox.append((topic, payload, retained, mid, self._client._package_handler.current_connection))

    def _qos0_received(self, client: Any, topic: str, payload: bytes, qos: int, properties: Any) -> None:
        """gmqtt read a QoS 0 PUBLISH (``batch_handler`` only): keep it for this turn's batch, like a QoS 1 one.

        gmqtt hands a QoS 2 PUBLISH here too, expecting a coroutine whose result it answers with PUBREC; the
        platform subscribes at QoS 1 only (``docs/protocol.md``), so one is refused in the log, not batched
        without an answer."""
        if qos != 0:
            log.error("MQTT %s: a QoS %s message on %s is not handled (the links subscribe at QoS 1)", self.client_id,
                      qos, outside(topic))
            return
        self._keep_for_batch(None, payload, topic, properties)

    def _start_batch(self) -> None:
        batch, self._inbox = self._inbox, []
        if batch and not self._closing:
            task = asyncio.get_running_loop().create_task(self._handle_batch(batch), name=f"mqtt-in-{self.client_id}")
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _handle_batch(self, batch: list[tuple[str, bytes, bool, int | None, Any]]) -> None:
        """One turn's messages through ``batch_handler``, then the PUBACKs of the QoS 1 ones in order (an exception
        is logged and the messages acknowledged all the same, as with :data:`Handler`).

        A PUBACK goes only on the connection that read the message. A packet id names a message within one
        connection's session: after a reconnection, the broker either sends the unacknowledged message again (the
        session was kept: that copy is acknowledged when its own batch returns) or has forgotten it (the session
        was lost, and the same id may already name a new message this link has not handled yet). Either way a
        PUBACK of an earlier connection's id on the new one would be wrong, so it is not sent."""
        handler = self._batch_handler
        if handler is None:  # only installed with one
            return
        self.stats.received += len(batch)
        self.stats.extra["inbound_batches"] = self.stats.extra.get("inbound_batches", 0) + 1
        try:
            await handler([(topic, payload, retained) for topic, payload, retained, _, _ in batch])
        except Exception:
            self.stats.handler_errors += 1
            log.exception("batch handler failed on %d messages", len(batch))
        current = self._client._package_handler.current_connection
        open_now = current is not None and not current.is_closing()
        stale = 0
        pubacks: list[int] = []
        for *_, mid, conn in batch:
            if mid is None:  # QoS 0: nothing to acknowledge
                continue
            if conn is not current or not open_now:
                stale += 1
                continue
            pubacks.append(mid)
        if pubacks:
            # The batch's PUBACKs in one write, each the bytes gmqtt's ``send_command_with_mid`` builds (MQTT 5:
            # reason code 0 and no properties), without its three calls and ``struct`` format per packet; on a gmqtt
            # release other than the one checked (:data:`GMQTT_CHECKED`), through gmqtt, one by one.
            if self._gmqtt_checked and current._protocol.proto_ver == MQTTv50:
                current._protocol.write_data(
                    b"".join([_PUBACK_V5.pack(b"\x40\x04", mid, b"\x00\x00") for mid in pubacks]))
            else:
                for mid in pubacks:
                    current.send_command_with_mid(MQTTCommands.PUBACK, mid, False)
        if stale:
            self.stats.extra["pubacks_not_sent_stale"] = self.stats.extra.get("pubacks_not_sent_stale", 0) + stale
            log.debug("MQTT %s: %d PUBACKs not sent, their connection is gone", self.client_id, stale)

    async def _on_message(self, client: Any, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        self.stats.received += 1
        retained = bool(properties.get("retain", 0)) if isinstance(properties, dict) else False
        try:
            await self._handler(topic, payload, retained)
        except Exception:
            self.stats.handler_errors += 1
            log.exception("handler failed on a message from topic %s", outside(topic))
        return 0


class Republisher:
    """Puts a retained message back at every connection of a link: a broker restarted without (or with an old)
    persistence snapshot has lost its retained copies, and their owner holds the source (the hub its stored tariff,
    a bridge its stored copy). Give :meth:`connected` as the link's ``on_connect`` (or call it from there) and run
    :meth:`run` as a task; ``publish`` is tried again after ``retry_s`` when it fails with :class:`MqttError` or one
    of ``retry_on`` (a storage error), but not after :class:`PacketTooLarge` (logged; tried at the next connection,
    when the owner may hold a smaller one)."""

    def __init__(self, publish: Callable[[], Awaitable[object]], what: str,
                 retry_on: tuple[type[Exception], ...] = (), retry_s: float = 1.0) -> None:
        self._publish = publish
        self.what = what
        self.retry_on: tuple[type[Exception], ...] = (MqttError, *retry_on)
        self.retry_s = retry_s
        self._due = asyncio.Event()

    def connected(self) -> None:
        """The link is up (the first time or again): publish once more."""
        self._due.set()

    async def run(self) -> None:
        """Publish at every connection until cancelled."""
        while True:
            await self._due.wait()
            self._due.clear()
            try:
                await self._publish()
            except PacketTooLarge as exc:  # the same message would be refused again: wait for the next connection
                log.error("%s is not republished: %s", self.what, exc)
            except self.retry_on as exc:
                log.warning("%s is not republished now (%s); trying again", self.what, exc)
                await asyncio.sleep(self.retry_s)
                self._due.set()

