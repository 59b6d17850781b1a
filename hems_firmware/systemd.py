"""systemd's notify protocol, without a dependency: ``READY=1`` once the gateway runs, ``WATCHDOG=1`` from its
poll loop, so a gateway whose loop hangs is restarted by systemd (``WatchdogSec=`` in the unit)."""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET`` when systemd set it; does nothing otherwise."""

    def __init__(self) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET")
        usec = os.environ.get("WATCHDOG_USEC")
        self.interval_s = int(usec) / 2e6 if usec and usec.isdigit() else 0.0
        self._last = 0.0

    def notify(self, message: str) -> bool:
        """Send one notification; True when it was sent."""
        if not self.address:
            return False
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(message.encode(), addr)
            except OSError:
                return False
        return True

    def ready(self) -> None:
        """The service is up."""
        self.notify("READY=1")

    def alive(self) -> None:
        """The poll loop turned: feed the watchdog (at most every half watchdog period when one is set)."""
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self.notify("WATCHDOG=1")
