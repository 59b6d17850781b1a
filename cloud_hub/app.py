"""The hub's ASGI application: the HTTP API, with the store and the MQTT relay opened in its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloud_hub import openadr3
from cloud_hub.api import console, data, events, health, permissions, registry, requests, tariffs
from cloud_hub.api.deps import RateLimited
from cloud_hub.authz import Principal
from cloud_hub.book import RequestBook
from cloud_hub.feed import ChangeFeed
from cloud_hub.metrics import HubMetrics
from cloud_hub.relay import HubRelay
from cloud_hub.replicas import CancelHandler, OwnerUnavailable, Replicas
from cloud_hub.service import Forbidden, HubService, IdempotencyConflict, InvalidBody, KeyInProgress, NotFound
from cloud_hub.settings import HubSettings
from cloud_hub.store import Conflict, HubStore, StoreUnavailable
from cloud_hub.tokens import TokenBook
from cloud_hub.views import ConsoleViews
from cloud_hub.webhooks import WebhookPolicy, Webhooks
from mhp_wire import topics
from mhp_wire.messages import presence_payload
from mhp_wire.mqtt import MqttEndpoint, MqttError, MqttLink
from mhp_wire.ratelimit import RateLimiter
from mhp_wire.webserver import BodyLimit

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status)


def _retry_later(status: int, code: str, message: str, after_s: float = 1.0) -> JSONResponse:
    """An error the client should retry: ``retry_after_s`` in the body, ``Retry-After`` (whole seconds) header."""
    resp = _error(status, code, message, retry_after_s=round(after_s, 3))
    resp.headers["Retry-After"] = str(max(1, math.ceil(after_s)))
    return resp


async def _run_relay(app: FastAPI, settings: HubSettings) -> None:
    relay: HubRelay = app.state.relay
    replicas: Replicas | None = relay.replicas
    endpoint = MqttEndpoint(settings.mqtt_host, settings.mqtt_port, settings.mqtt_username,
                            settings.mqtt_password, settings.mqtt_tls_ca_file)
    if replicas is None:
        link = MqttLink(endpoint, client_id=settings.mqtt_client_id, subscriptions=[topics.all_up("retailers")],
                        handler=relay.handle, status_topic=topics.PUBLIC_STATUS, connect_timeout_s=None,
                        on_connect=relay.link_connected)
    else:
        # One last will per connection: a replica's is its own presence, which the others act on. The public
        # hub presence is only ever "online" here (the bridges do not act on it).
        link = MqttLink(endpoint, client_id=settings.mqtt_client_id, subscriptions=replicas.subscriptions(),
                        handler=relay.handle, status_topic=topics.replica_status(replicas.me),
                        connect_timeout_s=None, clean_start=settings.replica_session_expiry_s == 0,
                        session_expiry_s=settings.replica_session_expiry_s, on_connect=relay.link_connected)
    async with link:
        relay.link = link
        relay.failure = None
        relay.kick()
        if replicas is None:
            await relay.run()
            return
        replicas.link = link
        with contextlib.suppress(MqttError):
            await link.publish(topics.PUBLIC_STATUS, presence_payload("online"), retain=True)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(replicas.run(), name="hub-replicas")
            tg.create_task(relay.run(), name="hub-relay-loops")


RELAY_RESTART_MAX_S = 30.0
"""The longest pause between two restarts of a failing MQTT relay."""


async def _supervise_relay(app: FastAPI, settings: HubSettings) -> None:
    """Run the MQTT side until cancelled: a failure (a refused login, a bug in a loop) is logged with its traceback,
    shown by ``/readyz``, and the relay is started again after a pause that doubles up to
    :data:`RELAY_RESTART_MAX_S`, while the HTTP API keeps serving. A silently dead relay task would leave the hub
    accepting requests that it never sends."""
    relay: HubRelay = app.state.relay
    pause = 1.0
    while True:
        started = asyncio.get_running_loop().time()
        try:
            await _run_relay(app, settings)
            problem = "the MQTT relay stopped"
        except Exception as exc:  # anything that ends the relay is logged, and the relay restarted
            problem = f"the MQTT relay failed: {type(exc).__name__}: {exc}"
            log.exception("%s; restarting it in %.0f s", problem, pause)
        else:
            log.error("%s; restarting it in %.0f s", problem, pause)
        relay.failure = problem
        if relay.replicas is not None:  # takes no new work until it has rejoined (Replicas.run)
            relay.replicas.ready.clear()
        app.state.metrics.relay_restarts.inc()
        await asyncio.sleep(pause)
        ran_s = asyncio.get_running_loop().time() - started
        pause = 1.0 if ran_s > 10 * RELAY_RESTART_MAX_S else min(2 * pause, RELAY_RESTART_MAX_S)


def _owner_cancel(service: HubService) -> CancelHandler:
    """The owner's side of a cancel forwarded by another replica, answered as ``(HTTP status, body)``."""

    async def cancel(principal: str, request_id: str) -> tuple[int, dict[str, Any]]:
        try:
            return 200, await service.cancel(Principal.parse(principal), request_id, forwarded=True)
        except NotFound as exc:
            return 404, {"message": str(exc)}
        except Forbidden as exc:
            return 403, {"message": str(exc)}
        except Conflict as exc:
            return 409, {"message": str(exc)}
        except (OwnerUnavailable, StoreUnavailable, ValueError) as exc:
            return 503, {"message": str(exc)}

    return cancel


async def _prune_feed(feed: ChangeFeed) -> None:
    """Delete change-feed events older than the replay window, a few times per window."""
    pause = min(300.0, max(1.0, feed.replay_s / 10))
    while True:
        await asyncio.sleep(pause)
        try:
            while await feed.prune() > 0:
                pass
        except StoreUnavailable as exc:
            log.warning("change feed: pruning old events failed (%s); tried again later", exc)


