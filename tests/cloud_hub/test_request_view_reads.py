"""``GET /v1/requests/{id}`` answers from the request's own fields and targets only (issue 14, fourth round): its
queued outbox messages, which the DSO's polling of an open request read and decoded every time (a billing
request's hold every client's readings), are not read. Shown on a real SQLite store: a queued message cell that
could not even be decoded does not change the answer."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cloud_hub.authz import Principal
from cloud_hub.storage import Mutation
from cloud_hub.store import RequestCodec
from tests.cloud_hub.embedded_hub import embedded_hub


async def test_the_view_of_an_open_request_does_not_read_its_queued_messages(tmp_path: Path) -> None:
    async with embedded_hub(tmp_path / "hub.db") as hub:
        store, book, service = hub.store, hub.book, hub.service
        await store.put_retailer("r1", "R1")
        await store.import_clients([(f"c{i}", "r1", 5.0, None, time.time() - 86_400) for i in range(3)])
        dso = Principal.parse("dso")
        start = datetime.now(UTC) + timedelta(minutes=5)
        accepted = await service.flexibility.create_emergency(dso, {
            "client_ids": ["c0", "c1", "c2"], "start": start.isoformat(), "duration_s": 600,
            "power_limit_kw": 2.0}, None)
        before = await service.requests.get_request(dso, accepted.request_id)
        queued = [m for m, i in book.outbox.items() if i.request_id == accepted.request_id]
        assert queued, "the request's message is queued (nothing sent it)"
        # Every queued message's cell replaced by bytes no reader could decode.
        await store.kv.batch([Mutation("requests", accepted.request_id,
                                       {RequestCodec.message(m): b"\xff not json" for m in queued})])
        after = await service.requests.get_request(dso, accepted.request_id)
        assert after == before
        assert after["state"] == "accepted" and sorted(after["clients"]) == ["c0", "c1", "c2"]
        assert all(c["state"] == "pending" for c in after["clients"].values())
