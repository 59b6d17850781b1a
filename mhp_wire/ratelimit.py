"""Token buckets: a pure rate limiter (no I/O, an injectable clock) and a table of them, one per identity."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    """Up to ``burst`` events at once, refilled at ``rate_per_s``; ``take`` says how long to wait when empty."""

    def __init__(self, rate_per_s: float, burst: float, clock: Clock = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate_per_s > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = max(self._at, now)

    def take(self, n: float = 1.0) -> float:
        """Spend ``n`` tokens and return 0.0, or spend nothing and return the seconds until ``n`` are there."""
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return 0.0
        return (n - self._tokens) / self.rate_per_s

    @property
    def full(self) -> bool:
        """Whether the bucket has refilled to its burst (so forgetting it changes nothing)."""
        self._refill()
        return self._tokens >= self.burst


class RateLimiter:
    """One :class:`TokenBucket` per key (a principal, a retailer, a gateway), created on first use.

    At most ``max_keys`` buckets are kept, the least recently used forgotten first (in O(1)): keys chosen by an
    attacker (e-mail addresses, client addresses) cannot grow the table or make each new key cost a pass over it. A
    forgotten key starts again with a full bucket, as a new key would; the identity a flood comes from keeps using
    its bucket, so it stays the most recently used and stays limited.
    """

    def __init__(self, rate_per_s: float, burst: float, clock: Clock = time.monotonic,
                 max_keys: int = 10_000) -> None:
        TokenBucket(rate_per_s, burst, clock)  # validate the parameters now
        if max_keys < 1:
            raise ValueError("a rate limiter needs max_keys >= 1")
        self.rate_per_s, self.burst, self._clock, self.max_keys = rate_per_s, burst, clock, max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, n: float = 1.0) -> float:
        """Spend ``n`` of ``key``'s tokens: 0.0 when allowed, else the seconds to wait."""
        bucket = self._buckets.get(key)
        if bucket is None:
            while len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.rate_per_s, self.burst, self._clock)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(n)
