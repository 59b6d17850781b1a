"""Use cases of the hub, between the HTTP layer and the store: authorization first, then the work."""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from cloud_hub.authz import Action, Context, Principal, decide
from cloud_hub.lifecycle import RequestState
from cloud_hub.metrics import HubMetrics
from cloud_hub.relay import HubRelay
from cloud_hub.store import AuditEntry, HubStore, NewRequest
from mhp_wire.messages import EmergencyParams, Request, RequestKind, encode, new_id


class Forbidden(Exception):
    """The principal may not do this (HTTP 403)."""


class NotFound(Exception):
    """An id names nothing (HTTP 404)."""


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` was reused with a different body (HTTP 409)."""


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def body_hash(body: dict[str, Any]) -> str:
    """A stable hash of a request body, to tell an idempotent retry from a reused key."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class HubService:
    """The hub's use cases."""

    def __init__(self, store: HubStore, relay: HubRelay, metrics: HubMetrics) -> None:
        self.store = store
        self.relay = relay
        self.metrics = metrics

    def authorize(self, who: Principal, action: Action, ctx: Context | None = None) -> str:
        """Raise :class:`Forbidden` unless allowed; returns the right the permission rests on."""
        verdict = decide(who, action, ctx)
        if not verdict.allowed:
            raise Forbidden(verdict.reason)
        return verdict.right

    async def put_retailer(self, who: Principal, retailer_id: str, name: str) -> bool:
        """Register or rename a retailer."""
        self.authorize(who, Action.MANAGE_RETAILER)
        return await self.store.put_retailer(retailer_id, name)

    async def put_client(self, who: Principal, client_id: str, body: dict[str, Any]) -> bool:
        """Register a client or change it (a new retailer with a later ``valid_from`` is a supplier switch)."""
        right = self.authorize(who, Action.MANAGE_CLIENT)
        if await self.store.get_retailer(body["retailer_id"]) is None:
            raise NotFound(f"retailer {body['retailer_id']!r} is not registered")
        valid_from: datetime | None = body.get("valid_from")
        created = await self.store.put_client(
            client_id, body["retailer_id"], body["contracted_power_kw"], body.get("feeder_id"),
            valid_from.timestamp() if valid_from else time.time(),
        )
        await self.store.audit([AuditEntry(str(who), client_id, "manage_client", right)])
        return created

    async def get_client(self, who: Principal, client_id: str) -> dict[str, Any]:
        """A client with its supplier history, for the DSO or its current retailer."""
        client = await self.store.get_client(client_id)
        if client is None:
            raise NotFound(f"client {client_id!r} is not registered")
        now = time.time()
        current = next((p["retailer_id"] for p in reversed(client["suppliers"]) if p["valid_from"] <= now), None)
        try:
            right = self.authorize(who, Action.READ_CLIENT, Context(supplier_at_time=current))
        except Forbidden:
            await self.store.audit([AuditEntry(str(who), client_id, "read_client", "none", allowed=False)])
            raise
        await self.store.audit([AuditEntry(str(who), client_id, "read_client", right)])
        return {
            "client_id": client_id,
            "retailer_id": current,
            "contracted_power_kw": client["contracted_power_kw"],
            "feeder_id": client["feeder_id"],
            "suppliers": [
                {"retailer_id": p["retailer_id"], "valid_from": _iso(p["valid_from"])} for p in client["suppliers"]
            ],
        }

    async def create_emergency(
        self, who: Principal, body: dict[str, Any], idempotency_key: str | None
    ) -> tuple[int, dict[str, Any]]:
        """Accept an emergency: resolve its clients, address each to its supplier at ``start``, store, dispatch.

        Returns ``(status, answer)``; a retry with the same ``Idempotency-Key`` returns the first answer.
        """
        t0 = time.perf_counter()
        right = self.authorize(who, Action.TRIGGER_EMERGENCY)
        digest = body_hash(body)
        if idempotency_key:
            earlier = await self.store.idempotent_answer(str(who), idempotency_key)
            if earlier is not None:
                if earlier[0] != digest:
                    raise IdempotencyConflict(
                        f"Idempotency-Key {idempotency_key!r} was already used with a different body"
                    )
                return earlier[1], earlier[2]
        start: datetime = body["start"]
        end = start + timedelta(seconds=body["duration_s"])
        client_ids = await self._targets(body)
        suppliers = await self.store.suppliers_at(client_ids, start.timestamp())
        unknown = sorted(set(client_ids) - set(suppliers))
        if unknown:
            raise NotFound(f"unknown client(s): {', '.join(unknown[:20])}")
        unsupplied = sorted(c for c, r in suppliers.items() if r is None)
        if unsupplied:
            raise NotFound(f"client(s) with no retailer at {start.isoformat()}: {', '.join(unsupplied[:20])}")
        by_retailer: dict[str, list[str]] = defaultdict(list)
        for cid in client_ids:
            rid = suppliers[cid]
            assert rid is not None
            by_retailer[rid].append(cid)
        request_id = new_id()
        params = EmergencyParams(start=start, end=end, power_limit_kw=body["power_limit_kw"])
        outbox = []
        for rid, cids in sorted(by_retailer.items()):
            msg = Request(request_id=request_id, kind=RequestKind.EMERGENCY, client_ids=cids, params=params,
                          expires_at=end)
            outbox.append((msg.msg_id, rid, encode(msg)))
        now = time.time()
        answer = {"request_id": request_id, "state": RequestState.ACCEPTED.value}
        stored_body = {**body, "start": start.isoformat(), "client_ids": client_ids}
        req = NewRequest(
            request_id=request_id, type="emergency", issuer=str(who), body=stored_body, created_at=now,
            deadline=end.timestamp(), clients=[(c, suppliers[c] or "") for c in client_ids], outbox=outbox,
            audit=[AuditEntry(str(who), c, "trigger_emergency", right, ref=request_id, at=now) for c in client_ids],
            hub_ms=(time.perf_counter() - t0) * 1000,
            idempotency=(str(who), idempotency_key, digest, 202, answer) if idempotency_key else None,
        )
        t_store = time.perf_counter()
        await self.store.create_request(req)
        self.relay.storage_ms[request_id] = (time.perf_counter() - t_store) * 1000
        self.relay.kick()
        self.metrics.requests_created.labels("emergency").inc()
        self.metrics.accept_seconds.labels("emergency").observe(time.perf_counter() - t0)
        return 202, answer

    async def _targets(self, body: dict[str, Any]) -> list[str]:
        if body.get("client_ids"):
            return list(dict.fromkeys(body["client_ids"]))
        feeder = body.get("feeder_id")
        if feeder:
            found = await self.store.clients_on_feeder(feeder)
            if not found:
                raise NotFound(f"no client is registered on feeder {feeder!r}")
            return found
        raise ValueError("give client_ids or feeder_id")

    async def get_request(self, who: Principal, request_id: str) -> dict[str, Any]:
        """A request as its issuer sees it: state, per-retailer and per-client progress, per-component trace."""
        req = await self.store.get_request(request_id)
        if req is None:
            raise NotFound(f"request {request_id!r} does not exist")
        self.authorize(who, Action.READ_REQUEST, Context(issuer=req["issuer"]))
        retailers: dict[str, dict[str, Any]] = {}
        clients: dict[str, dict[str, Any]] = {}
        sums: dict[str, list[float]] = defaultdict(list)
        for c in req["clients"]:
            r = retailers.setdefault(c["retailer_id"], {"clients": 0, "states": {}})
            r["clients"] += 1
            r["states"][c["state"]] = r["states"].get(c["state"], 0) + 1
            clients[c["client_id"]] = {"state": c["state"], "retailer_id": c["retailer_id"], "detail": c["detail"],
                                       "trace": c["trace"], "updated_at": _iso(c["updated_at"])}
            for k in ("retailer_ms", "gateway_ms", "total_ms"):
                if k in c["trace"]:
                    sums[k].append(float(c["trace"][k]))
        storage_ms = self.relay.storage_ms.get(request_id, req["storage_ms"])
        trace: dict[str, Any] = {"hub_ms": round(req["hub_ms"], 3), "storage_ms": round(storage_ms, 3)}
        if req["first_dispatch_at"] is not None:
            trace["dispatch_ms"] = round((req["first_dispatch_at"] - req["created_at"]) * 1000, 3)
        for k, values in sums.items():
            trace[k] = round(sum(values) / len(values), 3)
            trace[k.replace("_ms", "_max_ms")] = round(max(values), 3)
        if req["completed_at"] is not None:
            trace["completion_ms"] = round((req["completed_at"] - req["created_at"]) * 1000, 3)
        return {
            "request_id": request_id,
            "type": req["type"],
            "state": req["state"],
            "created_at": _iso(req["created_at"]),
            "completed_at": _iso(req["completed_at"]),
            "request": req["body"],
            "retailers": retailers,
            "clients": clients,
            "trace": trace,
        }
