"""The lean path of the hub's hot HTTP requests: the DSO's creating POSTs and its ``GET /v1/requests/{id}``.

Most of the hub's HTTP traffic is those five routes, and FastAPI spends on each of them about as much CPU around the
route (routing, dependency solving, six ASGI layers, request objects) as some of the use cases do themselves
(docs/performance.md, "Issue 14, tenth round"). This middleware answers the plain case of those routes with FastAPI's
own parts, the ones that decide the answer (Starlette's JSON parse of the body, the route's body model, the
route's endpoint, its response model's validation and JSON), and hands everything else to FastAPI unchanged, the
body already read replayed to it: like the hand readers of MQTT messages (``mhp_wire.fastwire``), anything unusual
goes to the full path, so each error answer stays FastAPI's own (docs/decisions.md, "The hub's lean HTTP path").

The plain case: ``POST`` of a hot path or ``GET /v1/requests/{id}`` (an id FastAPI takes: 1-64 characters, no
``/``), no query string and no ``root_path``, one ``Authorization: Bearer`` of a known, unexpired token, and for a
POST one ``Content-Type: application/json``, at most one ``Idempotency-Key`` of 1-200 characters, and a body that
parses and that the route's model accepts (a GET: no body). Only then is the principal's rate limit taken (once:
FastAPI, on a fallback, takes it itself) and the endpoint called; its errors are answered by the app's own
exception handlers, and an error without one reaches Starlette's ``ServerErrorMiddleware`` (500) as from a route.

It sits inside ``BodyLimit`` (which counts and refuses the body before anything reads it) and outside FastAPI's
exception middleware (``create_app``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi.exceptions import ResponseValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_hub.api import requests
from cloud_hub.api.deps import IDEMPOTENCY_KEY_MAX, take_turn
from cloud_hub.api.requests import REQUEST_ID_MAX

Handler = Callable[[Request, Exception], Awaitable[Response]]

HOT_POSTS = (requests.post_emergency, requests.post_load_shift, requests.post_load_reduction, requests.post_billing)
"""The creating POSTs of the DSO's traffic (``sim.experiment.dso_sim``), each taking ``body`` and an
``Idempotency-Key``."""

REQUEST_PREFIX = "/v1/requests/"

NESTING_MAX = 32
"""A POST body with more ``[`` and ``{`` than this (strings included) goes to FastAPI. Every hot body is one flat
object with one list of ids; Python's JSON parser counts nesting against the recursion limit, which FastAPI's
deeper stack meets sooner: a value ~970 levels deep under a key repeated later (the last one wins, so the model
accepts the body) was a 400 through FastAPI and a 202 here."""

_WANTED = frozenset({b"authorization", b"content-type", b"idempotency-key", b"content-length", b"transfer-encoding"})


def _routes() -> tuple[dict[str, APIRoute], APIRoute]:
    posts = {r.path: r for r in requests.router.routes if isinstance(r, APIRoute) and r.endpoint in HOT_POSTS}
    get = next(r for r in requests.router.routes if isinstance(r, APIRoute) and r.endpoint is requests.get_request)
    assert len(posts) == len(HOT_POSTS), posts
    return posts, get


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[bytes, bytes] | None:
    """The headers the lean path reads, or None when one of them is repeated (FastAPI would read the first one;
    the lean path does not guess)."""
    found: dict[bytes, bytes] = {}
    for name, value in raw:
        if name in _WANTED:
            if name in found:
                return None
            found[name] = value
    return found


def _replay(messages: list[Message], receive: Receive, error: Exception | None) -> Receive:
    """``receive`` for FastAPI after the lean path has read ``messages`` (and met ``error``, raised again where it
    was met): the same messages, then the server's own ``receive``."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        if error is not None:
            raise error
        return await receive()

    return replayed


class LeanRoutes:
    """ASGI middleware: the plain case of the hot routes answered without FastAPI's per-request machinery (module
    docstring); ``answered`` counts the requests it answered, by ``"METHOD path"`` (the tests' proof it is taken)."""

    def __init__(self, app: ASGIApp, *, handlers: Mapping[type[Exception], Handler], answered: Counter[str]) -> None:
        self.app = app
        self.handlers = handlers
        self.answered = answered
        self.posts, self.get = _routes()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = self._target(scope) if scope["type"] == "http" else None
        if target is None:
            await self.app(scope, receive, send)
            return
        route, principal, arguments, headers = target
        if "request_id" in arguments:  # the GET: no body
            await self._answer(scope, receive, send, route, principal, arguments)
            return
        messages: list[Message] = []
        try:
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
        except Exception as exc:  # BodyLimit's refusal, a disconnect: FastAPI meets them as it would have
            await self.app(scope, _replay(messages, receive, exc), send)
            return
        arguments["body"] = self._body(route, messages)
        # FastAPI checks the token once the body is in (one revoked or expired while the body arrived is refused),
        # and so does the lean path for a POST: its only look at the token file and only hash of the token.
        principal = None if arguments["body"] is None else self._principal(scope["app"].state, headers)
        if principal is None:
            await self.app(scope, _replay(messages, receive, None), send)
        else:
            arguments["who"] = principal
            await self._answer(scope, receive, send, route, principal, arguments)

    def _target(self, scope: Scope) -> tuple[APIRoute, Any, dict[str, Any], dict[bytes, bytes]] | None:
        """The route, the principal (a GET's; a POST's is found after its body, once), the endpoint's arguments but
        the body and the principal, and the headers read, of a request of the plain case so far (all but its body
        and a POST's token), else None."""
        method, path = scope["method"], scope["path"]
        route = self.posts.get(path) if method == "POST" else None
        request_id = path[len(REQUEST_PREFIX):] if method == "GET" and path.startswith(REQUEST_PREFIX) else ""
        if 0 < len(request_id) <= REQUEST_ID_MAX and "/" not in request_id:
            route = self.get
        if route is None:
            return None
        app = scope["app"]
        headers = _headers(scope["headers"])
        if (headers is None or scope["query_string"] or scope.get("root_path") or app.dependency_overrides
                or getattr(app.state, "service", None) is None):
            return None
        if route is self.get:  # FastAPI reads no body and no content type there; a GET with a body is unusual
            principal = self._principal(app.state, headers)
            if principal is None or b"content-length" in headers or b"transfer-encoding" in headers:
                return None
            return route, principal, {"request_id": request_id, "who": principal, "service": app.state.service}, headers
        key = headers.get(b"idempotency-key")
        idempotency_key = None if key is None else key.decode("latin-1")
        if b"authorization" not in headers or headers.get(b"content-type") != b"application/json" or (
                idempotency_key is not None and not 0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX):
            return None  # (no token: FastAPI's 401, without the lean path reading the body)
        # A POST's principal is found once its body is in (``__call__``): ``None`` here.
        return route, None, {"service": app.state.service, "idempotency_key": idempotency_key}, headers

    @staticmethod
    def _principal(state: Any, headers: dict[bytes, bytes]) -> Any:
        """The principal of a well-formed bearer token known and unexpired, else None (FastAPI's 401s)."""
        value = headers.get(b"authorization")
        if value is None:
            return None
        text = value.decode("latin-1")
        if not text.lower().startswith("bearer "):
            return None
        return state.tokens.principal(text[7:].strip())

    @staticmethod
    def _body(route: APIRoute, messages: list[Message]) -> Any:
        """The body as the route's model accepts it (parsed as Starlette's ``Request.json`` does), or None."""
        if messages[-1]["type"] != "http.request":
            return None
        raw = b"".join(m.get("body", b"") for m in messages)
        if raw.count(b"[") + raw.count(b"{") > NESTING_MAX:
            return None
        try:
            value = json.loads(raw)
        except Exception:  # not JSON (nor UTF-8, nor shallow enough): FastAPI's 422 or 400
            return None
        if value is None:
            return None
        assert route.body_field is not None
        body, errors = route.body_field.validate(value, {}, loc=("body",))
        return None if errors else body

    async def _answer(self, scope: Scope, receive: Receive, send: Send, route: APIRoute, principal: Any,
                      arguments: dict[str, Any]) -> None:
        """Take the principal's turn, call the route's endpoint and answer as FastAPI would."""
        try:
            take_turn(scope["app"].state, principal)
            result = await route.endpoint(**arguments)
            # In the try, as in FastAPI's route: a response that cannot be written (a ValueError) is the app's 422.
            field = route.response_field
            assert field is not None
            value, errors = field.validate(result, {}, loc=("response",))
            if errors:
                raise ResponseValidationError(errors=errors, body=result)
            content = field.serialize_json(
                value, include=route.response_model_include, exclude=route.response_model_exclude,
                by_alias=route.response_model_by_alias, exclude_unset=route.response_model_exclude_unset,
                exclude_defaults=route.response_model_exclude_defaults,
                exclude_none=route.response_model_exclude_none)
        except Exception as exc:
            handler = next((self.handlers[c] for c in type(exc).__mro__ if c in self.handlers), None)
            if handler is None:
                raise
            response = await handler(Request(scope), exc)
            await response(scope, receive, send)
            return
        self.answered[f"{scope['method']} {route.path}"] += 1
        await send({"type": "http.response.start", "status": route.status_code or 200,
                    "headers": [(b"content-length", str(len(content)).encode()),
                                (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": content})
