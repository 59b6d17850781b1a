"""Retailers and clients: registration, supplier switches announced to the retailers concerned, reading a client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from cloud_hub.authz import Action, Context, Principal, visible_suppliers
from cloud_hub.book import OutboxItem
from cloud_hub.errors import NotFound
from cloud_hub.store import AuditEntry, HubStore
from cloud_hub.timeline import (
    customer_changes,
    supplier_at,
)
from cloud_hub.usecases.access import Access
from cloud_hub.usecases.creating import NewRequest, RequestCreator
from cloud_hub.usecases.results import ClientRegistered
from cloud_hub.usecases.shared import iso, ts
from mhp_wire.messages import (
    ClientState,
    CustomerChange,
    Customers,
    SupplyPeriod,
    encode,
    new_id,
)

log = logging.getLogger(__name__)

CUSTOMERS_DELIVERY_S = 7 * 24 * 3600
"""How long the hub keeps re-sending a ``customers`` message to a retailer that does not acknowledge it (as long
as a broker keeps an offline bridge's session)."""
CUSTOMERS_MESSAGE_BYTES = 200_000
"""A ``customers`` message is cut before it would pass this size (the payload limit is 256 KiB)."""


REGISTER_LOCK_STRIPES = 256
"""Locks serialising registrations of the same client (by a hash of its id)."""

def _customer_messages(items: list[CustomerChange]) -> list[Customers]:
    """``items`` in as few ``customers`` messages as fit the payload limit (and the 1,000 items a message holds)."""
    out: list[Customers] = []
    part: list[CustomerChange] = []
    size = 0
    for item in items:
        n = len(item.model_dump_json()) + 1
        if part and (size + n > CUSTOMERS_MESSAGE_BYTES or len(part) == 1_000):
            out.append(Customers(items=part))
            part, size = [], 0
        part.append(item)
        size += n
    if part:
        out.append(Customers(items=part))
    return out


class Registry:
    """Retailers and clients."""

    def __init__(self, store: HubStore, access: Access, creator: RequestCreator) -> None:
        self.store = store
        self.access = access
        self.creator = creator
        self._register_locks = [asyncio.Lock() for _ in range(REGISTER_LOCK_STRIPES)]
        """Registrations of one client run one at a time (a client maps to one lock: a bounded set, not a map)."""

    # -- registry -----------------------------------------------------------------------------------------

    async def put_retailer(self, who: Principal, retailer_id: str, name: str) -> bool:
        """Register or rename a retailer."""
        self.access.authorize(who, Action.MANAGE_RETAILER)
        return await self.store.put_retailer(retailer_id, name)

    async def put_client(self, who: Principal, client_id: str, body: dict[str, Any]) -> bool:
        """Register a client or change it (a new retailer with a later ``valid_from`` is a supplier switch)."""
        return (await self.register_client(who, client_id, body)).created

    async def register_client(self, who: Principal, client_id: str, body: dict[str, Any]) -> ClientRegistered:
        """:meth:`put_client`, also returning the id of the request that announces the change to the retailers
        (None when the supplier history did not change)."""
        right = await self.access.named(who, Action.MANAGE_CLIENT, [client_id])
        if await self.store.get_retailer(body["retailer_id"]) is None:
            raise NotFound(f"retailer {body['retailer_id']!r} is not registered")
        valid_from = body.get("valid_from")
        created, announced = await self._register(who, [(
            client_id, body["retailer_id"], body["contracted_power_kw"], body.get("feeder_id"),
            ts(valid_from) if valid_from else time.time())])
        await self.store.audit([AuditEntry(str(who), client_id, Action.MANAGE_CLIENT.value, right)])
        return ClientRegistered(created == 1, announced)

    async def put_clients(self, who: Principal, clients: list[dict[str, Any]]) -> dict[str, int]:
        """Register or change many clients at once (a DSO's import), each as :meth:`put_client` would; all or
        nothing: an unknown retailer or a supplier switch without a later ``valid_from`` stores none of them."""
        right = await self.access.named(who, Action.MANAGE_CLIENT, [c["client_id"] for c in clients])
        wanted = sorted({c["retailer_id"] for c in clients})
        unknown = sorted(set(wanted) - await self.store.known_retailers(wanted))
        if unknown:
            raise NotFound(f"retailer(s) not registered: {', '.join(repr(r) for r in unknown[:20])}")
        now = time.time()
        created, _ = await self._register(who, [
            (c["client_id"], c["retailer_id"], c["contracted_power_kw"], c.get("feeder_id"),
             ts(c["valid_from"]) if c.get("valid_from") else now) for c in clients])
        await self.store.audit([AuditEntry(str(who), c["client_id"], Action.MANAGE_CLIENT.value, right)
                                for c in clients])
        return {"created": created, "updated": len(clients) - created}

    async def _register(self, who: Principal, clients: list[tuple[str, str, float, str | None, float]]
                        ) -> tuple[int, str | None]:
        """Store client registrations; when a supplier history changes (a new client, a supplier switch), each
        retailer whose supply changes is told, in the same write, through the outbox: a ``customers`` message
        (re-sent until acknowledged, kept across restarts) with all its periods of those clients. Returns how
        many clients are new and the id of the announcing request (None: nothing to announce).

        Registrations of the same client are serialised in this process (planning reads the stored row and the
        write must follow from what was read: two at once announced contradictory periods with the same revision);
        hub replicas are not serialised with each other (docs/decisions.md, "Review fixes: data")."""
        stripes = sorted({hash(c[0]) % REGISTER_LOCK_STRIPES for c in clients})
        async with contextlib.AsyncExitStack() as held:
            for i in stripes:  # always in the same order: two batches cannot wait for each other
                await held.enter_async_context(self._register_locks[i])
            return await self._register_locked(who, clients)

    async def _register_locked(self, who: Principal, clients: list[tuple[str, str, float, str | None, float]]
                               ) -> tuple[int, str | None]:
        plan = await self.store.plan_clients(clients)
        per_retailer: dict[str, list[CustomerChange]] = defaultdict(list)
        for cid, (before, after) in sorted(plan.history.items()):
            for rid, spans in customer_changes(before, after).items():
                per_retailer[rid].append(CustomerChange(client_id=cid, revision=plan.revisions[cid], periods=[
                    SupplyPeriod(valid_from=datetime.fromtimestamp(f, UTC),
                                 valid_until=None if u is None else datetime.fromtimestamp(u, UTC))
                    for f, u in spans]))
        if not per_retailer:
            await self.store.kv.batch(plan.mutations)
            return plan.created, None
        t0 = time.perf_counter()
        request_id = new_id()
        now = time.time()
        outbox = [OutboxItem(msg.msg_id, request_id, rid, "customers", encode(msg))
                  for rid, items in sorted(per_retailer.items()) for msg in _customer_messages(items)]
        parties = {rid: {"retailers": {rid: ClientState.PENDING.value}, "state": ClientState.PENDING.value,
                         "detail": {"clients": len(items)}, "trace": {}, "updated_at": now}
                   for rid, items in per_retailer.items()}
        body = {"clients": sorted(plan.history)[:100], "client_count": len(plan.history)}
        # The data access log: which retailer is given which client's supply periods, on the right it rests on.
        audit = [AuditEntry(f"retailer:{rid}", item.client_id, "receive_supplier_periods",
                            "retailer:supplier-of-period", ref=request_id, at=now)
                 for rid, items in sorted(per_retailer.items()) for item in items]
        await self.creator.create(who, None, NewRequest(
            request_id, "customers", body, now + CUSTOMERS_DELIVERY_S, t0, outbox=outbox, parties=parties,
            audit=audit, mutations=plan.mutations))
        log.info("supplier changes of %d client(s) announced to %s (request %s)", len(plan.history),
                 ", ".join(sorted(per_retailer)), request_id)
        return plan.created, request_id

    async def get_client(self, who: Principal, client_id: str) -> dict[str, Any]:
        """A client with its supplier history, for the DSO or its current retailer."""
        client = await self.store.get_client(client_id)
        current = None if client is None else supplier_at(client["suppliers"], time.time())
        await self.access.logged(who, Action.READ_CLIENT, client_id, Context(supplier_at_time=current),
                                     exists=client is not None)
        assert client is not None  # an unknown client was answered NotFound above
        return {"client_id": client_id, "retailer_id": current,
                "contracted_power_kw": client["contracted_power_kw"], "feeder_id": client["feeder_id"],
                "suppliers": [{"retailer_id": p["retailer_id"], "valid_from": iso(p["valid_from"])}
                              for p in visible_suppliers(who, client["suppliers"])]}

