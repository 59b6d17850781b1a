"""What the use cases answer: typed results, which the HTTP layer declares as its response models."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel


class Accepted(BaseModel):
    """A request durably stored (HTTP 202): follow it with ``GET /v1/requests/{request_id}``."""

    request_id: str
    state: str


class TariffAccepted(Accepted):
    """A tariff version stored and queued for every retailer (HTTP 202)."""

    version: int | None = None
    """The stored version (None in the answer repeated to a retry with the same ``Idempotency-Key``, which is
    stored without it)."""


class Revised(BaseModel):
    """A new revision of a request stored and queued (HTTP 202)."""

    request_id: str
    revision: int
    state: str


class Cancelled(BaseModel):
    """A request cancelled: the retailers told to stop it."""

    request_id: str
    state: str
    cancel_sent_to: list[str]


@dataclass(frozen=True, slots=True)
class ClientRegistered:
    """A client registration: whether it created the client, and the request announcing its supplier change."""

    created: bool
    customer_change_request_id: str | None
