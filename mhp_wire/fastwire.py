"""Wire payloads of a hot path built without a pydantic model per message: the same JSON, the same rules.

A bridge in a fan-out to 10,000 gateways handles five messages per gateway; building, validating and encoding a
model for each of them (``Ack(...)``: ~17 µs with its ``uuid4`` id and encoding; ``Outcome(...)``: ~18 µs) was a
large part of its CPU per client (docs/performance.md, "Issue 14, fourth round"). What is built here is what
:func:`mhp_wire.messages.encode` writes for the same values — keys in the models' order, ``sent_at`` through
pydantic's own serialiser of datetimes, strings and numbers through orjson (the same JSON escapes; a non-finite
float written as ``null`` as pydantic writes it) — from values that are valid by construction (ids the caller
generated or received validated, states of :class:`ClientState`). ``tests/mhp_wire/test_fastwire.py`` holds each
payload against the model's encoding and its decoding. Anything orjson cannot write (an integer beyond 64 bits
inside a gateway's ``detail``) falls back to the model's encoding.

:class:`CommandTemplate` encodes a request's command once and splices each client's ``msg_id`` and ``client_id``
into it; :func:`read_report` is the other direction, a gateway's ``ack`` or ``outcome`` read into plain values
when it is one of the plain shapes gateways send, and ``None`` (read it with :func:`mhp_wire.messages.decode`,
which refuses it with its error) otherwise; :func:`read_outcomes` reads a bridge's ``outcomes`` for the hub the
same way (issue 14, ninth round).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
from pydantic import AwareDatetime, TypeAdapter

from mhp_wire.ids import ID_RE, msg_ids
from mhp_wire.messages import (
    BRIDGE_OUTCOME_BYTES,
    MAX_PAYLOAD_BYTES,
    OUTCOMES_MAX,
    ClientState,
    Command,
    Outcome,
    OutcomeReport,
    Outcomes,
    encode,
    oversize_detail,
    utcnow,
)

_SENT_AT: TypeAdapter[datetime] = TypeAdapter(AwareDatetime)


def sent_at_json(at: datetime | None = None) -> bytes:
    """``at`` (default: now) as the models write ``sent_at``, quotes included.

    A time in UTC (every one this side makes: :func:`mhp_wire.messages.utcnow`) is written by orjson with ``Z``:
    the bytes pydantic's serialiser writes (microseconds only when not zero, six digits), in 0.3 instead of 0.85 µs,
    paid for each ``ack`` a bridge sends a gateway; any other offset goes through pydantic's serialiser itself.
    ``tests/mhp_wire/test_fastwire.py`` holds the two against each other."""
    if at is None:
        at = utcnow()
    if type(at) is datetime and at.tzinfo is UTC:  # orjson refuses a subclass; pydantic writes it
        return orjson.dumps(at, option=orjson.OPT_UTC_Z)
    return _SENT_AT.dump_json(at)


_ACK_HEAD = b'{"v":1,"msg_id":'
_ACK_SENT_AT = b',"sent_at":'
_ACK_IDS = b',"type":"ack","ack_ids":'


def ack_payload(ack_ids: Sequence[str], *, msg_id: str | None = None, at: datetime | None = None) -> bytes:
    """An ``ack`` naming ``ack_ids`` (1 to 10,000 ``msg_id``s), as ``encode(Ack(ack_ids=...))`` writes it."""
    if not 1 <= len(ack_ids) <= 10_000:
        raise ValueError(f"an ack names 1 to 10,000 messages, not {len(ack_ids)}")
    return (_ACK_HEAD + orjson.dumps(msg_id or msg_ids()) + _ACK_SENT_AT + sent_at_json(at) + _ACK_IDS
            + orjson.dumps(list(ack_ids)) + b"}")


class AckStamp:
    """``ack`` payloads naming one message each, all sent at one instant: :func:`ack_payload` of ``[ack_id]`` with
    a fresh ``msg_id`` each and the one ``sent_at`` (``at``, default: now) written once. The bridge answers a
    batch of gateways' outcomes in one turn of its loop with one of these (issue 14, session 13): 0.4 µs less per
    answer than writing the time for each."""

    __slots__ = ("_tail",)

    def __init__(self, at: datetime | None = None) -> None:
        self._tail = _ACK_SENT_AT + sent_at_json(at) + _ACK_IDS + b"["

    def ack(self, ack_id: str) -> bytes:
        """The ``ack`` of ``ack_id``."""
        return _ACK_HEAD + orjson.dumps(msg_ids()) + self._tail + orjson.dumps(ack_id) + b"]}"


class Report(NamedTuple):
    """One client's outcome for the hub, as plain values (what an :class:`Outcome` carries but its envelope)."""

    request_id: str
    client_id: str
    state: ClientState
    detail: dict[str, Any]
    trace: dict[str, float]
    revision: int
    msg_id: str | None = None
    """A fixed ``msg_id`` when it travels alone as an ``outcome`` (a ``delivered`` one's, which a later outcome
    may withdraw); None: a fresh one."""


