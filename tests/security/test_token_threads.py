"""The token book under FastAPI's thread pool: many threads asking at once while it first loads never see a
half-loaded book (a fresh hub once refused valid tokens for a moment after a restart)."""

from __future__ import annotations

import threading
from pathlib import Path

from cloud_hub.tokens import TokenBook


def test_concurrent_first_lookups_all_see_the_loaded_book(tmp_path: Path) -> None:
    token = TokenBook(tmp_path / "tokens.json").issue("dso")
    for _ in range(20):
        book = TokenBook(tmp_path / "tokens.json")  # a fresh process's book: nothing loaded yet
        results: list[object] = []
        start = threading.Barrier(8)

        def ask(b: TokenBook, barrier: threading.Barrier, out: list[object]) -> None:
            barrier.wait()
            out.append(b.principal(token))

        threads = [threading.Thread(target=ask, args=(book, start, results)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r is not None and str(r) == "dso" for r in results), results
