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


def test_each_key_has_its_own_bucket_and_full_ones_are_forgotten() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 2, clock, max_keys=2)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 1.0]
    assert limiter.take("b") == 0.0, "a flood from one key does not touch another"
    clock.now += 10  # both refill; a third key forgets them rather than grow without bound
    assert limiter.take("c") == 0.0
    assert len(limiter._buckets) == 1
    assert limiter.take("a") == 0.0