def _entry(r: Report) -> dict[str, Any]:
    # The state as it is: orjson writes an enum as its value, in C (``.value`` is a Python property, ~0.09 µs).
    return {"client_id": r.client_id, "state": r.state, "detail": r.detail, "trace": r.trace, "revision": r.revision}


Oversize = Callable[[Report, int], None]
"""Told of a report whose ``outcome`` was too big to send whole, and its size in bytes (:func:`outcome_payload`)."""


def outcome_payload(r: Report, *, at: datetime | None = None, limit: int = BRIDGE_OUTCOME_BYTES,
                    oversize: Oversize | None = None) -> tuple[str, bytes]:
    """``(msg_id, payload)`` of one client's ``outcome``, as ``encode(Outcome(...))`` writes it; one over ``limit``
    bytes (a gateway's near the limit, once the bridge's trace is added) goes with its ``detail`` cut to a marker
    (:func:`mhp_wire.messages.oversize_detail`), and ``oversize`` is told: its state still reaches the hub, and its
    packet fits the brokers' (a larger one cut the sender's link at each reconnection, for good)."""
    mid, payload = _outcome_payload(r, at)
    if len(payload) <= limit:
        return mid, payload
    if oversize is not None:
        oversize(r, len(payload))
    return _outcome_payload(r._replace(msg_id=mid, detail=oversize_detail(r.detail, len(payload), limit, "bridge")),
                            at)


def _outcome_payload(r: Report, at: datetime | None) -> tuple[str, bytes]:
    mid = r.msg_id or msg_ids()
    try:
        body = orjson.dumps({"request_id": r.request_id, **_entry(r)})
    except orjson.JSONEncodeError:  # beyond what orjson writes (an integer over 64 bits): the model's encoding
        return mid, encode(Outcome.model_construct(
            msg_id=mid, sent_at=utcnow() if at is None else at, request_id=r.request_id, client_id=r.client_id,
            state=r.state, detail=r.detail, trace=r.trace, revision=r.revision))
    return mid, (b'{"v":1,"msg_id":' + orjson.dumps(mid) + b',"sent_at":' + sent_at_json(at)
                 + b',"type":"outcome",' + body[1:])


def outcomes_payload(request_id: str, reports: Sequence[Report], *, msg_id: str | None = None,
                     at: datetime | None = None) -> tuple[str, bytes]:
    """``(msg_id, payload)`` of one ``outcomes`` message of one request, as the model writes it."""
    mid = msg_id or msg_ids()
    try:
        entries = orjson.dumps([_entry(r) for r in reports])
    except orjson.JSONEncodeError:
        return mid, encode(Outcomes.model_construct(
            msg_id=mid, sent_at=utcnow() if at is None else at, request_id=request_id, reports=[
                OutcomeReport.model_construct(client_id=r.client_id, state=r.state, detail=r.detail, trace=r.trace,
                                              revision=r.revision) for r in reports]))
    return mid, (b'{"v":1,"msg_id":' + orjson.dumps(mid) + b',"sent_at":' + sent_at_json(at)
                 + b',"type":"outcomes","request_id":' + orjson.dumps(request_id) + b',"reports":' + entries + b"}")


def pack_reports(reports: Sequence[Report], per_message: int, *, limit: int = BRIDGE_OUTCOME_BYTES,
                 oversize: Oversize | None = None) -> list[tuple[str, bytes]]:
    """Outbox messages ``(msg_id, payload)`` for the hub: one ``outcomes`` per request of at most ``per_message``
    clients, split further while a payload is over ``limit`` (what fits the brokers' packet, also once a hub
    replica forwards it); a request with one report as an ``outcome``, its ``detail`` cut to a marker if even alone
    it is over ``limit`` (:func:`outcome_payload`, which tells ``oversize``). Each client's reports keep their order."""
    by_request: dict[str, list[Report]] = {}
    for r in reports:
        by_request.setdefault(r.request_id, []).append(r)
    packed: list[tuple[str, bytes]] = []
    for request_id, group in by_request.items():
        for i in range(0, len(group), per_message):
            packed += _pack_one(request_id, group[i:i + per_message], limit, oversize)
    return packed


