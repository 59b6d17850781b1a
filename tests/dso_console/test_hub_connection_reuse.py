"""The console's reads of the hub survive a kept-alive connection the hub closes as it is reused: a hub (here a
raw HTTP/1.1 server, to close at exactly that moment) answers a first GET with keep-alive, then drops the same
connection when the next request arrives on it, as uvicorn does when its keep-alive ends under a request. The
console asks a read again once, on a fresh connection; a POST is never sent twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from dso_console.app import ConsoleSettings, DsoConsole, _HubError

BODY = b'{"ready": true}'
ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY)) + BODY


class DroppingHub:
    """Answers the first request of each connection; closes the connection when a second one arrives on it."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.dropped = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if length:
                    await reader.readexactly(length)
                self.requests.append(head.split(b"\r\n")[0])
                if served:
                    self.dropped += 1
                    break
                writer.write(ANSWER)
                await writer.drain()
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.fixture
async def hub() -> AsyncIterator[tuple[DroppingHub, str]]:
    fake = DroppingHub()
    server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield fake, f"http://127.0.0.1:{port}"


async def test_a_read_on_a_connection_the_hub_closed_is_asked_again(hub: tuple[DroppingHub, str]) -> None:
    fake, url = hub
    async with DsoConsole(ConsoleSettings(url, "token", port=0)).serving() as console:
        assert await console._hub("GET", "/v1/status") == (200, {"ready": True})
        assert await console._hub("GET", "/v1/status") == (200, {"ready": True})  # reused, dropped, asked again
    assert fake.dropped == 1 and fake.requests.count(b"GET /v1/status HTTP/1.1") == 3


async def test_a_post_on_a_connection_the_hub_closed_is_not_sent_twice(hub: tuple[DroppingHub, str]) -> None:
    fake, url = hub
    async with DsoConsole(ConsoleSettings(url, "token", port=0)).serving() as console:
        assert (await console._hub("GET", "/v1/status"))[0] == 200
        with pytest.raises(_HubError, match="RemoteProtocolError"):
            await console._hub("POST", "/v1/emergencies", json={})
    assert fake.requests.count(b"POST /v1/emergencies HTTP/1.1") == 1
