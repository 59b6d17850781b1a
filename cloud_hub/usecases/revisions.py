"""Revisions of a request: a new numbered revision merged, validated and delivered like the first."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cloud_hub.authz import Action, Context, Principal
from cloud_hub.book import OutboxItem, RequestBook
from cloud_hub.errors import Conflict, InvalidBody, NotFound, OwnerUnavailable
from cloud_hub.lifecycle import RequestState, request_state_from_counts
from cloud_hub.replicas import Replicas
from cloud_hub.store import AuditEntry, HubStore, RequestCodec
from cloud_hub.timeline import (
    reduction_targets,
    supplier_at,
)
from cloud_hub.usecases.access import Access
from cloud_hub.usecases.creating import RequestCreator
from cloud_hub.usecases.flexibility import REQUEST_CLIENTS_PER_MESSAGE, reduction_items
from cloud_hub.usecases.idempotency import Idempotency, body_hash
from cloud_hub.usecases.results import Revised
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

"""``(request type, body) -> body``: a whole request body validated as the creating POST validates it (raises
:class:`InvalidBody`); the HTTP layer owns the body models."""

BodyValidator = Callable[[str, dict[str, Any]], dict[str, Any]]
"""``(request type, body) -> body``: a whole request body validated as the creating POST validates it (raises
:class:`InvalidBody`); the HTTP layer owns the body models."""

REVISABLE: dict[str, frozenset[str]] = {
    "emergency": frozenset({"power_limit_kw", "start", "duration_s", "client_ids", "feeder_id"}),
    "load_shift": frozenset({"window_start", "window_end", "reason", "client_ids", "feeder_id"}),
    "load_reduction": frozenset({"reduction_kw", "start", "duration_s"}),
}
"""The fields a revision may change, per request type (docs/decisions.md, "Revisions")."""
REVISABLE_AFTER_SELECTION = frozenset({"start", "duration_s"})
"""A load reduction whose clients are chosen: only its window may change (the choice rests on ``reduction_kw``)."""
REVISION_HISTORY_MAX = 20
"""Earlier revisions' outcomes kept per client."""


def _revised_history(entry: dict[str, Any]) -> None:
    """Keep where a client stood in the revision a new one replaces."""
    if entry.get("state") == ClientState.PENDING.value and not entry.get("detail"):
        return
    entry["history"] = [*entry.get("history", []), {
        "revision": entry.get("revision", 1), "state": entry["state"], "detail": entry.get("detail", {}),
        "updated_at": entry.get("updated_at")}][-REVISION_HISTORY_MAX:]


def _wire_kind(kind: str) -> RequestKind:
    return {"emergency": RequestKind.EMERGENCY, "load_shift": RequestKind.LOAD_SHIFT}.get(
        kind, RequestKind.LOAD_REDUCTION)


def _revised_params(kind: str, phase: str | None, body: dict[str, Any]) -> tuple[float, float, Params]:
    """``(start, end, params)`` of a revised request's validated ``body``, as its creation derives them."""
    if kind == "load_shift":
        start, end = ts(body["window_start"]), ts(body["window_end"])
        if end <= start:
            raise InvalidBody([{"field": "window_end", "message": "window_end must be after window_start"}])
        return start, end, LoadShiftParams(start=body["window_start"], end=body["window_end"],
                                           reason=body.get("reason"))
    start = ts(body["start"])
    end = start + body["duration_s"]
    until = datetime.fromtimestamp(end, UTC)
    if kind == "emergency":
        return start, end, EmergencyParams(start=body["start"], end=until, power_limit_kw=body["power_limit_kw"])
    if phase == "availability":
        return start, end, AvailabilityParams(start=body["start"], end=until, reduction_kw=body["reduction_kw"])
    # Not sent as it is: each chosen home is sent its own target (:func:`_reduction_items`).
    return start, end, LoadReductionParams(start=body["start"], end=until, target_kw=body["reduction_kw"])



