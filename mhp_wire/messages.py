"""Typed, validated message models of wire version 1; every MQTT payload is one of these, as UTF-8 JSON.

Every message carries ``v`` (the wire version), ``type`` (the discriminator), a unique ``msg_id`` and
``sent_at``. Delivery is QoS 1, *at least once*: a receiver acknowledges a message it has durably stored with an
``ack`` naming its ``msg_id`` (the application-level acknowledgement that survives a broker crash, see
``docs/protocol.md``), and drops duplicates by ``(request_id, client_id)`` (``billing_data``: and ``period_start``,
a client's readings may come in parts of its period).
An ``ack`` itself is published at QoS 0 (:data:`ACK_QOS`): a lost one is repaired by the sender's re-send.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from mhp_wire.ids import ID_MAX_CHARS, msg_ids
from mhp_wire.logsafe import outside
from mhp_wire.topics import MAX_UP_TOPIC_BYTES, TopicError, check_id, replica_in

WIRE_VERSION = 1
MAX_PAYLOAD_BYTES = 256 * 1024
"""The largest payload a receiver reads: :func:`decode` refuses a larger one. A sender keeps to
:data:`SEND_PAYLOAD_BYTES`, which is smaller."""
MAX_PACKET_BYTES = 256 * 1024
"""The brokers' ``max_packet_size`` (``broker_config``): the whole PUBLISH packet, topic and headers included.
Mosquitto disconnects a client that sends a larger one, and the client's session sends a QoS 1 packet again at each
reconnection: one oversize message cuts its sender's link for good (docs/decisions.md, "A message that fits the
brokers' packet")."""
PUBLISH_OVERHEAD_BYTES = 1 + 4 + 2 + MAX_UP_TOPIC_BYTES + 2 + 1
"""What a PUBLISH packet adds to its payload at most: the fixed header (1), the remaining length (at most 4), the
topic's length (2) and the longest ``up`` topic of a party, the packet id (2), the empty properties' length (1)."""
SEND_PAYLOAD_BYTES = MAX_PACKET_BYTES - PUBLISH_OVERHEAD_BYTES
"""The largest payload a party publishes on its ``up`` topics, and a hub replica on another's inbox: its packet fits
the brokers' :data:`MAX_PACKET_BYTES` on any of them (and :func:`decode` reads it, :data:`MAX_PAYLOAD_BYTES` being
larger)."""
BRIDGE_TRACE_KEYS = ("gateway_rtt_ms", "retailer_ms")
"""The timings a bridge adds to a gateway's outcome's ``trace`` when it forwards it to the hub."""
_FLOAT_JSON_MAX = len("-2.2250738585072014e-308")
"""The longest JSON a finite float takes (as pydantic and orjson write it)."""
_SENT_AT_JSON_MAX = len('"2026-01-01T00:00:00.000000+00:00"')
"""The longest ``sent_at`` the wire takes: microseconds and an offset."""
FORWARD_HEADROOM_BYTES = (sum(len(f',"{k}":') + _FLOAT_JSON_MAX for k in BRIDGE_TRACE_KEYS)
                          + 64 + 2 + _SENT_AT_JSON_MAX)
"""What a bridge's forwarding may add to a gateway's ``outcome`` at most: the :data:`BRIDGE_TRACE_KEYS` at their
longest (a float each), and its own ``msg_id`` (at most 64 characters and quotes) and ``sent_at`` in place of the
gateway's (counted whole, however short the gateway's were)."""


def replica_outcome_header(sender: str, retailer_id: str) -> bytes:
    """The line a hub replica puts before a retailer's ``outcome``/``outcomes`` payload when it forwards it to the
    replica that owns its request (``mhp/v1/hub/replicas/{id}/in``): compact JSON and a newline; the retailer's bytes
    follow unchanged (docs/protocol.md, "Between hub replicas"). Ids are :func:`check_id` ids: nothing to escape."""
    return json.dumps({"type": "outcome", "sender": check_id(sender), "retailer_id": check_id(retailer_id)},
                      separators=(",", ":")).encode() + b"\n"


_LONGEST_ID = "x" * ID_MAX_CHARS
REPLICA_HEADROOM_BYTES = (len(replica_outcome_header(_LONGEST_ID, _LONGEST_ID))
                          + max(0, len(replica_in(_LONGEST_ID).encode()) - MAX_UP_TOPIC_BYTES))
