"""The hub's Prometheus metrics (one registry per app, so two hubs in one test process do not collide), and a
rolling window of the same counts that the DSO's ``GET /v1/status`` reads (refusals and errors in the last hour)."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mhp_wire.loopwatch import Stall

RECENT_WINDOW_S = 3600.0
"""What "recent" means for ``GET /v1/status``: the last hour."""
RECENT_BUCKET_S = 60.0
"""The rolling window moves by whole minutes: an event counts until the minute it fell in is an hour old."""


class RecentCounts:
    """Counts of events per ``(name, labels)`` over the last ``window_s`` seconds, kept in buckets of ``bucket_s``
    seconds on an injected clock (``clock`` returns seconds; tests drive it). Memory is bounded by the window: at
    most ``window_s / bucket_s + 1`` buckets, each with one count per label set seen in it."""

    def __init__(self, window_s: float = RECENT_WINDOW_S, bucket_s: float = RECENT_BUCKET_S,
                 clock: Callable[[], float] = time.time) -> None:
        if bucket_s <= 0 or window_s < bucket_s:
            raise ValueError("the window must hold at least one bucket of a positive length")
        self.window_s = window_s
        self.bucket_s = bucket_s
        self.clock = clock
        self._buckets: dict[int, Tally[tuple[str, tuple[str, ...]]]] = {}

    def _now_bucket(self) -> int:
        return int(self.clock() // self.bucket_s)

    def _prune(self, now: int) -> None:
        oldest = now - int(self.window_s // self.bucket_s) + 1
        for b in [b for b in self._buckets if b < oldest or b > now]:  # a clock set back drops the "future" too
            del self._buckets[b]

    def add(self, name: str, labels: tuple[str, ...] = (), n: float = 1) -> None:
        """Count ``n`` events of ``name`` with ``labels`` now."""
        now = self._now_bucket()
        bucket = self._buckets.get(now)
        if bucket is None:
            self._prune(now)
            bucket = self._buckets[now] = Tally()
        bucket[(name, labels)] += int(n)

    def counts(self, name: str) -> dict[tuple[str, ...], int]:
        """Events of ``name`` within the window, per label set (label sets with no event are absent)."""
        self._prune(self._now_bucket())
        total: Tally[tuple[str, ...]] = Tally()
        for bucket in self._buckets.values():
            for (n, labels), v in bucket.items():
                if n == name:
                    total[labels] += v
        return {k: v for k, v in total.items() if v}


class _WindowedChild:
    """One label set of a :class:`WindowedCounter`: counts into Prometheus and into the rolling window."""

    __slots__ = ("_child", "_labels", "_name", "_recent")

    def __init__(self, child: Counter, recent: RecentCounts, name: str, labels: tuple[str, ...]) -> None:
        self._child, self._recent, self._name, self._labels = child, recent, name, labels

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` to the counter and to the window."""
        self._child.inc(amount)
        self._recent.add(self._name, self._labels, amount)


