"""Client data: meter readings, consumption profiles, billing deliveries, active-power measurements, the audit log."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from cloud_hub.authz import Action, Context, Principal, decide, visible_suppliers
from cloud_hub.book import OutboxItem
from cloud_hub.errors import Conflict, NotFound
from cloud_hub.store import AuditEntry, HubStore
from cloud_hub.timeline import (
    clip_blocks,
    covered_by,
    profile,
    supplier_at,
    supply_spans,
    switches_in,
    whole_supplier,
    withhold_straddling,
)
from cloud_hub.usecases.access import Access, refusal_audit
from cloud_hub.usecases.creating import NewRequest, RequestCreator
from cloud_hub.usecases.idempotency import Idempotency
from cloud_hub.usecases.results import Accepted
from cloud_hub.usecases.shared import iso, ts
from mhp_wire.messages import (
    READING_BLOCK_VALUES,
    SEND_PAYLOAD_BYTES,
    BillingClient,
    BillingData,
    ClientState,
    Measurements,
    ReadingBlock,
    encode,
)

log = logging.getLogger(__name__)

BILLING_CLIENTS_PER_MESSAGE = 100
BILLING_DELIVERY_S = 24 * 3600


def readings_json(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reading blocks as the API shows them (the wire's ``ReadingBlock`` fields, times in ISO 8601)."""
    return [{"start": iso(b["start"]), "resolution_s": b["resolution_s"], "values_kwh": b["values_kwh"],
             "quality": b["quality"], "corrected": b["corrected"]} for b in blocks]


