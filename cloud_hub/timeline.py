"""Pure functions over supplier periods and meter readings: who supplied a client when, and consumption series."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import pairwise
from typing import Any


def supplier_at(periods: list[dict[str, Any]], at: float) -> str | None:
    """The retailer supplying at time ``at`` (periods sorted by ``valid_from``), or None before the first."""
    current = None
    for p in periods:
        if p["valid_from"] <= at:
            current = p["retailer_id"]
        else:
            break
    return current


def supply_spans(periods: list[dict[str, Any]], start: float, end: float) -> list[tuple[str, float, float]]:
    """``(retailer, from, to)`` pieces of ``[start, end)`` by who supplied; unsupplied time is left out."""
    spans: list[tuple[str, float, float]] = []
    for i, p in enumerate(periods):
        p_end = periods[i + 1]["valid_from"] if i + 1 < len(periods) else float("inf")
        s, e = max(start, p["valid_from"]), min(end, p_end)
        if s < e:
            if spans and spans[-1][0] == p["retailer_id"] and spans[-1][2] == s:
                spans[-1] = (p["retailer_id"], spans[-1][1], e)
            else:
                spans.append((p["retailer_id"], s, e))
    return spans


def covered_by(spans: list[tuple[str, float, float]], retailer_id: str, start: float, end: float) -> bool:
    """Whether ``retailer_id`` supplied the whole of ``[start, end)``."""
    return len(spans) == 1 and spans[0] == (retailer_id, start, end)


def whole_supplier(periods: list[dict[str, Any]], start: float, end: float) -> str | None:
    """The retailer that supplied the client for the whole of ``[start, end)``; None when nobody did alone (a
    supplier switch inside it, or unsupplied time)."""
    spans = supply_spans(periods, start, end)
    return spans[0][0] if spans and covered_by(spans, spans[0][0], start, end) else None


def switches_in(periods: list[dict[str, Any]], start: float, end: float) -> list[float]:
    """The times strictly inside ``(start, end)`` at which the client's supplier changes."""
    return [p["valid_from"] for p in periods if start < p["valid_from"] < end]