def _pack_one(request_id: str, group: list[Report], limit: int, oversize: Oversize | None
              ) -> list[tuple[str, bytes]]:
    if len(group) == 1:
        return [outcome_payload(group[0], limit=limit, oversize=oversize)]
    mid, payload = outcomes_payload(request_id, group)
    if len(payload) <= limit:
        return [(mid, payload)]
    half = len(group) // 2
    return _pack_one(request_id, group[:half], limit, oversize) + _pack_one(request_id, group[half:], limit, oversize)


class CommandTemplate:
    """A request's :class:`Command` encoded once; :meth:`payload` splices one client's ``msg_id`` and
    ``client_id`` into it: the bytes ``encode(template.model_copy(update={"client_id": ..., "msg_id": ...}))``
    writes (the same ``sent_at`` for all, as the copies had), at a fraction of the cost."""

    _MSG = "\x01mhp-msg-id\x01"
    _CLIENT = "\x01mhp-client-id\x01"

    def __init__(self, template: Command) -> None:
        self.template = template
        raw = encode(template.model_copy(update={"msg_id": self._MSG, "client_id": self._CLIENT}))
        msg, client = orjson.dumps(self._MSG), orjson.dumps(self._CLIENT)
        self._parts: tuple[bytes, bytes, bytes] | None = None
        if raw.count(msg) == 1 and raw.count(client) == 1 and raw.index(msg) < raw.index(client):
            head, rest = raw.split(msg)
            middle, tail = rest.split(client)
            self._parts = (head, middle, tail)
        # else (a marker inside the params' own text): each command is encoded as a copy, as before

    @property
    def parts(self) -> tuple[bytes, bytes, bytes] | None:
        """``(head, middle, tail)``: :meth:`payload` of ids that :data:`~mhp_wire.ids.ID_RE` matches is ``head``, the
        ``msg_id`` in quotes, ``middle``, the ``client_id`` in quotes, ``tail`` (such ids need no escaping in JSON);
        None when the template cannot be spliced (each command is then encoded as a copy)."""
        return self._parts

    def payload(self, msg_id: str, client_id: str) -> bytes:
        """The command for ``client_id`` (a valid id: the request's own) under ``msg_id``."""
        if self._parts is None or ID_RE.fullmatch(client_id) is None:
            return encode(self.template.model_copy(update={"client_id": client_id, "msg_id": msg_id}))
        head, middle, tail = self._parts
        return head + orjson.dumps(msg_id) + middle + orjson.dumps(client_id) + tail


# -- reading a gateway's reports ------------------------------------------------------------------------------

class AckIn(NamedTuple):
    """A gateway's ``ack``, read by :func:`read_report`."""

    msg_id: str
    ack_ids: list[str]

    @property
    def type(self) -> str:
        """The wire ``type``."""
        return "ack"


class OutcomeIn(NamedTuple):
    """A gateway's ``outcome``, read by :func:`read_report`."""

    msg_id: str
    request_id: str
    client_id: str
    state: ClientState
    detail: dict[str, Any]
    trace: dict[str, float]
    revision: int

    @property
    def type(self) -> str:
        """The wire ``type``."""
        return "outcome"


ReportIn = tuple[str, ClientState, dict[str, Any], dict[str, float], int]
"""One entry of a retailer's ``outcomes``, read by :func:`read_outcomes`: the fields of an
:class:`~mhp_wire.messages.OutcomeReport` in its order (``client_id``, ``state``, ``detail``, ``trace``,
``revision``)."""


class OutcomesIn(NamedTuple):
    """A retailer's ``outcomes`` (many clients of one request), read by :func:`read_outcomes` when every
    entry is a valid report: the values of an :class:`~mhp_wire.messages.Outcomes` whose ``reports`` are all
    :class:`~mhp_wire.messages.OutcomeReport` objects."""

    msg_id: str
    request_id: str
    reports: list[ReportIn]

    @property
    def type(self) -> str:
        """The wire ``type``."""
        return "outcomes"


