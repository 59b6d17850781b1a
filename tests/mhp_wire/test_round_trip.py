"""The first re-send delay learnt from measured round trips (:class:`mhp_wire.backoff.RoundTrip`, RFC 6298's
estimator): a table of sample sequences and the delay each leaves."""

from __future__ import annotations

import math

import pytest

from mhp_wire.backoff import RoundTrip

CASES = [
    # samples (s), floor, max, expected timeout (s)
    ((), 0.5, 4.0, 0.5),                         # nothing measured yet: the configured delay
    ((0.01, 0.01, 0.01), 0.5, 4.0, 0.5),         # a quick link never goes below the floor
    ((1.0,), 0.5, 4.0, 3.0),                     # first sample: srtt 1, rttvar 0.5 -> 1 + 4 * 0.5
    ((1.0, 1.0), 0.5, 4.0, 2.5),                 # rttvar 0.375, srtt 1 -> 2.5
    ((10.0,), 0.5, 4.0, 4.0),                    # capped at max_s
    ((10.0,), 5.0, 4.0, 5.0),                    # a floor above the cap wins (a bridge set to wait 5 s)
    ((1.0, -3.0, math.nan, math.inf), 0.5, 4.0, 3.0),  # a clock step or garbage is not a round trip
]


@pytest.mark.parametrize(("samples", "floor", "cap", "expected"), CASES)
def test_the_timeout_follows_the_samples(samples: tuple[float, ...], floor: float, cap: float,
                                         expected: float) -> None:
    rtt = RoundTrip(floor_s=floor, max_s=cap)
    for s in samples:
        rtt.sample(s)
    assert rtt.timeout_s() == pytest.approx(expected)


def test_it_falls_back_to_the_floor_once_the_link_is_quick_again() -> None:
    rtt = RoundTrip(floor_s=0.5, max_s=4.0)
    for _ in range(50):
        rtt.sample(1.5)
    assert rtt.timeout_s() > 1.5
    for _ in range(100):
        rtt.sample(0.02)
    assert rtt.timeout_s() == 0.5


def test_a_time_out_doubles_the_delay_until_the_next_sample() -> None:
    # A link slower than the floor: every message is re-sent and, under Karn's rule, gives no sample. Backing off
    # lets the next message wait long enough to be answered once, and its sample resets the back-off.
    rtt = RoundTrip(floor_s=0.5, max_s=4.0)
    rtt.timed_out()
    assert rtt.timeout_s() == 1.0
    rtt.timed_out()
    rtt.timed_out()
    rtt.timed_out()
    assert rtt.timeout_s() == 4.0  # capped
    rtt.sample(0.2)
    assert rtt.timeout_s() == pytest.approx(0.6)  # 0.2 + 4 * 0.1, the back-off gone


def test_a_message_counts_its_silence_from_the_latest_answer_to_one_sent_no_later() -> None:
    rtt = RoundTrip(floor_s=0.5, max_s=4.0)
    assert rtt.quiet_since(10.0) == 10.0  # nothing answered: from its own send
    rtt.answered([10.0, 10.0], 11.0)  # two of the round sent at 10 answered at 11
    rtt.answered([12.0], 12.5)  # a later round's answer
    assert rtt.samples == 3
    assert rtt.quiet_since(10.0) == 11.0  # its round is still being answered
    assert rtt.quiet_since(9.0) == 9.0  # answers to later sends say nothing of an earlier one
    assert rtt.quiet_since(12.0) == 12.5 and rtt.quiet_since(20.0) == 20.0
    rtt.answered([10.0], 11.5)
    assert rtt.quiet_since(11.0) == 11.5


def test_answers_older_than_the_longest_timeout_are_forgotten() -> None:
    rtt = RoundTrip(floor_s=0.5, max_s=4.0)
    for k in range(100):
        rtt.answered([float(k)], k + 0.1)
    assert len(rtt.answers) <= 65 and 0.0 not in rtt.answers and rtt.quiet_since(99.0) == 99.1
