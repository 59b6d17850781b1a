"""How many leaf pages a fan-out's outcome commits wrote in the hub's store, against the same commits scattered.

A measurement, not a part (issue 14, thirteenth round). Each outcome commit stamps every client entry it writes with
its ``updated_at``, so the distinct ``updated_at`` of a request's ``c:<client>`` cells are its outcome commits (and
its settled ``sent`` marks, which carry their own). The ``cells`` table is keyed ``(tbl, row, col)``: a request's
client entries lie in client id order, so a commit whose clients are neighbours in that order dirties few leaves,
and one whose clients are spread over the row dirties about one leaf each. Pages are estimated from the cells'
mean size (a leaf filled to 90 %), the scattered figure from the same commit sizes over a random permutation::

    python -m sim.commit_pages OUT/run/hub.db [--min-clients 9000] [--seed 1]

prints, per request of at least ``--min-clients`` clients: its commits, the leaf pages they wrote, and what the same
commits would write scattered. The product never imports this.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
from collections import defaultdict
from dataclasses import dataclass

import orjson

LEAF_FILL = 0.9
"""The share of a leaf page its cells fill (SQLite splits a full leaf; B-tree leaves of keyed inserts run 70-100 %)."""
CELL_OVERHEAD = 45
"""Bytes a ``cells`` record carries besides its column name and value: the table and row key, the record header."""


@dataclass(frozen=True)
class CommitPages:
    request_id: str
    clients: int
    commits: int
    pages: int
    """Leaf pages the commits wrote (a page counted once per commit that touched it)."""
    scattered: int
    """The same commit sizes over a random order of the clients."""


def commit_pages(db: sqlite3.Connection, min_clients: int = 9000, seed: int = 1) -> list[CommitPages]:
    """:class:`CommitPages` of every request in ``db`` (a hub's SQLite store) with at least ``min_clients`` clients."""
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    rng = random.Random(seed)
    found = []
    rows = [r for (r,) in db.execute("SELECT row FROM cells WHERE tbl='requests' AND col LIKE 'c:%' GROUP BY row "
                                     "HAVING count(*) >= ?", (min_clients,))]
    for request_id in rows:
        cells = db.execute("SELECT col, val FROM cells WHERE tbl='requests' AND row=? AND col LIKE 'c:%' ORDER BY col",
                           (request_id,)).fetchall()
        mean = sum(len(col) + len(val) + CELL_OVERHEAD for col, val in cells) / len(cells)
        per_page = max(1, int(page_size * LEAF_FILL // mean))
        commits: dict[object, list[int]] = defaultdict(list)
        for rank, (_, val) in enumerate(cells):
            commits[orjson.loads(val).get("updated_at")].append(rank)
        pages = sum(len({rank // per_page for rank in ranks}) for ranks in commits.values())
        order = list(range(len(cells)))
        rng.shuffle(order)
        scattered, start = 0, 0
        for ranks in commits.values():
            scattered += len({order[k] // per_page for k in range(start, start + len(ranks))})
            start += len(ranks)
        found.append(CommitPages(request_id, len(cells), len(commits), pages, scattered))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.commit_pages", description=__doc__.split("\n")[0])
    parser.add_argument("db", help="a hub's SQLite store (a fan-out's OUT/run/hub.db)")
    parser.add_argument("--min-clients", type=int, default=9000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    db = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True)
    for r in commit_pages(db, args.min_clients, args.seed):
        print(f"{r.request_id}: {r.clients} clients, {r.commits} commits, ~{r.pages} leaf pages written "
              f"(the same commits scattered: ~{r.scattered})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
