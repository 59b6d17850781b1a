"""Dependencies of the HTTP layer, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request

from cloud_hub.authz import Principal
from cloud_hub.errors import RateLimited
from cloud_hub.service import HubService
from mhp_wire.ratelimit import RateLimiter


async def get_service(request: Request) -> HubService:
    """The hub's use cases, opened in the app's lifespan (``async``, as every dependency here: FastAPI runs a plain
    ``def`` dependency on a worker thread, a thread hand-off per request)."""
    service: HubService = request.app.state.service
    return service


async def get_principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    """The principal behind the bearer token; 401 without one or with an unknown one."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    principal = request.app.state.tokens.principal(authorization[7:].strip())
    if principal is None and request.app.state.tokens.expired(authorization[7:].strip()):
        raise HTTPException(401, "token expired", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    if principal is None:
        raise HTTPException(401, "invalid or revoked bearer token", headers={"WWW-Authenticate": "Bearer"})
    take_turn(request.app.state, principal)
    return principal


def take_turn(state: Any, principal: Principal) -> None:
    """One HTTP request of ``principal`` through the app's rate limiter (``state.http_limiter``): taken once per
    request, by this dependency or by the lean path (``cloud_hub.lean``); :class:`RateLimited` when it is spent."""
    limiter: RateLimiter | None = getattr(state, "http_limiter", None)
    if limiter is not None:
        wait_s = limiter.take(str(principal))
        if wait_s > 0:
            raise RateLimited(principal, wait_s)


Service = Annotated[HubService, Depends(get_service)]
Caller = Annotated[Principal, Depends(get_principal)]
IDEMPOTENCY_KEY_MAX = 200
"""The longest ``Idempotency-Key`` taken (also read by the lean path, ``cloud_hub.lean``)."""
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=IDEMPOTENCY_KEY_MAX)]