@dataclass(eq=False)
class Revisions:
    """Revising emergencies, load shifts and load reductions that have not ended."""

    store: HubStore
    book: RequestBook
    access: Access
    idempotency: Idempotency
    creator: RequestCreator
    replicas: Replicas | None = None

    # -- revisions ------------------------------------------------------------------------------------------

    async def revise(self, who: Principal, request_id: str, changes: dict[str, Any], key: str | None,
                     validate: BodyValidator) -> Revised:
        """A new numbered revision of an emergency, load shift or load reduction: ``changes`` (the fields that
        change) merged into the stored body, validated by ``validate`` as a new request of that type would be,
        and delivered through the same outboxes; clients the revision removes get a cancel, added ones the
        request (docs/decisions.md, "Revisions"). Honours ``Idempotency-Key`` as the creating POSTs do."""
        req = await self.store.get_request(request_id, RequestCodec.META)
        if req is None:
            raise NotFound(f"request {request_id!r} does not exist")
        meta = req["meta"]
        right = self.access.authorize(who, Action.REVISE_REQUEST, Context(issuer=meta["issuer"]))
        if self.replicas is not None:
            if meta.get("owner") != self.replicas.me:
                raise OwnerUnavailable(f"request {request_id} is revised by the replica that owns it; retry shortly")
            self.replicas.check_ready()
        keyed = {"revise": request_id, **changes}
        async with self.idempotency.keyed(who, key, keyed) as slot:
            if slot.answer is not None:
                return Revised.model_validate(slot.answer)
            idem = (str(who), key, body_hash(keyed)) if key else None
            return await self._revise(who, request_id, changes, validate, right, idem)

    # Complexity (C901, PLR0912, PLR0915): one revision under the request's lock: its checks, then one atomic write;
    # split with RequestBook's interface (issue 15 item 2, on its own branch).
    async def _revise(self, who: Principal, request_id: str, changes: dict[str, Any], validate: BodyValidator,  # noqa: C901, PLR0912, PLR0915
                      right: str, idem: tuple[str, str, str] | None) -> Revised:
        async with self.book.lock(request_id):
            req = await self.store.get_request(request_id, RequestCodec.WITH_CLIENTS)
            assert req is not None  # a request row is never deleted
            meta, entries = req["meta"], req["clients"]
            kind, state, now = meta["type"], RequestState(meta["state"]), time.time()
            if kind not in REVISABLE:
                raise Conflict(f"a {kind} request cannot be revised")
            if state in (RequestState.CANCELLED, RequestState.EXPIRED) or meta["deadline"] <= now:
                why = state.value if state in (RequestState.CANCELLED, RequestState.EXPIRED) else "its window is over"
                raise Conflict(f"request {request_id} has ended ({why}): it cannot be revised")
            phase = meta.get("phase")
            if kind == "load_reduction" and phase != "availability":
                phase = "dispatch"  # its clients were chosen (a finished one has a selection too)
            allowed = REVISABLE[kind] if phase != "dispatch" else REVISABLE_AFTER_SELECTION
            refused = [f for f in changes if f not in allowed]
            if refused:
                why = ("the clients were chosen on the stored reduction" if kind == "load_reduction" and phase ==
                       "dispatch" else f"a {kind} revision may change only {', '.join(sorted(allowed))}")
                raise InvalidBody([{"field": f, "message": f"cannot be revised: {why}"} for f in sorted(refused)])
            merged = {**meta["body"], **changes}
            for one, other in (("client_ids", "feeder_id"), ("feeder_id", "client_ids")):
                if one in changes:
                    merged.pop(other, None)
            body = validate(kind, merged)
            revision = int(meta.get("revision", 1)) + 1
            start, end, params = _revised_params(kind, phase, body)
            if end <= now:
                raise ValueError("the revised request would already be over: its end is in the past")
            live = {cid for cid, e in entries.items() if not e.get("removed")}
            targets: list[str] = []
            added: list[str] = []
            removed: list[str] = []
            if phase == "dispatch":
                targets = sorted(set((meta.get("selection") or {}).get("chosen", [])) & live)
            elif phase != "availability":  # (in that phase nothing is sent: the answers stand, and the selection
                retarget = {"client_ids", "feeder_id"} & set(changes)
                targets = await self.creator.targets(body) if retarget else sorted(live)  # in id order, both
                added = [c for c in targets if c not in entries or entries[c].get("removed")]
                removed = sorted(live - set(targets))  # uses the revised reduction_kw)
            # Every client the revision is sent to now (or, in the availability phase, at the dispatch) is looked up
            # as at creation: its supplier at the revised start. A kept client supplied then by another retailer than
            # the one the request went to is a conflict: the revision is not re-routed (docs/decisions.md).
            added_set = set(added)
            kept = [c for c in (sorted(live) if phase == "availability" else targets) if c not in added_set]
            supplier: dict[str, str | None] = {}
            if added or kept:
                known = await self.access.known_clients([*added, *kept])
                supplier = {cid: supplier_at(known[cid]["suppliers"], start) for cid in [*added, *kept]}
                unsupplied = [cid for cid, rid in supplier.items() if rid is None]
                if unsupplied:
                    raise Conflict(f"no retailer supplies {', '.join(unsupplied[:20])} at {iso(start)}")
                moved = [f"{cid} (sent to {was}, supplied by {supplier[cid]} then)" for cid in kept
                         if supplier[cid] != (was := next(iter(entries[cid]["retailers"])))]
                if moved:
                    raise Conflict(f"the revision would move {len(moved)} client(s) to another retailer at "
                                   f"{iso(start)}: {', '.join(moved[:20])}; a revision keeps each client's "
                                   f"retailer: cancel the request and create a new one")
            put: dict[str, Any] = {}
            counts = Counter({ClientState(k): v for k, v in (meta.get("counts") or {}).items()})
            by_retailer: dict[str, list[str]] = defaultdict(list)
            cancels: dict[str, list[str]] = defaultdict(list)
            for cid in targets:
                e = entries.get(cid)
                if e is None or e.get("removed"):
                    rid = supplier[cid]
                    assert rid is not None
                    if e is not None:
                        _revised_history(e)
                    e = {"retailers": {}, "state": ClientState.PENDING.value, "detail": {}, "trace": {},
                         "history": (e or {}).get("history", [])}
                    counts[ClientState.PENDING] += 1
                else:
                    rid = next(iter(e["retailers"]))
                    _revised_history(e)
                    counts[ClientState(e["state"])] -= 1
                    counts[ClientState.PENDING] += 1
                e.update({"retailers": {rid: ClientState.PENDING.value}, "state": ClientState.PENDING.value,
                          "detail": {}, "trace": {}, "updated_at": now, "revision": revision})
                put[RequestCodec.client(cid)] = e
                by_retailer[rid].append(cid)
            for cid in removed:
                e = entries[cid]
                _revised_history(e)
                counts[ClientState(e["state"])] -= 1
                for rid in e["retailers"]:  # pending or not: it may be at the broker already (see cancel)
                    cancels[rid].append(cid)
                e.update({"state": ClientState.CANCELLED.value, "updated_at": now, "revision": revision,
                          "removed": revision, "detail": {"reason": f"removed from the request by revision "
                                                                     f"{revision}"}})
                put[RequestCodec.client(cid)] = e
            items = []
            expires = datetime.fromtimestamp(end, UTC)
            if phase == "dispatch":  # the chosen homes keep their own targets (in the order chosen): the window moves
                selection: dict[str, Any] = meta.get("selection") or {}
                sent_to = set(targets)
                chosen = [c for c in selection.get("chosen", []) if c in sent_to]
                available = {c: float(entries[c].get("available_kw") or 0.0) for c in chosen}
                # (reduction_kw cannot change in this phase: the body's is the one the selection rests on)
                shares = reduction_targets(available, chosen, float(body["reduction_kw"]))
                items = reduction_items(request_id, by_retailer, shares, body["start"], end, revision)
            else:
                for rid, all_cids in sorted(by_retailer.items()):
                    for cids in chunks(all_cids, REQUEST_CLIENTS_PER_MESSAGE):
                        msg = Request(request_id=request_id, kind=_wire_kind(kind), client_ids=cids, params=params,
                                      expires_at=expires, revision=revision)
                        items.append(OutboxItem(msg.msg_id, request_id, rid, "request", encode(msg), cids,
                                                revision=revision))
            for rid, cids in sorted(cancels.items()):
                notice = Cancel(request_id=request_id, client_ids=cids, revision=revision)
                items.append(OutboxItem(notice.msg_id, request_id, rid, "removal", encode(notice), []))
            history = meta.get("revisions") or [{"revision": 1, "at": meta["created_at"], "request": meta["body"]}]
            body_json = json.loads(json.dumps(body, default=str))
            history = [*history, {"revision": revision, "at": now, "by": str(who), "request": body_json,
                                  "changes": json.loads(json.dumps(changes, default=str)),
                                  "added": added, "removed": removed}]
            counts = Counter({k: v for k, v in counts.items() if v > 0})
            new_state = RequestState.DISPATCHING if targets or phase == "availability" else (
                request_state_from_counts(RequestState.DISPATCHING, counts))
            put.update(RequestCodec.fields({"body": body_json, "revision": revision, "revisions": history,
                                            "deadline": end, "state": new_state.value,
                                            "counts": {k.value: v for k, v in counts.items()}, "completed_at": None}))
            if kind == "load_reduction":
                put[RequestCodec.meta("phase")] = phase
            else:
                put[RequestCodec.meta("phase")] = None
                put[RequestCodec.meta("targets")] = len(targets)
            answer = {"request_id": request_id, "revision": revision, "state": new_state.value}
            audit = [AuditEntry(str(who), cid, Action.REVISE_REQUEST.value, right, ref=request_id, at=now)
                     for cid in sorted({*targets, *removed})]
            owner = self.replicas.me if self.replicas is not None else None
            await self.book.replace_messages(  # the queued requests of the earlier revision are replaced
                request_id, put, items, lambda i: i.kind == "request", deadline=end,
                reduction_kw=body.get("reduction_kw"), audit=audit, reopen=(end, owner),
                idempotency=(*idem, 202, answer) if idem else None)
        log.info("request %s revised to revision %d by %s (%d client(s) sent it, %d removed)", request_id, revision,
                 who, len(targets), len(removed))
        return Revised.model_validate(answer)

