"""free_port() draws ports the kernel never hands out (below its ephemeral range), each once per process, and only
ports nothing is bound to."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest

from mhp_wire import ports


def ephemeral_low() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    got = [ports.free_port() for _ in range(200)]
    assert len(set(got)) == 200
    assert all(ports.LOWEST <= p < ephemeral_low() for p in got)
    with socket.socket() as s:
        s.bind(("127.0.0.1", got[-1]))
        s.listen()


def test_a_bound_port_is_never_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        free = other.getsockname()[1]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        taken.listen()
        draws = itertools.chain([busy, busy], itertools.repeat(free))
        monkeypatch.setattr(ports, "_below_ephemeral", lambda: (1024, 65535))
        monkeypatch.setattr(ports.random, "randint", lambda lo, hi: next(draws))
        monkeypatch.setattr(ports, "_handed_out", set())
        assert ports.free_port() == free


def test_without_room_below_the_ephemeral_range_the_kernel_chooses(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text("1024\t65535\n")
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE", narrow)
    port = ports.free_port()
    assert 1024 <= port <= 65535
