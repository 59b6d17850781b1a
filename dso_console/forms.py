"""An operator's form turned into the hub's request body, validated by the hub's own models (pure).

The form's inputs are named like the hub's fields. Reading a form only does what a form needs: text fields are
trimmed (an empty one is absent), client ids are split on commas, spaces or lines, a time without an offset is read
in the browser's time zone, a decimal comma is a decimal point, a tariff's periods are one ``start, end, price`` a
line. Whether the result is a valid request is decided by :data:`mhp_wire.dso_api.REQUEST_BODIES`, the models the
hub validates its POSTs with; their problems are reported by field, and nothing is posted.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping
from datetime import datetime
from typing import Any, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AwareDatetime, BaseModel, ValidationError

from mhp_wire.dso_api import REQUEST_BODIES, RevisionBody

KINDS = {"emergency": "/v1/emergencies", "load_shift": "/v1/load-shifts", "load_reduction": "/v1/load-reductions",
         "billing": "/v1/billing-data", "tariff": "/v1/tariffs"}
"""Request types of the form and the hub endpoint each is posted to."""
TARGETED = frozenset({"emergency", "load_shift", "load_reduction"})
FORM_FIELDS = frozenset({"kind", "tz", "target", "idempotency_key"})
"""Inputs of the form that are not fields of the hub's body."""


class FormProblems(Exception):
    """A form that cannot become a hub request; ``problems`` says which field and why."""

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{p['field'] or 'form'}: {p['message']}" for p in problems))
        self.problems = problems


def _base(annotation: Any) -> Any:
    """``int`` of ``int | None`` (and of ``Annotated[int, ...]``)."""
    if get_origin(annotation) is typing.Annotated:
        return _base(get_args(annotation)[0])
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _base(args[0]) if len(args) == 1 else annotation
    return annotation


def _kinds(model: type[BaseModel]) -> dict[str, str]:
    """Each field of ``model`` as the form reads it: ``number``, ``time``, ``ids``, ``periods`` or ``text``."""
    out = {}
    for name, info in model.model_fields.items():
        base = _base(info.annotation)
        if base in (int, float):
            out[name] = "number"
        elif base is AwareDatetime or (isinstance(base, type) and issubclass(base, datetime)):
            out[name] = "time"
        elif name == "client_ids":
            out[name] = "ids"
        elif name == "periods":
            out[name] = "periods"
        else:
            out[name] = "text"
    return out


def _when(value: str, tz: ZoneInfo) -> str:
    """An RFC 3339 time; one without an offset is read in ``tz`` (one that is no time is left to the model)."""
    try:
        at = datetime.fromisoformat(value.replace(" ", "T", 1) if "T" not in value else value)
    except ValueError:
        return value
    return (at if at.tzinfo is not None else at.replace(tzinfo=tz)).isoformat()


def _periods(value: str, tz: ZoneInfo) -> list[dict[str, str]]:
    out = []
    for n, line in enumerate((ln for ln in value.splitlines() if ln.strip()), 1):
        parts = [p.strip() for p in line.split(";" if ";" in line else ",")]  # "0,5" needs ";" between fields
        if len(parts) != 3:
            raise FormProblems([{"field": "periods", "message": f"line {n}: “{line.strip()[:60]}” is not “start, end, "
                                 "price” (like 2026-11-27T07:00, 2026-11-27T22:00, 0.21)"}])
        out.append({"start": _when(parts[0], tz), "end": _when(parts[1], tz),
                    "price_eur_per_kwh": parts[2].replace(",", ".")})
    return out


def read_fields(form: Mapping[str, Any], model: type[BaseModel], tz: ZoneInfo) -> tuple[dict[str, Any],
                                                                                         list[dict[str, str]]]:
    """The candidate body of ``model``'s fields from the form (not validated) and the form's own problems."""
    body: dict[str, Any] = {}
    problems: list[dict[str, str]] = []
    for name, kind in _kinds(model).items():
        value = form.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            problems.append({"field": name, "message": "must be text"})
            continue
        value = value.strip()
        if not value:
            continue
        if kind == "number":
            body[name] = value.replace(",", ".")
        elif kind == "time":
            body[name] = _when(value, tz)
        elif kind == "ids":
            body[name] = list(dict.fromkeys(i for i in re.split(r"[\s,;]+", value) if i))
        elif kind == "periods":
            try:
                body[name] = _periods(value, tz)
            except FormProblems as exc:
                problems += exc.problems
        else:
            body[name] = value
    return body, problems


