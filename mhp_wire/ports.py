"""Free TCP ports for servers started by the stack, the experiments and the tests.

Binding port 0 and releasing it ("the kernel chose a free one") is a race: until the server binds it, the port is
free for anything else, and anything else includes every ``bind(("", 0))`` and every outgoing connection of the
machine, which draw from the same ephemeral range (``net.ipv4.ip_local_port_range``, 32768-60999 by default). A
port below that range is never handed out by the kernel, so only another caller of :func:`free_port` could take
it: ports are drawn at random from there, each at most once per process, and checked by binding them.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20_000
"""The lowest port drawn (well above the registered services' usual ports)."""
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def _below_ephemeral() -> tuple[int, int] | None:
    """The range to draw from, or None when the ephemeral range leaves too little room below it."""
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768
    return (LOWEST, low - 1) if low - LOWEST >= 2_000 else None


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now, not in the kernel's ephemeral range, and not returned
    before by this process (while fewer than 4,000 have been)."""
    span = _below_ephemeral()
    if span is not None:
        if len(_handed_out) > 4_000:
            _handed_out.clear()
        for _ in range(100):
            port = random.randint(*span)
            if port not in _handed_out and _bindable(host, port):
                _handed_out.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # the kernel's choice, as a last resort
        s.bind((host, 0))
        return int(s.getsockname()[1])
