"""A client request accepted in one compact write, expanded to its per-client entries right after.

A request that names thousands of clients is answered ``202`` once one write is durable: the request row's own
fields and its **plan** (``r:plan``): which retailer supplies which targeted client, what its ``request`` messages
say, and the data access log line every client gets. Its per-client entries (the ``c:<client>`` cells), its
messages (one per retailer and 3,000 clients, ``o:<msg>``), its audit lines and its change-feed ``created`` event
are written by the **expansion**, one more write made from the plan alone, right after the answer; the messages
are sent only once that write is durable (an outcome always finds its client's entry). A hub killed between the
two writes finishes the expansion when it loads the request again (:meth:`cloud_hub.book.RequestBook.load`),
before it sends anything.

Plain functions on plain data (no I/O): what the plan holds and what it expands to.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mhp_wire.messages import ClientState, Request, RequestKind

REQUEST_CLIENTS_PER_MESSAGE = 3_000
"""Client ids per ``request`` message: 3,000 ids of at most 64 characters stay under the 256 KiB payload limit."""

PLAN = "plan"
"""The request's own field holding its plan while it is not expanded (the cell ``r:plan``)."""


def make_plan(by_retailer: dict[str, list[str]], message: tuple[RequestKind, dict[str, Any], datetime],
              audit: tuple[str, str, str, float], max_kw: dict[str, float | None] | None = None) -> dict[str, Any]:
    """The plan of a client request: ``by_retailer`` (``{retailer: [client, ...]}``, each client once), what its
    ``request`` messages say (``(kind, params as JSON, expires_at)``), the audit line ``(principal, action, right,
    at)`` written for every client, and each client's contracted power when its entry bounds an availability claim
    (a load reduction's phase one). Each retailer's clients come in id order (``Creator.targets``), and the request
    messages keep that order."""
    principal, action, right, at = audit
    kind, params, expires_at = message
    plan: dict[str, Any] = {"by_retailer": by_retailer,
                            "message": {"kind": kind.value, "params": params, "expires_at": expires_at.isoformat()},
                            "audit": {"principal": principal, "action": action, "right": right, "at": at}}
    if max_kw is not None:
        plan["max_kw"] = max_kw
    return plan


def targets(plan: dict[str, Any]) -> int:
    """How many clients the plan names."""
    return sum(len(cids) for cids in plan["by_retailer"].values())


def entries(plan: dict[str, Any], now: float) -> dict[str, dict[str, Any]]:
    """Every targeted client's entry as the request starts: pending at its one retailer."""
    pending = ClientState.PENDING.value
    max_kw = plan.get("max_kw")
    out: dict[str, dict[str, Any]] = {}
    for rid, cids in plan["by_retailer"].items():
        for cid in cids:
            e: dict[str, Any] = {"retailers": {rid: pending}, "state": pending, "detail": {}, "trace": {},
                                 "updated_at": now}
            if max_kw is not None:  # the bound of the client's availability claim (cloud_hub.lifecycle)
                e["max_kw"] = max_kw[cid]
            out[cid] = e
    return out


def audit_lines(plan: dict[str, Any]) -> list[tuple[str, str, str, str, float]]:
    """The data access log of the request, ``(principal, client, action, right, at)``: one line per targeted
    client, at the time it was accepted."""
    a = plan["audit"]
    return [(a["principal"], cid, a["action"], a["right"], a["at"])
            for cids in plan["by_retailer"].values() for cid in cids]


def messages(plan: dict[str, Any], request_id: str) -> list[tuple[str, Request]]:
    """The ``request`` messages of the plan, ``(retailer, message)``: one per retailer and
    :data:`REQUEST_CLIENTS_PER_MESSAGE` clients, retailers in id order."""
    m = plan["message"]
    out = []
    for rid, all_cids in sorted(plan["by_retailer"].items()):
        for k in range(0, len(all_cids), REQUEST_CLIENTS_PER_MESSAGE):
            out.append((rid, Request.model_validate({
                "request_id": request_id, "kind": m["kind"], "client_ids": all_cids[k:k + REQUEST_CLIENTS_PER_MESSAGE],
                "params": m["params"], "expires_at": m["expires_at"]})))
    return out
