"""Flexibility requests: emergencies, load shifts, two-phase load reductions, and cancelling any request."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cloud_hub import fanout
from cloud_hub.authz import Action, Context, Principal
from cloud_hub.book import OutboxItem, RequestBook
from cloud_hub.errors import Conflict, NotFound, OwnerUnavailable
from cloud_hub.lifecycle import RequestState
from cloud_hub.metrics import HubMetrics
from cloud_hub.replicas import Replicas
from cloud_hub.store import HubStore, RequestCodec
from cloud_hub.timeline import (
    choose_for_reduction,
    reduction_targets,
)
from cloud_hub.usecases.access import Access
from cloud_hub.usecases.creating import NewRequest, RequestCreator
from cloud_hub.usecases.idempotency import Idempotency
from cloud_hub.usecases.results import Accepted, Cancelled
from cloud_hub.usecases.shared import chunks, iso, ts
from mhp_wire.messages import (
    AvailabilityParams,
    Cancel,
    ClientState,
    EmergencyParams,
    LoadReductionParams,
    LoadShiftParams,
    Params,
    Request,
    RequestKind,
    encode,
)

log = logging.getLogger(__name__)

REQUEST_CLIENTS_PER_MESSAGE = fanout.REQUEST_CLIENTS_PER_MESSAGE
"""Client ids per ``request`` message (:data:`cloud_hub.fanout.REQUEST_CLIENTS_PER_MESSAGE`)."""

def reduction_items(request_id: str, by_retailer: dict[str, list[str]], targets: dict[str, float], start: Any,
                     end: float, revision: int) -> list[OutboxItem]:
    """The ``load_reduction`` messages of a load reduction's chosen clients (``by_retailer``), each home asked for
    its own target (:func:`cloud_hub.timeline.reduction_targets`: what it said it could shed, the last one chosen
    only the rest): one message per retailer and target, at the dispatch and at every later revision; each
    message's clients in id order (docs/protocol.md), whatever order ``by_retailer`` gives them in."""
    until = datetime.fromtimestamp(end, UTC)
    items = []
    for rid, all_cids in sorted(by_retailer.items()):
        by_target: dict[float, list[str]] = defaultdict(list)
        for cid in sorted(all_cids):
            by_target[targets[cid]].append(cid)
        for target_kw, same in sorted(by_target.items()):
            params = LoadReductionParams(start=start, end=until, target_kw=target_kw)
            for cids in chunks(same, REQUEST_CLIENTS_PER_MESSAGE):
                msg = Request(request_id=request_id, kind=RequestKind.LOAD_REDUCTION, client_ids=cids,
                              params=params, expires_at=until, revision=revision)
                items.append(OutboxItem(msg.msg_id, request_id, rid, "request", encode(msg), cids,
                                        revision=revision))
    return items