class WindowedCounter:
    """A Prometheus counter whose increments are also kept in a :class:`RecentCounts` window (``labels(...).inc()``
    and ``inc()`` as on the counter itself), so that "in the last hour" is read from the hub's own counts, never
    by parsing the Prometheus text."""

    def __init__(self, counter: Counter, recent: RecentCounts, name: str) -> None:
        self.counter, self._recent, self._name = counter, recent, name
        self._children: dict[tuple[str, ...], _WindowedChild] = {}

    def labels(self, *values: str) -> _WindowedChild:
        """The child of one label set (looked up once, then cached: ``labels()`` is costly in a hot path)."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _WindowedChild(self.counter.labels(*values), self._recent, self._name,
                                                            values)
        return child

    def inc(self, amount: float = 1) -> None:
        """Increment a counter without labels."""
        self.counter.inc(amount)
        self._recent.add(self._name, (), amount)


class HubMetrics:
    """Counters and histograms exposed at ``/metrics``; ``recent`` holds the last hour of the refusals, errors and
    finished requests (``clock``: seconds, injected for tests)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry()
        self.recent = RecentCounts(clock=clock)
        r = self.registry
        self.requests_created = Counter("mhp_requests_created", "Requests accepted (202)", ["type"], registry=r)
        self.requests_finished = WindowedCounter(Counter("mhp_requests_finished", "Requests that reached a terminal "
                                                         "state", ["type", "state"], registry=r),
                                                 self.recent, "requests_finished")
        self.request_seconds = Histogram(
            "mhp_request_completion_seconds", "From acceptance to terminal state", ["type"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.accept_seconds = Histogram(
            "mhp_request_accept_seconds", "HTTP request received to 202 (hub and storage)", ["type"], registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.015, 0.03, 0.05, 0.1, 0.25, 1),
        )
        self.mqtt_received = Counter("mhp_mqtt_received", "MQTT messages received", ["type"], registry=r)
        self.mqtt_rejected = WindowedCounter(Counter("mhp_mqtt_rejected", "MQTT messages refused", ["reason"],
                                                     registry=r), self.recent, "mqtt_rejected")
        self.claims_refused = Counter("mhp_claims_refused", "Availability claims above the client's contracted power, "
                                      "not believed (the client counts as unavailable)", registry=r)
        self.outcomes_superseded = Counter(
            "mhp_outcomes_superseded", "Clients' unreachable replaced by the home's own later outcome (a command that "
            "reached its gateway after the bridge's ack timeout)", registry=r)
        self.outbox_sent = Counter("mhp_outbox_sent", "Outbox publications (first sends and re-sends)", registry=r)
        self.outbox_parked = Counter("mhp_outbox_parked", "Outbox messages the link refused as over the broker's "
                                     "packet limit: not sent, tried again at the next connection", registry=r)
        self.outcome_batch_size = Histogram(
            "mhp_outcome_batch_size", "Outcomes stored and acknowledged per group commit", registry=r,
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
        )
        self.open_requests = Gauge("mhp_open_requests", "Requests that have not ended", registry=r)
        self.http_rejected = WindowedCounter(Counter("mhp_http_rejected", "HTTP requests refused", ["status"],
                                                     registry=r), self.recent, "http_rejected")
        self.replica_forwarded = Counter("mhp_replica_forwarded", "Messages forwarded to another hub replica",
                                         ["kind"], registry=r)
        self.replica_held = Counter("mhp_replica_held", "Outcomes left unacknowledged: their owner replica is "
                                    "offline and the retailer sends them again", registry=r)
        self.replica_adopted = Counter("mhp_replica_adopted", "Open requests adopted from offline replicas",
                                       registry=r)
        self.relay_restarts = WindowedCounter(Counter("mhp_relay_restarts", "Restarts of the MQTT relay after it "
                                                      "failed or stopped", registry=r), self.recent, "relay_restarts")
        self.feed_events = Counter("mhp_feed_events", "Change-feed events stored and published", registry=r)
        self.feed_followers = Gauge("mhp_feed_followers", "Live change-feed followers (SSE streams, webhook "
                                    "workers)", registry=r)
        self.feed_overflows = Counter("mhp_feed_overflows", "Followers whose bounded queue overflowed: their stream "
                                      "was closed, to be resumed with Last-Event-ID", registry=r)
        self.webhook_deliveries = Counter("mhp_webhook_deliveries", "Webhook delivery attempts by result",
                                          ["result"], registry=r)
        self.webhook_dropped = Counter("mhp_webhook_dropped", "Webhook events dropped after the maximum age of "
                                       "retries", registry=r)
        self.loop_stall_seconds = Histogram(
            "mhp_loop_stall_seconds", "Event loop stalls (no heartbeat for longer than the setting loop_stall_s): "
            "count and wall seconds", registry=r, buckets=(0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.loop_stall_cpu_seconds = Counter("mhp_loop_stall_cpu_seconds", "The loop thread's CPU seconds during "
                                              "the stalls (far below their wall seconds: the process got no CPU or "
                                              "the loop waited)", registry=r)

    def count_stall(self, stall: Stall) -> None:
        """Count one stall of the event loop (``LoopWatch.on_stall``: called in the watchdog's thread)."""
        self.loop_stall_seconds.observe(stall.wall_s)
        self.loop_stall_cpu_seconds.inc(max(stall.cpu_s, 0.0))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
