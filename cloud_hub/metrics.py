"""The hub's Prometheus metrics (one registry per app, so two hubs in one test process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class HubMetrics:
    """Counters and histograms exposed at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests_created = Counter("mhp_requests_created", "Requests accepted (202)", ["type"], registry=r)
        self.requests_finished = Counter("mhp_requests_finished", "Requests that reached a terminal state",
                                         ["type", "state"], registry=r)
        self.request_seconds = Histogram(
            "mhp_request_completion_seconds", "From acceptance to terminal state", ["type"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.accept_seconds = Histogram(
            "mhp_request_accept_seconds", "HTTP request received to 202 (hub and storage)", ["type"], registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.015, 0.03, 0.05, 0.1, 0.25, 1),
        )
        self.mqtt_received = Counter("mhp_mqtt_received", "MQTT messages received", ["type"], registry=r)
        self.mqtt_rejected = Counter("mhp_mqtt_rejected", "MQTT messages refused", ["reason"], registry=r)
        self.claims_refused = Counter("mhp_claims_refused", "Availability claims above the client's contracted power, "
                                      "not believed (the client counts as unavailable)", registry=r)
        self.outbox_sent = Counter("mhp_outbox_sent", "Outbox publications (first sends and re-sends)", registry=r)
        self.outcome_batch_size = Histogram(
            "mhp_outcome_batch_size", "Outcomes stored and acknowledged per group commit", registry=r,
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
        )
        self.open_requests = Gauge("mhp_open_requests", "Requests that have not ended", registry=r)
        self.http_rejected = Counter("mhp_http_rejected", "HTTP requests refused", ["status"], registry=r)
        self.replica_forwarded = Counter("mhp_replica_forwarded", "Messages forwarded to another hub replica",
                                         ["kind"], registry=r)
        self.replica_held = Counter("mhp_replica_held", "Outcomes left unacknowledged: their owner replica is "
                                    "offline and the retailer sends them again", registry=r)
        self.replica_adopted = Counter("mhp_replica_adopted", "Open requests adopted from offline replicas",
                                       registry=r)
        self.relay_restarts = Counter("mhp_relay_restarts", "Restarts of the MQTT relay after it failed or stopped",
                                      registry=r)
        self.feed_events = Counter("mhp_feed_events", "Change-feed events stored and published", registry=r)
        self.feed_followers = Gauge("mhp_feed_followers", "Live change-feed followers (SSE streams, webhook "
                                    "workers)", registry=r)
        self.feed_overflows = Counter("mhp_feed_overflows", "Followers whose bounded queue overflowed: their stream "
                                      "was closed, to be resumed with Last-Event-ID", registry=r)
        self.webhook_deliveries = Counter("mhp_webhook_deliveries", "Webhook delivery attempts by result",
                                          ["result"], registry=r)
        self.webhook_dropped = Counter("mhp_webhook_dropped", "Webhook events dropped after the maximum age of "
                                       "retries", registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
