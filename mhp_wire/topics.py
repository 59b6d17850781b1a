"""The MQTT topic tree, version 1. Components never format a topic string by hand: they call these builders.

Two brokers, one shape. On the **hub broker** the parties are retailers (MQTT username = retailer id) and the
hub; on a **retailer broker** the parties are gateways (MQTT username = gateway id) and that retailer's bridge.
Each party has a ``down`` subtree that only the privileged side writes and an ``up`` subtree that only the party
writes; ``public`` is written by the privileged side and read by all. The broker ACLs in ``broker_config``
are generated from the same three rules, so the topic tree and the ACLs cannot drift apart.

    mhp/v1/retailers/{retailer_id}/down/msg      hub -> retailer       QoS 1 (an ack: QoS 0)
    mhp/v1/retailers/{retailer_id}/up/msg        retailer -> hub       QoS 1 (an ack: QoS 0)
    mhp/v1/retailers/{retailer_id}/up/status     retailer presence     QoS 1, retained, last will
    mhp/v1/gateways/{gateway_id}/down/msg        bridge -> gateway     QoS 1 (an ack: QoS 0)
    mhp/v1/gateways/{gateway_id}/up/msg          gateway -> bridge     QoS 1 (an ack: QoS 0)
    mhp/v1/gateways/{gateway_id}/up/telemetry    gateway -> bridge     QoS 1
    mhp/v1/gateways/{gateway_id}/up/status       gateway presence      QoS 1, retained, last will
    mhp/v1/public/tariff                         current tariff        QoS 1, retained
    mhp/v1/public/status                         hub / bridge presence QoS 1, retained, last will
    mhp/v1/hub/replicas/{replica_id}/status      hub replica presence  QoS 1, retained, last will
    mhp/v1/hub/replicas/{replica_id}/in          replica -> replica    QoS 1 (forwarded outcomes, acks, cancels)
    mhp/v1/bridge/{login}/probe                  bridge -> itself      QoS 1 (its read marker, on its retailer broker)

The ``hub`` subtree exists only on the hub broker and only between hub replicas (``docs/architecture.md``,
scale-out): no party pattern grants it, so only the privileged identities (one per replica) may use it. Replicas
share the retailers' ``up/msg`` traffic through the MQTT 5 shared subscription ``$share/hub/...`` (:func:`shared`)
and each also subscribes, unshared, to every retailer's presence.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

from mhp_wire.ids import ID_MAX_CHARS, is_id

ROOT = "mhp"
VERSION = "v1"
PREFIX = f"{ROOT}/{VERSION}"

PartyKind = Literal["retailers", "gateways"]

RESERVED_IDS = frozenset({"hub", "bridge", "admin", "dso"})


class TopicError(ValueError):
    """A topic or identifier does not belong to the v1 topic tree."""


def check_id(value: str) -> str:
    """Return ``value`` if it can be a retailer, gateway or client id (and so an MQTT username and a topic level)."""
    if not is_id(value):
        raise TopicError(
            f"invalid id {value!r}: 1-64 characters of letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return value


def down(kind: PartyKind, party_id: str) -> str:
    """Privileged side -> one party: requests and commands."""
    return f"{PREFIX}/{kind}/{check_id(party_id)}/down/msg"


def up(kind: PartyKind, party_id: str) -> str:
    """One party -> privileged side: acknowledgements, outcomes, answers."""
    return f"{PREFIX}/{kind}/{check_id(party_id)}/up/msg"


def telemetry(gateway_id: str) -> str:
    """A gateway's measurements."""
    return f"{PREFIX}/gateways/{check_id(gateway_id)}/up/telemetry"


def status(kind: PartyKind, party_id: str) -> str:
    """A party's retained presence (``online``/``offline``), also its last will."""
    return f"{PREFIX}/{kind}/{check_id(party_id)}/up/status"


def _longest_up_topic() -> int:
    longest = "x" * ID_MAX_CHARS
    return max(len(t.encode()) for t in (up("retailers", longest), up("gateways", longest),
                                         status("retailers", longest), status("gateways", longest),
                                         telemetry(longest)))


MAX_UP_TOPIC_BYTES = _longest_up_topic()
"""The longest topic a party publishes on (its ``up`` subtree, with an id of :data:`ID_MAX_CHARS`): what a PUBLISH
packet's topic takes at most of the brokers' packet limit (:data:`mhp_wire.messages.SEND_PAYLOAD_BYTES`)."""


def all_up(kind: PartyKind) -> str:
    """Subscription filter for everything every party of ``kind`` sends up."""
    return f"{PREFIX}/{kind}/+/up/#"


def party_up(kind: PartyKind, party_id: str) -> str:
    """Subscription filter for everything one party sends up (its messages, telemetry and presence): what a
    partitioned bridge subscribes to per gateway it owns (``retailer_bridge.partition.uplink_filters``)."""
    return f"{PREFIX}/{kind}/{check_id(party_id)}/up/#"


