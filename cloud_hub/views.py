"""What the DSO's console reads: the platform now, the client registry, a feeder's measured power, recent requests.

Each view is authorized first (``cloud_hub/authz.py``) and bounded: a page is at most :data:`PAGE_MAX` items and
reads at most :data:`SCAN_MAX` index rows (a filtered page may come back short, with a cursor to go on from), a
feeder series at most :data:`MAX_BUCKETS` buckets over at most :data:`MAX_FEEDER_CLIENTS` clients, read
:data:`CLIENT_PAGE` at a time, and at most :data:`MAX_POINTS` stored measurements. Reads of client data are written to
the data access log, one line per client, as every other read is.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

from cloud_hub.authz import Action, Principal, decide, visible_suppliers
from cloud_hub.errors import Forbidden, NotFound
from cloud_hub.lifecycle import RequestState
from cloud_hub.metrics import HubMetrics
from cloud_hub.store import AuditEntry, HubStore
from cloud_hub.timeline import supplier_at
from cloud_hub.usecases.shared import iso

PAGE_MAX = 1000
"""The largest ``limit`` of a paged list."""
SCAN_MAX = 5000
"""Index rows one call of a filtered list reads at most; past them it answers what it found and a cursor."""
CLIENT_PAGE = 500
"""Clients of a feeder read per storage call."""
MAX_FEEDER_CLIENTS = 10_000
"""A feeder with more clients is refused (422): its sum would be read in more than 20 storage calls."""
MAX_BUCKETS = 10_000
"""Buckets one feeder series may have (``(to - from) / step_s``)."""
MAX_POINTS = 2_000_000
"""Stored measurements one feeder series may read; past them it is refused (422): narrow the range."""
OPEN_META_BATCH = 500
"""Open requests whose type and state are read per storage call."""

T = TypeVar("T")
R = TypeVar("R")


def bucket_means(points: Iterable[tuple[float, float]], start: float, step_s: float, buckets: int
                 ) -> dict[int, float]:
    """One client's mean active power per bucket ``[start + i * step_s, start + (i + 1) * step_s)``, for each
    bucket in which it reported (points outside ``[0, buckets)`` are ignored)."""
    sums: dict[int, float] = defaultdict(float)
    counts: dict[int, int] = defaultdict(int)
    for at, kw in points:
        i = math.floor((at - start) / step_s)
        if 0 <= i < buckets:
            sums[i] += kw
            counts[i] += 1
    return {i: sums[i] / counts[i] for i in sums}


def feeder_sum(per_client: Iterable[Mapping[int, float]], buckets: int) -> list[tuple[float | None, int]]:
    """The feeder's power per bucket: the sum of its clients' means, and how many clients reported (``None`` for a
    bucket in which none did: no data is not 0 kW)."""
    totals = [0.0] * buckets
    reporting = [0] * buckets
    for means in per_client:
        for i, kw in means.items():
            totals[i] += kw
            reporting[i] += 1
    return [(round(t, 6) if n else None, n) for t, n in zip(totals, reporting, strict=True)]


async def paged(fetch: Callable[[str | None, int], Awaitable[list[tuple[str, T]]]], keep: Callable[[T], R | None],
                *, limit: int, after: str | None, filtered: bool) -> tuple[list[R], str | None]:
    """Up to ``limit`` kept items of a key-ordered index after the cursor ``after``, and the cursor of the next page
    (None when the index has no more). ``fetch(cursor, n)`` reads up to ``n`` entries ``(key, item)`` after
    ``cursor``; ``keep`` turns an item into an answer, or None to skip it (a filter). At most :data:`SCAN_MAX`
    entries are read: a filtered page may come back short, with a cursor to go on from."""
    found: list[R] = []
    cursor, scanned = after, 0
    while len(found) < limit and scanned < SCAN_MAX:
        n = min(PAGE_MAX if filtered else limit - len(found), SCAN_MAX - scanned)
        entries = await fetch(cursor, n + 1)  # one more than used: whether the index goes on
        more, entries = len(entries) > n, entries[:n]
        scanned += len(entries)
        for i, (key, item) in enumerate(entries):
            cursor = key
            kept = keep(item)
            if kept is not None:
                found.append(kept)
                if len(found) == limit:
                    return found, cursor if more or i < len(entries) - 1 else None
        if not more:
            return found, None  # the end of the index
    return found, cursor


class ConsoleViews:
    """The read views of ``cloud_hub/api/console.py`` over the store, the metrics and the relay's presence."""

    def __init__(self, store: HubStore, metrics: HubMetrics,
                 presence: Callable[[], Mapping[str, tuple[str, float | None]]],
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.metrics = metrics
        self.presence = presence
        """Each retailer's presence as the relay heard it: ``retailer_id -> (state, since)``."""
        self.clock = clock
        """Wall-clock time: which supplier period is current."""

    @staticmethod
    def authorize(who: Principal, action: Action) -> str:
        """Raise :class:`Forbidden` unless ``who`` may; the right it rests on."""
        verdict = decide(who, action)
        if not verdict.allowed:
            raise Forbidden(verdict.reason)
        return verdict.right

    # -- the platform now -----------------------------------------------------------------------------------

    def authorize_status(self, who: Principal) -> None:
        """Refuse before the readiness checks touch storage: :meth:`status` authorizes again."""
        self.authorize(who, Action.READ_STATUS)

    async def status(self, who: Principal, readiness: tuple[bool, dict[str, str]]) -> dict[str, Any]:
        """Retailers online or offline and since when, open requests by type and state, refusals and errors in the
        last hour, and the hub's readiness (DSO)."""
        self.authorize(who, Action.READ_STATUS)
        heard = self.presence()
        retailers = {}
        for rid in sorted(await self.store.retailer_ids()):
            state, since = heard.get(rid, ("offline", None))
            retailers[rid] = {"state": state, "online": state == "online", "since": iso(since),
                              "heard": rid in heard}
        open_by: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        total = 0
        ids = await self.store.open_request_ids()
        for i in range(0, len(ids), OPEN_META_BATCH):
            metas = await self.store.request_metas(ids[i:i + OPEN_META_BATCH], ["type", "state"])
            for meta in metas.values():  # an index entry without its row was never answered 202: not a request
                if RequestState(meta["state"]).terminal:
                    continue  # ended, its last messages still being delivered: not open
                open_by[meta["type"]][meta["state"]] += 1
                total += 1
        recent = self.metrics.recent
        http = {s[0]: n for s, n in recent.counts("http_rejected").items()}
        mqtt = {r[0]: n for r, n in recent.counts("mqtt_rejected").items()}
        http_refused = {s: n for s, n in http.items() if not s.startswith("5")}
        http_errors = {s: n for s, n in http.items() if s.startswith("5")}
        finished = recent.counts("requests_finished")
        failed: dict[str, dict[str, int]] = defaultdict(dict)
        for (kind, state), n in finished.items():
            if state in (RequestState.FAILED, RequestState.EXPIRED):
                failed[kind][state] = n
        restarts = sum(recent.counts("relay_restarts").values())
        ready, checks = readiness
        return {
            "at": iso(self.clock()),
            "ready": ready, "checks": checks,
            "retailers": retailers,
            "open_requests": {"total": total, "by_type": {k: dict(v) for k, v in sorted(open_by.items())}},
            "last_hour": {
                "window_s": int(recent.window_s),
                "refusals": {"total": sum(http_refused.values()) + sum(mqtt.values()),
                             "http": dict(sorted(http_refused.items())), "mqtt": dict(sorted(mqtt.items()))},
                "errors": {"total": sum(http_errors.values()) + restarts + sum(sum(v.values())
                                                                               for v in failed.values()),
                           "http": dict(sorted(http_errors.items())), "relay_restarts": restarts,
                           "requests": {k: v for k, v in sorted(failed.items())}},
            },
        }

    # -- the registry ---------------------------------------------------------------------------------------

    async def clients(self, who: Principal, *, feeder_id: str | None, retailer_id: str | None, limit: int,
                      after: str | None) -> dict[str, Any]:
        """The client registry in client-id order after ``after``, at most ``limit`` clients, each with its
        current retailer, contracted power, feeder and supplier history; ``next_after`` is the cursor of the next
        page (None at the end). ``feeder_id`` reads the feeder index; ``retailer_id`` (the current retailer) is a
        filter, so such a page may be short: it reads at most :data:`SCAN_MAX` clients (DSO)."""
        right = self.authorize(who, Action.LIST_CLIENTS)
        now = self.clock()

        async def fetch(cursor: str | None, n: int) -> list[tuple[str, dict[str, Any]]]:
            if feeder_id is None:
                return [(c["client_id"], c) for c in await self.store.client_page(cursor, n)]
            ids = await self.store.feeder_client_page(feeder_id, cursor, n)
            rows = await self.store.get_clients(ids) if ids else {}
            # An index entry whose client row is gone (moved meanwhile) is skipped, its key still moves the cursor.
            return [(cid, rows.get(cid, {})) for cid in ids]

        def keep(c: dict[str, Any]) -> dict[str, Any] | None:
            if not c:
                return None
            current = supplier_at(c["suppliers"], now)
            if retailer_id is not None and current != retailer_id:
                return None
            return {"client_id": c["client_id"], "retailer_id": current,
                    "contracted_power_kw": c["contracted_power_kw"], "feeder_id": c["feeder_id"],
                    "suppliers": [{"retailer_id": p["retailer_id"], "valid_from": iso(p["valid_from"])}
                                  for p in visible_suppliers(who, c["suppliers"])]}

        found, cursor = await paged(fetch, keep, limit=limit, after=after, filtered=retailer_id is not None)
        await self.store.audit([AuditEntry(str(who), c["client_id"], Action.LIST_CLIENTS.value, right)
                                for c in found])
        return {"clients": found, "count": len(found), "next_after": cursor}

    # -- a feeder's measured power ----------------------------------------------------------------------------

    async def feeder_measurements(self, who: Principal, feeder_id: str, start: float, end: float, step_s: int
                                  ) -> dict[str, Any]:
        """The feeder's measured active power in ``[start, end)`` per bucket of ``step_s``: each client's mean in
        the bucket, summed over the clients that reported, with how many did (DSO)."""
        right = self.authorize(who, Action.READ_FEEDER_MEASUREMENTS)
        if end <= start:
            raise ValueError("to must be after from")
        buckets = math.ceil((end - start) / step_s)
        if buckets > MAX_BUCKETS:
            raise ValueError(f"{buckets} buckets asked for; at most {MAX_BUCKETS}: widen step_s or narrow the range")
        per_client: list[dict[int, float]] = []
        cursor: str | None = None
        clients = points = 0
        while True:
            ids = await self.store.feeder_client_page(feeder_id, cursor, CLIENT_PAGE)
            if not ids:
                break
            clients += len(ids)
            if clients > MAX_FEEDER_CLIENTS:
                raise ValueError(f"feeder {feeder_id!r} has more than {MAX_FEEDER_CLIENTS} clients: read its "
                                 f"clients' measurements with GET /v1/measurements")
            series = await self.store.measurements_many(ids, start, end)
            points += sum(len(s) for s in series)
            if points > MAX_POINTS:
                raise ValueError(f"more than {MAX_POINTS} measurements in the range: narrow it")
            await self.store.audit([AuditEntry(str(who), cid, Action.READ_FEEDER_MEASUREMENTS.value, right,
                                               ref=f"feeder:{feeder_id}") for cid in ids])
            per_client += [bucket_means(s, start, step_s, buckets) for s in series]
            cursor = ids[-1]
            if len(ids) < CLIENT_PAGE:
                break
        if clients == 0:
            raise NotFound(f"no client is registered on feeder {feeder_id!r}")
        summed = feeder_sum(per_client, buckets)
        return {"feeder_id": feeder_id, "from": iso(start), "to": iso(end), "step_s": step_s, "clients": clients,
                "series": [{"start": iso(start + i * step_s), "end": iso(min(end, start + (i + 1) * step_s)),
                            "active_power_kw": kw, "clients_reporting": n} for i, (kw, n) in enumerate(summed)]}

    # -- recent requests ------------------------------------------------------------------------------------

    async def requests(self, who: Principal, *, state: str | None, kind: str | None, since: float | None,
                       limit: int, after: str | None) -> dict[str, Any]:
        """The requests ``who`` issued, newest first, at most ``limit``, created at or after ``since``, of one
        ``state`` and ``kind`` when given; ``next_after`` continues (None at the end). A filtered page reads at
        most :data:`SCAN_MAX` index rows and may come back short, with a cursor (DSO)."""
        self.authorize(who, Action.LIST_REQUESTS)
        columns = ["type", "state", "created_at", "completed_at", "deadline", "counts", "revision"]

        async def fetch(cursor: str | None, n: int) -> list[tuple[str, tuple[str, dict[str, Any]]]]:
            entries = await self.store.issued_request_page(str(who), cursor, since, n)
            metas = await self.store.request_metas([rid for _, rid in entries], columns) if entries else {}
            return [(key, (rid, metas.get(rid, {}))) for key, rid in entries]

        def keep(item: tuple[str, dict[str, Any]]) -> dict[str, Any] | None:
            rid, meta = item
            if not meta:
                return None  # an index entry without its row was never answered 202: not a request
            if (state is not None and meta["state"] != state) or (kind is not None and meta["type"] != kind):
                return None
            counts = meta.get("counts") or {}
            return {"request_id": rid, "type": meta["type"], "state": meta["state"],
                    "created_at": iso(meta["created_at"]), "completed_at": iso(meta.get("completed_at")),
                    "deadline": iso(meta.get("deadline")), "revision": meta.get("revision", 1),
                    "targets": sum(counts.values()), "counts": counts}

        found, cursor = await paged(fetch, keep, limit=limit, after=after,
                                    filtered=state is not None or kind is not None)
        return {"requests": found, "count": len(found), "next_after": cursor}