def create_app(settings: HubSettings) -> FastAPI:
    """Build the hub application for ``settings``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = HubStore.from_settings(settings)
        await store.open()
        metrics = HubMetrics()
        feed = ChangeFeed(store.kv, metrics, replay_s=settings.feed_replay_s, queue_max=settings.feed_queue_max)
        await feed.open()
        store.feed = feed  # from here on every request write carries its change-feed events
        book = RequestBook(store, metrics, settings.replica_id)
        relay = HubRelay(book, metrics)
        replicas = None
        if settings.replica_id is None:
            resumed = await book.load()
            if resumed:
                log.info("resumed %d unfinished request(s) from storage", resumed)
        else:  # a replica loads its requests once it has heard the others' presence (Replicas.run)
            replicas = Replicas(settings.replica_id, book, metrics, settle_s=settings.replica_settle_s,
                                scan_s=settings.replica_scan_s, forward_timeout_s=settings.replica_forward_timeout_s)
            relay.use_replicas(replicas)
        service = HubService(store, book, metrics, replicas)
        if replicas is not None:
            replicas.on_cancel = _owner_cancel(service)
        relay.on_measurements = service.accept_measurements
        relay.limiter = RateLimiter(settings.mqtt_rate_limit_per_s, settings.mqtt_rate_limit_burst)
        relay.presence_limiter = RateLimiter(settings.presence_rate_limit_per_s, settings.presence_rate_limit_burst)
        relay.on_phase_due = service.finish_availability
        service.publish_tariff_retained = relay.publish_tariff
        app.state.store, app.state.metrics, app.state.relay, app.state.service = store, metrics, relay, service
        app.state.replicas = replicas
        app.state.views = ConsoleViews(store, metrics, relay.presence_now)
        app.state.tokens = TokenBook(settings.tokens_file)
        webhooks = Webhooks(store, feed, metrics, WebhookPolicy(
            production=settings.environment == "production", allow_private=settings.webhook_allow_private,
            timeout_s=settings.webhook_timeout_s, retry_initial_s=settings.webhook_retry_initial_s,
            retry_max_s=settings.webhook_retry_max_s, max_age_s=settings.webhook_max_age_s))
        app.state.feed, app.state.webhooks, app.state.settings = feed, webhooks, settings
        await webhooks.start()
        permissions.attach(app)  # customer consent for eligible parties (docs/consent.md)
        task = asyncio.create_task(_supervise_relay(app, settings), name="hub-relay")
        pruner = asyncio.create_task(_prune_feed(feed), name="hub-feed-prune")
        try:
            yield
        finally:
            for t in (task, pruner):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await webhooks.close()
            await store.close()

    # The API's own description (/docs, /redoc, /openapi.json) only where the settings expose it.
    docs = settings.expose_docs
    app = FastAPI(title="Market Hub Platform", version="1", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.include_router(health.router)
    if settings.expose_metrics:
        app.include_router(health.metrics_router)
    app.include_router(registry.router)
    app.include_router(requests.router)
    app.include_router(data.router)
    app.include_router(tariffs.router)
    app.include_router(console.router)
    app.include_router(events.router)
    app.include_router(permissions.router)
    openadr3.mount(app)  # the OpenADR 3.1 VTN facade (docs/openadr3.md)
    app.state.http_limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    def count(status: int) -> None:
        metrics = getattr(app.state, "metrics", None)
        if metrics is not None:
            metrics.http_rejected.labels(str(status)).inc()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        count(422)
        problems = [
            {"field": ".".join(str(p) for p in e["loc"] if p != "body"), "message": e["msg"]} for e in exc.errors()
        ]
        text = "; ".join(f"{p['field'] or 'body'}: {p['message']}" for p in problems[:10])
        return _error(422, "invalid", f"invalid request: {text}", problems=problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        count(exc.status_code)
        code = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}
        resp = _error(exc.status_code, code.get(exc.status_code, "error"), str(exc.detail))
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> JSONResponse:
        count(403)
        return _error(403, "forbidden", str(exc))

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        count(404)
        return _error(404, "not_found", str(exc))

    @app.exception_handler(Conflict)
    async def conflict(request: Request, exc: Conflict) -> JSONResponse:
        count(409)
        return _error(409, "conflict", str(exc))

    @app.exception_handler(IdempotencyConflict)
    async def idem_conflict(request: Request, exc: IdempotencyConflict) -> JSONResponse:
        count(409)
        return _error(409, "conflict", str(exc))

    @app.exception_handler(KeyInProgress)
    async def key_in_progress(request: Request, exc: KeyInProgress) -> JSONResponse:
        count(409)
        return _retry_later(409, "in_progress", str(exc))

    @app.exception_handler(InvalidBody)
    async def invalid_merged_body(request: Request, exc: InvalidBody) -> JSONResponse:
        count(422)
        return _error(422, "invalid", str(exc), problems=exc.problems)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError) -> JSONResponse:
        count(422)
        return _error(422, "invalid", str(exc))

    @app.exception_handler(RateLimited)
    async def rate_limited(request: Request, exc: RateLimited) -> JSONResponse:
        count(429)
        return _retry_later(429, "rate_limited", str(exc), exc.retry_after_s)

    @app.exception_handler(OwnerUnavailable)
    async def owner_unavailable(request: Request, exc: OwnerUnavailable) -> JSONResponse:
        count(503)
        return _retry_later(503, "owner_unavailable", str(exc))

    @app.exception_handler(StoreUnavailable)
    async def unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        count(503)
        log.error("storage unavailable: %s", exc)
        return _error(503, "storage_unavailable", "storage is unavailable; nothing was stored, retry later",
                      retry_after_s=1)

    return app