"""What a hub replica's forwarding adds to a retailer's outcome at most: the :func:`replica_outcome_header` with two
ids of :data:`~mhp_wire.ids.ID_MAX_CHARS`, and what the replica's inbox topic is longer than the longest ``up``
topic (nothing: :data:`PUBLISH_OVERHEAD_BYTES` covers it)."""
BRIDGE_OUTCOME_BYTES = SEND_PAYLOAD_BYTES - REPLICA_HEADROOM_BYTES
"""The largest ``outcome`` or ``outcomes`` payload a bridge sends the hub: once a hub replica has put its header
before it, it still fits :data:`SEND_PAYLOAD_BYTES` on the replica's inbox (docs/decisions.md, "An outcome forwarded
between hub replicas fits the packet")."""
GATEWAY_OUTCOME_BYTES = BRIDGE_OUTCOME_BYTES - FORWARD_HEADROOM_BYTES
"""The largest ``outcome`` a gateway sends: once its bridge has added its trace it still fits
:data:`BRIDGE_OUTCOME_BYTES`. A larger one goes with its ``detail`` cut to a marker (:func:`oversize_detail`)."""
OVERSIZE_KEY = "oversize"
"""The marker an outcome's ``detail`` carries when it was too big to send whole (:func:`oversize_detail`)."""
_KEEP_FIELDS = 32
_KEEP_CHARS = 500


class WireError(ValueError):
    """A payload that is not a valid v1 message; ``str()`` says exactly what is wrong."""


def new_id() -> str:
    """A fresh message or request id."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


def _check_id_field(value: str) -> str:
    try:
        return check_id(value)
    except TopicError as exc:
        raise ValueError(str(exc)) from exc


Id = Annotated[str, AfterValidator(_check_id_field)]

_WIRE = {"wire": True}
"""The validation context of :func:`decode`: what arrives from outside, as opposed to a model built here."""


def _finite_claim(value: Any, info: ValidationInfo) -> Any:
    """A power a party claims must be a finite number when it arrives: JSON has no ``Infinity`` or ``NaN``, yet the
    JSON parser reads ``1e999``, ``Infinity`` and ``NaN`` into floats. A model built here still accepts a
    non-finite value, which :func:`encode` writes as ``null`` (docs/protocol.md)."""
    if (info.context or {}).get("wire") and isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class RequestKind(StrEnum):
    """What a DSO request asks of the homes."""

    EMERGENCY = "emergency"
    LOAD_SHIFT = "load_shift"
    AVAILABILITY = "availability"
    LOAD_REDUCTION = "load_reduction"


class ClientState(StrEnum):
    """Where one targeted client stands in one request."""

    PENDING = "pending"
    SENT = "sent"
    DELIVERED = "delivered"
    ACKNOWLEDGED = "acknowledged"
    AVAILABLE = "available"
    UNAVAILABLE = "unavailable"
    EXECUTED = "executed"
    LIMIT_NOT_MET = "limit_not_met"
    """The gateway acted but the home is not under the limit (or the target was not shed); ``detail`` says what
    was measured, what was asked and why."""
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether no later state can follow."""
        return self not in _NON_TERMINAL


_NON_TERMINAL = frozenset({ClientState.PENDING, ClientState.SENT, ClientState.DELIVERED})


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    msg_id: str = Field(default_factory=msg_ids, min_length=1, max_length=64)
    """Opaque, unique per message: a per-process prefix and a counter (:class:`mhp_wire.ids.MsgIds`), not a
    ``uuid4`` each (a system call per message on the hub's hot path, ~5 % of its event loop at 6,000/min)."""
    sent_at: AwareDatetime = Field(default_factory=utcnow)


