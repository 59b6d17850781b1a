"""The hub's domain errors: one hierarchy, each class carrying the HTTP status and the ``error`` code it is answered
with, so that services raise what went wrong and only the HTTP layer (``cloud_hub.app``) turns it into a response.

This module imports nothing of the hub: storage, the replicas and the use cases all raise these.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar


class HubError(Exception):
    """Something the client is answered with an error for: ``status`` (HTTP) and ``code`` (the body's ``error``)."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "error"
    retry_after_s: ClassVar[float | None] = None
    """Set for an error the client should retry: ``retry_after_s`` in the body and a ``Retry-After`` header."""
    by_code: ClassVar[dict[str, type[HubError]]] = {}
    """Every error class by its ``code`` (the first class to claim a code keeps it), to rebuild one from the wire."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        HubError.by_code.setdefault(cls.code, cls)

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        out: dict[str, Any] = {"error": self.code, "message": str(self)}
        wait = self.wait_s()
        if wait is not None:
            out["retry_after_s"] = round(wait, 3)
        return out

    def wait_s(self) -> float | None:
        """How long the client should wait before retrying (None: not a retryable error)."""
        return self.retry_after_s

    def headers(self) -> dict[str, str]:
        """HTTP headers of the answer: ``Retry-After`` in whole seconds for a retryable error."""
        wait = self.wait_s()
        return {} if wait is None else {"Retry-After": str(max(1, math.ceil(wait)))}

    @staticmethod
    def from_code(code: str, message: str) -> HubError:
        """The error a ``code`` names (as another replica answered it); an unknown code is an unavailable owner."""
        cls = HubError.by_code.get(code)
        if cls is None or cls.__init__ is not HubError.__init__:  # a class with its own arguments: not rebuilt
            return OwnerUnavailable(message)
        return cls(message)


class Forbidden(HubError):
    """The principal may not do this (HTTP 403)."""

    status, code = 403, "forbidden"


class NotFound(HubError):
    """An id names nothing (HTTP 404)."""

    status, code = 404, "not_found"


class Conflict(HubError):
    """The write contradicts what is stored (HTTP 409)."""

    status, code = 409, "conflict"


class IdempotencyConflict(Conflict):
    """An ``Idempotency-Key`` was reused with a different body (HTTP 409)."""


class KeyInProgress(HubError):
    """The first attempt with this ``Idempotency-Key`` is still creating its request (HTTP 409, retry)."""

    status, code, retry_after_s = 409, "in_progress", 1.0


class InvalidBody(HubError, ValueError):
    """A body that fails validation after the HTTP layer's (a revision merged into its request): HTTP 422 with
    ``problems``, each ``{"field", "message"}``, as for any invalid body."""

    status, code = 422, "invalid"

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__("invalid request: " + "; ".join(f"{p['field'] or 'body'}: {p['message']}"
                                                         for p in problems[:10]))
        self.problems = problems

    def body(self) -> dict[str, Any]:
        """The message and every problem."""
        return {**super().body(), "problems": self.problems}


class RateLimited(HubError):
    """A principal sent more HTTP requests than its token bucket allows; retry after ``wait_s()``."""

    status, code = 429, "rate_limited"

    def __init__(self, principal: object, retry_after_s: float) -> None:
        super().__init__(f"rate limit exceeded for {principal}: retry in {retry_after_s:.2f} s")
        self.wait = retry_after_s

    def wait_s(self) -> float:
        """What the principal's token bucket said."""
        return self.wait


class OwnerUnavailable(HubError):
    """The replica that owns a request cannot act on it now (offline, not answering); retry later (HTTP 503)."""

    status, code, retry_after_s = 503, "owner_unavailable", 1.0


class StoreUnavailable(HubError):
    """Storage cannot be reached or refused the operation (HTTP 503, retry). The client is told only that nothing
    was stored; the cause is in the hub's log."""

    status, code = 503, "storage_unavailable"

    def body(self) -> dict[str, Any]:
        """A fixed message: the storage's own words stay in the log."""
        return {"error": self.code, "message": "storage is unavailable; nothing was stored, retry later",
                "retry_after_s": 1}

    def headers(self) -> dict[str, str]:
        """No ``Retry-After`` header (the body says when)."""
        return {}
