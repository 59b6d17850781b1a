"""The hub's data on the HBase-shaped store: row keys and cells of every table (``docs/storage.md``).

Every query costs in proportion to its own answer: a client is one row (with its supplier periods as cells), a
request is one row (with a cell per targeted client and per outbox message), a consumption profile or a
measurement series is one prefix scan of ``client_id|time``, the audit of a client one prefix scan.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud_hub import codec, fanout
from cloud_hub.errors import Conflict
from cloud_hub.feed import ChangeFeed, Staged
from cloud_hub.lifecycle import RequestState, RowChanges, RowState, working
from cloud_hub.storage import KVStore, Mutation, Row, StoreUnavailable, prefix_stop
from cloud_hub.storage.sqlite import SqliteKV
from cloud_hub.timeline import supplier_at
from cloud_hub.yielding import CHUNK, chunked_apply, chunked_map
from mhp_wire.messages import ClientState

if TYPE_CHECKING:
    from cloud_hub.settings import HubSettings

__all__ = ["AuditEntry", "Conflict", "HubStore", "KeptEntries", "RequestCodec", "StoreUnavailable", "audit_mutations",
           "decode_cells", "held_copies", "ms", "tkey"]


def ms(ts: float) -> int:
    """Epoch seconds to integer milliseconds."""
    return round(ts * 1000)


def tkey(ts: float) -> str:
    """A time as a fixed-width row-key part that sorts in time order (ms since the epoch, 15 digits)."""
    return f"{max(0, ms(ts)):015d}"


NEWEST_FIRST_MS = 10**15 - 1
"""Row keys that sort newest first hold ``NEWEST_FIRST_MS - ms(time)`` (15 digits, like :func:`tkey`)."""


def issuer_key(issuer: str, created_at: float, request_id: str) -> str:
    """The ``requests_by_issuer`` row of a request: ``issuer|<newest-first time>|request_id``, so that one issuer's
    requests are one prefix scan, newest first."""
    return f"{issuer}|{NEWEST_FIRST_MS - max(0, ms(created_at)):015d}|{request_id}"


def _j(obj: Any) -> bytes:
    return codec.dumps(obj)


def _u(raw: bytes | None, default: Any = None) -> Any:
    return default if raw is None else codec.loads(raw)


def _blocks(rows: list[tuple[str, Row]], start: float) -> list[dict[str, Any]]:
    """Reading blocks decoded from their rows, those that end after ``start``."""
    out = []
    for _, r in rows:
        b = {"start": _u(r["r:start"]), "resolution_s": _u(r["r:resolution_s"]), "values_kwh": _u(r["r:values"]),
             "quality": r["r:quality"].decode(), "version": int(r["r:version"]),
             "corrected": r.get("r:corrects") == b"1", "uploaded_at": _u(r["r:uploaded_at"])}
        if b["start"] + b["resolution_s"] * len(b["values_kwh"]) > start:
            out.append(b)
    return out


SUPPLIER_CELL_MS_MAX = 10**15 - 1
"""The largest time a supplier period's cell name holds (:func:`tkey`'s 15 digits)."""


def supplier_cell_upto(at: float) -> str:
    """The greatest supplier-period cell name (``s:`` and :func:`tkey`'s 15 digits) of a period that has begun at
    ``at``: a cell ``s:<ms>`` sorts at or below it exactly when ``ms / 1000 <= at``, so the common one-period client
    row is answered by comparing names, without parsing its time."""
    if at != at:  # NaN: no period has begun (ms / 1000 <= NaN is never true)
        return "s:"
    m = math.floor(at * 1000) if abs(at) < 1e16 else (SUPPLIER_CELL_MS_MAX if at > 0 else -1)
    while m < SUPPLIER_CELL_MS_MAX and (m + 1) / 1000 <= at:  # at * 1000 rounded down one too far
        m += 1
    while m >= 0 and m / 1000 > at:  # ... or up
        m -= 1
    if m < 0:
        return "s:"  # below every cell: no period has begun
    return f"s:{min(m, SUPPLIER_CELL_MS_MAX):015d}"


@dataclass(slots=True)
class ClientPlan:
    """What registering some clients writes (:meth:`HubStore.plan_clients`)."""

    mutations: list[Mutation] = field(default_factory=list)
    created: int = 0
    """How many of the clients are new."""
    history: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = field(default_factory=dict)
    """``client_id -> (supplier periods before, after)`` of every client whose supplier history changes."""
    revisions: dict[str, int] = field(default_factory=dict)
    """``client_id -> revision`` of every client whose supplier history changes: the change's number in the
    ``customers`` announcements (stored with the client, ``d:revision``)."""


@dataclass(slots=True)
class AuditEntry:
    """One line of the data access log: who read or triggered what, for which client, under which right."""

    principal: str
    client_id: str
    action: str
    right: str
    allowed: bool = True
    ref: str | None = None
    at: float = field(default_factory=time.time)
    detail: str | None = None
    """What a summary line (client ``*``) stands for, e.g. how many refused client ids it counts."""


_seq = 0


def audit_mutation(e: AuditEntry) -> Mutation:
    """The audit row of one entry (key ``client_id|time|seq``: one client's log is one prefix scan)."""
    global _seq
    _seq = (_seq + 1) % 1_000_000
    line: dict[str, Any] = {"principal": e.principal, "action": e.action, "right": e.right, "allowed": e.allowed,
                            "ref": e.ref, "at": e.at}
    if e.detail:
        line["detail"] = e.detail
    return Mutation("audit", f"{e.client_id}|{tkey(e.at)}|{_seq:06d}", {AUDIT_LINE: _j(line)})


def audit_mutations(entries: Iterable[AuditEntry]) -> list[Mutation]:
    """:func:`audit_mutation` of each entry, in order, with the same rows; a line shared by many entries (one request's
    clients: same principal, action, right, reference and time) is encoded once, and each distinct time's key part
    made once. Accepting a request for 10,000 clients writes 10,000 audit lines that differ only in their client."""
    global _seq
    out: list[Mutation] = []
    encoded: dict[tuple[Any, ...], tuple[str, bytes]] = {}
    for e in entries:
        shape = (e.principal, e.action, e.right, e.allowed, e.ref, e.at, e.detail)
        known = encoded.get(shape)
        if known is None:
            line: dict[str, Any] = {"principal": e.principal, "action": e.action, "right": e.right,
                                    "allowed": e.allowed, "ref": e.ref, "at": e.at}
            if e.detail:
                line["detail"] = e.detail
            known = encoded[shape] = (tkey(e.at), _j(line))
        _seq = (_seq + 1) % 1_000_000
        out.append(Mutation("audit", f"{e.client_id}|{known[0]}|{_seq:06d}", {AUDIT_LINE: known[1]}))
    return out


def decode_cells(row: Row) -> dict[str, Any]:
    """A row's cells decoded, ``{column: value}``: all of them in one decoder call (each cell is one JSON text, so
    the row's values joined by commas are one JSON array), the same values as decoding cell by cell; a row whose
    cells do not make one array (a cell that is not JSON) is decoded cell by cell, so the error names that cell's
    value as before."""
    if len(row) < 2:
        return {c: _u(v) for c, v in row.items()}
    try:
        values = codec.loads(b"[" + b",".join(row.values()) + b"]")
    except ValueError:
        return {c: _u(v) for c, v in row.items()}
    if len(values) != len(row):  # an empty cell, or one holding several texts: not one value per cell
        return {c: _u(v) for c, v in row.items()}
    return dict(zip(row, values, strict=True))


async def _decode_in_chunks(row: Row) -> dict[str, Any]:
    """:func:`decode_cells` of a row, :data:`cloud_hub.yielding.CHUNK` cells at a time with the event loop let go
    between them (a request row of 100,000 clients)."""
    if len(row) <= CHUNK:
        return decode_cells(row)
    return dict(await chunked_apply(lambda part: list(decode_cells(dict(part)).items()), list(row.items())))


AUDIT_LINE = "a:l"
"""The one cell of an audit row (since issue 14's third round; rows written before hold one cell per field,
``a:principal``, ``a:action``, ..., and are read as they are)."""


def audit_line(client_id: str, c: Row) -> dict[str, Any]:
    """One audit row as ``GET /v1/audit`` answers it, from either form of the row."""
    if AUDIT_LINE in c:
        d = _u(c[AUDIT_LINE])
        return {"at": d["at"], "principal": d["principal"], "client_id": client_id, "action": d["action"],
                "right": d["right"], "allowed": d["allowed"], "ref": d["ref"] or None,
                **({"detail": d["detail"]} if d.get("detail") else {})}
    return {"at": _u(c["a:at"]), "principal": c["a:principal"].decode(), "client_id": client_id,
            "action": c["a:action"].decode(), "right": c["a:right"].decode(), "allowed": c["a:allowed"] == b"1",
            "ref": c["a:ref"].decode() or None, **({"detail": c["a:detail"].decode()} if "a:detail" in c else {})}


class RequestCodec:
    """A request row's cells and the lifecycle's :class:`~cloud_hub.lifecycle.RowState`, both ways.

    The one place the request row's cell names live (``docs/storage.md``): ``r:<field>`` for the request's own
    fields, ``c:<client>`` per targeted client, ``p:<retailer>`` per party of a request without clients, ``o:<msg>``
    per queued message. Values are the JSON the row has always held, so existing hub databases load unchanged.
    """

    META_FOR_OUTCOMES = ("state", "counts", "created_at", "phase", "type", "answered", "targets", "selection")
    _OUTCOME_META = list(map("r:{}".format, META_FOR_OUTCOMES))
    """The cells of :attr:`META_FOR_OUTCOMES` (made once, not per commit)."""

    @staticmethod
    def meta(name: str) -> str:
        """The cell of the request's own field ``name``."""
        return f"r:{name}"

    @staticmethod
    def client(client_id: str) -> str:
        """The cell of one targeted client's entry."""
        return f"c:{client_id}"

    @staticmethod
    def party(retailer_id: str) -> str:
        """The cell of one party (a retailer addressed by a request without clients)."""
        return f"p:{retailer_id}"

    @staticmethod
    def message(msg_id: str) -> str:
        """The cell of one queued outbox message."""
        return f"o:{msg_id}"

    @classmethod
    def outcome_columns(cls, client_ids: Iterable[str], owner: bool) -> list[str]:
        """The cells :meth:`row_state` decodes for outcomes about ``client_ids`` (``owner``: with the replica
        owning the request)."""
        # "c:" + id inline (per outcome of every commit): what :meth:`client` gives, without a call per client
        return [*dict.fromkeys(["c:" + c for c in client_ids]), *cls._OUTCOME_META, *(["r:owner"] if owner else [])]

    @staticmethod
    def owner(cells: dict[str, Any]) -> str | None:
        """The replica owning the request (None: a hub without replicas, or not read)."""
        owner: str | None = cells.get("r:owner")
        return owner

    @staticmethod
    def row_state(cells: dict[str, Any]) -> RowState | None:
        """The lifecycle's view of a request's cells, as read (None: no such request)."""
        if "r:state" not in cells:
            return None
        return RowState(
            state=RequestState(cells["r:state"]),
            counts=Counter({ClientState(k): v for k, v in cells["r:counts"].items()}),
            created_at=cells.get("r:created_at"), kind=cells.get("r:type"), phase=cells.get("r:phase"),
            answered=int(cells.get("r:answered") or 0), targets=int(cells.get("r:targets") or 0),
            selection=cells.get("r:selection") or {},
            clients={col[2:]: e for col, e in cells.items() if col.startswith("c:")},
            parties={col[2:]: e for col, e in cells.items() if col.startswith("p:")},
            first_dispatch_at=cells.get("r:first_dispatch_at"), cancel=cells.get("r:cancel"))

    @staticmethod
    def changes(changes: RowChanges) -> dict[str, Any]:
        """The cells to write for ``changes`` (empty when nothing changed)."""
        put: dict[str, Any] = {} if changes.cancel is None else {"r:cancel": changes.cancel}
        put.update({f"c:{cid}": e for cid, e in changes.clients.items()})
        put.update({f"p:{rid}": e for rid, e in changes.parties.items()})
        if changes.answered is not None:
            put["r:answered"] = changes.answered
        if changes.counts is not None:
            put["r:counts"] = {k.value: v for k, v in changes.counts.items() if v}
        if changes.state is not None:
            put["r:state"] = changes.state.value
        if changes.ended_at is not None:
            put["r:completed_at"] = changes.ended_at
            put["r:phase"] = "done"
        if changes.first_dispatch_at is not None:
            put["r:first_dispatch_at"] = changes.first_dispatch_at
        return put

    @classmethod
    def target_columns(cls, clients: Sequence[str], retailer_id: str) -> list[str]:
        """The cells of a message's targets: its clients', or (none) its retailer's as a party."""
        return [cls.client(c) for c in clients] or [cls.party(retailer_id)]

    @classmethod
    def sent_columns(cls, messages: Iterable[tuple[Sequence[str], str]]) -> list[str]:
        """The cells :func:`~cloud_hub.lifecycle.sent` needs for ``(clients, retailer_id)`` of first sends."""
        cols = [cls.meta("state"), cls.meta("counts"), cls.meta("first_dispatch_at")]
        for clients, retailer_id in messages:
            cols += cls.target_columns(clients, retailer_id)
        return cols

    @classmethod
    def ack_columns(cls, deliveries: Iterable[tuple[Sequence[str], str]]) -> list[str]:
        """The cells :func:`~cloud_hub.lifecycle.acknowledged` needs for ``(clients, retailer_id)`` of deliveries."""
        cols = [cls.meta("state"), cls.meta("counts"), cls.meta("cancel")]
        for clients, retailer_id in deliveries:
            cols += cls.target_columns(clients, retailer_id)
        return cols

    META = ["r:"]
    """The family of a request's own fields."""
    TARGETS = ["c:", "p:"]
    """The families of a request's targets: its clients, or (none) its parties."""
    WHOLE = [*META, *TARGETS]
    """The families of a request's own fields and all of its targets (no queued messages)."""
    WITH_CLIENTS = [*META, "c:"]
    """The families of a request's own fields and its clients."""
    WITH_MESSAGES = ["r:", "o:"]
    """The families of a request's own fields and its queued messages."""

    @classmethod
    def messages(cls, stored: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The cells of queued messages, from ``{msg_id: stored form}``."""
        return {cls.message(m): d for m, d in stored.items()}

    @classmethod
    def message_cells(cls, msg_ids: Iterable[str]) -> list[str] | None:
        """The cells of ``msg_ids`` to delete (None: none)."""
        return [cls.message(m) for m in msg_ids] or None

    @classmethod
    def fields(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The cells of the request's own fields ``{name: value}``."""
        return {cls.meta(k): v for k, v in values.items()}

    @staticmethod
    def state_written(put: dict[str, Any]) -> RequestState | None:
        """The request state cells ``put`` write (None: they leave it as it is)."""
        state = put.get("r:state")
        return None if state is None else RequestState(state)

    @staticmethod
    def with_storage_ms(put: dict[str, Any], storage_ms: float) -> dict[str, Any]:
        """``put`` with the measured duration of the request's creating write (``docs/storage.md``)."""
        put["r:storage_ms"] = storage_ms
        return put

    @staticmethod
    def stores_storage_ms(put: dict[str, Any]) -> bool:
        """Whether ``put`` writes the request's measured storage time."""
        return "r:storage_ms" in put


ENTRIES_KEPT = 50_000
"""Client entries :class:`KeptEntries` holds at most, over all rows (~1 KB each decoded): a few fan-outs' worth."""


class KeptEntries:
    """The client entries (``c:`` cells) of the large request rows this process expanded, decoded, as last durably
    written: what an outcome commit or a round of ``sent`` marks would otherwise read back from storage and decode
    before each write (issue 14, fourteenth round: ~2 µs per client of a fan-out's outcome, and again per mark).

    Only for a hub that is the one writer of its store (a replica shares the file with other writers: never there).
    A row is kept from its expansion (every client entry it has, so a client missing here is missing from the row)
    until a write closes the request, a write to it fails, or newer rows need the room; every write of the store
    updates it once durable, so it holds what a storage read returns at that moment. Readers get shallow copies
    (:func:`~cloud_hub.lifecycle.working`): they may change an entry's top-level fields and its ``retailers`` in
    place; its other nested values (``detail``, ``trace``, ``history``, ``superseded``) are shared with the held
    entry, to be replaced, never changed."""

    def __init__(self, limit: int = ENTRIES_KEPT) -> None:
        self.limit = limit
        self._rows: dict[str, dict[str, dict[str, Any]]] = {}
        self._size = 0

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._rows

    def __len__(self) -> int:
        """Entries held, over all rows."""
        return self._size

    def keep(self, request_id: str, entries: dict[str, dict[str, Any]]) -> None:
        """Hold ``entries`` (``{"c:<client>": entry}``, every client entry of the row, just written) from now on;
        a row larger than :attr:`limit` is not held, and the oldest rows make room."""
        self.forget(request_id)
        if len(entries) > self.limit:
            return
        while self._rows and self._size + len(entries) > self.limit:
            self.forget(next(iter(self._rows)))
        self._rows[request_id] = dict(entries)
        self._size += len(entries)

    def clear(self) -> None:
        """Hold nothing."""
        self._rows.clear()
        self._size = 0

    def forget(self, request_id: str) -> None:
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._size -= len(row)

    def written(self, request_id: str, put: dict[str, Any], delete: list[str] | None, close: bool) -> None:
        """A durable write of the row: ``delete``'s client entries go, then ``put``'s replace those held (the order
        storage applies a mutation in, :meth:`~cloud_hub.storage.sqlite.SqliteKV.batch`: a column in both is put).
        Over :attr:`limit` after it, the oldest other rows make room; a row larger than the limit is held no
        longer."""
        row = self._rows.get(request_id)
        if row is None:
            return
        if close:
            self.forget(request_id)
            return
        n = len(row)
        for col in delete or ():
            row.pop(col, None)
        row.update((col, e) for col, e in put.items() if col[:2] == "c:")
        self._size += len(row) - n
        if len(row) > self.limit:
            self.forget(request_id)
            return
        while self._size > self.limit:
            self.forget(next(r for r in self._rows if r != request_id))

    def split(self, request_id: str, columns: list[str]) -> tuple[list[tuple[str, dict[str, Any]]], list[str]] | None:
        """The client cells of ``columns`` held for the row, ``(column, entry)`` (the held objects themselves: a
        reader gets :func:`held_copies` of them; a client the row lacks is left out, as a read leaves it out), and
        the other columns, to be read; None: the row is not held."""
        row = self._rows.get(request_id)
        if row is None:
            return None
        found: list[tuple[str, dict[str, Any]]] = []
        rest: list[str] = []
        for col in columns:
            if col[:2] != "c:" or col == "c:":
                rest.append(col)
            elif (e := row.get(col)) is not None:
                found.append((col, e))
        return found, rest


def held_copies(cells: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Held client entries as a reader gets them: shallow copies (:func:`~cloud_hub.lifecycle.working`) whose
    top-level fields and ``retailers`` it may change in place; other nested values are shared, to be replaced."""
    return [(col, working(e)) for col, e in cells]


class HubStore:
    """Registry, requests, readings, measurements, tariffs and the access log of the hub."""

    def __init__(self, kv: KVStore, *, keep_entries: bool = False) -> None:
        self.kv = kv
        self.feed: ChangeFeed | None = None
        """Set by the app: every request write then adds its change-feed events to the same batch."""
        self.kept: KeptEntries | None = KeptEntries() if keep_entries else None
        """The expanded rows' client entries held in memory (``keep_entries``: only where this process is the store's
        one writer), read by :meth:`get_requests_cells` with ``kept``."""

    async def _batch_with_events(self, muts: list[Mutation],
                                 writes: list[tuple[str, dict[str, Any], dict[str, Any] | None]]) -> None:
        """Write ``muts`` with the change-feed events of the request rows ``writes`` ``(request_id, put, meta)``
        (the one place events are made, see :mod:`cloud_hub.feed`); they are published once durable."""
        if self.feed is None:
            await self.kv.batch(muts)
            return
        staged: Staged = await self.feed.stage(writes)
        try:
            await self.kv.batch([*muts, *staged.mutations])
        except BaseException:
            self.feed.settle(staged, durable=False)
            raise
        self.feed.settle(staged, durable=True)

    @classmethod
    def embedded(cls, path: Path | str, busy_timeout_ms: int = 1000, *, keep_entries: bool = False) -> HubStore:
        """The default: the embedded SQLite backend."""
        return cls(SqliteKV(path, busy_timeout_ms=busy_timeout_ms), keep_entries=keep_entries)

    @classmethod
    def from_settings(cls, settings: HubSettings) -> HubStore:
        """The backend the settings name; a hub without replicas (the store's one writer) keeps its expanded rows'
        client entries in memory (:class:`KeptEntries`)."""
        keep = settings.replica_id is None
        if settings.storage == "hbase":
            from cloud_hub.storage.hbase import HBaseKV

            return cls(HBaseKV(settings.hbase_hosts, table_prefix=settings.hbase_table_prefix,
                               pool_size=settings.hbase_pool_size, timeout_ms=settings.hbase_timeout_ms),
                       keep_entries=keep)
        return cls.embedded(settings.db_path, settings.sqlite_busy_timeout_ms, keep_entries=keep)

    async def open(self) -> None:
        """Open the backend (creating tables)."""
        await self.kv.open()

    async def close(self) -> None:
        """Close the backend; the held client entries go (a store opened again reads storage first)."""
        if self.kept is not None:
            self.kept.clear()
        await self.kv.close()

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless storage accepts writes."""
        await self.kv.ping()

    # -- registry -----------------------------------------------------------------------------------------

    async def put_retailer(self, retailer_id: str, name: str) -> bool:
        """Create or rename a retailer; True when it is new."""
        existing = await self.kv.get("retailers", retailer_id, ["d:name"])
        await self.kv.batch([Mutation("retailers", retailer_id, {
            "d:name": name.encode(), **({} if existing else {"d:created_at": _j(time.time())})})])
        return not existing

    async def get_retailer(self, retailer_id: str) -> dict[str, Any] | None:
        """A retailer, or None."""
        row = await self.kv.get("retailers", retailer_id)
        return {"retailer_id": retailer_id, "name": row["d:name"].decode()} if row else None

    async def known_retailers(self, retailer_ids: list[str]) -> set[str]:
        """Those of ``retailer_ids`` that are registered."""
        return set(await self.kv.get_many("retailers", retailer_ids, ["d:name"]))

    async def retailer_ids(self) -> list[str]:
        """Every registered retailer."""
        return [r for r, _ in await self.kv.scan("retailers", columns=["d:name"])]

    @staticmethod
    def _client(client_id: str, row: Row) -> dict[str, Any]:
        periods = sorted((int(c[2:]) / 1000, v.decode()) for c, v in row.items() if c.startswith("s:"))
        return {"client_id": client_id, "contracted_power_kw": _u(row.get("d:contracted_power_kw")),
                "feeder_id": _u(row.get("d:feeder_id")), "revision": _u(row.get("d:revision")),
                "suppliers": [{"valid_from": f, "retailer_id": r} for f, r in periods]}

    async def get_client(self, client_id: str) -> dict[str, Any] | None:
        """A client with its supplier periods (oldest first), or None."""
        row = await self.kv.get("clients", client_id)
        return self._client(client_id, row) if row else None

    async def get_clients(self, client_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Several clients at once; unknown ones are absent."""
        rows = await self.kv.get_many("clients", client_ids)
        return {cid: self._client(cid, row) for cid, row in rows.items()}

    async def suppliers_at(self, client_ids: list[str], at: float, *, power: bool = False
                           ) -> dict[str, tuple[str | None, float | None]]:
        """Each registered client's retailer at ``at`` (None: none supplies it then) and, with ``power``, its
        contracted power; unknown clients are absent. Reads only the supplier cells (and the power), decoding
        nothing else: what accepting a request for thousands of clients needs (``docs/performance.md``)."""
        if not power:
            return await self._suppliers_only(client_ids, at)
        rows = await self.kv.get_many("clients", client_ids, ["s:", "d:contracted_power_kw"])
        out: dict[str, tuple[str | None, float | None]] = {}
        for cid, row in rows.items():
            periods = [(int(c[2:]) / 1000, v) for c, v in row.items() if c[0] == "s"]
            if len(periods) == 1:  # one supplier since registration: supplier_at's rule without its dicts
                rid = periods[0][1].decode() if periods[0][0] <= at else None
            else:
                rid = supplier_at([{"valid_from": f, "retailer_id": r.decode()} for f, r in sorted(periods)], at)
            out[cid] = (rid, _u(row.get("d:contracted_power_kw")))
        return out

    async def _suppliers_only(self, client_ids: list[str], at: float) -> dict[str, tuple[str | None, float | None]]:
        """:meth:`suppliers_at` without the power, from the supplier cells as flat triples: the common client,
        supplied by one retailer since registration, costs a comparison of its cell's name with ``at``'s
        (:func:`supplier_cell_upto`) and a lookup of its retailer's id, decoded once per retailer."""
        cells = await self.kv.get_many_cells("clients", client_ids, ["s:"])
        upto = supplier_cell_upto(at)
        names: dict[bytes, str] = {}
        out: dict[str, tuple[str | None, float | None]] = {}
        for cid, col, raw in cells:
            if col > upto:
                out[cid] = (None, None)
                continue
            rid = names.get(raw)
            if rid is None:
                rid = names[raw] = raw.decode()
            out[cid] = (rid, None)
        if len(out) < len(cells):  # some clients have several supplier periods: supplier_at's rule for them
            periods: dict[str, list[tuple[float, str]]] = {}
            for cid, col, raw in cells:
                periods.setdefault(cid, []).append((int(col[2:]) / 1000, raw.decode()))
            for cid, mine in periods.items():
                if len(mine) > 1:
                    out[cid] = (supplier_at([{"valid_from": f, "retailer_id": r} for f, r in sorted(mine)], at), None)
        return out

    async def put_client(self, client_id: str, retailer_id: str, contracted_power_kw: float,
                         feeder_id: str | None, valid_from: float) -> bool:
        """Create or update a client; a different retailer from a later ``valid_from`` is a supplier switch."""
        return await self.put_clients([(client_id, retailer_id, contracted_power_kw, feeder_id, valid_from)]) == 1

    async def put_clients(self, clients: list[tuple[str, str, float, str | None, float]]) -> int:
        """:meth:`put_client` for many ``(client_id, retailer_id, contracted_power_kw, feeder_id, valid_from)``
        at once: one read of the rows, one batch. Raises :class:`Conflict`, writing nothing, when any of them is
        a supplier switch without a later ``valid_from``. Returns how many clients are new."""
        plan = await self.plan_clients(clients)
        await self.kv.batch(plan.mutations)
        return plan.created

    async def plan_clients(self, clients: list[tuple[str, str, float, str | None, float]]) -> ClientPlan:
        """What :meth:`put_clients` would write, without writing it: the mutations, how many clients are new,
        and the supplier history before and after of each client whose history changes (a new client, a
        supplier switch). Raises :class:`Conflict` as :meth:`put_clients` does."""
        existing = await self.get_clients([c[0] for c in clients])
        plan = ClientPlan(created=sum(c[0] not in existing for c in clients))
        for client_id, retailer_id, contracted_power_kw, feeder_id, valid_from in clients:
            plan.mutations += self._client_mutations(client_id, existing.get(client_id), retailer_id,
                                                     contracted_power_kw, feeder_id, valid_from)
        added: dict[str, Row] = {}
        for m in plan.mutations:  # the supplier periods written (the cells ``s:<valid_from>``)
            periods = {c: v for c, v in (m.put or {}).items() if c.startswith("s:")} if m.table == "clients" else {}
            if periods:
                added.setdefault(m.row, {}).update(periods)
        now_ms = ms(time.time())
        for client_id, periods in added.items():
            first = existing.get(client_id)
            before = [] if first is None else first["suppliers"]
            row: Row = {f"s:{tkey(p['valid_from'])}": p["retailer_id"].encode() for p in before}
            plan.history[client_id] = (before, self._client(client_id, {**row, **periods})["suppliers"])
            # The change's revision: the hub's write time in ms, and above the client's last one whatever the
            # clocks (a client announced before revisions were stored had the length of its history): it grows
            # with every change without telling a retailer how many supplier periods the client had.
            last = 0 if first is None else max(first["revision"] or 0, len(before))
            plan.revisions[client_id] = max(last + 1, now_ms)
        for m in plan.mutations:
            if m.table == "clients" and m.row in plan.revisions:
                m.put["d:revision"] = _j(plan.revisions[m.row])
        return plan

    @staticmethod
    def _client_mutations(client_id: str, old: dict[str, Any] | None, retailer_id: str,
                          contracted_power_kw: float, feeder_id: str | None, valid_from: float) -> list[Mutation]:
        muts = []
        cells: Row = {"d:contracted_power_kw": _j(contracted_power_kw), "d:feeder_id": _j(feeder_id)}
        if old is None:
            cells["d:created_at"] = _j(time.time())
            cells[f"s:{tkey(valid_from)}"] = retailer_id.encode()
        else:
            last = old["suppliers"][-1]
            if last["retailer_id"] != retailer_id:
                if valid_from <= last["valid_from"]:
                    raise Conflict(f"client {client_id!r} is supplied by {last['retailer_id']!r} since "
                                   f"{_iso(last['valid_from'])}; a supplier switch needs a later valid_from")
                cells[f"s:{tkey(valid_from)}"] = retailer_id.encode()
            if old["feeder_id"] and old["feeder_id"] != feeder_id:
                muts.append(Mutation("feeders", f"{old['feeder_id']}|{client_id}", delete=[]))
        if feeder_id:
            muts.append(Mutation("feeders", f"{feeder_id}|{client_id}", {"d:x": b"1"}))
        return [Mutation("clients", client_id, cells), *muts]

    async def import_clients(self, clients: list[tuple[str, str, float, str | None, float]]) -> None:
        """Bulk registration of new clients ``(client_id, retailer_id, contracted_power_kw, feeder_id,
        valid_from)``, e.g. a DSO's initial import; unlike :meth:`put_client` it does not check for switches."""
        now = _j(time.time())
        muts = []
        for cid, rid, kw, feeder, valid_from in clients:
            muts.append(Mutation("clients", cid, {"d:contracted_power_kw": _j(kw), "d:feeder_id": _j(feeder),
                                                  "d:created_at": now, f"s:{tkey(valid_from)}": rid.encode()}))
            if feeder:
                muts.append(Mutation("feeders", f"{feeder}|{cid}", {"d:x": b"1"}))
        await self.kv.batch(muts)

    async def client_page(self, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` clients in client-id order, those after ``after`` (one row-key range scan)."""
        rows = await self.kv.scan("clients", start=(after + "\x00") if after is not None else None,
                                  stop=prefix_stop(""), limit=limit)
        return [self._client(cid, row) for cid, row in rows]

    async def feeder_client_page(self, feeder_id: str, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` client ids of a feeder in client-id order, those after ``after`` (one range scan of the
        ``feeders`` index)."""
        prefix = f"{feeder_id}|"
        start = prefix + (after + "\x00" if after is not None else "")
        rows = await self.kv.scan("feeders", start=start, stop=prefix_stop(prefix), limit=limit, columns=["d:x"])
        return [r[len(prefix):] for r, _ in rows]

    async def clients_on_feeder(self, feeder_id: str, limit: int | None = None) -> list[str]:
        """The clients registered on a feeder (the first ``limit`` of them, by id, when given)."""
        return [r.split("|", 1)[1] for r, _ in await self.kv.scan("feeders", prefix=f"{feeder_id}|", limit=limit)]

    # -- requests -----------------------------------------------------------------------------------------

    async def idempotency(self, principal: str, key: str
                          ) -> tuple[tuple[str, int, dict[str, Any]] | None, bytes | None]:
        """What is stored for this principal's ``Idempotency-Key``: ``(body_hash, status, answer)`` once answered,
        and the claim of the attempt that is (or was) creating the request, each None when absent."""
        row = await self.kv.get("idempotency", f"{principal}|{key}")
        answer = (row["d:hash"].decode(), int(row["d:status"]), _u(row["d:answer"])) if "d:answer" in row else None
        return answer, row.get("d:claim")

    async def claim_idempotency(self, principal: str, key: str, expected: bytes | None, claim: bytes) -> bool:
        """Set the key's claim to ``claim`` if it is still ``expected`` (None: unclaimed); whether it was set."""
        return await self.kv.check_and_put("idempotency", f"{principal}|{key}", "d:claim", expected, claim)

    async def release_idempotency(self, principal: str, key: str, claim: bytes | None) -> bool:
        """Release the key's claim (its attempt failed before creating anything), unless another attempt has taken
        it over meanwhile: the claim becomes empty (unclaimed). Whether it was released."""
        if claim is None:
            return False
        return await self.kv.check_and_put("idempotency", f"{principal}|{key}", "d:claim", claim, b"")

    async def put_idempotent_answer(self, principal: str, key: str, digest: str, status: int,
                                    answer: dict[str, Any]) -> None:
        """Store the answer of a key whose request exists (written with the request, normally)."""
        await self.kv.batch([Mutation("idempotency", f"{principal}|{key}", {
            "d:hash": digest.encode(), "d:status": str(status).encode(), "d:answer": _j(answer)})])

    async def request_exists(self, request_id: str) -> bool:
        """Whether the request's row has been written."""
        return bool(await self.kv.get("requests", request_id, ["r:type"]))

    # Complexity (PLR0913): every part of a new request's row goes into one atomic write.
    async def create_request(self, request_id: str, meta: dict[str, Any], clients: dict[str, dict[str, Any]],  # noqa: PLR0913
                             outbox: dict[str, dict[str, Any]], parties: dict[str, dict[str, Any]],
                             audit: list[AuditEntry],
                             idempotency: tuple[str, str, str, int, dict[str, Any]] | None,
                             owner: str | None = None, extra: Sequence[Mutation] = (),
                             plan: dict[str, Any] | None = None) -> None:
        """Store a new request. Rows in crash-safe order: the open index and the issuer's index, the request row
        (atomic), the idempotency answer, the audit lines; a restart, and a listing, ignore an index entry without
        its request row.
        ``owner``: the hub replica that keeps the request's book (``r:owner`` and the index's ``d:owner``).
        ``extra``: mutations written first, in the same batch (one transaction on SQLite): the client rows whose
        change the request announces (:meth:`plan_clients`).
        ``plan``: the request is accepted compactly (:mod:`cloud_hub.fanout`): ``clients`` and ``audit`` are empty
        here, the plan is stored in ``r:plan``, and the change feed's ``created`` event waits for
        :meth:`expand_request`, which writes them."""
        if self.kept is not None:
            self.kept.forget(request_id)  # (a new row: held only once expanded)
        cells: Row = {f"r:{k}": _j(v) for k, v in meta.items()}
        if plan is not None:
            cells[f"r:{fanout.PLAN}"] = _j(plan)
        cells.update({f"c:{cid}": _j(e) for cid, e in clients.items()})
        cells.update({f"o:{mid}": _j(m) for mid, m in outbox.items()})
        cells.update({f"p:{rid}": _j(p) for rid, p in parties.items()})
        index: Row = {"d:deadline": _j(meta["deadline"])}
        if owner is not None:
            index["d:owner"] = owner.encode()
            cells["r:owner"] = _j(owner)
        muts = [*extra, Mutation("open_requests", request_id, index)]
        if "issuer" in meta and "created_at" in meta:  # listed by its issuer (GET /v1/requests), newest first
            muts.append(Mutation("requests_by_issuer", issuer_key(str(meta["issuer"]), meta["created_at"], request_id),
                                 {"d:x": b"1"}))
        muts.append(Mutation("requests", request_id, cells))
        if idempotency:
            principal, key, digest, status, answer = idempotency
            muts.append(Mutation("idempotency", f"{principal}|{key}", {
                "d:hash": digest.encode(), "d:status": str(status).encode(), "d:answer": _j(answer)}))
        muts += audit_mutations(audit)
        if plan is not None:
            await self._batch_with_events(muts, [])
            return
        put = {**{f"c:{cid}": e for cid, e in clients.items()}, **{f"p:{rid}": p for rid, p in parties.items()}}
        await self._batch_with_events(muts, [(request_id, put, meta)])

    async def expand_request(self, request_id: str, meta: dict[str, Any], clients: dict[str, dict[str, Any]],
                             outbox: dict[str, dict[str, Any]], audit: list[AuditEntry]) -> None:
        """Write the per-client entries, queued messages and audit lines of a request accepted with a plan, and drop
        the plan, in one batch (the request row atomically), with the change feed's ``created`` event (``meta``: the
        request's own fields, as at creation)."""
        # The audit lines first, the row (which drops the plan) last: on HBase, where a batch is written row by
        # row, a crash between them leaves the plan, and the expansion is made again (an audit line twice, never
        # none).
        # Encoded in chunks (cloud_hub.yielding): 100,000 clients held the event loop for seconds in one go.
        muts = await chunked_apply(audit_mutations, audit)
        cells = dict(await chunked_map(lambda ce: (f"c:{ce[0]}", _j(ce[1])), clients.items()))
        cells.update({f"o:{mid}": _j(m) for mid, m in outbox.items()})
        muts.append(Mutation("requests", request_id, cells, delete=[f"r:{fanout.PLAN}"]))
        entries = {f"c:{cid}": e for cid, e in clients.items()}
        await self._written([request_id], self._batch_with_events(muts, [(request_id, entries, meta)]))
        if self.kept is not None:
            self.kept.keep(request_id, entries)

    async def _written(self, request_ids: list[str], write: Awaitable[None],
                       kept: Iterable[tuple[str, dict[str, Any], list[str] | None, bool]] = ()) -> None:
        """Await ``write`` of the rows ``request_ids``, then hand :attr:`kept` what it wrote (``kept``: ``(request_id,
        put, delete, close)``); a write that fails (or is cancelled: it may still commit) drops those rows from it."""
        try:
            await write
        except BaseException:
            if self.kept is not None:
                for rid in request_ids:
                    self.kept.forget(rid)
            raise
        if self.kept is not None:
            for rid, put, delete, close in kept:
                self.kept.written(rid, put, delete, close)

    async def get_request(self, request_id: str, families: list[str] | None = None) -> dict[str, Any] | None:
        """A request as ``{"meta", "clients", "outbox", "parties"}`` (only the families asked), or None; with
        ``"plan"`` too while it is accepted but not expanded (:mod:`cloud_hub.fanout`)."""
        row = await self.kv.get("requests", request_id, families)
        if not row:
            return None
        out: dict[str, Any] = {"meta": {}, "clients": {}, "outbox": {}, "parties": {}}
        names = {"r": "meta", "c": "clients", "o": "outbox", "p": "parties"}
        for col, value in decode_cells(row).items():
            fam, _, qual = col.partition(":")
            out[names[fam]][qual] = value
        plan = out["meta"].pop(fanout.PLAN, None)
        if plan is not None:
            out["plan"] = plan
        if plan is not None and (families is None or "c:" in families):
            # Accepted but not expanded yet (a moment after the 202): its clients are pending, as they will be
            # written.
            out["clients"] = {**fanout.entries(plan, out["meta"]["created_at"]), **out["clients"]}
        return out

    async def get_request_cells(self, request_id: str, columns: list[str]) -> dict[str, Any]:
        """Some cells of a request, decoded: ``{"c:<client>": {...}, "r:counts": {...}}``."""
        row = await self.kv.get("requests", request_id, columns)
        return decode_cells(row)

    async def get_requests_cells(self, wanted: dict[str, list[str]], *, kept: bool = False
                                 ) -> dict[str, dict[str, Any]]:
        """:meth:`get_request_cells` of several requests in one storage call (a missing request maps to ``{}``).
        ``kept``: the client cells of rows held in memory (:attr:`kept`) come from there, as :func:`held_copies` (only
        top-level fields and ``retailers`` may be changed in place), and only the other cells are read; for a
        caller that holds the requests' locks (an outcome commit, a round of marks), so that no write of those rows
        is under way."""
        held: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        rest = wanted
        if kept and self.kept is not None:
            rest = {}
            for rid, columns in wanted.items():
                part = self.kept.split(rid, columns)
                if part is None:
                    rest[rid] = columns
                    continue
                held[rid], left = part
                if left:  # (no columns left: nothing to read; an empty list would read the whole row)
                    rest[rid] = left
        rows = await self.kv.get_each("requests", dict(rest)) if rest else {}
        # Decoded (and copied) in chunks (cloud_hub.yielding): an outcome commit or a round of first sends reads
        # thousands.
        out = {rid: await _decode_in_chunks(rows.get(rid, {})) for rid in wanted}
        for rid, cells in held.items():
            out[rid].update(await chunked_apply(held_copies, cells))
        return out

    async def update_request(self, request_id: str, put: dict[str, Any], delete: list[str] | None = None,
                             audit: list[AuditEntry] | None = None, close: bool = False,
                             reopen: tuple[float, str | None] | None = None,
                             idempotency: tuple[str, str, str, int, dict[str, Any]] | None = None) -> None:
        """Write cells of one request row atomically (``put`` maps ``family:qualifier`` to JSON-able values);
        ``close`` drops it from the open index afterwards. ``reopen`` ``(deadline, owner)``: the request is open
        again (a revision), its index entry is written first, as at creation; ``idempotency``: the answer of the
        ``Idempotency-Key`` that made this write, after the row."""
        muts: list[Mutation] = []
        if reopen is not None:
            index: Row = {"d:deadline": _j(reopen[0])}
            if reopen[1] is not None:
                index["d:owner"] = reopen[1].encode()
            muts.append(Mutation("open_requests", request_id, index))
        muts.append(Mutation("requests", request_id, {c: _j(v) for c, v in put.items()}, delete=delete or None))
        if idempotency:
            principal, key, digest, status, answer = idempotency
            muts.append(Mutation("idempotency", f"{principal}|{key}", {
                "d:hash": digest.encode(), "d:status": str(status).encode(), "d:answer": _j(answer)}))
        muts += audit_mutations(audit or [])
        if close:
            muts.append(Mutation("open_requests", request_id, delete=[]))
        await self._written([request_id], self._batch_with_events(muts, [(request_id, put, None)]),
                            [(request_id, put, delete, close)])

    async def update_requests(self, writes: list[tuple[str, dict[str, Any], list[str] | None, bool]],
                              audit: list[AuditEntry] | None = None) -> None:
        """Write cells of several request rows in one batch, each row atomically: ``(request_id, put, delete,
        close)`` as in :meth:`update_request`; the open index loses the closed requests after every row; ``audit``
        lines go in the same batch, first."""
        muts = await chunked_apply(audit_mutations, audit or [])
        muts += [Mutation("requests", rid, dict(zip(put, await chunked_map(_j, put.values()), strict=True)),
                          delete=delete or None) for rid, put, delete, _ in writes]
        muts += [Mutation("open_requests", rid, delete=[]) for rid, _, _, close in writes if close]
        if muts:
            await self._written([w[0] for w in writes],
                                self._batch_with_events(muts, [(rid, put, None) for rid, put, _, _ in writes]), writes)

    async def issued_request_page(self, issuer: str, after: str | None, since: float | None, limit: int
                                  ) -> list[tuple[str, str]]:
        """Up to ``limit`` entries ``(cursor, request_id)`` of the ``requests_by_issuer`` index, newest first: those
        after the cursor ``after`` (the ``cursor`` of the last entry of the previous page), created at or after
        ``since``. Requests stored before this index existed are not in it."""
        prefix = f"{issuer}|"
        start = prefix + (after + "\x00" if after is not None else "")
        stop = prefix_stop(prefix)
        if since is not None:  # newest first: the oldest wanted time is the last key wanted
            stop = f"{prefix}{NEWEST_FIRST_MS - max(0, ms(since)):015d}|\U0010ffff"
        if start >= stop:  # a cursor older than ``since``: nothing is left
            return []
        rows = await self.kv.scan("requests_by_issuer", start=start, stop=stop, limit=limit, columns=["d:x"])
        return [(r[len(prefix):], r.rsplit("|", 1)[1]) for r, _ in rows]

    async def request_metas(self, request_ids: list[str], columns: list[str]) -> dict[str, dict[str, Any]]:
        """The meta cells ``columns`` (names without ``r:``) of several requests, decoded; missing ones absent."""
        rows = await self.kv.get_each("requests", {rid: [f"r:{c}" for c in columns] for rid in request_ids})
        return {rid: {c[2:]: _u(v) for c, v in row.items()} for rid, row in rows.items()}

    async def open_request_ids(self) -> list[str]:
        """Requests that have not ended, or still have messages to deliver."""
        return [r for r, _ in await self.kv.scan("open_requests")]

    async def open_request_owners(self) -> list[tuple[str, str | None]]:
        """Open requests with the hub replica that owns each (None: stored by a hub without replicas)."""
        rows = await self.kv.scan("open_requests")  # not columns=["d:owner"]: rows without one would be left out
        return [(r, cells["d:owner"].decode() if "d:owner" in cells else None) for r, cells in rows]

    async def set_owner(self, request_id: str, owner: str) -> None:
        """Hand an open request to another hub replica: the row's ``r:owner``, then the index's ``d:owner``."""
        await self.kv.batch([Mutation("requests", request_id, {"r:owner": _j(owner)}),
                             Mutation("open_requests", request_id, {"d:owner": owner.encode()})])

    # -- meter readings -----------------------------------------------------------------------------------

    async def put_readings(self, blocks: list[dict[str, Any]]) -> tuple[int, int]:
        """Store reading blocks; a block for an interval already stored is a correction. Every upload's block is
        kept: the first at ``client|start``, a later one with the same start at ``client|start|version`` (it sorts
        right after it, so a range scan by start finds both), and reads apply "the last upload wins" where blocks
        overlap (:func:`cloud_hub.timeline.points`). Overwriting the row lost the values of the stored block that
        the correction did not cover. Returns ``(stored, corrections)``."""
        muts, corrections = [], 0
        versions: dict[str, int] = {}  # the highest version of each ``client|start`` (this upload's blocks too)
        for b in blocks:
            base = f"{b['client_id']}|{tkey(b['start'])}"
            end = b["start"] + b["resolution_s"] * len(b["values_kwh"])
            stored = await self.readings(b["client_id"], b["start"], end)
            if base not in versions:
                versions[base] = max((s["version"] for s in stored if tkey(s["start"]) == tkey(b["start"])),
                                     default=0)
            version = versions[base] = versions[base] + 1
            overlaps = version > 1 or bool(stored)
            corrections += overlaps
            muts.append(Mutation("readings", base if version == 1 else f"{base}|{version:06d}", {
                "r:start": _j(b["start"]), "r:resolution_s": _j(b["resolution_s"]), "r:values": _j(b["values_kwh"]),
                "r:quality": b["quality"].encode(), "r:version": str(version).encode(),
                "r:corrects": b"1" if overlaps else b"0", "r:uploaded_at": _j(time.time())}))
        await self.kv.batch(muts)
        return len(blocks), corrections

    async def readings(self, client_id: str, start: float, end: float, lookback_s: float = 86_400 * 31
                       ) -> list[dict[str, Any]]:
        """Reading blocks of a client that may overlap ``[start, end)`` (one range scan of its rows)."""
        rows = await self.kv.scan("readings", start=f"{client_id}|{tkey(start - lookback_s)}",
                                  stop=f"{client_id}|{tkey(end)}")
        return _blocks(rows, start)

    async def readings_many(self, queries: list[tuple[str, float, float]], lookback_s: float = 86_400 * 31
                            ) -> list[list[dict[str, Any]]]:
        """:meth:`readings` for each ``(client_id, start, end)``, all in one storage call."""
        found = await self.kv.scan_ranges("readings", [(f"{cid}|{tkey(start - lookback_s)}", f"{cid}|{tkey(end)}")
                                                       for cid, start, end in queries])
        return [_blocks(rows, start) for rows, (_, start, _) in zip(found, queries, strict=True)]

    # -- measurements -------------------------------------------------------------------------------------

    async def put_measurements(self, items: list[tuple[str, float, float, str]],
                               audit: list[AuditEntry] | None = None) -> None:
        """Store ``(client_id, at, active_power_kw, retailer_id)`` items (idempotent: the key is client|time), with
        their ``audit`` lines first in the same batch (one write for a whole message)."""
        muts = audit_mutations(audit or [])
        muts += [Mutation("measurements", f"{cid}|{tkey(at)}", {
            "m:kw": _j(kw), "m:retailer": rid.encode()}) for cid, at, kw, rid in items]
        if muts:
            await self.kv.batch(muts)

    async def measurements_many(self, client_ids: list[str], start: float, end: float
                                ) -> list[list[tuple[float, float]]]:
        """Each client's ``(at, active_power_kw)`` in ``[start, end)``, all in one storage call (one range scan
        per client)."""
        found = await self.kv.scan_ranges("measurements", [(f"{cid}|{tkey(start)}", f"{cid}|{tkey(end)}")
                                                           for cid in client_ids])
        return [[(int(r.split("|")[1]) / 1000, float(_u(c["m:kw"]))) for r, c in rows] for rows in found]

    async def measurements(self, client_id: str, start: float, end: float) -> list[dict[str, Any]]:
        """A client's active-power series in ``[start, end)``."""
        rows = await self.kv.scan("measurements", start=f"{client_id}|{tkey(start)}", stop=f"{client_id}|{tkey(end)}")
        return [{"at": int(r.split("|")[1]) / 1000, "active_power_kw": _u(c["m:kw"]),
                 "retailer_id": c["m:retailer"].decode()} for r, c in rows]

    # -- tariffs ------------------------------------------------------------------------------------------

    async def put_tariff(self, tariff: dict[str, Any]) -> int:
        """Store a new version of a tariff and make it the current one; returns its version. Each version also
        takes the next number of the hub's publication order (``published``, across all tariffs)."""
        version = await self.kv.increment("tariffs", tariff["tariff_id"], "t:version")
        published = await self.kv.increment("tariffs", "~published", "t:seq")
        stored = {**tariff, "version": version, "published": published}
        await self.kv.batch([Mutation("tariffs", tariff["tariff_id"], {f"t:v{version:09d}": _j(stored)}),
                             Mutation("tariffs", "~current", {"t:tariff": _j(stored)})])
        return version

    async def current_tariff(self) -> dict[str, Any] | None:
        """The latest tariff published, or None."""
        row = await self.kv.get("tariffs", "~current")
        return _u(row.get("t:tariff")) if row else None

    async def get_tariff(self, tariff_id: str, version: int | None = None) -> dict[str, Any] | None:
        """One stored version of a tariff (its latest when ``version`` is None) with ``latest_version``, or None
        when there is no such tariff or version. Every version published is kept."""
        row = await self.kv.get("tariffs", tariff_id)
        versions = sorted(int(c[3:]) for c in row if c.startswith("t:v") and c[3:].isdigit())
        if not versions:
            return None
        wanted = versions[-1] if version is None else version
        raw = row.get(f"t:v{wanted:09d}")
        if raw is None:
            return None
        tariff: dict[str, Any] = _u(raw)
        return {**tariff, "latest_version": versions[-1]}

    # -- webhook subscriptions ----------------------------------------------------------------------------

    async def put_subscription(self, sub: dict[str, Any]) -> None:
        """Store a webhook subscription (``subscription_id``, ``owner``, ``url``, ``events``, ``request_id``,
        ``secret``, ``created_at``, ``cursor``: the last event id handled)."""
        cells: Row = {f"d:{k}": _j(v) for k, v in sub.items() if k != "subscription_id"}
        await self.kv.batch([Mutation("subscriptions", sub["subscription_id"], cells)])

    async def get_subscription(self, subscription_id: str) -> dict[str, Any] | None:
        """A stored subscription, or None."""
        row = await self.kv.get("subscriptions", subscription_id)
        return {"subscription_id": subscription_id, **{c[2:]: _u(v) for c, v in row.items()}} if row else None

    async def subscriptions(self) -> list[dict[str, Any]]:
        """Every stored subscription."""
        return [{"subscription_id": r, **{c[2:]: _u(v) for c, v in cells.items()}}
                for r, cells in await self.kv.scan("subscriptions")]

    async def set_subscription_cursor(self, subscription_id: str, event_id: int) -> None:
        """The last event a subscription has handled (delivered, or dropped after its retries)."""
        await self.kv.batch([Mutation("subscriptions", subscription_id, {"d:cursor": _j(event_id)})])

    async def delete_subscription(self, subscription_id: str) -> None:
        """Remove a subscription."""
        await self.kv.batch([Mutation("subscriptions", subscription_id, delete=[])])

    # -- audit --------------------------------------------------------------------------------------------

    async def audit(self, entries: list[AuditEntry]) -> None:
        """Append lines to the data access log."""
        if entries:
            await self.kv.batch(audit_mutations(entries))

    async def get_audit(self, client_id: str, start: float, end: float) -> list[dict[str, Any]]:
        """The data access log of one client between two times, oldest first."""
        rows = await self.kv.scan("audit", start=f"{client_id}|{tkey(start)}", stop=f"{client_id}|{tkey(end)}")
        return [audit_line(client_id, c) for _, c in rows]


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat()