def all_up_msg(kind: PartyKind) -> str:
    """Subscription filter for the messages (not the presence) every party of ``kind`` sends up."""
    return f"{PREFIX}/{kind}/+/up/msg"


def all_status(kind: PartyKind) -> str:
    """Subscription filter for the retained presence of every party of ``kind``."""
    return f"{PREFIX}/{kind}/+/up/status"


SHARE_GROUP = "hub"
"""The shared-subscription group of the hub replicas."""


def shared(topic_filter: str, group: str = SHARE_GROUP) -> str:
    """An MQTT 5 shared subscription: the broker hands each matching message to one member of ``group``."""
    check_id(group)
    return f"$share/{group}/{topic_filter}"


REPLICAS = f"{PREFIX}/hub/replicas"


def replica_status(replica_id: str) -> str:
    """A hub replica's retained presence (``online``/``offline``), also its last will."""
    return f"{REPLICAS}/{check_id(replica_id)}/status"


def replica_in(replica_id: str) -> str:
    """What the other replicas send one hub replica."""
    return f"{REPLICAS}/{check_id(replica_id)}/in"


REPLICA_STATUS_ALL = f"{REPLICAS}/+/status"


def bridge_probe(login: str) -> str:
    """A bridge process's read marker on its retailer broker (:class:`mhp_wire.outbox.ReadHorizon`): it publishes and
    alone reads it, under its own MQTT login. Like ``hub/replicas``, no party pattern grants the ``bridge`` subtree,
    so a gateway can neither read nor forge it."""
    return f"{PREFIX}/bridge/{check_id(login)}/probe"

TARIFF = f"{PREFIX}/public/tariff"
PUBLIC_STATUS = f"{PREFIX}/public/status"
PUBLIC_ALL = f"{PREFIX}/public/#"


def acl_patterns(kind: PartyKind) -> list[tuple[Literal["read", "write", "readwrite"], str]]:
    """Mosquitto ``pattern`` rules for every party of ``kind``: ``%u`` is replaced by the MQTT username."""
    return [
        ("read", f"{PREFIX}/{kind}/%u/down/#"),
        ("write", f"{PREFIX}/{kind}/%u/up/#"),
        ("read", PUBLIC_ALL),
    ]


def openadr3_ven(ven_id: str, object_type: str, operation: str) -> str:
    """The OpenADR 3 MQTT notifier's topic of one VEN's objects (``events``) and operation (``create``, ``update``,
    ``delete``, or ``+`` for all): under the retailer's own ``down`` subtree, so the broker's ACL pattern for
    retailers already lets only that VEN read it, and its bridge (subscribed to ``down/msg``) never gets it."""
    return f"{PREFIX}/retailers/{check_id(ven_id)}/down/openadr3/{object_type}/{operation}"


PRIVILEGED_ACL = f"{PREFIX}/#"
"""The hub (on the hub broker) and a bridge (on its retailer broker) may read and write the whole v1 tree, the
hub replicas' ``hub/replicas`` subtree included (and only they: :func:`acl_patterns` never grants it)."""


class ParsedTopic(NamedTuple):
    """What an incoming ``up`` topic says: which party sent it and on which channel. A named tuple: immutable as the
    frozen dataclass it was, and built in 0.15 instead of 0.5 µs (one per message a party sends)."""

    kind: PartyKind
    party_id: str
    channel: Literal["msg", "telemetry", "status"]


_REPLICA_RE = re.compile(rf"^{ROOT}/{VERSION}/hub/replicas/([^/]+)/(status|in)$")


def parse_replica(topic: str) -> tuple[str, Literal["status", "in"]] | None:
    """``(replica_id, channel)`` of a hub-replica topic, or None for any other topic."""
    m = _REPLICA_RE.fullmatch(topic)
    if not m:
        return None
    check_id(m.group(1))
    return m.group(1), m.group(2)  # type: ignore[return-value]


_UP_RE = re.compile(rf"^{ROOT}/{VERSION}/(retailers|gateways)/([^/]+)/up/(msg|telemetry|status)$")


_SENDER_RE = re.compile(rf"^{ROOT}/{VERSION}/(?:retailers|gateways)/([^/]+)/up/")


def sender_of(topic: str) -> str | None:
    """The party id of a topic in some party's ``up`` subtree (which the broker's ACL ties to the username), even
    when the rest of the topic is not one of ours; None for any other topic. For rate-limiting what is refused."""
    m = _SENDER_RE.match(topic)
    return m.group(1) if m else None


def parse_up(topic: str) -> ParsedTopic:
    """Parse an ``up`` topic; the party id comes from the topic, which the broker's ACL ties to the username."""
    m = _UP_RE.fullmatch(topic)
    if not m:
        raise TopicError(f"not a v1 up topic: {topic!r}")
    kind, party_id, channel = m.groups()
    check_id(party_id)
    return ParsedTopic(kind, party_id, channel)  # type: ignore[arg-type]
