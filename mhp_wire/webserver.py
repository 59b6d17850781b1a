"""Running a uvicorn server inside one of our processes (the gateway's page, the personal area, the DSO page), and
the ASGI guards every HTTP server of the project puts in front of its routes (the hub's API too).

Only the components that serve a web page import this module (they bring uvicorn with their extras).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
from collections.abc import Callable, Iterable, Iterator

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its process (``run_service`` or a ``main`` cancels on SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host`` (IPv4 or IPv6) and ``port`` (0: a free one), for ``EmbeddedServer.serve``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


# -- request bodies ------------------------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    """Raised to the application by ``receive`` once the body has passed the limit (the 413 is already sent).

    Not a ``ValueError`` or ``HTTPException``: an application's own handlers must not turn it into another answer
    (whatever they send after it is dropped anyway)."""


async def _answer(send: Send, status: int, code: str, message: str) -> None:
    """A JSON error ``{"error", "message"}`` that closes the connection after it."""
    body = json.dumps({"error": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _declared(headers: Iterable[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """The body a request announces: its ``Content-Length`` (-1 when unreadable) and whether it is chunked."""
    length: int | None = None
    chunked = False
    for name, value in headers:
        if name == b"content-length":
            length = int(value) if value.isdigit() else -1
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked


class BodyLimit:
    """ASGI middleware: request bodies counted as they arrive, refused with 413 at ``max_bytes``.

    The count is taken in the ``receive`` the application is given, before routing, authentication or parsing, so a
    body without ``Content-Length`` (``Transfer-Encoding: chunked``) is stopped at the limit like one that announces
    its size (which is refused before any of it is read). The 413 is ``{"error": "too_large", "message"}`` with
    ``Connection: close``; the application then gets :class:`BodyTooLarge` from ``receive`` and anything it sends
    is dropped. Any answer given before the request body has arrived whole (the 413, or a route that does not read
    the body) closes the connection too: otherwise the server would go on reading, and discarding, a body that
    never ends. ``max_bytes = 0``: the server takes no request body at all.

    (Starlette >= 1.6 counts bodies the same way (``max_body_size``) but answers by raising an ``HTTPException``
    through the application's own error handling and keeps the connection, so uvicorn drains an endless body; and
    the gateway's extra supports older Starlette releases.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int, *, wider: Callable[[Scope], int | None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.wider = wider
        """A larger limit for some requests (their method and path in ``scope``), None for the others: a route
        whose valid bodies are larger than the rest (the hub's requests naming up to 100,000 clients)."""

    def limit_for(self, scope: Scope) -> int:
        """This request's limit: ``wider``'s answer, else ``max_bytes``."""
        wider = None if self.wider is None else self.wider(scope)
        return self.max_bytes if wider is None else wider

    @staticmethod
    def _message(limit: int) -> str:
        return "this server takes no request body" if limit == 0 else f"request body over {limit} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        length, chunked = _declared(scope["headers"])
        if (length is not None and not 0 <= length <= limit) or (chunked and limit == 0):
            await _answer(send, 413, "too_large", self._message(limit))
            return
        received = 0
        body_done = not chunked and not length
        refused = started = False

        async def counted() -> Message:
            nonlocal received, body_done, refused
            if refused:
                raise BodyTooLarge(self._message(limit))
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await _answer(send, 413, "too_large", self._message(limit))
                    raise BodyTooLarge(self._message(limit))
                body_done = body_done or not message.get("more_body", False)
            return message

        async def closing(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
                if not body_done:
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counted, closing)


# -- host names ----------------------------------------------------------------------------------------------------


def host_name(scope: Scope) -> str:
    """The host name of a request's ``Host`` header, lower case, without the port or IPv6 brackets ("" if none)."""
    host = ""
    for name, value in scope["headers"]:
        if name == b"host":
            host = value.decode("latin-1").strip().lower()
            break
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip_literal(name: str) -> bool:
    """Whether ``name`` is an IPv4 or IPv6 address (not a DNS name)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class HostGuard:
    """ASGI middleware: 403 for a request whose ``Host`` is not one this server serves (DNS rebinding).

    A page that acts without sign-in answers only to the names it was told and to addresses: a browser that a
    hostile site's DNS name points at this server sends that name, not ours. Allowed: the loopback names, every IP
    address literal (no DNS name involved), and ``names``.
    """

    def __init__(self, app: ASGIApp, names: Iterable[str] = ()) -> None:
        self.app = app
        self.names = LOOPBACK_NAMES | {n.strip("[]").lower() for n in names if n}

    def allows(self, name: str) -> bool:
        """Whether a request for host ``name`` is served."""
        return name in self.names or is_ip_literal(name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allows(host_name(scope)):
            await _answer(send, 403, "forbidden", "this page does not answer to that host name")
            return
        await self.app(scope, receive, send)


def with_security_headers(send: Send, security_headers: dict[str, str]) -> Send:
    """``send`` adding ``security_headers`` (and ``cache-control: no-store``) to a response that lacks them."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            present = {k.lower() for k, _ in headers}
            headers += [(k.encode(), v.encode()) for k, v in security_headers.items() if k.encode() not in present]
            if b"cache-control" not in present:
                headers.append((b"cache-control", b"no-store"))
            message = {**message, "headers": headers}
        await send(message)

    return send_with_headers
