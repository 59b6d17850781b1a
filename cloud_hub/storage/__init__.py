"""The hub's storage interface, shaped after HBase's data model, so the embedded store and HBase are one contract.

A store has **tables**; a table has **rows** kept sorted by row key; a row has **cells** named
``family:qualifier`` (the families of each table are fixed by :data:`SCHEMA`). The operations are HBase's: get a
row (or some of its columns), put cells, delete cells or a row, scan a key range or a prefix in key order, and
increment a counter. A single-row mutation is atomic; a :meth:`KVStore.batch` of several rows is applied in
order, atomically on the embedded store and row by row on HBase, so callers order their rows so that a crash
between two of them leaves nothing a restart cannot repair (see ``docs/storage.md``).

Every backend turns its own failures into :class:`StoreUnavailable`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from cloud_hub.errors import StoreUnavailable as StoreUnavailable  # raised by every backend: a hub error (503)

Row = dict[str, bytes]
"""Cells of one row: ``"family:qualifier" -> value``."""

SCHEMA: dict[str, tuple[str, ...]] = {
    "retailers": ("d",),
    "clients": ("d", "s"),          # d: attributes; s:<valid_from ms> -> retailer id (supplier periods)
    "feeders": ("d",),              # row feeder_id|client_id: an index
    "requests": ("r", "c", "o", "p"),  # r: meta; c:<client> state; o:<msg id> outbox; p:<retailer> delivery
    "open_requests": ("d",),        # row request id while the request has not ended: an index for restarts
    "requests_by_issuer": ("d",),   # row issuer|newest-first time|request id: an index for listing requests
    "idempotency": ("d",),          # row principal|key
    "audit": ("a",),                # row client_id|ts ms|seq: the data access log
    "readings": ("r",),             # row client_id|interval start ms: a block of meter readings
    "measurements": ("m",),         # row client_id|ts ms: active power
    "tariffs": ("t",),              # row tariff_id: t:<version> -> tariff; row "~current" -> latest
    "health": ("d",),               # written by readiness checks
    "events": ("e",),               # row event id (20 digits): the change feed's log; row "~last": the highest id
    "subscriptions": ("d",),        # row subscription id: a webhook (owner, url, events, secret, cursor)
    "parties": ("d",),              # row party id: an eligible party (docs/consent.md)
    "permissions": ("d",),          # row permission id: d:p -> the permission with its history
    "permissions_by_client": ("d",),  # row client_id|permission_id: an index for the customer's view and reads
    "permissions_by_party": ("d",),  # row party_id|newest-first time|permission_id: a party's own permissions
    "openadr3": ("d",),             # the OpenADR 3 facade: ven|, evt|<ven>|<request>, sub|, rep|<ven>|, ~cursor
}


@dataclass(slots=True)
class Mutation:
    """Put cells into, or delete cells (or the whole row) from, one row of one table."""

    table: str
    row: str
    put: Row = field(default_factory=dict)
    delete: list[str] | None = None
    """Columns to delete; an empty list deletes the whole row."""


class KVStore(Protocol):
    """An HBase-shaped store."""

    async def open(self) -> None:
        """Connect, and create the tables of :data:`SCHEMA` if missing (idempotent)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...

    async def get(self, table: str, row: str, columns: list[str] | None = None) -> Row:
        """The cells of one row (only ``columns`` when given, a column being ``family:qualifier`` or ``family:``);
        an empty dict when the row does not exist."""
        ...

    async def get_many(self, table: str, rows: list[str], columns: list[str] | None = None) -> dict[str, Row]:
        """Several rows at once; missing rows are absent from the answer."""
        ...

    async def get_many_cells(self, table: str, rows: list[str], columns: list[str] | None = None
                             ) -> list[tuple[str, str, bytes]]:
        """The cells of :meth:`get_many` as flat ``(row, column, value)`` triples, no dict built per row (accepting
        a request for 10,000 clients reads one supplier cell of each); a row's cells in no promised order, a row
        named twice answered once."""
        ...

    async def get_each(self, table: str, wanted: dict[str, list[str] | None]) -> dict[str, Row]:
        """For each row of ``wanted``, its cells (only the columns given for it, as in :meth:`get`), in one storage
        call; missing rows are absent from the answer."""
        ...

    async def scan(self, table: str, *, prefix: str | None = None, start: str | None = None,
                   stop: str | None = None, limit: int | None = None,
                   columns: list[str] | None = None) -> list[tuple[str, Row]]:
        """Rows in key order: those starting with ``prefix``, or with ``start <= key < stop``."""
        ...

    async def scan_ranges(self, table: str, ranges: list[tuple[str, str]]) -> list[list[tuple[str, Row]]]:
        """Several scans in one storage call: for each ``(start, stop)``, the rows with ``start <= key < stop`` in
        key order (a billing request reads the readings of every client it names)."""
        ...

    async def batch(self, mutations: list[Mutation]) -> None:
        """Apply mutations in order (each row atomically)."""
        ...

    async def increment(self, table: str, row: str, column: str, value: int = 1) -> int:
        """Atomically add ``value`` to a 64-bit counter cell and return the new value."""
        ...

    async def check_and_put(self, table: str, row: str, column: str, expected: bytes | None, value: bytes) -> bool:
        """Atomically: if the cell ``column`` of ``row`` holds ``expected`` (None: the cell does not exist), set it
        to ``value`` and return True; otherwise change nothing and return False (HBase's ``checkAndPut``)."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the store answers and accepts writes."""
        ...


def prefix_stop(prefix: str) -> str:
    """The smallest key greater than every key starting with ``prefix``."""
    return prefix + "\U0010ffff"
