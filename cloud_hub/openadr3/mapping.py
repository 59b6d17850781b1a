"""The pure core of the OpenADR 3.1 facade: the hub's objects as OpenADR objects, and OpenADR objects as the hub's.

No I/O here. Mapping table, field by field, in ``docs/openadr3.md``. One hub request is one OpenADR event, with
the event's ``id`` = the request id; what one VEN sees of it is built by :func:`event_for` from the request's stored
row and that VEN's id: only its own clients are targets (neutral as the change feed's view).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mhp_wire.messages import ClientState

SPEC_VERSION = "3.1.0"
BASE_PATH = f"/openadr3/{SPEC_VERSION}"
"""Where the facade is mounted; a VEN's ``vtn_url`` is the hub's URL followed by this."""
SPEC_VERSION_30 = "3.0.1"
BASE_PATH_30 = f"/openadr3/{SPEC_VERSION_30}"
"""The same facade for OpenADR 3.0 clients (toadr3, openadr3-client's 3.0.1 VEN): targets as ``{type, values}``."""
VERSIONS = {BASE_PATH: SPEC_VERSION, BASE_PATH_30: SPEC_VERSION_30}
"""Each base path and the OpenADR version whose shape of ``targets`` it answers and takes."""

PROGRAM_OF_TYPE = {"emergency": "mhp-emergency", "load_shift": "mhp-load-shift",
                   "load_reduction": "mhp-load-reduction"}
"""The request types that become events, and the program of each."""
TYPE_OF_PROGRAM = {p: t for t, p in PROGRAM_OF_TYPE.items()}
TARIFF_PROGRAM = "mhp-tariff"
PRIORITY = {"emergency": 0, "load_reduction": 1, "load_shift": 2}
"""OpenADR priority: a lower number is a higher priority."""

OUTCOME_PAYLOAD = "X_MHP_OUTCOME"
"""Report payload type (an extension, as the spec allows) whose value is a client's state in the request."""
DEMAND_PAYLOAD = "DEMAND"
"""Report payload type of a measured active power (kW): becomes the hub's measurement of that client."""
AVAILABLE_PAYLOAD = "DOWN_REGULATION_AVAILABLE"
"""Report payload type of a load reduction's first phase: the kW a client could shed (outcome ``available``)."""

SCOPES = {
    "dso": ["read_all", "write_events", "write_vens"],
    "admin": ["read_all", "write_vens"],
    "retailer": ["read_targets", "read_ven_objects", "write_reports", "write_subscriptions", "write_vens"],
}
"""The OpenADR 3.1 scopes a principal's token carries (the hub's authz decides each operation anyway)."""

_OUTCOME_STATES = {ClientState.ACKNOWLEDGED, ClientState.AVAILABLE, ClientState.UNAVAILABLE, ClientState.EXECUTED,
                   ClientState.LIMIT_NOT_MET, ClientState.REFUSED}
"""The client states a VEN may report (those a bridge reports; never the hub's own ``pending``/``sent``...)."""


class MappingError(ValueError):
    """An OpenADR object the hub cannot take (HTTP 422 with this message)."""


def iso_duration(seconds: float) -> str:
    """An ISO 8601 duration (``PT…S``) of whole seconds."""
    return f"PT{max(0, round(seconds))}S"


def parse_duration(text: str) -> float:
    """Seconds of an ISO 8601 duration with days, hours, minutes, seconds (``P1DT2H``, ``PT900S``)."""
    m = re.fullmatch(r"P(?:(\d+)W)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?", text or "")
    if not m or text in ("P", "PT") or text.endswith("T"):
        raise MappingError(f"duration {text!r} is not an ISO 8601 duration of weeks, days, hours, minutes, seconds")
    w, d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return (((w * 7 + d) * 24 + h) * 60 + mi) * 60 + s


def _iso(ts: float | str | None) -> str | None:
    if ts is None:
        return None
    if isinstance(ts, str):
        return datetime.fromisoformat(ts).isoformat()
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _ts(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    at = datetime.fromisoformat(str(value))
    if at.tzinfo is None:
        raise MappingError(f"time {value!r} has no offset (RFC 3339 with offset expected)")
    return at.timestamp()


def programs(created_at: float) -> list[dict[str, Any]]:
    """The hub's programs: the tariff calendar (a PRICE program) and one per kind of flexibility request."""
    created = _iso(created_at)

    def program(pid: str, name: str, ptype: str, payloads: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": pid, "objectType": "PROGRAM", "createdDateTime": created, "modificationDateTime": created,
                "programName": pid, "programLongName": name, "programType": ptype, "bindingEvents": True,
                "payloadDescriptors": payloads}

    return [
        program(TARIFF_PROGRAM, "Network tariff calendar", "PRICE",
                [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "PRICE", "units": "KWH",
                  "currency": "EUR"}]),
        program(PROGRAM_OF_TYPE["emergency"], "Emergency mode: stay under a power limit", "EMERGENCY",
                [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "IMPORT_CAPACITY_LIMIT", "units": "KW"}]),
        program(PROGRAM_OF_TYPE["load_reduction"], "Load reduction (availability, then dispatch)", "LOAD_REDUCTION",
                [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "DISPATCH_SETPOINT_RELATIVE",
                  "units": "KW"}]),
        program(PROGRAM_OF_TYPE["load_shift"], "Load shift out of a window", "LOAD_SHIFT",
                [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "SIMPLE"}]),
    ]


