"""Liveness, readiness and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from cloud_hub.api.models import Health, Readiness
from cloud_hub.store import StoreUnavailable

router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["health"])
"""``/metrics``: included only where the settings expose it (``HubSettings.expose_metrics``)."""


@router.get("/healthz", response_model=Health)
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


async def readiness(state: Any) -> tuple[bool, dict[str, str]]:
    """Whether the hub is ready, and each check's answer (``ok`` or why not): the app's ``state`` holds the store,
    the relay and, for a hub replica, its replicas."""
    checks: dict[str, str] = {}
    try:
        await state.store.ping()
        checks["storage"] = "ok"
    except StoreUnavailable as exc:
        checks["storage"] = str(exc)
    link = state.relay.link
    checks["mqtt"] = "ok" if link is not None and link.connected else state.relay.failure or "not connected"
    replicas = getattr(state, "replicas", None)
    if replicas is not None:
        checks["replica"] = "ok" if replicas.ready.is_set() else "loading the requests it owns"
    return all(v == "ok" for v in checks.values()), checks


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "not ready: the checks say why"}})
async def readyz(request: Request) -> Response:
    """Ready when the storage accepts writes and the MQTT link to the hub broker is up (and, for a hub replica,
    once it has loaded the requests it owns)."""
    ready, checks = await readiness(request.app.state)
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@metrics_router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")
