"""The hub's ASGI application: the HTTP API, with the store and the MQTT relay opened in its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from cloud_hub import openadr3
from cloud_hub.api import console, data, events, health, permissions, registry, requests, tariffs
from cloud_hub.book import RequestBook
from cloud_hub.errors import HubError, StoreUnavailable
from cloud_hub.feed import ChangeFeed
from cloud_hub.lean import LeanRoutes
from cloud_hub.metrics import HubMetrics
from cloud_hub.relay import HubRelay
from cloud_hub.replicas import Replicas
from cloud_hub.service import HubService
from cloud_hub.settings import HubSettings
from cloud_hub.store import HubStore
from cloud_hub.tokens import TokenBook
from cloud_hub.views import ConsoleViews
from cloud_hub.webhooks import WebhookPolicy, Webhooks
from mhp_wire import topics
from mhp_wire.loopwatch import LoopWatch
from mhp_wire.messages import presence_payload
from mhp_wire.mqtt import MqttEndpoint, MqttError, MqttLink
from mhp_wire.ratelimit import RateLimiter
from mhp_wire.webserver import BodyLimit

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status)


def _count(request: Request, status: int) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.http_rejected.labels(str(status)).inc()


async def _hub_error(request: Request, exc: Exception) -> JSONResponse:
    """Every :class:`HubError`: its status, its body, its headers."""
    assert isinstance(exc, HubError)
    _count(request, exc.status)
    if isinstance(exc, StoreUnavailable):
        log.error("storage unavailable: %s", exc)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def _invalid_body(request: Request, exc: Exception) -> JSONResponse:
    """A body or query FastAPI refused: 422 with each problem."""
    assert isinstance(exc, RequestValidationError)
    _count(request, 422)
    problems = [
        {"field": ".".join(str(p) for p in e["loc"] if p != "body"), "message": e["msg"]} for e in exc.errors()
    ]
    text = "; ".join(f"{p['field'] or 'body'}: {p['message']}" for p in problems[:10])
    return _error(422, "invalid", f"invalid request: {text}", problems=problems)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (401 from the token check, 404 of an unknown path, 405) in the same body."""
    assert isinstance(exc, StarletteHTTPException)
    _count(request, exc.status_code)
    code = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}
    return JSONResponse({"error": code.get(exc.status_code, "error"), "message": str(exc.detail)},
                        status_code=exc.status_code, headers=exc.headers)


async def _value_error(request: Request, exc: Exception) -> JSONResponse:
    """A value a use case found invalid (an end before its start): 422."""
    _count(request, 422)
    return _error(422, "invalid", str(exc))


ERROR_HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
    HubError: _hub_error,
    RequestValidationError: _invalid_body,
    StarletteHTTPException: _http_error,
    ValueError: _value_error,
}
"""Every error the HTTP layer answers, registered in one loop (the most specific class of an error wins, so
:class:`cloud_hub.errors.InvalidBody`, also a ``ValueError``, is a :class:`HubError` here)."""


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


async def _assemble(app: FastAPI, settings: HubSettings) -> tuple[ChangeFeed, Webhooks]:
    """Open the store and build the hub's parts, each given what it uses through its constructor, in the order
    they depend on each other: the book, the replicas, the relay, the use cases (whose tariffs publish through
    the relay); then the two edges back, named: the relay hands measurements and due phases to the use cases, and
    the replicas hand forwarded cancels to them."""
    store = HubStore.from_settings(settings)
    await store.open()
    metrics = HubMetrics()
    feed = ChangeFeed(store.kv, metrics, replay_s=settings.feed_replay_s, queue_max=settings.feed_queue_max)
    await feed.open()
    store.feed = feed  # from here on every request write carries its change-feed events
    book = RequestBook(store, metrics, settings.replica_id,
                       expand_after_accept_min_clients=settings.expand_after_accept_min_clients,
                       sent_settle_s=settings.sent_settle_s)
    relay = HubRelay(book, metrics,
                     limiter=RateLimiter(settings.mqtt_rate_limit_per_s, settings.mqtt_rate_limit_burst),
                     presence_limiter=RateLimiter(settings.presence_rate_limit_per_s,
                                                  settings.presence_rate_limit_burst))
    replicas = None
    if settings.replica_id is None:
        resumed = await book.load()
        if resumed:
            log.info("resumed %d unfinished request(s) from storage", resumed)
    else:  # a replica loads its requests once it has heard the others' presence (Replicas.run)
        replicas = Replicas(settings.replica_id, book, metrics, settle_s=settings.replica_settle_s,
                            scan_s=settings.replica_scan_s, forward_timeout_s=settings.replica_forward_timeout_s)
        relay.use_replicas(replicas)
    service = HubService.build(store, book, metrics, replicas, publish_tariff_retained=relay.publish_tariff)
    relay.deliver_to(service.data.accept_measurements, service.flexibility.finish_availability)
    if replicas is not None:
        replicas.serve_cancels(service.flexibility.owner_cancel)
    webhooks = Webhooks(store, feed, metrics, WebhookPolicy(
        production=settings.environment == "production", allow_private=settings.webhook_allow_private,
        timeout_s=settings.webhook_timeout_s, retry_initial_s=settings.webhook_retry_initial_s,
        retry_max_s=settings.webhook_retry_max_s, max_age_s=settings.webhook_max_age_s))
    state = app.state
    state.store, state.metrics, state.relay, state.service, state.replicas = store, metrics, relay, service, replicas
    state.views = ConsoleViews(store, metrics, relay.presence_now)
    state.tokens = TokenBook(settings.tokens_file)
    state.feed, state.webhooks, state.settings = feed, webhooks, settings
    return feed, webhooks