def program_ids() -> set[str]:
    """Every program id of :func:`programs`."""
    return {TARIFF_PROGRAM, *PROGRAM_OF_TYPE.values()}


def ven_clients(clients: Mapping[str, Mapping[str, Any]], ven: str) -> list[str]:
    """The clients of a request's row that were addressed to ``ven`` (its supplier at the request's time)."""
    return sorted(cid for cid, e in clients.items() if ven in e.get("retailers", {}))


def addressed_vens(clients: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every retailer a request's clients were addressed to."""
    return sorted({r for e in clients.values() for r in e.get("retailers", {})})


def dispatched(meta: Mapping[str, Any]) -> set[str] | None:
    """The clients a load reduction's second phase disconnects (None: not a load reduction past its first phase)."""
    if meta.get("type") != "load_reduction" or meta.get("phase") in (None, "availability"):
        return None
    return set((meta.get("selection") or {}).get("chosen") or [])


def _window(kind: str, body: Mapping[str, Any]) -> tuple[float, float]:
    if kind == "load_shift":
        start, end = _ts(body["window_start"]), _ts(body["window_end"])
        return start, end - start
    return _ts(body["start"]), float(body["duration_s"])


def _payloads(kind: str, meta: Mapping[str, Any], body: Mapping[str, Any]) -> list[dict[str, Any]]:
    if kind == "emergency":
        return [{"type": "IMPORT_CAPACITY_LIMIT", "values": [body["power_limit_kw"]]},
                {"type": "ALERT_GRID_EMERGENCY", "values": ["emergency mode: stay under the power limit"]}]
    if kind == "load_reduction":
        return [{"type": "DISPATCH_SETPOINT_RELATIVE", "values": [-float(body["reduction_kw"])]}]
    out: list[dict[str, Any]] = [{"type": "SIMPLE", "values": [1]}]
    if body.get("reason"):
        out.append({"type": "ALERT_OTHER", "values": [str(body["reason"])]})
    return out


def _report_descriptors(kind: str, meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = [{"payloadType": OUTCOME_PAYLOAD, "readingType": "DIRECT_READ"},
           {"payloadType": DEMAND_PAYLOAD, "readingType": "DIRECT_READ", "units": "KW"}]
    if kind == "load_reduction" and meta.get("phase") == "availability":
        out.insert(0, {"payloadType": AVAILABLE_PAYLOAD, "units": "KW"})
    return out


def clients_by_ven(clients: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Each addressed VEN's clients of a request's row, in one pass (sorted)."""
    out: dict[str, list[str]] = {}
    for cid in sorted(clients):
        for r in clients[cid].get("retailers", {}):
            out.setdefault(r, []).append(cid)
    return out


def event_for(request_id: str, meta: Mapping[str, Any], clients: Mapping[str, Mapping[str, Any]],
              ven: str | None, mine: list[str] | None = None) -> dict[str, Any] | None:
    """The OpenADR event of one hub request as ``ven`` sees it (None: a VEN that none of its clients concern, or a
    request type that is no event); ``ven`` None: as its issuer (the DSO) sees it, every client. ``mine``: the
    VEN's clients when already known (:func:`clients_by_ven`)."""
    kind = meta.get("type")
    if kind not in PROGRAM_OF_TYPE:
        return None
    if mine is None:
        mine = sorted(clients) if ven is None else ven_clients(clients, ven)
    chosen = dispatched(meta)
    if chosen is not None and ven is not None:  # a load reduction's second phase: only the clients disconnected
        mine = [c for c in mine if c in chosen]
    if not mine:
        return None
    body = meta.get("body") or {}
    start, duration = _window(kind, body)
    targets = [{"type": "RESOURCE_NAME", "values": mine}]
    if ven is not None:
        targets.append({"type": "VEN_NAME", "values": [ven]})
    modified = max([r.get("at", meta["created_at"]) for r in meta.get("revisions") or []] + [meta["created_at"]])
    event: dict[str, Any] = {
        "id": request_id, "objectType": "EVENT", "programID": PROGRAM_OF_TYPE[kind],
        "createdDateTime": _iso(meta["created_at"]), "modificationDateTime": _iso(modified),
        "eventName": f"{kind} {request_id}", "priority": PRIORITY[kind], "targets": targets,
        "payloadDescriptors": [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": p["type"],
                                **({"units": "KW"} if p["type"] in ("IMPORT_CAPACITY_LIMIT",
                                                                    "DISPATCH_SETPOINT_RELATIVE") else {})}
                               for p in _payloads(kind, meta, body)],
        "reportDescriptors": _report_descriptors(kind, meta),
        "intervalPeriod": {"start": _iso(start), "duration": iso_duration(duration)},
        "intervals": [{"id": 0, "payloads": _payloads(kind, meta, body)}],
    }
    return event


def tariff_event(tariff: Mapping[str, Any]) -> dict[str, Any]:
    """The stored network tariff as one event of the PRICE program, one interval per tariff period (public)."""
    version = int(tariff.get("version", 1))
    eid = "tariff-" + "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in str(tariff["tariff_id"]))
    eid = f"{eid[:100]}-v{version}"
    start = _ts(tariff["valid_from"])
    intervals = []
    for i, p in enumerate(tariff.get("periods", [])):
        ps, pe = _ts(p["start"]), _ts(p["end"])
        intervals.append({"id": i, "intervalPeriod": {"start": _iso(ps), "duration": iso_duration(pe - ps)},
                          "payloads": [{"type": "PRICE", "values": [p["price_eur_per_kwh"]]}]})
    return {"id": eid, "objectType": "EVENT", "programID": TARIFF_PROGRAM, "eventName": str(tariff["tariff_id"]),
            "priority": 9, "targets": [],
            "payloadDescriptors": [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "PRICE",
                                    "units": "KWH", "currency": "EUR"}],
            "intervalPeriod": {"start": _iso(start), "duration": iso_duration(_ts(tariff["valid_to"]) - start)},
            "intervals": intervals}


def request_body(event: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The hub request (its type and ``/v1`` body) a DSO's new event stands for; raises :class:`MappingError`."""
    kind = TYPE_OF_PROGRAM.get(str(event.get("programID")))
    if kind is None:
        raise MappingError(f"programID must be one of {sorted(TYPE_OF_PROGRAM)}: the tariff is published with "
                           f"POST /v1/tariffs")
    start, duration, payloads = _event_interval(event)
    body: dict[str, Any] = {"client_ids": _event_clients(event)}
    body.update(_BODY_OF_KIND.get(kind, _window_body)(start, duration, payloads))
    return kind, body


def _event_interval(event: Mapping[str, Any]) -> tuple[float, float, dict[Any, Any]]:
    """The start, duration (s) and payloads (type -> first value) of an event's one interval."""
    period = event.get("intervalPeriod") or {}
    intervals = event.get("intervals") or []
    if not intervals:
        raise MappingError("an event needs one interval")
    if len(intervals) > 1:
        raise MappingError("the hub's requests have one interval: give exactly one")
    period = intervals[0].get("intervalPeriod") or period
    if "start" not in period or "duration" not in period:
        raise MappingError("the event (or its interval) needs an intervalPeriod with start and duration")
    start, duration = _ts(period["start"]), parse_duration(str(period["duration"]))
    payloads = {p.get("type"): (p.get("values") or [None])[0] for p in intervals[0].get("payloads") or []}
    return start, duration, payloads


def _event_clients(event: Mapping[str, Any]) -> list[str]:
    """The client ids an event's RESOURCE_NAME targets name (at least one)."""
    clients: list[str] = []
    for t in event.get("targets") or []:
        if t.get("type") != "RESOURCE_NAME":
            raise MappingError(f"target type {t.get('type')!r} is not supported: target RESOURCE_NAME (client ids)")
        clients += [str(v) for v in t.get("values") or []]
    if not clients:
        raise MappingError("an event needs a RESOURCE_NAME target naming the clients")
    return clients


def targets_out(targets: list[Any] | None, version: str) -> list[Any] | None:
    """An object's ``targets`` (kept in 3.0's ``{type, values}`` shape inside the hub) in ``version``'s shape: as
    they are for 3.0.1; for 3.1.0 a list of strings, the ``RESOURCE_NAME`` values (client ids) in order (the VEN an
    event concerns is the one that reads it, its ``VEN_NAME`` target is not repeated as a string)."""
    if targets is None or version != SPEC_VERSION:
        return targets
    return [str(v) for t in targets if isinstance(t, Mapping) and t.get("type") == "RESOURCE_NAME"
            for v in t.get("values") or []]


def targets_in(targets: list[Any] | None, version: str) -> list[dict[str, Any]] | None:
    """Incoming ``targets`` in ``version``'s shape, as the hub keeps them (3.0's ``{type, values}``); raises
    :class:`MappingError` on the other version's shape: 3.1.0 takes strings (client ids, ``RESOURCE_NAME``),
    3.0.1 takes ``{type, values}`` objects."""
    if targets is None:
        return None
    if version == SPEC_VERSION:
        if not all(isinstance(t, str) for t in targets):
            raise MappingError(f"OpenADR {SPEC_VERSION}'s targets are strings (client ids); {{type, values}} "
                               f"targets are OpenADR 3.0's: use {BASE_PATH_30}")
        return [{"type": "RESOURCE_NAME", "values": list(targets)}] if targets else []
    if not all(isinstance(t, Mapping) and isinstance(t.get("values", []), list) for t in targets):
        raise MappingError(f"OpenADR {SPEC_VERSION_30}'s targets are {{type, values}} objects; targets as strings "
                           f"are OpenADR 3.1's: use {BASE_PATH}")
    return [dict(t) for t in targets]


def _emergency_body(start: float, duration: float, payloads: Mapping[Any, Any]) -> dict[str, Any]:
    """An emergency's fields: its window and the import limit (kW)."""
    if payloads.get("IMPORT_CAPACITY_LIMIT") is None:
        raise MappingError("an emergency event needs an IMPORT_CAPACITY_LIMIT payload (kW)")
    return {"start": _iso(start), "duration_s": duration, "power_limit_kw": float(payloads["IMPORT_CAPACITY_LIMIT"])}


def _load_reduction_body(start: float, duration: float, payloads: Mapping[Any, Any]) -> dict[str, Any]:
    """A load reduction's fields: its window, the reduction (kW) and how soon clients answer (1-60 s)."""
    if payloads.get("DISPATCH_SETPOINT_RELATIVE") is None:
        raise MappingError("a load reduction event needs a DISPATCH_SETPOINT_RELATIVE payload (kW, negative)")
    return {"start": _iso(start), "duration_s": duration,
            "reduction_kw": abs(float(payloads["DISPATCH_SETPOINT_RELATIVE"])),
            "respond_within_s": max(1.0, min(60.0, start - datetime.now(UTC).timestamp()))}


def _window_body(start: float, duration: float, payloads: Mapping[Any, Any]) -> dict[str, Any]:
    """A load shift's fields: the window clients shift into, and the reason the DSO gave (ALERT_OTHER)."""
    body: dict[str, Any] = {"window_start": _iso(start), "window_end": _iso(start + duration)}
    if payloads.get("ALERT_OTHER"):
        body["reason"] = str(payloads["ALERT_OTHER"])[:200]
    return body


_BODY_OF_KIND = {"emergency": _emergency_body, "load_reduction": _load_reduction_body}
"""The request body's fields by request type; any other (load_shift) is a window (:func:`_window_body`)."""


@dataclass(frozen=True, slots=True)
class ReportItem:
    """One thing a report says about one client: an ``outcome`` (``state``, ``available_kw``) or a ``demand``
    (``active_power_kw`` at ``at``)."""

    kind: str
    client_id: str
    at: float
    state: ClientState | None = None
    value: float | None = None


def report_items(report: Mapping[str, Any], now: float) -> list[ReportItem]:
    """What a VEN's report says, client by client; raises :class:`MappingError` on what the hub cannot take."""
    out: list[ReportItem] = []
    for res in report.get("resources") or []:
        cid = str(res.get("resourceName") or "")
        if not cid:
            raise MappingError("each report resource needs a resourceName (the client id)")
        default_start = (res.get("intervalPeriod") or report.get("intervalPeriod") or {}).get("start")
        for interval in res.get("intervals") or []:
            start = (interval.get("intervalPeriod") or {}).get("start", default_start)
            at = _ts(start) if start not in (None, "0000-00-00") else now
            for p in interval.get("payloads") or []:
                ptype, values = p.get("type"), p.get("values") or []
                if not values:
                    raise MappingError(f"payload {ptype!r} of {cid!r} has no value")
                if ptype == OUTCOME_PAYLOAD:
                    try:
                        state = ClientState(str(values[0]))
                    except ValueError:
                        raise MappingError(f"{OUTCOME_PAYLOAD} of {cid!r} must be one of "
                                           f"{sorted(s.value for s in _OUTCOME_STATES)}") from None
                    if state not in _OUTCOME_STATES:
                        raise MappingError(f"{OUTCOME_PAYLOAD} {state.value!r} is the hub's to set, not a VEN's")
                    out.append(ReportItem("outcome", cid, at, state=state))
                elif ptype == AVAILABLE_PAYLOAD:
                    out.append(ReportItem("outcome", cid, at, state=ClientState.AVAILABLE, value=_kw(values[0])))
                elif ptype == DEMAND_PAYLOAD:
                    out.append(ReportItem("demand", cid, at, value=_kw(values[0])))
                else:
                    raise MappingError(f"report payload type {ptype!r} is not supported: use {OUTCOME_PAYLOAD}, "
                                       f"{AVAILABLE_PAYLOAD} or {DEMAND_PAYLOAD}")
    if not out:
        raise MappingError("the report says nothing: give resources with intervals and payloads")
    return out


def _kw(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MappingError(f"a power must be a number of kW, not {value!r}")
    if not -10_000 <= float(value) <= 10_000:
        raise MappingError(f"power {value} kW is out of range")
    return float(value)
