"""sim.commit_pages: a fan-out's outcome commits in client order write few leaves; the same commits scattered, many
(a real SQLite file in the hub store's schema)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest

from cloud_hub.storage.sqlite import DDL
from sim.commit_pages import commit_pages, main


def _store(path: Path, commits: list[list[int]]) -> None:
    db = sqlite3.connect(path)
    db.executescript(DDL)
    for k, clients in enumerate(commits):
        db.executemany("INSERT INTO cells VALUES ('requests', 'req-1', ?, ?)",
                       [(f"c:client-{c:05d}", orjson.dumps({"state": "executed", "updated_at": 100.0 + k,
                                                            "retailers": {"r1": {"state": "executed"}}}))
                        for c in clients])
    db.execute("INSERT INTO cells VALUES ('requests', 'req-1', 'r:state', '\"completed\"')")
    db.execute("INSERT INTO cells VALUES ('requests', 'req-small', 'c:client-00001', ?)",
               (orjson.dumps({"updated_at": 1.0}),))
    db.commit()
    db.close()


def test_commits_in_client_order_write_a_leaf_once_and_scattered_ones_nearly_one_a_client(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    _store(path, [list(range(k * 500, (k + 1) * 500)) for k in range(4)])
    (found,) = commit_pages(sqlite3.connect(path), min_clients=1000)
    assert (found.request_id, found.clients, found.commits) == ("req-1", 2000, 4)
    leaves = found.pages
    assert 2000 / 40 <= leaves <= 2000 / 20 + 4, "about one leaf per 20-40 entries of ~100 bytes, each written once"
    assert found.scattered > 3 * leaves


def test_the_command_line_prints_each_large_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hub.db"
    _store(path, [list(range(0, 1200))])
    assert main([str(path), "--min-clients", "1000"]) == 0
    out = capsys.readouterr().out
    assert "req-1: 1200 clients, 1 commits" in out and "req-small" not in out