class _Window(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    start: AwareDatetime
    end: AwareDatetime

    @model_validator(mode="after")
    def _ordered(self) -> _Window:
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class EmergencyParams(_Window):
    """Hold the home under ``power_limit_kw`` of import from ``start`` to ``end``."""

    kind: Literal["emergency"] = "emergency"
    power_limit_kw: float = Field(ge=0, le=10_000)


class LoadShiftParams(_Window):
    """Move flexible (sheddable) loads out of the window from ``start`` to ``end``."""

    kind: Literal["load_shift"] = "load_shift"
    reason: str | None = Field(None, max_length=500)


class AvailabilityParams(_Window):
    """Phase one of a load reduction: which of these clients could shed load from ``start`` to ``end``?"""

    kind: Literal["availability"] = "availability"
    reduction_kw: float = Field(gt=0, le=1_000_000)


class LoadReductionParams(_Window):
    """Phase two of a load reduction: switch appliances off from ``start`` to ``end``."""

    kind: Literal["load_reduction"] = "load_reduction"
    target_kw: float | None = Field(None, ge=0, le=1_000_000)


Params = Annotated[
    EmergencyParams | LoadShiftParams | AvailabilityParams | LoadReductionParams, Field(discriminator="kind")
]


class Request(_Msg):
    """Hub -> retailer: a DSO request for some of that retailer's clients (never another retailer's)."""

    type: Literal["request"] = "request"
    request_id: str = Field(min_length=1, max_length=64)
    kind: RequestKind
    client_ids: list[Id] = Field(min_length=1, max_length=100_000)
    params: Params
    expires_at: AwareDatetime
    revision: int = Field(default=1, ge=1)
    """The request's revision (``POST /v1/requests/{id}/revise``): a higher one replaces what a lower one said
    for the same clients; absent (an older hub) means 1."""

    @model_validator(mode="after")
    def _kind_matches(self) -> Request:
        if self.params.kind != self.kind.value:
            raise ValueError(f"params are for {self.params.kind!r}, not {self.kind.value!r}")
        return self


class Command(_Msg):
    """Bridge -> gateway: what one home must do for one request."""

    type: Literal["command"] = "command"
    request_id: str = Field(min_length=1, max_length=64)
    client_id: Id
    kind: RequestKind
    params: Params
    expires_at: AwareDatetime
    revision: int = Field(default=1, ge=1)
    """The request's revision this command carries: the gateway applies the newest it has, and ignores (and
    reports, ``stale_revision``) an older one that arrives late; absent (an older bridge) means 1."""


class Cancel(_Msg):
    """Hub -> retailer or bridge -> gateway: stop acting on a request."""

    type: Literal["cancel"] = "cancel"
    request_id: str = Field(min_length=1, max_length=64)
    client_ids: list[Id] = Field(default_factory=list, max_length=100_000)
    revision: int | None = Field(default=None, ge=1)
    """None: the whole request is cancelled. A number: that revision of the request removed the clients named
    (only they stop; the request goes on for the others), and a receiver that already holds a newer revision for a
    client ignores it."""


class AckPartition(BaseModel):
    """Which partition of a retailer's bridge acknowledges: process ``index`` of ``of`` (``docs/protocol.md``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0, lt=64)
    of: int = Field(ge=1, le=64)

    @model_validator(mode="after")
    def _within(self) -> AckPartition:
        if self.index >= self.of:
            raise ValueError(f"partition index {self.index} must be below its count {self.of}")
        return self


ACK_QOS = 0
"""The MQTT QoS of every ``ack`` (hub, bridge and gateway; docs/decisions.md, "Acks at QoS 0"). An ack is never
stored in an outbox: a lost one is repaired by the sender of the acknowledged message, which re-sends it on its
back-off until acknowledged, and the receiver acks the duplicate again. QoS 1 bought an ack nothing but a packet id,
a slot of the in-flight window, the broker's stored copy and two PUBACKs. Every other message stays at QoS 1."""


class Ack(_Msg):
    """The receiver has durably stored the messages named in ``ack_ids``; the sender may stop re-sending them."""

    type: Literal["ack"] = "ack"
    ack_ids: list[str] = Field(min_length=1, max_length=10_000)
    partition: AckPartition | None = None
    """A partitioned retailer bridge's acknowledgement to the hub: it stored its partition's share of each message;
    the hub stops re-sending a message when every partition ``0..of-1`` has acknowledged it. Absent (not ``null``)
    from an unpartitioned bridge, the hub and gateways, so that their acknowledgements are as before."""

    @model_serializer(mode="wrap")
    def _absent_when_unpartitioned(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("partition", 0) is None:
            del data["partition"]
        return data


def _finite_detail(detail: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    """``detail.available_kw`` is a claim (what the client could shed): not infinite or NaN on the wire (the one
    check of an :class:`Outcome`'s and an :class:`OutcomeReport`'s ``detail``)."""
    try:
        _finite_claim(detail.get("available_kw"), info)
    except ValueError:
        raise ValueError("available_kw must be a finite number") from None
    return detail


class Outcome(_Msg):
    """Gateway -> bridge -> hub: where one client stands in one request, with per-component timings (ms)."""

    type: Literal["outcome"] = "outcome"
    request_id: str = Field(min_length=1, max_length=64)
    client_id: Id
    state: ClientState
    detail: dict[str, Any] = Field(default_factory=dict)
    trace: dict[str, float] = Field(default_factory=dict)
    revision: int = Field(default=1, ge=1)
    """The revision of the request this outcome answers; the hub keeps only outcomes of a client's latest
    revision. Absent (an older gateway or bridge) means 1."""

    _finite_available_kw = field_validator("detail")(_finite_detail)


def oversize_detail(detail: dict[str, Any], size: int, limit: int, by: Literal["gateway", "bridge"]
                    ) -> dict[str, Any]:
    """An outcome's ``detail`` cut to fit: its outcome was ``size`` bytes, over ``limit``. The outcome itself (its
    state, request, client and revision) is sent all the same; its detail keeps its first top-level fields that are a
    number, a bool, null or a string of at most 500 characters (the figures and the ``reason``; at most 32 of them,
    with names of at most 64 characters) and says under :data:`OVERSIZE_KEY` what was dropped and who cut it:
    ``{"bytes": size, "limit": limit, "by": by, "dropped": [the first 20 names dropped]}``."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in detail.items():
        small = value is None or isinstance(value, (bool, int, float)) \
            or (isinstance(value, str) and len(value) <= _KEEP_CHARS)
        if small and len(key) <= 64 and len(kept) < _KEEP_FIELDS and key != OVERSIZE_KEY:
            kept[key] = value
        else:
            dropped.append(key)
    kept[OVERSIZE_KEY] = {"bytes": size, "limit": limit, "by": by, "dropped": [k[:64] for k in dropped[:20]]}
    return kept


OUTCOMES_MAX = 2_000
"""Client reports per ``outcomes`` message: 2,000 reports of a few hundred bytes stay under the 256 KiB limit."""


class OutcomeReport(BaseModel):
    """One client's entry of an :class:`Outcomes` message: the fields of an :class:`Outcome` that name the client."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    client_id: Id
    state: ClientState
    detail: dict[str, Any] = Field(default_factory=dict)
    trace: dict[str, float] = Field(default_factory=dict)
    revision: int = Field(default=1, ge=1)

    _finite_available_kw = field_validator("detail")(_finite_detail)


class Outcomes(_Msg):
    """Bridge -> hub: where many clients stand in one request, one entry per client (``docs/protocol.md``).

    An entry that is not a valid :class:`OutcomeReport` does not make the message invalid: it stays a plain object
    here, and the hub refuses it alone (``error`` naming the entry) while it applies the rest."""

    type: Literal["outcomes"] = "outcomes"
    request_id: str = Field(min_length=1, max_length=64)
    reports: list[Annotated[OutcomeReport | dict[str, Any], Field(union_mode="left_to_right")]] = Field(
        min_length=1, max_length=OUTCOMES_MAX)

    def invalid_reason(self, index: int) -> str:
        """Why entry ``index`` (a plain object, see the class) is not a valid report."""
        try:
            OutcomeReport.model_validate(self.reports[index], context=_WIRE)
        except ValidationError as exc:
            return _clip("; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(entry)'}: {err['msg']}"
                                   for err in exc.errors()[:5]), 600)
        return "not a valid report"


class ErrorReply(_Msg):
    """An answer to a message that was refused: what was wrong with it, so its sender can tell."""

    type: Literal["error"] = "error"
    ref_msg_id: str | None = Field(default=None, max_length=64)
    """The ``msg_id`` of the refused message (a ``msg_id`` has at most 64 characters)."""
    code: Literal["invalid", "forbidden", "unknown_client", "expired", "internal", "stale_revision"]
    """``stale_revision``: a command (or cancel) of an older revision than the one the receiver holds arrived
    late; it was acknowledged and ignored."""
    message: str = Field(max_length=2000)


class FailsafeReport(BaseModel):
    """A gateway's failsafe episode: the limit it applied on its own while its bridge was away (in telemetry)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    state: Literal["active", "ended"]
    started_at: AwareDatetime
    ended_at: AwareDatetime | None = None
    ended_by: Literal["duration", "reconnected"] | None = None
    limit_kw: float = Field(ge=0, le=10_000)
    """The limit applied: the configured failsafe limit, never below the configured legal floor."""
    offline_s: float = Field(ge=0)
    """How long the uplink had been down when the failsafe applied."""
    shed: list[str] = Field(default_factory=list, max_length=64)


class Telemetry(_Msg):
    """Gateway -> bridge: one poll of the home's devices; ``seq`` numbers a gateway's telemetry in order."""

    type: Literal["telemetry"] = "telemetry"
    gateway_id: Id
    client_id: Id
    seq: int = Field(ge=0)
    at: AwareDatetime
    devices: dict[str, dict[str, float | bool | None]]
    active_power_kw: float | None = None
    """The home's import now (from its meter), if known."""
    sheddable_kw: float | None = None
    """Rated power of the sheddable loads that are on now: what the home could shed."""
    rated_sheddable_kw: float | None = None
    """Rated power of every load the gateway is configured to shed, on or off: the bound of ``sheddable_kw``
    (absent from gateways older than this field)."""
    failsafe: FailsafeReport | None = None
    """The failsafe in force, or the one that just ended (once), if any (absent from older gateways)."""

    @field_validator("active_power_kw", "sheddable_kw", "rated_sheddable_kw")
    @classmethod
    def _finite_claims(cls, value: float | None, info: ValidationInfo) -> float | None:
        return _finite_claim(value, info)


class Presence(_Msg):
    """A party's retained presence; its ``offline`` form is the party's last will."""

    type: Literal["presence"] = "presence"
    state: Literal["online", "offline"]


READING_BLOCK_VALUES = 10_000
"""The most readings one :class:`ReadingBlock` carries (the hub stores consecutive uploads as one block, and cuts
longer ones into blocks of this many when it delivers them)."""


class ReadingBlock(BaseModel):
    """Consecutive meter readings of one client: ``values_kwh[i]`` is the energy of interval ``i``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    start: AwareDatetime
    resolution_s: int = Field(gt=0, le=86_400)
    values_kwh: list[float] = Field(min_length=1, max_length=READING_BLOCK_VALUES)
    quality: Literal["measured", "estimated"] = "measured"
    version: int = Field(1, ge=1)
    """Uploads of the same interval so far; above 1 the block is a correction."""
    corrected: bool = False


class BillingClient(BaseModel):
    """One client's readings for the part of the billed period in which this retailer supplied it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    client_id: Id
    period_start: AwareDatetime
    period_end: AwareDatetime
    readings: list[ReadingBlock] = Field(max_length=10_000)


class BillingData(_Msg):
    """Hub -> retailer: billing data of its clients for a period (one message may carry part of the clients)."""

    type: Literal["billing_data"] = "billing_data"
    request_id: str = Field(min_length=1, max_length=64)
    period_start: AwareDatetime
    period_end: AwareDatetime
    clients: list[BillingClient] = Field(min_length=1, max_length=1_000)


class TariffPeriod(BaseModel):
    """A price for a time span."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    start: AwareDatetime
    end: AwareDatetime
    price_eur_per_kwh: float = Field(ge=-10, le=100)


class Tariff(_Msg):
    """A network tariff calendar, public; ``version`` increases with every publication of the same id."""

    type: Literal["tariff"] = "tariff"
    tariff_id: Id
    version: int = Field(ge=1)
    valid_from: AwareDatetime
    valid_to: AwareDatetime
    periods: list[TariffPeriod] = Field(min_length=1, max_length=10_000)
    published: int | None = Field(default=None, ge=1)
    """The hub's publication order across all tariffs (absent from a hub older than it): a bridge keeps the tariff
    published last, whatever order re-sends arrive in."""


def tariff_msg_id(tariff_id: str, version: int) -> str:
    """The ``msg_id`` of a tariff version as published retained: the same at every republication, and within the
    64 characters of a ``msg_id`` whatever the tariff id's length (``tariff-<id>-<version>`` was not)."""
    return f"tariff-{uuid.uuid5(uuid.NAMESPACE_URL, f'mhp:tariff:{tariff_id}:{version}').hex}"


def recipient_msg_id(msg_id: str, recipient: str) -> str:
    """The ``msg_id`` of one recipient's copy of a message (each retailer acknowledges its own copy): a uuid5 of
    both, so that it is the same at every re-send and within the 64 characters of a ``msg_id`` whatever the
    recipient id's length (``<msg_id>-<recipient>`` was not: a copy for a 40-character retailer id was refused
    as invalid by its bridge, forever)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"mhp:copy:{msg_id}:{recipient}").hex


class Measurement(BaseModel):
    """Active power of one client at one time."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    client_id: Id
    at: AwareDatetime
    active_power_kw: float = Field(ge=-10_000, le=10_000)


MEASUREMENTS_PER_MESSAGE = 10_000
"""The most measurements one ``measurements`` message carries (a sender splits further to fit the packet:
:func:`measurements_payloads`)."""


class Measurements(_Msg):
    """Retailer -> hub: active-power measurements of its own clients."""

    type: Literal["measurements"] = "measurements"
    items: list[Measurement] = Field(min_length=1, max_length=MEASUREMENTS_PER_MESSAGE)


def measurements_payloads(items: Sequence[Measurement], limit: int = SEND_PAYLOAD_BYTES) -> list[tuple[str, bytes]]:
    """Outbox messages ``(msg_id, payload)`` carrying every one of ``items``, in their order: ``measurements`` of at
    most :data:`MEASUREMENTS_PER_MESSAGE` each, cut further while a payload is over ``limit`` (the packet, see
    :data:`MAX_PACKET_BYTES`; one measurement is ~80 bytes, so 10,000 are ~800 KB). One measurement alone always
    fits: its id is at most 64 characters and its numbers bounded."""
    out: list[tuple[str, bytes]] = []
    for i in range(0, len(items), MEASUREMENTS_PER_MESSAGE):
        out += _fitted_measurements(list(items[i:i + MEASUREMENTS_PER_MESSAGE]), limit)
    return out


def _fitted_measurements(items: list[Measurement], limit: int) -> list[tuple[str, bytes]]:
    batch = Measurements(items=items)
    payload = encode(batch)
    if len(payload) <= limit or len(items) == 1:
        return [(batch.msg_id, payload)]
    # Cut at once into as many parts as the size says (one more for the parts' own envelopes), not by halves: 10,000
    # measurements were encoded three times over halving, on the bridge's loop at every flush.
    parts = len(payload) // limit + 2
    size = -(-len(items) // parts)
    return [m for i in range(0, len(items), size) for m in _fitted_measurements(items[i:i + size], limit)]


class ApplianceSchedule(BaseModel):
    """A customer's flexibility settings for one appliance (from the retailer's personal area)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    device: str = Field(min_length=1, max_length=64)
    allowed: list[tuple[str, str]] = Field(default_factory=list, max_length=24)
    """Windows ``("HH:MM", "HH:MM")`` in which the appliance may run (empty: any time)."""
    run_s: float | None = Field(None, ge=0, le=86_400)
    """Running time it needs per day, placed in the cheapest allowed slots (None: not tariff-scheduled)."""
    max_interruption_s: float | None = Field(None, ge=0, le=86_400)
    """The longest it may be kept off by a request (None: no bound)."""
    priority: int | None = Field(None, ge=0, le=1000)
    """Lower sheds first (None: keep the installer's setting)."""
    never_shed: bool = False


class Schedule(_Msg):
    """Bridge -> gateway: the customer's flexibility schedule; the newest ``version`` wins."""

    type: Literal["schedule"] = "schedule"
    client_id: Id
    version: int = Field(ge=1)
    appliances: list[ApplianceSchedule] = Field(max_length=64)


class SupplyPeriod(BaseModel):
    """A span in which one retailer supplies one client: from ``valid_from``, until ``valid_until`` (None: open)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    valid_from: AwareDatetime
    valid_until: AwareDatetime | None = None

    @model_validator(mode="after")
    def _ordered(self) -> SupplyPeriod:
        if self.valid_until is not None and self.valid_until <= self.valid_from:
            raise ValueError("valid_until must be after valid_from")
        return self


class CustomerChange(BaseModel):
    """Every period in which the receiving retailer supplies ``client_id``, as the hub knows them at ``revision``.

    A gain is a period that starts, a loss one that ends (``valid_until``); an empty list: not this retailer's
    client at any time. ``revision`` grows with every change of the client's supplier history: a receiver keeps
    the highest it has seen, so a late re-send of an older revision changes nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    client_id: Id
    revision: int = Field(ge=1)
    periods: list[SupplyPeriod] = Field(max_length=1_000)

    @model_validator(mode="after")
    def _in_order(self) -> CustomerChange:
        for a, b in zip(self.periods, self.periods[1:], strict=False):
            if a.valid_until is None or b.valid_from < a.valid_until:
                raise ValueError("periods must be in order and must not overlap")
        return self


class Customers(_Msg):
    """Hub -> retailer: clients whose supply by this retailer changed (gained, lost, or from when)."""

    type: Literal["customers"] = "customers"
    items: list[CustomerChange] = Field(min_length=1, max_length=1_000)


class ConsentQuery(_Msg):
    """Retailer -> hub: show me this customer's permissions and access log (answered by ``consent_view`` when the
    retailer supplies the client now). Not stored: a personal-area page asks again."""

    type: Literal["consent_query"] = "consent_query"
    client_id: Id


class ConsentDecision(_Msg):
    """Retailer -> hub, through the bridge's stored outbox: the customer accepted, rejected or revoked a party's
    permission in the personal area (docs/consent.md). Acknowledged with ``ack``, or refused with ``error``."""

    type: Literal["consent_decision"] = "consent_decision"
    client_id: Id
    permission_id: Id
    decision: Literal["accept", "reject", "revoke"]
    decided_at: AwareDatetime


class ConsentItem(BaseModel):
    """One party's permission, as the customer is shown it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    permission_id: Id
    party_id: Id
    party_name: str = Field(max_length=200)
    purpose: str = Field(max_length=500)
    scopes: list[Literal["consumption_profile", "billing_data", "live_measurements"]] = Field(max_length=3)
    resolution_s: int = Field(gt=0)
    data_from: AwareDatetime
    data_to: AwareDatetime
    valid_until: AwareDatetime
    decide_by: AwareDatetime
    state: Literal["created", "validated", "sent_to_pa", "accepted", "rejected", "timed_out", "revoked",
                   "terminated", "fulfilled"]


class AccessItem(BaseModel):
    """One line of the hub's data access log about the customer: who, when, what, under which right."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    at: AwareDatetime
    principal: str = Field(max_length=200)
    action: str = Field(max_length=64)
    right: str = Field(max_length=200)
    allowed: bool


class ConsentView(_Msg):
    """Hub -> retailer: a customer's permissions and the newest lines of their access log, for the personal area
    (sent to the client's current retailer only: on a ``consent_query``, and after each change)."""

    type: Literal["consent_view"] = "consent_view"
    client_id: Id
    permissions: list[ConsentItem] = Field(max_length=500)
    accesses: list[AccessItem] = Field(max_length=500)


Message = Annotated[
    Request | Command | Cancel | Ack | Outcome | Outcomes | ErrorReply | Telemetry | Presence | BillingData | Tariff
    | Measurements | Schedule | Customers | ConsentQuery | ConsentDecision | ConsentView,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


def encode(msg: BaseModel) -> bytes:
    """Serialise a message to its wire form."""
    return msg.model_dump_json().encode()  # not exclude_none: it would also drop None values inside dicts


def decode(payload: bytes) -> Message:
    """Parse and validate a wire payload, raising :class:`WireError` with a readable reason."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        return _ADAPTER.validate_json(payload, context=_WIRE)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_clip('.'.join(str(p) for p in err['loc'])) or '(message)'}: {_clip(err['msg'])}"
            for err in exc.errors()[:10]
        )
        raise WireError(f"invalid v{WIRE_VERSION} message: {_clip(problems, 1800)}") from None


def _clip(text: str, limit: int = 120) -> str:
    """A hostile value echoed in an error stays short (an error answer carries at most 2000 characters) and on one
    line (the error is logged too)."""
    return outside(text, limit)


def presence_payload(state: Literal["online", "offline"]) -> bytes:
    """The retained presence payload (also used as the last will)."""
    return encode(Presence(state=state, msg_id=f"presence-{state}"))


def publish_qos(msg: object) -> int:
    """The MQTT QoS to publish ``msg`` at: :data:`ACK_QOS` for an ``ack``, 1 for everything else."""
    return ACK_QOS if isinstance(msg, Ack) else 1