_SENT_AT_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)")
"""The ``sent_at`` shapes read here (RFC 3339 with an offset of at most 23:59, at most microseconds; the date and
time are checked by ``datetime.fromisoformat``, which alone would take an offset of ``+00:60`` that the models
refuse); any other goes to :func:`mhp_wire.messages.decode`, which reads or refuses it."""
_STATES = {s.value: s for s in ClientState}
_ACK_KEYS = frozenset({"v", "msg_id", "sent_at", "type", "ack_ids"})
_OUTCOME_KEYS = frozenset({"v", "msg_id", "sent_at", "type", "request_id", "client_id", "state", "detail", "trace",
                           "revision"})
_OUTCOME_REQUIRED = frozenset({"v", "msg_id", "sent_at", "type", "request_id", "client_id", "state"})
_OUTCOMES_KEYS = frozenset({"v", "msg_id", "sent_at", "type", "request_id", "reports"})
_ENTRY_KEYS = frozenset({"client_id", "state", "detail", "trace", "revision"})
_MAX_INT = 2 ** 63
_ABSENT: Any = object()
_id_match = ID_RE.fullmatch


def _short_str(value: Any, most: int) -> bool:
    return type(value) is str and 1 <= len(value) <= most


def _plain_number(value: Any) -> bool:
    """A number of a ``trace`` that both parsers read alike: an int or a float within 63 bits. orjson reads an
    integer beyond 64 bits (``18446744073709551617``) as a float, which the models keep as the exact int (or, in a
    ``trace``, round themselves); a float of that size may be one, and is left to the models."""
    t = type(value)
    return (t is float or t is int) and -_MAX_INT < value < _MAX_INT


def _plain_json(value: Any, depth: int = 0) -> bool:
    """A ``detail``'s list or object whose values both parsers read alike (anything else: the models' decoding
    decides): at most 16 deep, and no float of 63 bits or more (orjson's reading of an integer beyond 64 bits,
    which the models keep exact). Its other leaves are read alike: orjson gives only strings, bools, nulls, ints
    (exact, as the models keep them) and finite floats (it refuses ``NaN``, ``Infinity`` and ``1e999``)."""
    t = type(value)
    if t is dict:
        values: Any = value.values()
    elif t is list:
        values = value
    else:
        return False
    if depth >= 16:
        return False
    for v in values:
        t = type(v)
        if t is float:
            if not -_MAX_INT < v < _MAX_INT:
                return False
        elif (t is dict or t is list) and not _plain_json(v, depth + 1):
            return False
    return True


def _sent_at_ok(value: Any) -> bool:
    if type(value) is not str or _SENT_AT_RE.fullmatch(value) is None:
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def read_report(payload: bytes) -> AckIn | OutcomeIn | None:
    """A gateway's ``ack`` or ``outcome`` in its plain shape, as plain values; None for anything else (another
    type, a field outside the plain shape, or anything invalid), which the caller reads with
    :func:`mhp_wire.messages.decode` — the one that refuses, with its error. What this accepts is exactly a subset
    of what ``decode`` accepts, with the same values (held against it by ``tests/mhp_wire/test_fastwire.py``)."""
    data = _envelope(payload)
    if data is None:
        return None
    kind = data.get("type")
    if kind == "ack":
        return _read_ack(data)
    if kind == "outcome":
        return _read_outcome(data)
    return None


