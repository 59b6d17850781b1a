"""The hub's use cases put together: one object per use case (``cloud_hub/usecases/``), each given its
collaborators through its constructor. The HTTP routes and the MQTT relay reach the use cases through
:class:`HubService`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cloud_hub.book import RequestBook
from cloud_hub.errors import Forbidden, IdempotencyConflict, InvalidBody, KeyInProgress, NotFound
from cloud_hub.metrics import HubMetrics
from cloud_hub.replicas import Replicas
from cloud_hub.store import HubStore
from cloud_hub.usecases.access import Access
from cloud_hub.usecases.creating import RequestCreator
from cloud_hub.usecases.data import ClientData
from cloud_hub.usecases.flexibility import REQUEST_CLIENTS_PER_MESSAGE, Flexibility
from cloud_hub.usecases.idempotency import Idempotency
from cloud_hub.usecases.registry import Registry
from cloud_hub.usecases.revisions import Revisions
from cloud_hub.usecases.shared import iso
from cloud_hub.usecases.tariffs import Tariffs, tariff_message
from cloud_hub.usecases.views import RequestViews

__all__ = ["REQUEST_CLIENTS_PER_MESSAGE", "Forbidden", "HubService", "IdempotencyConflict", "InvalidBody",
           "KeyInProgress", "NotFound", "iso", "tariff_message"]
"""Names other modules imported from here before the split keep working (the errors live in ``cloud_hub.errors``,
``iso`` in ``cloud_hub.usecases.shared``)."""


@dataclass(frozen=True, slots=True)
class HubService:
    """The hub's use cases: where each rule lives is named by the attribute (and the module of its class)."""

    book: RequestBook
    registry: Registry
    data: ClientData
    tariffs: Tariffs
    flexibility: Flexibility
    revisions: Revisions
    requests: RequestViews
    access: Access

    @classmethod
    def build(cls, store: HubStore, book: RequestBook, metrics: HubMetrics, replicas: Replicas | None = None, *,
              publish_tariff_retained: Callable[[bytes], Awaitable[None]] | None = None) -> HubService:
        """Every use case on ``store`` and ``book``; ``replicas`` when the hub runs as several; the tariff's
        retained publication through ``publish_tariff_retained`` (the relay's; None: the outbox only)."""
        access = Access(store)
        idempotency = Idempotency(store, book, replicas)
        creator = RequestCreator(store, book, metrics, replicas)
        return cls(
            book=book,
            registry=Registry(store, access, creator),
            data=ClientData(store, access, idempotency, creator),
            tariffs=Tariffs(store, access, idempotency, creator, publish_tariff_retained),
            flexibility=Flexibility(store, book, metrics, access, idempotency, creator, replicas),
            revisions=Revisions(store, book, access, idempotency, creator, replicas),
            requests=RequestViews(store, book, access),
            access=access,
        )
