"""Exponential back-off, the one formula of the project: a pure policy with no I/O and an injected clock.

:func:`delay_s` is the delay before the n-th try of anything (an outbox re-send, a telemetry batch, a storage
retry, a reconnection); :class:`Backoff` keeps the count and the blocked-until time of one thing (a failing device,
a webhook target, a connection) against a clock the caller passes in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_EXPONENT = 64
"""Past this many doublings every delay is at its cap anyway; a float power beyond it would overflow."""


def delay_s(attempts: int, first_s: float = 0.5, max_s: float = 30.0, factor: float = 2.0) -> float:
    """The delay before try number ``attempts`` (1: the first re-try): ``min(max_s, first_s * factor **
    (attempts - 1))``, ``first_s`` for ``attempts`` <= 1."""
    return float(min(max_s, first_s * factor ** min(max(0, attempts - 1), MAX_EXPONENT)))


def jittered(delay: float, u: float) -> float:
    """``delay`` spread over ``[delay / 2, delay)`` by ``u`` in ``[0, 1)`` (a random number the caller draws):
    many clients that failed together (a broker restarted, a connect storm) do not all try again at the same
    instant, and none waits less than half its back-off."""
    return delay * (0.5 + min(max(u, 0.0), 1.0) / 2)


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
        delay = delay_s(self.failures + 1, self.initial_s, self.max_s, self.factor)
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


@dataclass
class RoundTrip:
    """The first re-send delay from the round trips measured, after RFC 6298 (TCP's retransmission timer):
    ``srtt + 4 * rttvar`` over the acknowledgements of messages sent once (Karn's rule: a re-sent message's
    acknowledgement could answer either send), never below ``floor_s`` (the configured delay, what a quiet link
    gets) nor above ``max_s`` unless ``floor_s`` is above it.

    A fixed short delay re-sends everything that is merely queued when the receivers or the broker are busy (a
    fan-out to thousands of gateways on a loaded machine): the re-sends add to the queue they wait in. Measured
    round trips let the delay follow the link's own pace, and fall back as the link gets quick again.
    """

    floor_s: float = 0.5
    max_s: float = 4.0
    srtt: float | None = None
    """The smoothed round trip (None: no sample yet)."""
    rttvar: float = 0.0
    """Its smoothed mean deviation."""
    samples: int = 0
    """How many round trips were sampled (what a test of Karn's rule or of a stale sample counts)."""
    backoff: float = 1.0
    """Doubled each time first re-sends fall due (:meth:`timed_out`), back to 1 with the next sample: as TCP keeps
    its backed-off timer for new segments, so that a link slower than the floor, whose messages are all re-sent and
    so give no sample under Karn's rule, still gets one that arrives in time."""
    answers: dict[float, float] = field(default_factory=dict)
    """``sent_at -> answered_at``: for each send time (a sending round's, shared by all it sent) the latest answer to
    a message sent then once (:meth:`answered`); what :meth:`quiet_since` reads."""

    def sample(self, rtt_s: float) -> None:
        """One measured round trip (send to acknowledgement) of a message sent once; non-finite or negative values
        (a clock step) are ignored."""
        if not math.isfinite(rtt_s) or rtt_s < 0:
            return
        if self.srtt is None:
            self.srtt, self.rttvar = rtt_s, rtt_s / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt_s)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt_s
        self.samples += 1
        self.backoff = 1.0

    def answered(self, sent_at: Sequence[float], now: float) -> None:
        """Messages sent once at ``sent_at`` (one time per message) were answered at ``now``: one :meth:`sample`
        each, and the link's progress for :meth:`quiet_since`. Answers older than the longest timeout are forgotten
        (they can no longer hold a re-send back)."""
        for s in sent_at:
            self.sample(now - s)
        answers = self.answers
        for s in set(sent_at):
            if answers.get(s, -math.inf) < now:
                answers[s] = now
        if len(answers) > 64:
            oldest = now - max(self.floor_s, self.max_s)
            for s in [s for s, at in answers.items() if at < oldest]:
                del answers[s]

    def quiet_since(self, sent_at: float) -> float:
        """When the link last showed progress for a message sent once at ``sent_at``: the latest answer to one sent
        at or before it (what was queued ahead of it, or beside it in its round), or ``sent_at`` itself.

        TCP restarts its retransmission timer at each acknowledgement of new data (RFC 6298, 5.3): a segment is
        sent again only once the link has been silent for the whole timeout, not merely because it is older than
        the timeout. Here each message's answer comes on its own, so the answers that count are those to messages
        sent no later than it: a burst of thousands whose answers keep coming is being drained, and the one still
        waiting is queued, not lost; a message whose predecessors are all answered (or that went alone) counts from
        its own send, so a receiver that went away is still sent it again after one timeout of silence."""
        latest = sent_at
        for s, at in self.answers.items():
            if s <= sent_at and at > latest:
                latest = at
        return latest

    def timed_out(self) -> None:
        """Messages sent once were not acknowledged within :meth:`timeout_s` and are being sent again."""
        self.backoff = min(self.backoff * 2, 2.0 ** 10)

    def timeout_s(self) -> float:
        """The first re-send delay now."""
        base = self.floor_s if self.srtt is None else self.srtt + 4 * self.rttvar
        return max(self.floor_s, min(self.max_s, base * self.backoff))
