"""Storing a new request of any use case: its row, its outbox, its audit and its idempotent answer, in one write."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

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


class RequestCreator:
    """Stores new requests through the book, and finds a request's targets."""

    def __init__(self, store: HubStore, book: RequestBook, metrics: HubMetrics, replicas: Replicas | None = None
                 ) -> None:
        self.store = store
        self.book = book
        self.metrics = metrics
        self.replicas = replicas

    # Complexity (PLR0913): every part of a new request goes into one atomic write (row, outbox, audit, answer).
    async def create(self, who: Principal, key: str | None, body: dict[str, Any], request_id: str, kind: str,  # noqa: PLR0913
                      deadline: float, clients: dict[str, dict[str, Any]], outbox: list[OutboxItem],
                      parties: dict[str, dict[str, Any]], audit: list[AuditEntry], t0: float,
                      extra: dict[str, Any] | None = None, mutations: Sequence[Mutation] = ()
                      ) -> Accepted:
        if self.replicas is not None:
            self.replicas.check_ready()
        now = time.time()
        answer = {"request_id": request_id, "state": RequestState.ACCEPTED.value}
        meta = {"type": kind, "issuer": str(who), "body": json.loads(json.dumps(body, default=str)),
                "created_at": now, "deadline": deadline, "hub_ms": round((time.perf_counter() - t0) * 1000, 3),
                **(extra or {})}
        idem = (str(who), key, body_hash(body), 202, answer) if key else None
        await self.book.create(request_id, meta, clients, outbox, parties, audit, idem, mutations)
        self.metrics.requests_created.labels(kind).inc()
        self.metrics.accept_seconds.labels(kind).observe(time.perf_counter() - t0)
        return Accepted.model_validate(answer)

    async def targets(self, body: dict[str, Any]) -> list[str]:
        if body.get("client_ids"):
            return list(dict.fromkeys(body["client_ids"]))
        feeder = body.get("feeder_id")
        if feeder:
            found = await self.store.clients_on_feeder(feeder)
            if not found:
                raise NotFound(f"no client is registered on feeder {feeder!r}")
            return found
        raise ValueError("give client_ids or feeder_id")