async def billing_readings(store: HubStore, client_id: str, start: float, end: float,
                           may_have: Callable[[float, float], bool]
                           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A client's meter readings of ``[start, end)`` as billing uses them (consecutive blocks, corrections applied,
    each with its quality and whether it corrects an earlier upload), and the reading intervals withheld because
    they run past ``end`` into time the reader may not have (``may_have(t0, t1)`` False). No authorization: the
    caller decided (the DSO's :meth:`ClientData.billing_data`, a party's read under its permission)."""
    return withhold_straddling(clip_blocks(await store.readings(client_id, start, end), start, end), end, may_have)


def _reading_blocks(block: dict[str, Any]) -> list[ReadingBlock]:
    """A stored block of readings (consecutive uploads are stored as one) as wire blocks of at most
    :data:`~mhp_wire.messages.READING_BLOCK_VALUES` readings each (a longer one failed the whole billing request
    with the wire model's error before)."""
    values, step = block["values_kwh"], block["resolution_s"]
    return [ReadingBlock(**{**block, "values_kwh": values[i:i + READING_BLOCK_VALUES],
                            "start": datetime.fromtimestamp(block["start"] + i * step, UTC)})
            for i in range(0, len(values), READING_BLOCK_VALUES)]


def _billing_messages(request_id: str, body: dict[str, Any], per_retailer: dict[str, list[BillingClient]],
                      limit: int = SEND_PAYLOAD_BYTES) -> list[OutboxItem]:
    """Each retailer's billing data, in messages of at most :data:`BILLING_CLIENTS_PER_MESSAGE` clients whose
    payload fits ``limit`` (the brokers' packet, :data:`~mhp_wire.messages.SEND_PAYLOAD_BYTES`: a larger one would
    have the hub broker cut the hub's link, again at every reconnection). A client whose readings alone do not fit
    goes in consecutive parts of its period (:func:`_client_parts`), each filling a message; each message lists its
    clients, and the book marks a client acknowledged by a retailer once every message naming it is
    (:meth:`cloud_hub.book.RequestBook.on_acks`)."""
    outbox = []
    for rid, items in sorted(per_retailer.items()):
        for i in range(0, len(items), BILLING_CLIENTS_PER_MESSAGE):
            for chunk, msg, payload in _fitted_billing(request_id, body, items[i:i + BILLING_CLIENTS_PER_MESSAGE],
                                                       limit):
                outbox.append(OutboxItem(msg.msg_id, request_id, rid, "billing", payload,
                                         list(dict.fromkeys(c.client_id for c in chunk))))
    return outbox


def _fitted_billing(request_id: str, body: dict[str, Any], clients: list[BillingClient], limit: int,
                    slack: int = 0) -> list[tuple[list[BillingClient], BillingData, bytes]]:
    """``clients`` in as few messages as fit ``limit``, in order: one encoding when they fit (the usual case, as
    before); otherwise each client's encoded size decides, packed in order, a client too big alone cut into parts.
    Sizes are measured with every time in its longest form (:func:`_longest`: a time on a whole second is written
    7 characters shorter), so a message is never longer than measured; one that is all the same (``slack``: what
    it was over) is packed again with that much less room, while it can still be cut."""
    def message(chunk: list[BillingClient]) -> tuple[list[BillingClient], BillingData, bytes]:
        msg = BillingData(request_id=request_id, period_start=body["period_start"], period_end=body["period_end"],
                          clients=chunk)
        return chunk, msg, encode(msg)

    whole = message(clients)
    if len(whole[2]) <= limit - slack:
        return [whole]
    envelope = whole[1].model_copy(update={"clients": [], "sent_at": _longest(whole[1].sent_at)})
    room = limit - slack - len(encode(envelope))  # the envelope, "[]" included
    chunks: list[list[BillingClient]] = [[]]
    used = 0
    for part in (p for c in clients for p in _client_parts(c, room)):
        size = len(part.model_dump_json()) + 1  # and its comma
        if chunks[-1] and used + size > room:
            chunks.append([])
            used = 0
        chunks[-1].append(part)
        used += size
    out: list[tuple[list[BillingClient], BillingData, bytes]] = []
    for chunk in chunks:
        m = message(chunk)
        over = len(m[2]) - limit
        cuttable = len(chunk) > 1 or sum(len(b.values_kwh) for b in chunk[0].readings) > 1
        out += _fitted_billing(request_id, body, chunk, limit, slack + over) if over > 0 and cuttable else [m]
    return out


def _longest(t: datetime) -> datetime:
    """``t`` as written at its longest (with microseconds: ``...:00.000001Z``, not ``...:00Z``)."""
    return t if t.microsecond else t.replace(microsecond=1)


def _client_parts(client: BillingClient, room: int) -> list[BillingClient]:
    """``client`` as consecutive parts of its period whose JSON each fits ``room`` bytes: the readings cut between
    blocks (a block that alone does not fit, between its values), each part's period from its first interval (the
    client's start for the first) to the next part's (the client's end for the last). ``[client]`` when it fits."""
    if len(client.model_dump_json()) <= room:
        return [client]
    envelope = len(client.model_copy(update={"readings": [], "period_start": _longest(client.period_start),
                                             "period_end": _longest(client.period_end)}).model_dump_json())
    groups: list[list[ReadingBlock]] = [[]]
    used = envelope
    for block in (b for whole in client.readings for b in _block_parts(whole, room - envelope)):
        size = len(block.model_dump_json()) + 1
        if groups[-1] and used + size > room:
            groups.append([])
            used = envelope
        groups[-1].append(block)
        used += size
    starts = [client.period_start, *(g[0].start for g in groups[1:]), client.period_end]
    return [client.model_copy(update={"period_start": starts[k], "period_end": starts[k + 1], "readings": g})
            for k, g in enumerate(groups)]


def _block_parts(block: ReadingBlock, room: int) -> list[ReadingBlock]:
    """``block`` cut between its values into consecutive blocks whose JSON each fits ``room`` (a block of 10,000
    readings is ~60-230 KB, so this is for a packet smaller than the brokers' default)."""
    if len(block.model_dump_json()) <= room or len(block.values_kwh) == 1:
        return [block]
    half = len(block.values_kwh) // 2
    second = block.start + timedelta(seconds=half * block.resolution_s)
    return [*_block_parts(block.model_copy(update={"values_kwh": block.values_kwh[:half]}), room),
            *_block_parts(block.model_copy(update={"values_kwh": block.values_kwh[half:], "start": second}), room)]


class ClientData:
    """Client data, each read and write authorized and logged."""

    def __init__(self, store: HubStore, access: Access, idempotency: Idempotency, creator: RequestCreator) -> None:
        self.store = store
        self.access = access
        self.idempotency = idempotency
        self.creator = creator

    # -- meter readings, consumption, billing ---------------------------------------------------------------

    async def upload_readings(self, who: Principal, readings: list[dict[str, Any]]) -> dict[str, Any]:
        """Store meter readings; an upload for an interval already stored is a correction."""
        right = await self.access.named(who, Action.UPLOAD_READINGS, [r["client_id"] for r in readings])
        await self.access.known_clients(sorted({r["client_id"] for r in readings}))
        blocks = [{**r, "start": ts(r["start"]), "quality": r.get("quality") or "measured"} for r in readings]
        stored, corrections = await self.store.put_readings(blocks)
        await self.store.audit([AuditEntry(str(who), cid, Action.UPLOAD_READINGS.value, right)
                                for cid in sorted({r["client_id"] for r in readings})])
        return {"stored": stored, "corrections": corrections}

    async def consumption_profile(self, who: Principal, client_id: str, start: float, end: float,
                                  resolution_s: int) -> dict[str, Any]:
        """A client's consumption series, for the DSO or the retailer that supplied it over the whole range."""
        if end <= start:
            raise ValueError("'to' must be after 'from'")
        if (end - start) / resolution_s > 100_000:
            raise ValueError("too many points: ask for a shorter range or a coarser resolution_s")
        client = await self.store.get_client(client_id)
        spans = [] if client is None else supply_spans(client["suppliers"], start, end)
        owner = spans[0][0] if len(spans) == 1 and covered_by(spans, spans[0][0], start, end) else None
        await self.access.logged(who, Action.READ_CONSUMPTION, client_id, Context(
            covered_by_supplier=owner, suppliers_in_range=tuple(sorted({rid for rid, _, _ in spans}))),
            exists=client is not None)
        assert client is not None  # an unknown client was answered NotFound above
        periods = client["suppliers"]

        def may_have(t0: float, t1: float) -> bool:  # the last interval may run past the range, into another's time
            return decide(who, Action.READ_CONSUMPTION,
                          Context(covered_by_supplier=whole_supplier(periods, t0, t1))).allowed

        blocks, withheld = withhold_straddling(
            clip_blocks(await self.store.readings(client_id, start, end), start, end), end, may_have)
        return {"client_id": client_id, "from": iso(start), "to": iso(end), "resolution_s": resolution_s,
                "series": [{**p, "start": iso(p["start"])} for p in profile(blocks, start, end, resolution_s)],
                "withheld": [self._withheld(w, periods, who) for w in withheld]}

    async def billing_data(self, who: Principal, client_id: str, start: float, end: float) -> dict[str, Any]:
        """A client's meter readings of ``[start, end)`` as used for its bills (dso)."""
        if end <= start:
            raise ValueError("'to' must be after 'from'")
        await self.access.named(who, Action.READ_BILLING_DATA, [client_id])
        exists = await self.store.get_client(client_id) is not None
        await self.access.logged(who, Action.READ_BILLING_DATA, client_id, exists=exists)
        blocks, _ = await billing_readings(self.store, client_id, start, end, lambda t0, t1: True)
        return {"client_id": client_id, "from": iso(start), "to": iso(end), "readings": readings_json(blocks),
                "withheld": []}

    @staticmethod
    def _withheld(w: dict[str, Any], periods: list[dict[str, Any]], reader: Principal) -> dict[str, Any]:
        """A reading interval withheld from a retailer, as ``reader`` sees it (with the switch inside it): the
        retailers that supplied it are those ``reader`` may see (:func:`visible_suppliers`), so a retailer is not
        told who supplied the client before or after it."""
        switches = switches_in(periods, w["start"], w["end"])
        at = ", ".join(str(iso(t)) for t in switches)
        reason = (f"straddles a supplier switch ({at}): attributed to no retailer" if switches
                  else "not supplied by one retailer for the whole interval")
        visible = {p["retailer_id"] for p in visible_suppliers(reader, periods)}
        return {"start": iso(w["start"]), "end": iso(w["end"]), "resolution_s": w["resolution_s"],
                "retailers": [rid for rid, _, _ in supply_spans(periods, w["start"], w["end"]) if rid in visible],
                "reason": reason}

    async def request_billing(self, who: Principal, body: dict[str, Any], key: str | None
                              ) -> Accepted:
        """Deliver each client's readings of the period to the retailer(s) that supplied it, split at switches."""
        right = await self.access.named(who, Action.REQUEST_BILLING, body.get("client_ids"))
        async with self.idempotency.keyed(who, key, body) as slot:
            if slot.answer is not None:
                return Accepted.model_validate(slot.answer)
            return await self._billing(who, body, key, right, slot.request_id)

    async def _billing(self, who: Principal, body: dict[str, Any], key: str | None, right: str, request_id: str
                       ) -> Accepted:
        t0 = time.perf_counter()
        start, end = ts(body["period_start"]), ts(body["period_end"])
        if end <= start:
            raise ValueError("period_end must be after period_start")
        client_ids = list(dict.fromkeys(body["client_ids"]))
        clients = await self.access.known_clients(client_ids)
        per_retailer: dict[str, list[BillingClient]] = defaultdict(list)
        entries: dict[str, dict[str, Any]] = {}
        unsupplied = []
        spans_of = {cid: supply_spans(clients[cid]["suppliers"], start, end) for cid in client_ids}
        # Every client's readings of every supply span in one storage call (one per span was a thread hand-off each),
        # and of the unsupplied time before its first supplier, where an interval may reach into the first supply.
        queries = [(cid, s, e) for cid in client_ids for _, s, e in spans_of[cid]]
        queries += [(cid, start, spans[0][1]) for cid, spans in spans_of.items() if spans and spans[0][1] > start]
        found = dict(zip(queries, await self.store.readings_many(queries), strict=True))
        for cid in client_ids:
            spans = spans_of[cid]
            if not spans:
                unsupplied.append(cid)
                continue
            entries[cid] = {"retailers": {}, "state": ClientState.PENDING.value, "detail": {}, "trace": {},
                            "updated_at": time.time()}
            periods = clients[cid]["suppliers"]
            withheld: list[dict[str, Any]] = []
            if spans[0][1] > start:  # nobody supplied the start of the period: its readings go to no one
                _, held = withhold_straddling(clip_blocks(found[(cid, start, spans[0][1])], start, spans[0][1]),
                                              spans[0][1], lambda t0, t1: False)
                withheld += [self._withheld(w, periods, who) for w in held]
            for rid, s, e in spans:
                to = Principal("retailer", rid)

                def may_have(t0: float, t1: float, to: Principal = to, periods: list[dict[str, Any]] = periods
                             ) -> bool:  # an interval running past the span may straddle a supplier switch
                    return decide(to, Action.DELIVER_BILLING,
                                  Context(covered_by_supplier=whole_supplier(periods, t0, t1))).allowed

                blocks, held = withhold_straddling(clip_blocks(found[(cid, s, e)], s, e), e, may_have)
                withheld += [self._withheld(w, periods, who) for w in held]
                per_retailer[rid].append(BillingClient(
                    client_id=cid, period_start=datetime.fromtimestamp(s, UTC),
                    period_end=datetime.fromtimestamp(e, UTC),
                    readings=[r for b in blocks for r in _reading_blocks(b)]))
                entries[cid]["retailers"][rid] = ClientState.PENDING.value
                entries[cid]["detail"].setdefault("corrected", False)
                entries[cid]["detail"]["corrected"] |= any(b["corrected"] for b in blocks)
            if withheld:  # the DSO sees which intervals went to no retailer, and why
                entries[cid]["detail"]["withheld"] = withheld
        if unsupplied:
            raise Conflict(f"no retailer supplied {', '.join(unsupplied[:20])} in the billed period")
        outbox = _billing_messages(request_id, body, per_retailer)
        audit = [AuditEntry(str(who), cid, Action.REQUEST_BILLING.value, right, ref=request_id) for cid in client_ids]
        return await self.creator.create(who, key, NewRequest(
            request_id, "billing", body, time.time() + BILLING_DELIVERY_S, t0, clients=entries, outbox=outbox,
            audit=audit))

    # -- measurements and audit -------------------------------------------------------------------------------

    async def accept_measurements(self, retailer_id: str, msg: Measurements) -> list[str]:
        """Store the measurements a retailer may send (its own clients at that time); returns refused clients."""
        who = Principal("retailer", retailer_id)
        clients = await self.store.get_clients(sorted({m.client_id for m in msg.items}))
        ok, refused = [], []
        rights: dict[str, str] = {}
        for m in msg.items:
            c = clients.get(m.client_id)
            supplier = supplier_at(c["suppliers"], m.at.timestamp()) if c else None
            verdict = decide(who, Action.SEND_MEASUREMENT, Context(supplier_at_time=supplier))
            if verdict.allowed:
                ok.append((m.client_id, m.at.timestamp(), m.active_power_kw, retailer_id))
                rights[m.client_id] = verdict.right
            else:
                refused.append(m.client_id)
        refused = sorted(set(refused))
        # Every attempt is in the data access log, in the same write as the measurements and before them (if the
        # log cannot be written, nothing is stored or acknowledged): one line per client and message, accepted or
        # refused, for a refused registered client up to AUDIT_REFUSALS_LOGGED per message; unknown ids (no one's
        # data) and refused clients past that are counted in one summary line (client "*"), so that a message of
        # random ids cannot write a line per id. The retailer is answered the same for an unknown client as for
        # another's.
        refused_known = [cid for cid in refused if cid in clients]
        audit = refusal_audit(str(who), Action.SEND_MEASUREMENT.value, "none", refused_known,
                              len(refused) - len(refused_known), [], msg.msg_id)
        audit += [AuditEntry(str(who), cid, Action.SEND_MEASUREMENT.value, right, True, msg.msg_id)
                  for cid, right in sorted(rights.items())]
        await self.store.put_measurements(ok, audit)
        return refused

    async def get_measurements(self, who: Principal, client_id: str, start: float, end: float) -> dict[str, Any]:
        """A client's active-power series (DSO)."""
        await self.access.named(who, Action.READ_MEASUREMENTS, [client_id])
        if await self.store.get_client(client_id) is None:
            raise NotFound(f"client {client_id!r} is not registered")
        await self.access.logged(who, Action.READ_MEASUREMENTS, client_id)
        series = await self.store.measurements(client_id, start, end)
        return {"client_id": client_id, "from": iso(start), "to": iso(end),
                "series": [{"at": iso(s["at"]), "active_power_kw": s["active_power_kw"],
                            "retailer_id": s["retailer_id"]} for s in series]}

    async def get_audit(self, who: Principal, client_id: str, start: float, end: float) -> dict[str, Any]:
        """The data access log of one client (DSO)."""
        self.access.authorize(who, Action.READ_AUDIT)
        entries = await self.store.get_audit(client_id, start, end)
        return {"client_id": client_id, "from": iso(start), "to": iso(end),
                "entries": [{**e, "at": iso(e["at"])} for e in entries]}
