"""A party's list of its own permissions (``GET /v1/permissions``), through the real hub on both storage backends:
newest first, paged by ``next_after``, filtered by the state the permission is in now (the clock's lapses
applied), never another party's; no other principal has permissions of its own to list."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloud_hub.tokens import TokenBook
from mhp_wire import topics
from mhp_wire.messages import ConsentDecision
from tests.cloud_hub.test_consent_end_to_end import answers, iso
from tests.hub_fixtures import HubHandle
from tests.mqtt_party import Party, parties

H = 3600.0


async def test_a_party_pages_through_its_own_permissions(hub_any: HubHandle, tmp_path: Path) -> None:
    hub = hub_any
    await hub.setup_registry({"c1": "r1", "c2": "r1"})
    book = TokenBook(tmp_path / "tokens.json")
    p1 = {"Authorization": f"Bearer {book.issue('party:p1')}"}
    p2 = {"Authorization": f"Bearer {book.issue('party:p2')}"}
    for pid in ("p1", "p2"):
        assert (await hub.http.put(f"/v1/parties/{pid}", json={"name": pid},
                                   headers=hub.auth("admin"))).status_code == 201
    now = time.time()
    ask: dict[str, Any] = {"purpose": "an offer", "scopes": ["consumption_profile"], "data_from": iso(now - 48 * H),
                           "data_to": iso(now), "valid_until": iso(now + 30 * 24 * H)}
    mine = []
    for client in ("c1", "c2", "c1"):
        r = await hub.http.post("/v1/permissions", json={**ask, "client_id": client}, headers=p1)
        assert r.status_code == 201, r.text
        mine.append(r.json()["permission_id"])
    r = await hub.http.post("/v1/permissions", json={**ask, "client_id": "c1"}, headers=p2)
    theirs = r.json()["permission_id"]
    with parties(Party(hub.broker, "r1", topics.down("retailers", "r1"))) as (r1,):
        d = ConsentDecision(client_id="c1", permission_id=mine[0], decision="accept", decided_at=datetime.now(UTC))
        await r1.publish(topics.up("retailers", "r1"), d)
        assert (await answers(r1, d.msg_id))[0] == "ack"

    r = await hub.http.get("/v1/permissions", params={"limit": 2}, headers=p1)
    assert r.status_code == 200, r.text
    first = r.json()
    assert [p["permission_id"] for p in first["permissions"]] == [mine[2], mine[1]], "newest first"
    assert first["count"] == 2 and first["next_after"]
    r = await hub.http.get("/v1/permissions", params={"limit": 2, "after": first["next_after"]}, headers=p1)
    second = r.json()
    assert [p["permission_id"] for p in second["permissions"]] == [mine[0]]
    assert second["next_after"] is None, "the end of the list"
    assert second["permissions"][0]["state"] == "accepted"
    assert [h["event"] for h in second["permissions"][0]["history"]] == ["validate", "send", "accept"]

    r = await hub.http.get("/v1/permissions", params={"state": "accepted"}, headers=p1)
    assert [p["permission_id"] for p in r.json()["permissions"]] == [mine[0]]
    r = await hub.http.get("/v1/permissions", headers=p2)
    assert [p["permission_id"] for p in r.json()["permissions"]] == [theirs], "never another party's"

    # six days on (past three working days from any weekday), the requests nobody decided have lapsed: the list
    # shows them as they are now
    hub.app.state.consent.now = lambda: time.time() + 6 * 24 * H
    r = await hub.http.get("/v1/permissions", params={"state": "timed_out"}, headers=p1)
    assert [p["permission_id"] for p in r.json()["permissions"]] == [mine[2], mine[1]]
    assert r.json()["permissions"][0]["history"][-1]["by"] == "clock"
    r = await hub.http.get("/v1/permissions", params={"state": "sent_to_pa"}, headers=p1)
    assert r.json() == {"permissions": [], "count": 0, "next_after": None}

    for who in ("dso", "r1", "admin"):
        r = await hub.http.get("/v1/permissions", headers=hub.auth(who))
        assert r.status_code == 403, who
    for bad in ({"after": "not-a-cursor"}, {"state": "lost"}, {"limit": 0}):
        r = await hub.http.get("/v1/permissions", params=bad, headers=p1)
        assert r.status_code == 422, bad