@dataclass(eq=False)
class Flexibility:
    """Emergencies, load shifts and load reductions, their second phase, and cancels."""

    store: HubStore
    book: RequestBook
    metrics: HubMetrics
    access: Access
    idempotency: Idempotency
    creator: RequestCreator
    replicas: Replicas | None = None
    """Set when the hub runs as several replicas: a cancel goes to the replica that owns the request."""

    # -- flexibility requests -------------------------------------------------------------------------------

    async def create_emergency(self, who: Principal, body: dict[str, Any], key: str | None
                               ) -> Accepted:
        """Announce emergency mode to the targeted clients' retailers before it takes effect."""
        start = ts(body["start"])
        end = start + body["duration_s"]
        params = EmergencyParams(start=body["start"], end=datetime.fromtimestamp(end, UTC),
                                 power_limit_kw=body["power_limit_kw"])
        return await self._client_request(who, Action.TRIGGER_EMERGENCY, RequestKind.EMERGENCY, body, key, params,
                                          at=start, deadline=end)

    async def create_load_shift(self, who: Principal, body: dict[str, Any], key: str | None
                                ) -> Accepted:
        """Ask the targeted clients' gateways to move flexible loads out of a window."""
        start, end = ts(body["window_start"]), ts(body["window_end"])
        if end <= start:
            raise ValueError("window_end must be after window_start")
        params = LoadShiftParams(start=body["window_start"], end=body["window_end"], reason=body.get("reason"))
        return await self._client_request(who, Action.TRIGGER_LOAD_SHIFT, RequestKind.LOAD_SHIFT, body, key, params,
                                          at=start, deadline=end)

    async def create_load_reduction(self, who: Principal, body: dict[str, Any], key: str | None
                                    ) -> Accepted:
        """Phase one of a load reduction: ask the retailers which targeted clients are available."""
        start = ts(body["start"])
        end = start + body["duration_s"]
        params = AvailabilityParams(start=body["start"], end=datetime.fromtimestamp(end, UTC),
                                    reduction_kw=body["reduction_kw"])
        return await self._client_request(
            who, Action.TRIGGER_LOAD_REDUCTION, RequestKind.AVAILABILITY, body, key, params, at=start, deadline=end,
            request_type="load_reduction",
            extra={"phase": "availability", "answered": 0})  # its window opens when it is stored (RequestBook)

    # Complexity (PLR0913): the three flexibility requests differ only in these arguments; grouping them would hide
    # which.
    async def _client_request(self, who: Principal, action: Action, kind: RequestKind, body: dict[str, Any],  # noqa: PLR0913
                              key: str | None, params: Params, *, at: float, deadline: float,
                              request_type: str | None = None, extra: dict[str, Any] | None = None
                              ) -> Accepted:
        t0 = time.perf_counter()
        right = await self.access.named(who, action, body.get("client_ids"), body.get("feeder_id"))
        async with self.idempotency.keyed(who, key, body) as slot:
            if slot.answer is not None:
                return Accepted.model_validate(slot.answer)
            return await self._new_client_request(who, action, kind, body, key, params, at=at, deadline=deadline,
                                                  request_type=request_type, extra=extra, right=right, t0=t0,
                                                  request_id=slot.request_id)

    # Complexity (PLR0913): the three flexibility requests differ only in these arguments; grouping them would hide
    # which.
    async def _new_client_request(self, who: Principal, action: Action, kind: RequestKind, body: dict[str, Any],  # noqa: PLR0913
                                  key: str | None, params: Params, *, at: float, deadline: float,
                                  request_type: str | None, extra: dict[str, Any] | None, right: str, t0: float,
                                  request_id: str) -> Accepted:
        if deadline <= time.time():
            raise ValueError("the request would already be over: its end is in the past")
        client_ids = await self.creator.targets(body)
        suppliers = await self.access.known_suppliers(client_ids, at, power=kind is RequestKind.AVAILABILITY)
        by_retailer: dict[str, list[str]] = defaultdict(list)
        unsupplied = []
        for cid in client_ids:
            rid = suppliers[cid][0]
            if rid is None:
                unsupplied.append(cid)
            else:
                by_retailer[rid].append(cid)
        if unsupplied:
            raise Conflict(f"no retailer supplies {', '.join(unsupplied[:20])} at {iso(at)}")
        expires = datetime.fromtimestamp(deadline, UTC)
        max_kw = None
        if kind is RequestKind.AVAILABILITY:  # the bound of each client's availability claim (cloud_hub.book)
            max_kw = {cid: suppliers[cid][1] for cid in client_ids}
        # The plan: a large request is answered after one write of it, its clients' entries, audit lines and request
        # messages written right after (cloud_hub.fanout); the book stores a small one whole in its one write.
        plan = fanout.make_plan(dict(by_retailer), (kind, params.model_dump(mode="json"), expires),
                                (str(who), action.value, right, time.time()), max_kw)
        return await self.creator.create(who, key, NewRequest(
            request_id, request_type or kind.value, body, deadline, t0, plan=plan,
            extra={**(extra or {}), "targets": fanout.targets(plan)}))

    async def finish_availability(self, request_id: str) -> None:
        """Phase two of a load reduction: disconnect the most available clients until the reduction is covered."""
        async with self.book.lock(request_id):
            req = await self.store.get_request(request_id, RequestCodec.WHOLE)
            if req is None or req["meta"].get("phase") != "availability":
                await self.book.finish_phase(request_id)
                return
            meta = req["meta"]
            available = {cid: e.get("available_kw", 0.0) for cid, e in req["clients"].items()
                         if e.get("availability") == "available"}
            chosen = choose_for_reduction(available, meta["body"]["reduction_kw"])
            now = time.time()
            put: dict[str, Any] = {}
            counts: dict[str, int] = defaultdict(int)
            by_retailer: dict[str, list[str]] = defaultdict(list)
            for cid, e in req["clients"].items():
                if cid in chosen:
                    rid = next(iter(e["retailers"]))
                    e["retailers"][rid] = ClientState.PENDING.value
                    e["state"] = ClientState.PENDING.value
                    e["revision"] = meta.get("revision", 1)
                    by_retailer[rid].append(cid)
                elif not ClientState(e["state"]).terminal:  # a refused client keeps its state
                    answer = e.get("availability")
                    e["state"] = answer if answer in ("available", "unavailable") else ClientState.UNREACHABLE.value
                    if answer is None:
                        e["detail"] = {"reason": "no availability answer within respond_within_s"}
                e["updated_at"] = now
                counts[e["state"]] += 1
                put[RequestCodec.client(cid)] = e
            selected_kw = round(sum(available[c] for c in chosen), 3)
            targets = reduction_targets(available, chosen, meta["body"]["reduction_kw"])
            items = reduction_items(request_id, by_retailer, targets, meta["body"]["start"], meta["deadline"],
                                     meta.get("revision", 1))
            put.update(RequestCodec.fields({"phase": "dispatch", "counts": dict(counts),
                                            "selection": {"chosen": chosen, "selected_kw": selected_kw,
                                                          "reduction_kw": meta["body"]["reduction_kw"],
                                                          "covered": selected_kw >= meta["body"]["reduction_kw"]}}))
            if not chosen:  # the available answers cover nothing: nothing was reduced
                put.update(RequestCodec.fields({"state": RequestState.FAILED.value, "completed_at": now,
                                                "phase": "done"}))
            await self.book.finish_phase(request_id, put, items if chosen else ())

    async def cancel(self, who: Principal, request_id: str, forwarded: bool = False) -> Cancelled:
        """Cancel a request that has not ended; every retailer it was sent to is told, and so every home.
        On a replica that does not own the request, the owner does it (``forwarded``: asked by another replica)."""
        req = await self.store.get_request(request_id, RequestCodec.WHOLE)
        if req is None:
            raise NotFound(f"request {request_id!r} does not exist")
        self.access.authorize(who, Action.CANCEL_REQUEST, Context(issuer=req["meta"]["issuer"]))
        owner = req["meta"].get("owner")
        if self.replicas is not None and owner != self.replicas.me:
            if forwarded or owner is None:
                raise OwnerUnavailable(f"request {request_id} is changing owner replica; retry shortly")
            # The owner's refusal comes back as the same HubError (cloud_hub.errors), raised by forward_cancel.
            return Cancelled.model_validate(await self.replicas.forward_cancel(owner, str(who), request_id))
        if self.replicas is not None:
            self.replicas.check_ready()

        def messages(reached: dict[str, list[str]]) -> list[OutboxItem]:
            msgs = [(rid, Cancel(request_id=request_id, client_ids=cids)) for rid, cids in sorted(reached.items())]
            return [OutboxItem(m.msg_id, request_id, rid, "cancel", encode(m), []) for rid, m in msgs]

        before, kind, told = await self.book.cancel(request_id, messages, time.time())
        if before.terminal:
            raise Conflict(f"request {request_id} has already ended ({before.value})")
        self.metrics.requests_finished.labels(str(kind), "cancelled").inc()
        return Cancelled(request_id=request_id, state=RequestState.CANCELLED.value, cancel_sent_to=told)

    async def owner_cancel(self, principal: str, request_id: str) -> dict[str, Any]:
        """The owner's side of a cancel forwarded by another replica (:data:`cloud_hub.replicas.CancelHandler`):
        the answer, or the :class:`cloud_hub.errors.HubError` raised, goes back to the asking replica as it is."""
        return (await self.cancel(Principal.parse(principal), request_id, forwarded=True)).model_dump()

