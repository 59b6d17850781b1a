"""Two pseudo-terminals joined back to back: a serial null-modem cable for tests (Linux/BSD only)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from types import TracebackType
from typing import Self


class PtyNullModem:
    """Two serial device paths whose lines are crossed: bytes written to one are read from the other.

    A single pty pair has a path only on its slave side, and pyserial (hence pymodbus) opens serial ports
    by path; so two pairs are made and their master sides copied into each other on the event loop,
    which is what ``socat pty pty`` does.
    """

    def __init__(self) -> None:
        """Prepare; the ptys are made when the context is entered."""
        self._fds: list[int] = []
        self._masters: tuple[int, int] | None = None
        self.paths: tuple[str, str] = ("", "")

    async def __aenter__(self) -> Self:
        """Open both pty pairs and start copying between them."""
        loop = asyncio.get_running_loop()
        master_a, slave_a = os.openpty()
        master_b, slave_b = os.openpty()
        self._fds = [master_a, slave_a, master_b, slave_b]
        for fd in self._fds:
            tty.setraw(fd)
        for fd in (master_a, master_b):
            os.set_blocking(fd, False)
        self.paths = (os.ttyname(slave_a), os.ttyname(slave_b))
        self._masters = (master_a, master_b)
        loop.add_reader(master_a, self._copy, master_a, master_b)
        loop.add_reader(master_b, self._copy, master_b, master_a)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop copying and close every descriptor."""
        loop = asyncio.get_running_loop()
        if self._masters is not None:
            for fd in self._masters:
                loop.remove_reader(fd)
            self._masters = None
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    @staticmethod
    def _copy(src: int, dst: int) -> None:
        """Move what arrived on one master to the other."""
        try:
            data = os.read(src, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO while no one holds the slave open
            return
        with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
            os.write(dst, data)
