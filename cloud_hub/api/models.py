"""The answers of the HTTP API as response models, so that the OpenAPI description shows every answer.

The use cases build these answers; the models name the contract's fields (DESIGN.md, docs/api.md) and allow more
(``extra="allow"``: fields are added freely, never renamed), with loose number types so that no answer is changed
by passing through them (an ``int`` stays an ``int``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from cloud_hub.errors import HubError


class Answer(BaseModel):
    """An answer whose named fields are the contract's; any other field is passed on as it is."""

    model_config = ConfigDict(extra="allow")


class ErrorBody(Answer):
    """Every error: ``error`` (a code), ``message``; ``problems`` for an invalid body, ``retry_after_s`` for one to
    retry (with a ``Retry-After`` header)."""

    error: str
    message: str
    problems: list[dict[str, str]] | None = None
    retry_after_s: float | int | None = None


class Health(Answer):
    """``GET /healthz``."""

    status: str


class Readiness(Answer):
    """``GET /readyz``: 200 when ready, 503 with the same body when not."""

    ready: bool
    checks: dict[str, str]


class RetailerAnswer(Answer):
    """A retailer as registered; ``tariff_request_id`` when a new one was sent the current tariff."""

    retailer_id: str
    name: str


class ClientAnswer(Answer):
    """A client with its supplier history."""

    client_id: str
    retailer_id: str | None
    contracted_power_kw: float | int
    feeder_id: str | None
    suppliers: list[dict[str, Any]]


class ClientsStored(Answer):
    """A bulk registration: how many clients were created and updated."""

    created: int
    updated: int


class ReadingsStored(Answer):
    """An upload of meter readings: blocks stored and how many were corrections."""

    stored: int
    corrections: int


class Series(Answer):
    """A client's series over ``[from, to)`` (consumption profile, measurements, audit)."""

    client_id: str


class RequestView(Answer):
    """A request as its issuer sees it."""

    request_id: str
    type: str
    state: str
    created_at: str | None
    retailers: dict[str, Any]
    clients: dict[str, Any]
    trace: dict[str, Any]


class Page(Answer):
    """A page of a console list, with ``count`` and ``next_after`` (the cursor of the next page, or null)."""

    count: int


class PartyAnswer(Answer):
    """An eligible party as registered."""

    party_id: str
    name: str


class PermissionChange(Answer):
    """One step of a permission's history: when, what happened, who did it, the state it led to."""

    at: str | None
    event: str
    by: str
    state: str


class PermissionAnswer(Answer):
    """A customer's permission as the party that asked for it (and the DSO) sees it, with its history."""

    permission_id: str
    party_id: str
    client_id: str
    purpose: str
    scopes: list[str]
    resolution_s: int
    data_from: str | None
    data_to: str | None
    valid_until: str | None
    decide_by: str | None
    created_at: str | None
    state: str
    history: list[PermissionChange]


class Document(Answer):
    """A stored document answered as stored (a tariff version, a subscription, the platform status)."""


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route answering errors with these statuses (every route that needs a token also
    answers 401, 422, 429 and 503)."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS.get(status, "error")}
            for status in sorted({401, 422, 429, 503, *statuses})}


_DESCRIPTIONS = {401: "no, an unknown or an expired bearer token", 403: "the principal may not",
                 404: "an unknown id", 409: "a conflict with what is stored",
                 413: "the body is larger than the hub takes", 422: "an invalid body or query",
                 429: "rate limited: retry after Retry-After", 503: "storage or the owning replica unavailable: retry"}

__all__ = ["Answer", "ErrorBody", "HubError", "errors"]
