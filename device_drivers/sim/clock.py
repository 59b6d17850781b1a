"""A manual monotonic clock, for simulations and tests that step time instead of waiting."""

from __future__ import annotations


class ManualClock:
    """Monotonic seconds that move only when :meth:`advance` is called; pass it wherever a clock is taken."""

    def __init__(self, start: float = 1000.0) -> None:
        """Start at `start` seconds."""
        self.now = start

    def __call__(self) -> float:
        """The current time."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        if seconds < 0:
            raise ValueError("time does not go back")
        self.now += seconds
