"""Running a uvicorn server inside one of our processes (the gateway's page, the personal area, the DSO page).

Only the components that serve a web page import this module (they bring uvicorn with their extras).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import uvicorn


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its process (``run_service`` or a ``main`` cancels on SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host`` (IPv4 or IPv6) and ``port`` (0: a free one), for ``EmbeddedServer.serve``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)
