"""Hostile request bodies against every HTTP server of the project, over raw sockets: the hub's API, a bridge's
personal area, the DSO page (sign-in on) and a gateway's live page, each really serving on 127.0.0.1.

Each gets, without any credential, a body that never ends (``Transfer-Encoding: chunked``), a ``Content-Length``
over its limit, and a ``Content-Length`` that lies about a longer chunked body. Each must answer before the body
has ended (413 at its limit, counted as the bytes arrive), close the connection instead of reading on, and keep
serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from dso_console.app import ConsoleSettings, DsoConsole
from retailer_bridge.accounts import ScryptCost, hash_password
from retailer_bridge.personal_area import MAX_FORM_BYTES
from tests.broker_fixtures import MosquittoFactory
from tests.hems_firmware.web_rig import running_gateway
from tests.hub_fixtures import running_hub
from tests.retailer_bridge.personal_area_rig import running_area

HUB_LIMIT = 4096
"""The hub's ``max_body_bytes`` and ``max_client_list_body_bytes`` in these tests (the smallest allowed is 1024)."""
DSO_LOGIN_LIMIT = 4096
"""What the DSO page reads at most of a sign-in form (``dso_console.app.LOGIN_MAX_BODY``), before anyone signed in."""
CHUNK = 1024
ANSWER_WITHIN_S = 5.0
"""How long a client waits for an answer or for the server to close (the answer comes at once when it comes)."""


@dataclass
class Target:
    """An HTTP server under attack: where it listens, the request that reads a body, and its limit."""

    name: str
    port: int
    method: str
    path: str
    limit: int
    """Bytes of body it reads at most before answering (0: it takes no body)."""
    headers: dict[str, str] = field(default_factory=dict)
    ok_path: str = "/"
    """A GET that a legitimate client sends afterwards (answered 200)."""


@pytest.fixture(params=["hub", "personal_area", "dso_page", "gateway_page"])
async def target(request: pytest.FixtureRequest, tmp_path: Path, mosquitto_factory: MosquittoFactory
                 ) -> AsyncIterator[Target]:
    """Each HTTP server of the project, running for real, and the unauthenticated request of it that reads a body."""
    name = request.param
    if name == "hub":
        async for hub in running_hub(request, tmp_path, mosquitto_factory, "sqlite", max_body_bytes=HUB_LIMIT,
                                     max_client_list_body_bytes=HUB_LIMIT):
            yield Target(name, httpx.URL(hub.url).port or 0, "POST", "/v1/emergencies", HUB_LIMIT,
                         {"Content-Type": "application/json"}, "/healthz")
    elif name == "personal_area":
        async with running_area(tmp_path, mosquitto_factory) as rig:
            yield Target(name, httpx.URL(rig.url).port or 0, "POST", "/login", MAX_FORM_BYTES,
                         {"Content-Type": "application/x-www-form-urlencoded"}, "/login")
    elif name == "dso_page":
        async for hub in running_hub(request, tmp_path, mosquitto_factory, "sqlite"):
            web = DsoConsole(ConsoleSettings(hub.url, hub.tokens["dso"], port=0,
                                        password_hash=hash_password("correct horse battery", ScryptCost(n=2**10))))
            async with web.serving():
                assert web.address is not None
                yield Target(name, web.address[1], "POST", "/login", DSO_LOGIN_LIMIT,
                             {"Content-Type": "application/x-www-form-urlencoded"}, "/login")
    else:
        broker = mosquitto_factory("retailer", ["gw-1"], "bridge")
        async with running_gateway(tmp_path, broker) as rig:
            yield Target(name, rig.port, "GET", "/api/state", 0, {}, "/api/state")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class RawClient:
    """A hostile HTTP/1.1 client on a plain socket: its writes failing (the server has closed) never hides an answer
    already received, unlike asyncio's streams, which drop what they have read once a write fails."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buffer = b""

    async def send(self, data: bytes) -> bool:
        """Send ``data``; ``False`` when the server no longer takes it."""
        try:
            await self.loop.sock_sendall(self.sock, data)
        except ConnectionError:
            return False
        return True

    async def _more(self) -> bytes:
        data = await self.loop.sock_recv(self.sock, 65536)
        self.buffer += data
        return data

    async def answer(self) -> Answer:
        """The next response (a body framed by Content-Length, as every error answer here is)."""
        async with asyncio.timeout(ANSWER_WITHIN_S):
            while b"\r\n\r\n" not in self.buffer:
                if not await self._more():
                    raise AssertionError(f"the connection closed without an answer: {self.buffer!r}")
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            size = int(headers.get("content-length", "0"))
            while len(rest) < size:
                if not await self._more():
                    raise AssertionError("the connection closed in the middle of the answer")
                rest = self.buffer.partition(b"\r\n\r\n")[2]
            self.buffer = rest[size:]
        assert status_line.startswith("HTTP/1.1 "), status_line
        return Answer(int(status_line.split()[1]), headers, rest[:size])

    async def closed_by_server(self) -> bool:
        """Whether the server closes the connection (end of stream, or a reset) rather than wait for more."""
        try:
            async with asyncio.timeout(ANSWER_WITHIN_S):
                while await self._more():
                    pass
        except ConnectionError:
            return True
        except TimeoutError:
            return False
        return True


def head(t: Target, *extra: str) -> bytes:
    lines = [f"{t.method} {t.path} HTTP/1.1", f"Host: 127.0.0.1:{t.port}", *(f"{k}: {v}" for k, v in t.headers.items()),
             *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(size: int = CHUNK) -> bytes:
    return f"{size:x}\r\n".encode() + b"a" * size + b"\r\n"


@contextlib.asynccontextmanager
async def connection(t: Target) -> AsyncIterator[RawClient]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", t.port))
        yield RawClient(sock)
    finally:
        sock.close()


async def still_serves(t: Target) -> None:
    """A legitimate client, on a new connection, is served as before."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{t.port}", timeout=ANSWER_WITHIN_S) as http:
        assert (await http.get(t.ok_path)).status_code == 200


