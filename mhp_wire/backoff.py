"""Exponential back-off: a pure policy with no I/O and an injected clock (failing devices, webhook deliveries)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Track consecutive failures and when a device may be tried again.

    The n-th consecutive failure (n >= 1) blocks the device for
    ``min(max_s, initial_s * factor ** (n - 1))`` seconds; a success clears it.
    """

    initial_s: float = 1.0
    max_s: float = 30.0
    factor: float = 2.0
    failures: int = field(default=0, init=False)
    _until: float = field(default=0.0, init=False, repr=False)

    def record_failure(self, now: float) -> float:
        """Count a failure at time `now`; return the delay before the next try."""
        delay = min(self.max_s, self.initial_s * self.factor ** min(self.failures, 64))
        self.failures += 1
        self._until = now + delay
        return delay

    def record_success(self) -> None:
        """Clear the failure count and any pending delay."""
        self.failures = 0
        self._until = 0.0

    def remaining(self, now: float) -> float:
        """Seconds until the device may be tried again (0 when it may be tried now)."""
        return max(0.0, self._until - now)

    def blocked(self, now: float) -> bool:
        """Whether the device is still backed off at time `now`."""
        return now < self._until
