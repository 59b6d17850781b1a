"""The pure token bucket, table-tested with a fake clock."""

from __future__ import annotations

import pytest

from mhp_wire.ratelimit import RateLimiter, TokenBucket


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# (rate per s, burst, [(advance s, expected wait of take() — 0.0 means allowed)])
CASES = [
    ("burst then empty", 1.0, 3, [(0, 0.0), (0, 0.0), (0, 0.0), (0, 1.0)]),
    ("refills at the rate", 2.0, 1, [(0, 0.0), (0, 0.5), (0.25, 0.25), (0.25, 0.0), (0, 0.5)]),
    ("never above the burst", 10.0, 2, [(100, 0.0), (0, 0.0), (0, 0.1)]),
    ("a refused take costs nothing", 1.0, 1, [(0, 0.0), (0, 1.0), (0, 1.0), (0.5, 0.5), (0.5, 0.0)]),
    ("a clock going back refills nothing", 1.0, 1, [(0, 0.0), (-5, 1.0), (1, 1.0), (5, 0.0)]),
]


@pytest.mark.parametrize(("name", "rate", "burst", "steps"), CASES, ids=[c[0] for c in CASES])
def test_token_bucket(name: str, rate: float, burst: int, steps: list[tuple[float, float]]) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock)
    for i, (advance, wait) in enumerate(steps):
        clock.now += advance
        assert bucket.take() == pytest.approx(wait), f"{name}: step {i}"


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_nonsense_parameters_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)


def test_each_key_has_its_own_bucket_and_the_least_recently_used_is_forgotten() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 2, clock, max_keys=2)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 1.0]
    assert limiter.take("b") == 0.0, "a flood from one key does not touch another"
    assert limiter.take("a") == 1.0, "a is still empty (and now the most recently used)"
    assert limiter.take("c") == 0.0  # the table is full: b, the least recently used, is forgotten
    assert len(limiter) == 2
    assert limiter.take("a") == 1.0, "the flooding key kept its bucket"


def test_keys_chosen_by_an_attacker_never_grow_the_table_nor_free_the_flooding_key() -> None:
    """100,000 fresh keys (e-mail addresses, client addresses) while none has refilled: the table stays at its
    bound, and a key that keeps flooding stays limited throughout. (The table used to keep every bucket that had
    not refilled and rebuild itself on each new key: unbounded, and a pass over all of it per request.)"""
    clock = FakeClock()
    limiter = RateLimiter(0.2, 10, clock, max_keys=1_000)
    for _ in range(10):
        limiter.take("victim@example.com")
    refused = 0
    for i in range(100_000):
        limiter.take(f"login:{i}@example.com")
        if i % 100 == 0:
            refused += limiter.take("victim@example.com") > 0
        assert len(limiter) <= 1_000
    assert refused == 1_000, "every attempt of the flooding key was refused"
