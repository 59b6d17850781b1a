"""Requests as their issuer and the retailers concerned see them: the GET, who may follow the change feed."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Any

from cloud_hub.authz import Action, Context, Principal, decide
from cloud_hub.book import RequestBook
from cloud_hub.errors import Forbidden, NotFound
from cloud_hub.store import HubStore, RequestCodec
from cloud_hub.usecases.access import Access
from cloud_hub.usecases.shared import iso

log = logging.getLogger(__name__)


TRACE_PER_CLIENT = ("retailer_ms", "gateway_ms", "total_ms")
"""Per-client timings a request's trace gives as a mean and a maximum over its clients."""


class _Stamps(dict[float, str | None]):
    """:func:`iso` of the times of one view, each formatted once: the clients of one outcome batch share one
    ``updated_at`` (the hub's time of that commit), so a view of 10,000 clients holds a few dozen distinct times."""

    def __missing__(self, ts: float) -> str | None:
        text = self[ts] = iso(ts)
        return text


def _client_view(c: dict[str, Any], stamps: _Stamps | None = None) -> dict[str, Any]:
    """One client of a request, as its issuer sees it (``stamps``: the view's times already formatted)."""
    updated_at = c["updated_at"]
    view = {"state": c["state"], "retailer_id": next(iter(c["retailers"])), "retailers": c["retailers"],
            "detail": c.get("detail", {}), "trace": c.get("trace", {}),
            "updated_at": iso(updated_at) if stamps is None or updated_at is None else stamps[updated_at]}
    if "available_kw" in c:
        view["available_kw"] = c["available_kw"]
    if "revision" in c:  # a revised request: the revision this state answers, and the earlier ones
        view["revision"] = c["revision"]
        view["history"] = [{**h, "updated_at": iso(h.get("updated_at"))} for h in c.get("history", [])]
    if "superseded" in c:  # an ``unreachable`` the home's own later outcome replaced (docs/api.md)
        view["superseded"] = [{**h, "updated_at": iso(h.get("updated_at")), "at": iso(h.get("at"))}
                              for h in c["superseded"]]
    return view


def _progress(req: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]],
                                            dict[str, list[float]]]:
    """Per retailer (its clients' states, or its own state as a party) and per client, and the per-client
    timings of :data:`TRACE_PER_CLIENT` collected."""
    retailers: dict[str, dict[str, Any]] = {}
    clients: dict[str, dict[str, Any]] = {}
    sums: dict[str, list[float]] = defaultdict(list)
    stamps = _Stamps()
    ordered = sorted(req["clients"].items())
    # Each retailer's clients by state, counted in C; a Counter keeps the order in which each pair first appears,
    # so the retailers and their states are listed as a count client by client lists them.
    for (rid, state), n in Counter([(rid, c["state"]) for _, c in ordered for rid in c["retailers"]]).items():
        r = retailers.setdefault(rid, {"clients": 0, "states": {}})
        r["clients"] += n
        r["states"][state] = n
    for cid, c in ordered:
        clients[cid] = _client_view(c, stamps)
        trace = c.get("trace")
        if trace:
            for k in TRACE_PER_CLIENT:
                if k in trace:
                    sums[k].append(float(trace[k]))
    for rid, p in sorted(req["parties"].items()):
        retailers[rid] = {"state": p["state"], "updated_at": iso(p["updated_at"])}
    return retailers, clients, sums


def _trace(meta: dict[str, Any], storage_ms: float | None, sums: dict[str, list[float]]) -> dict[str, Any]:
    """A request's per-component timings (the paper's Figure 6)."""
    trace: dict[str, Any] = {"hub_ms": meta["hub_ms"]}
    if storage_ms is not None:
        trace["storage_ms"] = storage_ms
    if meta.get("first_dispatch_at") is not None:
        trace["dispatch_ms"] = round((meta["first_dispatch_at"] - meta["created_at"]) * 1000, 3)
    for k, values in sums.items():
        trace[k] = round(sum(values) / len(values), 3)
        trace[k.replace("_ms", "_max_ms")] = round(max(values), 3)
    if meta.get("completed_at") is not None:
        trace["completion_ms"] = round((meta["completed_at"] - meta["created_at"]) * 1000, 3)
    return trace


