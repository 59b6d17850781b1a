"""Storing a new request of any use case: its row, its outbox, its audit and its idempotent answer, in one write."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cloud_hub import codec
from cloud_hub.authz import Principal
from cloud_hub.book import OutboxItem, RequestBook
from cloud_hub.errors import NotFound
from cloud_hub.lifecycle import RequestState
from cloud_hub.metrics import HubMetrics
from cloud_hub.replicas import Replicas
from cloud_hub.storage import Mutation
from cloud_hub.store import AuditEntry, HubStore
from cloud_hub.usecases.idempotency import body_hash
from cloud_hub.usecases.results import Accepted

log = logging.getLogger(__name__)


@dataclass(slots=True)
class NewRequest:
    """Everything a new request is stored with, in one write."""

    request_id: str
    kind: str
    """The request's ``type`` (``emergency``, ``billing``, ``customers``, ...)."""
    body: dict[str, Any]
    """The validated body it was created from (its issuer sees it in the GET)."""
    deadline: float
    t0: float
    """``time.perf_counter()`` when the use case began (the request's ``hub_ms``)."""
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    outbox: list[OutboxItem] = field(default_factory=list)
    parties: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Retailers addressed as a whole (a tariff, a customers announcement), not through clients."""
    audit: list[AuditEntry] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """More cells of the request row (``version``, ``phase``, ``targets``, ...)."""
    mutations: Sequence[Mutation] = ()
    """Other rows written in the same batch (a registration's client rows)."""
    plan: dict[str, Any] | None = None
    """Accepted compactly, its clients' entries and audit lines written right after (:mod:`cloud_hub.fanout`);
    ``clients`` and ``audit`` are then empty."""


class RequestCreator:
    """Stores new requests through the book, and finds a request's targets."""

    def __init__(self, store: HubStore, book: RequestBook, metrics: HubMetrics, replicas: Replicas | None = None
                 ) -> None:
        self.store = store
        self.book = book
        self.metrics = metrics
        self.replicas = replicas

    async def create(self, who: Principal, key: str | None, new: NewRequest) -> Accepted:
        """Store ``new`` (row, outbox, audit and, under ``key``, the idempotent answer) in one write: once this
        returns, the request is durable and will be delivered."""
        if self.replicas is not None:
            self.replicas.check_ready()
        now = time.time()
        answer = {"request_id": new.request_id, "state": RequestState.ACCEPTED.value}
        meta = {"type": new.kind, "issuer": str(who), "body": codec.loads(codec.dumps(new.body)),
                "created_at": now, "deadline": new.deadline,
                "hub_ms": round((time.perf_counter() - new.t0) * 1000, 3), **new.extra}
        idem = (str(who), key, body_hash(new.body), 202, answer) if key else None
        await self.book.create(new.request_id, meta, new.clients, new.outbox, new.parties, new.audit, idem,
                               new.mutations, plan=new.plan)
        self.metrics.requests_created.labels(new.kind).inc()
        self.metrics.accept_seconds.labels(new.kind).observe(time.perf_counter() - new.t0)
        return Accepted.model_validate(answer)

    async def targets(self, body: dict[str, Any]) -> list[str]:
        """The request's clients, each once and in id order, whatever order the DSO listed them in: every request
        message lists its clients so (docs/protocol.md), and the homes answer about in that order, which is the
        order of the request row's keys (docs/decisions.md, "Request messages list their clients in id order")."""
        if body.get("client_ids"):
            return sorted(dict.fromkeys(body["client_ids"]))
        feeder = body.get("feeder_id")
        if feeder:
            found = await self.store.clients_on_feeder(feeder)
            if not found:
                raise NotFound(f"no client is registered on feeder {feeder!r}")
            return sorted(found)  # a key scan's order already: one pass
        raise ValueError("give client_ids or feeder_id")

