"""Dependencies of the HTTP layer, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from cloud_hub.authz import Principal
from cloud_hub.service import HubService


def get_service(request: Request) -> HubService:
    """The hub's use cases, opened in the app's lifespan."""
    service: HubService = request.app.state.service
    return service


def get_principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    """The principal behind the bearer token; 401 without one or with an unknown one."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    principal = request.app.state.tokens.principal(authorization[7:].strip())
    if principal is None:
        raise HTTPException(401, "invalid or revoked bearer token", headers={"WWW-Authenticate": "Bearer"})
    return principal


Service = Annotated[HubService, Depends(get_service)]
Caller = Annotated[Principal, Depends(get_principal)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]