class RequestViews:
    """A request's state as its issuer reads it, and who may follow its changes."""

    def __init__(self, store: HubStore, book: RequestBook, access: Access) -> None:
        self.store = store
        self.book = book
        self.access = access

    async def get_request(self, who: Principal, request_id: str) -> dict[str, Any]:
        """A request as its issuer sees it: state, per-retailer and per-client progress, per-component trace."""
        # Its own fields and targets only: the queued messages (a billing request's hold every client's readings)
        # are not part of the answer, and the DSO polls an open request several times a second.
        req = await self.store.get_request(request_id, RequestCodec.WHOLE)
        if req is None:
            raise NotFound(f"request {request_id!r} does not exist")
        meta = req["meta"]
        self.access.authorize(who, Action.READ_REQUEST, Context(issuer=meta["issuer"]))
        retailers, clients, sums = _progress(req)
        # Stored with the request by the write after its creation (until then only the replica that created it
        # knows it); absent when unknown (a request stored before it was recorded), never a made-up 0.
        storage_ms = meta.get("storage_ms", self.book.storage_ms.get(request_id))
        out = {"request_id": request_id, "type": meta["type"], "state": meta["state"],
               "created_at": iso(meta["created_at"]), "completed_at": iso(meta.get("completed_at")),
               "deadline": iso(meta["deadline"]), "request": meta["body"], "retailers": retailers,
               "clients": clients, "trace": _trace(meta, storage_ms, sums)}
        for k in ("selection", "version"):
            if k in meta:
                out[k] = meta[k]
        out["revision"] = meta.get("revision", 1)
        out["revisions"] = [{**r, "at": iso(r["at"])} for r in meta.get("revisions") or [
            {"revision": 1, "at": meta["created_at"], "request": meta["body"]}]]
        if "cancel" in meta:
            out["cancel"] = {"requested_at": iso(meta["cancel"]["requested_at"]),
                             "acknowledged_by": {r: iso(t) for r, t in meta["cancel"]["retailers"].items()}}
        return out

    # -- the change feed ------------------------------------------------------------------------------------------

    async def may_follow(self, who: Principal, request_id: str | None) -> None:
        """Raise unless ``who`` may follow the change feed of ``request_id`` (None: of every request it may see):
        its issuer, or a retailer of some of its clients; a request that does not concern a retailer is answered
        as an unknown one (neutral, as the GET)."""
        if request_id is None:
            self.access.authorize(who, Action.READ_EVENTS)
            return
        req = await self.store.get_request(request_id, [RequestCodec.meta("issuer"), *RequestCodec.TARGETS])
        if req is None:
            raise NotFound(f"request {request_id!r} does not exist")
        addressed = {r for c in req["clients"].values() for r in c.get("retailers", {})} | set(req["parties"])
        verdict = decide(who, Action.READ_EVENTS, Context(issuer=req["meta"]["issuer"],
                                                          addressed_retailers=tuple(sorted(addressed))))
        if verdict.conceal:
            raise NotFound(f"request {request_id!r} does not exist")
        if not verdict.allowed:
            raise Forbidden(verdict.reason)

    def may_manage_subscription(self, who: Principal, owner: str | None) -> None:
        """Raise unless ``who`` may create a subscription (``owner`` None) or read or delete one of ``owner``'s;
        another principal's subscription is answered as an unknown one."""
        verdict = decide(who, Action.MANAGE_SUBSCRIPTION, Context(issuer=owner))
        if verdict.conceal:
            raise NotFound("no such subscription")
        if not verdict.allowed:
            raise Forbidden(verdict.reason)