def _lifespan(settings: HubSettings) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        feed, webhooks = await _assemble(app, settings)
        await webhooks.start()
        permissions.attach(app)  # customer consent for eligible parties (docs/consent.md)
        task = asyncio.create_task(_supervise_relay(app, settings), name="hub-relay")
        pruner = asyncio.create_task(_prune_feed(feed), name="hub-feed-prune")
        watch = LoopWatch(settings.loop_stall_s, name="hub", on_stall=app.state.metrics.count_stall)
        app.state.loop_watch = watch
        # started before the relay's and the pruner's tasks first run; stopped last, however the shutdown below
        # ends (a close that raises, a cancellation)
        with watch:
            try:
                yield
            finally:
                for t in (task, pruner):
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
                await app.state.relay.drain()  # the outcomes and acks received are stored before the store closes
                await webhooks.close()
                await app.state.service.book.close()  # an expansion cut short is finished by the next start
                await app.state.store.close()

    return lifespan


CLIENT_LIST_ROUTES = frozenset(f"/v1/{name}" for name in ("emergencies", "load-shifts", "load-reductions",
                                                           "billing-data"))
"""The routes whose bodies list up to 100,000 client ids (``mhp_wire.dso_api``), with ``/v1/requests/{id}/revise``."""


def names_clients(scope: Scope) -> bool:
    """Whether this HTTP request is one whose body may name up to 100,000 clients (``max_client_list_body_bytes``)."""
    if scope.get("method") != "POST":
        return False
    path: str = scope.get("path", "")
    return path in CLIENT_LIST_ROUTES or (path.startswith("/v1/requests/") and path.endswith("/revise")
                                          and path.count("/") == 4)


def create_app(settings: HubSettings, *, lean: bool = True) -> FastAPI:
    """Build the hub application for ``settings``; ``lean=False`` (tests and benchmarks only) leaves out the lean
    path of the hot routes (``cloud_hub.lean``), so that FastAPI answers every request."""
    # The API's own description (/docs, /redoc, /openapi.json) only where the settings expose it.
    docs = settings.expose_docs
    app = FastAPI(title="Market Hub Platform", version="1", lifespan=_lifespan(settings),
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    # The requests router first: its POSTs and the DSO's polls are most of the traffic, and FastAPI tries the
    # routes in order (its matching was ~7 % of the loop at 6,000 requests/min). No path of it is also a path of
    # another router, so the order changes no answer (tests/cloud_hub/test_route_order.py).
    app.include_router(requests.router)
    app.include_router(health.router)
    if settings.expose_metrics:
        app.include_router(health.metrics_router)
    app.include_router(registry.router)
    app.include_router(data.router)
    app.include_router(tariffs.router)
    app.include_router(console.router)
    app.include_router(events.router)
    app.include_router(permissions.router)
    openadr3.mount(app)  # the OpenADR 3.1 VTN facade (docs/openadr3.md)
    app.state.http_limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)

    # Starlette wraps the routes in the middleware added last outermost: ServerErrorMiddleware (500), BodyLimit,
    # LeanRoutes, FastAPI's exception middleware, the routes. The lean path's body is counted and refused by
    # BodyLimit, and an error it has no handler for becomes the same 500 as a route's.
    app.state.lean_answered = Counter[str]()
    if lean:
        app.add_middleware(LeanRoutes, handlers=ERROR_HANDLERS, answered=app.state.lean_answered)
    list_limit = max(settings.max_body_bytes, settings.max_client_list_body_bytes)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       wider=lambda scope: list_limit if names_clients(scope) else None)
    for error, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    return app