def validated(model: type[BaseModel], body: dict[str, Any], problems: list[dict[str, str]]) -> dict[str, Any]:
    """``body`` as ``model`` validates it (JSON-ready), or :class:`FormProblems` with the form's and the model's
    problems by field."""
    try:
        checked = model.model_validate(body)
    except ValidationError as exc:
        named = {p["field"] for p in problems}
        for e in exc.errors():
            loc = [str(p) for p in e["loc"]]
            name = loc[0] if loc else ""
            if name in named:
                continue  # said already
            shown = str(e.get("input"))[:40] if e["type"] not in ("missing",) and not isinstance(
                e.get("input"), dict) else ""
            message = "required" if e["type"] == "missing" else (f"“{shown}”: {e['msg']}" if shown else e["msg"])
            where = f" (item {int(loc[1]) + 1})" if len(loc) > 1 and loc[1].isdigit() else ""
            problems.append({"field": name, "message": message + where})
            named.add(name)
        if any(p["field"] for p in problems):
            # A whole-body rule ("give client_ids or feeder_id", "give at least one field to change") adds nothing
            # to a form whose fields are already said to be wrong.
            problems = [p for p in problems if p["field"]]
    if problems:
        raise FormProblems(problems)
    return _plain(checked.model_dump(exclude_none=True))


def _plain(value: Any) -> Any:
    """JSON-ready, each time as :meth:`datetime.isoformat` writes it (``+00:00``, as the operator gave it)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.isoformat() if isinstance(value, datetime) else value


def _zone(form: Mapping[str, Any]) -> ZoneInfo:
    tz_name = form.get("tz") or "UTC"
    try:
        if not isinstance(tz_name, str) or len(tz_name) > 64:
            raise ValueError
        return ZoneInfo(tz_name)
    except (ValueError, ZoneInfoNotFoundError):
        raise FormProblems([{"field": "tz", "message": f"unknown time zone {str(tz_name)[:64]!r}"}]) from None


def build_request(form: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """``(kind, hub path, body)`` of one submitted form, or :class:`FormProblems` (nothing is posted then).

    ``kind`` picks the request type, ``target`` (``clients`` or ``feeder``) the targets of an emergency, load shift
    or load reduction, and ``tz`` (an IANA zone, the browser's) the zone of times given without an offset.
    """
    kind = form.get("kind")
    if kind not in KINDS:
        raise FormProblems([{"field": "kind", "message": f"choose one of {', '.join(KINDS)}"}])
    tz = _zone(form)
    model = REQUEST_BODIES[kind]
    body, problems = read_fields(form, model, tz)
    if kind in TARGETED:
        target = form.get("target", "clients")
        if target == "clients":
            body.pop("feeder_id", None)
            if "client_ids" not in body and not any(p["field"] == "client_ids" for p in problems):
                problems.append({"field": "client_ids", "message": "required"})
        elif target == "feeder":
            body.pop("client_ids", None)
            problems = [p for p in problems if p["field"] != "client_ids"]
            if "feeder_id" not in body:
                problems.append({"field": "feeder_id", "message": "required"})
        else:
            body.pop("client_ids", None)
            body.pop("feeder_id", None)
            problems.append({"field": "target", "message": "choose listed clients or a feeder"})
    checked = validated(model, body, problems)
    return kind, KINDS[kind], checked


def build_revision(form: Mapping[str, Any]) -> dict[str, Any]:
    """The body of ``POST /v1/requests/{id}/revise`` from a form of the fields that change (validated by the hub's
    :class:`~mhp_wire.dso_api.RevisionBody`)."""
    tz = _zone(form)
    body, problems = read_fields(form, RevisionBody, tz)
    unknown = sorted(k for k in form if k not in RevisionBody.model_fields and k not in FORM_FIELDS)
    problems += [{"field": k, "message": "not a field a revision changes"} for k in unknown[:10]]
    return validated(RevisionBody, body, problems)