def _envelope(payload: bytes) -> dict[str, Any] | None:
    """The payload's JSON object when its ``v``, ``msg_id`` and ``sent_at`` are in the plain shape and the payload
    is that object written compactly as orjson writes it, else None."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict or type(data.get("v")) is not int or data["v"] != 1 \
            or not _short_str(data.get("msg_id"), 64) or not _sent_at_ok(data.get("sent_at")):
        return None
    try:
        canonical = orjson.dumps(data) == payload
    except orjson.JSONEncodeError:  # nesting orjson reads but does not write
        return None
    # Only the compact form that bridges, gateways and the models write (0.1 µs per report): a repeated key is
    # then impossible. orjson keeps a repeated key's last value where the models check every one (a ``trace``
    # of ``{"a":null,"a":1}``) or where their parser first refuses what the first hides (nesting past its limit).
    return data if canonical else None


def _read_ack(data: dict[str, Any]) -> AckIn | None:
    ids = data.get("ack_ids")
    if data.keys() != _ACK_KEYS or type(ids) is not list or not 1 <= len(ids) <= 10_000 \
            or not all(type(i) is str for i in ids):
        return None
    return AckIn(data["msg_id"], ids)


def _read_outcome(data: dict[str, Any]) -> OutcomeIn | None:
    if not data.keys() <= _OUTCOME_KEYS or not _OUTCOME_REQUIRED <= data.keys() \
            or not _short_str(data["request_id"], 64):
        return None
    entry = _read_entry(data)
    if entry is None:
        return None
    return OutcomeIn(data["msg_id"], data["request_id"], *entry)


def _read_entry(data: dict[str, Any]) -> ReportIn | None:
    """The client's fields of an ``outcome`` or of an ``outcomes`` entry whose keys are among the allowed ones,
    or None (a required one missing reads as None here and is refused). A plain tuple: per entry of a
    2,000-report message, a named one cost 0.15 µs more."""
    client_id, state = data.get("client_id"), data.get("state")
    member = _STATES.get(state) if type(state) is str else None
    revision, detail = data.get("revision", 1), data.get("detail", _ABSENT)
    if detail is _ABSENT:
        detail = {}
    trace = _float_trace(data.get("trace", _ABSENT))
    if member is None or type(client_id) is not str or _id_match(client_id) is None or type(revision) is not int \
            or not 1 <= revision < _MAX_INT or type(detail) is not dict or (detail and not _plain_json(detail)) \
            or trace is None:
        return None
    return client_id, member, detail, trace, revision


def _float_trace(trace: Any) -> dict[str, float] | None:
    """A ``trace`` (absent: ``_ABSENT``) as the models hold it, its numbers as floats; None when not plain. One
    loop over the values, and a copy only when one is a whole number."""
    if trace is _ABSENT:
        return {}
    if type(trace) is not dict:
        return None
    floats = True
    for v in trace.values():
        t = type(v)
        if (t is not float and t is not int) or not -_MAX_INT < v < _MAX_INT:
            return None
        if t is int:
            floats = False
    return trace if floats else {k: float(v) for k, v in trace.items()}


_OUTCOMES_TYPE = b'"outcomes"'
"""An ``outcomes`` message's type as JSON text, within its first 256 bytes as everyone writes it (after ``v``,
``msg_id`` and ``sent_at``: the bridge's :func:`outcomes_payload`, the models' :func:`~mhp_wire.messages.encode`)."""


def read_outcomes(payload: bytes) -> OutcomesIn | None:
    """A retailer's ``outcomes`` message in its plain shape, as plain values; None for anything else, which the
    caller reads with :func:`mhp_wire.messages.decode` (as for :func:`read_report`: exactly a subset of what
    ``decode`` accepts, with the same values; held against it by ``tests/mhp_wire/test_fastwire.py``). It is read
    only when every entry is a valid report in the plain shape: one that is not leaves the whole message to
    ``decode``, which keeps such an entry as a plain object for the hub to refuse alone.

    Only ``outcomes``: a single ``outcome`` or an ``ack`` costs more read here than decoded by the models (orjson,
    the ``sent_at`` check and the envelope are paid per message; docs/performance.md, "Issue 14, ninth round").
    A payload without ``"outcomes"`` in its first 256 bytes goes to ``decode`` at once, unparsed here."""
    if payload.find(_OUTCOMES_TYPE, 0, 256) < 0:
        return None
    data = _envelope(payload)
    if data is None or data.get("type") != "outcomes":
        return None
    return _read_outcomes(data)


def _read_outcomes(data: dict[str, Any]) -> OutcomesIn | None:
    entries = data.get("reports")
    if data.keys() != _OUTCOMES_KEYS or not _short_str(data["request_id"], 64) or type(entries) is not list \
            or not 1 <= len(entries) <= OUTCOMES_MAX:
        return None
    reports: list[ReportIn] = []
    append, keys = reports.append, _ENTRY_KEYS
    for e in entries:
        if type(e) is not dict or not e.keys() <= keys:
            return None
        report = _read_entry(e)
        if report is None:
            return None
        append(report)
    return OutcomesIn(data["msg_id"], data["request_id"], reports)


def reader(fallback: Callable[[bytes], Any],
           read_plain: Callable[[bytes], Any] = read_report) -> Callable[[bytes], Any]:
    """``read_plain`` (:func:`read_report`, or the hub's :func:`read_outcomes`) where it reads the payload,
    ``fallback`` (the models' decoding) where it does not."""

    def read(payload: bytes) -> Any:
        fast = read_plain(payload)
        return fallback(payload) if fast is None else fast

    return read
