"""``cloud-hub serve`` writes each fixed-length answer in one piece (``cloud_hub.httpwire``), and a stream's head at
once. Checked on the real process over a real socket: the client's kernel counts the TCP segments that carried
data to it (``TCP_INFO``'s ``tcpi_data_segs_in``); uvicorn as shipped wrote each answer's head and body apart, two
segments per answer."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator

import httpx
import pytest

from tests.broker_fixtures import BrokerHandle
from tests.cloud_hub.test_restart import HubProcess, hub_process, wait_ready

__all__ = ["hub_process"]  # the fixture, used by name

TCPI_DATA_SEGS_IN = 152
"""``struct tcp_info``'s ``tcpi_data_segs_in`` (Linux 4.6 on): after the 8 bytes of flags, 24 ``__u32``, 4 ``__u64``,
``segs_out``, ``segs_in``, ``notsent_bytes`` and ``min_rtt``."""


def data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    assert len(info) >= TCPI_DATA_SEGS_IN + 4, "this kernel's tcp_info has no tcpi_data_segs_in"
    return int(struct.unpack_from("I", info, TCPI_DATA_SEGS_IN)[0])


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def exchange(sock: socket.socket, request: bytes) -> tuple[bytes, bytes, int]:
    """Send ``request``, read its whole fixed-length answer: its head, its body and the data segments it came in."""
    before = data_segments_in(sock)
    sock.sendall(request)
    head, body = read_head(sock)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, (head, body)
        body += chunk
    assert len(body) == length, (head, body)
    return head, body, data_segments_in(sock) - before


@pytest.fixture
def served(hub_process: tuple[HubProcess, BrokerHandle]) -> Iterator[HubProcess]:
    hub, _ = hub_process
    hub.start()
    yield hub


async def test_each_answer_is_one_write_and_a_stream_head_leaves_at_once(served: HubProcess) -> None:
    hub = served
    async with httpx.AsyncClient(base_url=hub.url, timeout=10) as http:
        await wait_ready(http)
    auth = f"Authorization: Bearer {hub.tokens['dso']}\r\n".encode()
    with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answers = [exchange(sock, b"GET /readyz HTTP/1.1\r\nHost: hub\r\n\r\n"),  # FastAPI's JSON
                   exchange(sock, b"GET /v1/requests HTTP/1.1\r\nHost: hub\r\n" + auth + b"\r\n"),
                   exchange(sock, b"GET /v1/requests/nope HTTP/1.1\r\nHost: hub\r\n" + auth + b"\r\n"),  # lean: 404
                   exchange(sock, b"GET /v1/requests HTTP/1.1\r\nHost: hub\r\n\r\n")]  # 401
    statuses = [head.split(b"\r\n")[0] for head, _, _ in answers]
    assert statuses == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found",
                        b"HTTP/1.1 401 Unauthorized"]
    for _, body, _ in answers:
        json.loads(body)  # whole bodies, as sent
    assert [segments for _, _, segments in answers] == [1, 1, 1, 1]
    with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as sock:
        # No event is due: the stream's head comes alone, at once (a held head would wait for the first event).
        sock.sendall(b"GET /v1/events HTTP/1.1\r\nHost: hub\r\n" + auth + b"\r\n")
        head, _ = read_head(sock)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"text/event-stream" in head, head
