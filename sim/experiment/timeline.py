"""``mhp-sim experiment fanout --timeline``: when the first and the last client of one emergency passed each stage.

Built only from what the parts already record (no extra clock in the product): the DSO's POST and its ``202``
(this process), the hub's request view (``created_at``, the trace's ``dispatch_ms``, each client's ``updated_at``
and its trace's ``gateway_rtt_ms``, ``completed_at``), the bridge's store (each command's ``received_at`` and
``first_sent_at``) and the simulated gateways (when each got the command and when it sent its outcome,
``sim.fleet``'s stats). Every time is in milliseconds from the POST; every stage has the first and the last client
that passed it, so the gaps between stages say where the time goes. The floor's own figures (its first and last
acknowledgement, from its start) stand next to the stage they compare with.

Stages, in order (``n`` is how many clients each one has a time for):

- ``202``: the POST answered (the request durably stored at the hub).
- ``hub_stored``: the request's ``created_at`` (before its storage write).
- ``hub_dispatched``: the hub first published the request to a retailer (``created_at + dispatch_ms``).
- ``bridge_received``: the bridge got the request (its commands' ``received_at``).
- ``bridge_sent``: the bridge's sending round for each command began (``first_sent_at``: the round read it).
- ``gateway_received``: the gateway's handler got the command.
- ``gateway_answered``: the gateway handed its outcome to its MQTT link.
- ``bridge_outcome``: the bridge began handling that outcome (``first_sent_at + gateway_rtt_ms``).
- ``hub_executed``: the hub applied the outcome (the client's ``updated_at``; its commit follows).
- ``hub_completed``: the request's ``completed_at`` (the last outcome applied).
- ``seen_done``: this process saw the request end (the hub's ``/metrics``, polled every 50 ms).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

STAGES = ("202", "hub_stored", "hub_dispatched", "bridge_received", "bridge_sent", "gateway_received",
          "gateway_answered", "bridge_outcome", "hub_executed", "hub_completed", "seen_done")


def _epoch(value: Any) -> float | None:
    """An RFC 3339 time or epoch seconds as epoch seconds; None stays None."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value)).timestamp()


def span(times: Iterable[float | None], origin: float) -> dict[str, Any]:
    """The first and last of ``times`` (epoch s) in ms after ``origin``, and how many there were."""
    known = [t for t in times if t is not None]
    if not known:
        return {"first_ms": None, "last_ms": None, "n": 0}
    return {"first_ms": round((min(known) - origin) * 1000, 1), "last_ms": round((max(known) - origin) * 1000, 1),
            "n": len(known)}


def run_timeline(post_at: float, post_ms: float, view: Mapping[str, Any], commands: Mapping[str, Mapping[str, Any]],
                 gateway_of: Mapping[str, str], received: Mapping[str, Sequence[float]],
                 answered: Mapping[str, float], seen_done_s: float | None) -> dict[str, dict[str, Any]]:
    """One run's stages (:data:`STAGES`), each ``{"first_ms", "last_ms", "n"}`` from the POST.

    ``view``: the hub's ``GET /v1/requests/{id}`` at the end of the run; ``commands``: the bridges' stored commands
    of the request by client (``received_at``, ``first_sent_at``); ``gateway_of``: client → gateway; ``received``:
    gateway → ``[times received, first received at]``; ``answered``: gateway → its outcome sent at."""
    trace = view.get("trace") or {}
    created = _epoch(view.get("created_at"))
    clients: Mapping[str, Mapping[str, Any]] = view.get("clients") or {}
    outcome_in: list[float | None] = []
    executed: list[float | None] = []
    for cid, c in clients.items():
        if c.get("state") == "executed":
            executed.append(_epoch(c.get("updated_at")))
        rtt = (c.get("trace") or {}).get("gateway_rtt_ms")
        sent = (commands.get(cid) or {}).get("first_sent_at")
        outcome_in.append(None if rtt is None or sent is None else sent + rtt / 1000)
    gws = [gateway_of[c] for c in clients if c in gateway_of]
    dispatch_ms = trace.get("dispatch_ms")
    out = {
        "202": span([post_at + post_ms / 1000], post_at),
        "hub_stored": span([created], post_at),
        "hub_dispatched": span([None if created is None or dispatch_ms is None else created + dispatch_ms / 1000],
                               post_at),
        "bridge_received": span((c.get("received_at") for c in commands.values()), post_at),
        "bridge_sent": span((c.get("first_sent_at") for c in commands.values()), post_at),
        "gateway_received": span((received[g][1] if g in received else None for g in gws), post_at),
        "gateway_answered": span((answered.get(g) for g in gws), post_at),
        "bridge_outcome": span(outcome_in, post_at),
        "hub_executed": span(executed, post_at),
        "hub_completed": span([_epoch(view.get("completed_at"))], post_at),
        "seen_done": span([None if seen_done_s is None else post_at + seen_done_s], post_at),
    }
    return out


def floor_span(floor_runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The floor's first and last acknowledgement (ms from its first publish), the medians over its runs."""
    def median(xs: list[float]) -> float | None:
        xs = sorted(xs)
        if not xs:
            return None
        mid = len(xs) // 2
        return round(xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2, 1)

    firsts = [f["t_first_s"] * 1000 for f in floor_runs if f.get("t_first_s") is not None]
    lasts = [f["t100_s"] * 1000 for f in floor_runs if f.get("t100_s") is not None]
    return {"first_ack_ms": median(firsts), "last_ack_ms": median(lasts), "runs": len(floor_runs)}


FLOOR_NEXT_TO = {"gateway_received": "the floor's command reached a gateway: not recorded (its echo is bare)",
                 "bridge_outcome": "floor: acknowledgement back at its publisher (first / last)"}


def markdown(timelines: Sequence[Mapping[str, Any]], floor: Mapping[str, Any] | None) -> list[str]:
    """The report's section: one table, a row per stage, first / last per run, the floor beside its stage."""
    if not timelines:
        return []
    lines = ["## Timeline of each run (`--timeline`): first / last client per stage, ms from the POST", "",
             "| stage | " + " | ".join(f"run {t['run']}" for t in timelines) + " | floor |",
             "|---|" + "---|" * (len(timelines) + 1)]
    for stage in STAGES:
        cells = []
        for t in timelines:
            s = t["stages"][stage]
            cells.append("-" if s["first_ms"] is None else f"{s['first_ms']:g} / {s['last_ms']:g}"
                         if s["n"] > 1 else f"{s['first_ms']:g}")
        beside = ""
        if floor and stage == "bridge_outcome" and floor.get("last_ack_ms") is not None:
            beside = f"{floor['first_ack_ms']:g} / {floor['last_ack_ms']:g} (acks back)"
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {beside} |")
    return [*lines, "", "Stages: `sim/experiment/timeline.py`'s docstring. The floor's times run from its first "
            "publish, ours from the POST.", ""]