def withhold_straddling(blocks: list[dict[str, Any]], end: float, may_have: Callable[[float, float], bool]
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split readings clipped to a range the recipient may have (:func:`clip_blocks` over ``[start, end)``) into
    what it may receive and the reading intervals withheld from it: ``may_have(t0, t1)`` says whether it may have
    the energy of the interval ``[t0, t1)`` (it supplied the client for the whole of it).

    Every value starts inside the range, so only an interval running past ``end`` can reach time the recipient
    did not supply: the last values of a block. Returns ``(kept_blocks, withheld)``; each withheld item is
    ``{"start", "end", "resolution_s"}`` (its energy is not in it).
    """
    kept: list[dict[str, Any]] = []
    withheld: list[dict[str, Any]] = []
    for b in blocks:
        res, values = b["resolution_s"], b["values_kwh"]
        n = len(values)
        while n > 0 and b["start"] + n * res > end:  # the interval of value n-1 ends past the range
            t0 = b["start"] + (n - 1) * res
            if may_have(t0, t0 + res):
                break
            withheld.append({"start": t0, "end": t0 + res, "resolution_s": res})
            n -= 1
        if n == len(values):
            kept.append(b)
        elif n > 0:
            kept.append({**b, "values_kwh": values[:n]})
    withheld.sort(key=lambda w: w["start"])
    return kept, withheld


def points(blocks: Iterable[dict[str, Any]], start: float, end: float) -> dict[float, tuple[float, float, str, bool]]:
    """Every reading interval starting in ``[start, end)``: ``t -> (kwh, resolution_s, quality, corrected)``.

    Where uploads overlap, the one uploaded last wins (a correction replaces what it covers).
    """
    out: dict[float, tuple[float, float, str, bool]] = {}
    # clipped blocks (no overlap) have no upload time; two blocks of one upload with the same start: the later one
    # has the higher version
    for b in sorted(blocks, key=lambda b: (b.get("uploaded_at", 0.0), b.get("version", 1))):
        res = b["resolution_s"]
        for i, kwh in enumerate(b["values_kwh"]):
            t = b["start"] + i * res
            if start <= t < end:
                out[t] = (kwh, res, b["quality"], bool(b.get("corrected")) or b["version"] > 1)
    return out


def profile(blocks: Iterable[dict[str, Any]], start: float, end: float, resolution_s: int) -> list[dict[str, Any]]:
    """Energy per ``resolution_s`` bucket from ``start``; a bucket is ``estimated`` if any value in it is,
    and ``complete`` when the readings cover all of it."""
    buckets: dict[int, dict[str, Any]] = {}
    for t, (kwh, res, quality, _) in points(blocks, start, end).items():
        k = int((t - start) // resolution_s)
        b = buckets.setdefault(k, {"kwh": 0.0, "covered_s": 0.0, "quality": "measured"})
        b["kwh"] += kwh
        b["covered_s"] += res
        if quality == "estimated":
            b["quality"] = "estimated"
    out = []
    for k in sorted(buckets):
        b = buckets[k]
        out.append({"start": start + k * resolution_s, "kwh": round(b["kwh"], 6), "quality": b["quality"],
                    "complete": b["covered_s"] >= resolution_s})
    return out


def clip_blocks(blocks: Iterable[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """The readings in ``[start, end)`` as blocks of consecutive values, corrections applied (the last upload
    wins where uploads overlap), each block with its quality and whether it corrects an earlier upload.

    Blocks that do not overlap (the usual case: one upload per interval) and start on a whole second with a whole
    number of seconds per value (so the times of their values are exact) are sliced whole; the general case goes
    value by value through :func:`points`. Both give the same answer.
    """
    ordered = sorted(blocks, key=lambda b: b["start"])
    if all(float(b["start"]).is_integer() and float(b["resolution_s"]).is_integer() for b in ordered) and all(
            a["start"] + a["resolution_s"] * len(a["values_kwh"]) <= b["start"] for a, b in pairwise(ordered)):
        return _clip_disjoint(ordered, start, end)
    return _clip_points(ordered, start, end)


def _clip_disjoint(ordered: list[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """:func:`clip_blocks` of blocks sorted by start that do not overlap, with whole-second start and resolution."""
    out: list[dict[str, Any]] = []
    for b in ordered:
        b0, res, values = b["start"], b["resolution_s"], b["values_kwh"]
        first, stop = _first_at(b0, res, len(values), start), _first_at(b0, res, len(values), end)
        if first >= stop:
            continue
        t, quality = b0 + first * res, b["quality"]
        corrected = bool(b.get("corrected")) or b["version"] > 1
        last = out[-1] if out else None
        if (last and last["resolution_s"] == res and last["quality"] == quality and last["corrected"] == corrected
                and last["start"] + res * len(last["values_kwh"]) == t):
            last["values_kwh"].extend(values[first:stop])
        else:
            out.append({"start": t, "resolution_s": res, "values_kwh": list(values[first:stop]), "quality": quality,
                        "version": 2 if corrected else 1, "corrected": corrected})
    return out


def _first_at(b0: float, res: float, n: int, at: float) -> int:
    """The first ``i`` in ``[0, n]`` with ``b0 + i * res >= at``: estimated by division, then settled with the same
    comparison :func:`points` makes (the division's rounding can be one off)."""
    i = min(n, max(0, int(-((b0 - at) // res))))
    while i > 0 and b0 + (i - 1) * res >= at:
        i -= 1
    while i < n and b0 + i * res < at:
        i += 1
    return i


def _clip_points(blocks: Iterable[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """:func:`clip_blocks` value by value, for blocks that overlap."""
    out: list[dict[str, Any]] = []
    for t, (kwh, res, quality, corrected) in sorted(points(blocks, start, end).items()):
        last = out[-1] if out else None
        if (last and last["resolution_s"] == res and last["quality"] == quality and last["corrected"] == corrected
                and last["start"] + res * len(last["values_kwh"]) == t):
            last["values_kwh"].append(kwh)
        else:
            out.append({"start": t, "resolution_s": res, "values_kwh": [kwh], "quality": quality,
                        "version": 2 if corrected else 1, "corrected": corrected})
    return out


def choose_for_reduction(available: dict[str, float], reduction_kw: float) -> list[str]:
    """Clients to disconnect: the most available first, until ``reduction_kw`` is covered (ties by id)."""
    chosen, total = [], 0.0
    for cid, kw in sorted(available.items(), key=lambda kv: (-kv[1], kv[0])):
        if total >= reduction_kw or kw <= 0:
            break
        chosen.append(cid)
        total += kw
    return chosen


def reduction_targets(available: dict[str, float], chosen: list[str], reduction_kw: float) -> dict[str, float]:
    """What each chosen client is asked to shed: what it said it could, in the order chosen, until ``reduction_kw``
    is covered; the last one only the rest (no home sheds more than the DSO asked for)."""
    targets, rest = {}, reduction_kw
    for cid in chosen:
        targets[cid] = round(max(0.0, min(available[cid], rest)), 3)
        rest -= targets[cid]
    return targets


def retailer_periods(periods: list[dict[str, Any]]) -> dict[str, list[tuple[float, float | None]]]:
    """Per retailer, the spans ``(from, until)`` in which it supplies the client (``until`` None: open-ended)."""
    out: dict[str, list[tuple[float, float | None]]] = {}
    for rid, s, e in supply_spans(periods, float("-inf"), float("inf")):
        out.setdefault(rid, []).append((s, None if e == float("inf") else e))
    return out


def customer_changes(before: list[dict[str, Any]], after: list[dict[str, Any]]
                     ) -> dict[str, list[tuple[float, float | None]]]:
    """The retailers whose supply of a client a change of its supplier history (``before`` -> ``after``) changes
    (the one it gains, the one it loses), each with all its periods of that client after the change."""
    old, new = retailer_periods(before), retailer_periods(after)
    return {rid: new.get(rid, []) for rid in sorted(set(old) | set(new)) if old.get(rid) != new.get(rid)}