async def test_an_endless_chunked_body_without_credentials_is_refused_at_the_limit(target: Target) -> None:
    """The issue's attack: no token, ``Transfer-Encoding: chunked``, chunks that never end. The server answers 413
    once the body passes its limit (not when it ends: it never does), then closes the connection; the attacker's
    remaining chunks (up to 4x the limit) are never read."""
    t = target
    async with connection(t) as client:
        await client.send(head(t, "Transfer-Encoding: chunked"))
        sent = 0
        while sent <= t.limit and await client.send(chunk()):  # just past the limit; no terminating chunk
            sent += CHUNK
        try:
            answer = await client.answer()
        except TimeoutError:
            pytest.fail(f"{t.name}: no answer after {sent} bytes of a body limited to {t.limit}: it reads on")
        assert answer.status == 413, (t.name, answer)
        assert answer.headers.get("connection") == "close", (t.name, answer.headers)
        assert b"too_large" in answer.body or b"too large" in answer.body.lower(), (t.name, answer.body)
        while sent < 4 * max(t.limit, CHUNK) and await client.send(chunk()):  # the attacker goes on, up to 4x
            sent += CHUNK
        assert await client.closed_by_server(), f"{t.name}: the connection stays open, the body is read on"
    await still_serves(t)


async def test_a_content_length_over_the_limit_is_refused_before_any_body_is_read(target: Target) -> None:
    t = target
    async with connection(t) as client:
        await client.send(head(t, f"Content-Length: {4 * max(t.limit, CHUNK)}") + b"a" * CHUNK)
        answer = await client.answer()  # the rest of the body never comes
        assert answer.status == 413, (t.name, answer)
        assert await client.closed_by_server(), f"{t.name}: the connection stays open, waiting for the body"
    await still_serves(t)


async def test_a_lying_content_length_with_a_longer_chunked_body_is_refused(target: Target) -> None:
    """``Content-Length: 16`` and ``Transfer-Encoding: chunked`` with 4x the limit: the server neither takes the 16
    bytes for the body (and the rest for further requests) nor reads the chunks past its limit."""
    t = target
    async with connection(t) as client:
        await client.send(head(t, "Content-Length: 16", "Transfer-Encoding: chunked"))
        for _ in range(4 * max(t.limit, CHUNK) // CHUNK):
            if not await client.send(chunk()):
                break
        answer = await client.answer()
        assert answer.status in (400, 413), (t.name, answer)
        assert await client.closed_by_server(), f"{t.name}: the connection stays open"
    await still_serves(t)
