"""Parties and permissions on both storage backends (SQLite, HBase through its Thrift test double): stored with
their history, found by client, each change written in the same batch as its access-log lines."""

from __future__ import annotations

import time

from cloud_hub.consent import Event, PermissionAsk, Scope, State, decide, new_permission
from cloud_hub.consent_store import PermissionStore, decode_permission, encode_permission
from cloud_hub.storage import KVStore
from cloud_hub.store import AuditEntry, HubStore

NOW = time.time()


def test_a_permission_survives_its_stored_form() -> None:
    p = new_permission("perm-1", "p1", "c1", PermissionAsk("an offer", [Scope.CONSUMPTION_PROFILE,
                                                                     Scope.LIVE_MEASUREMENTS],
                                                           900, NOW - 86_400, NOW, NOW + 86_400), NOW)
    p = decide(p, Event.ACCEPT, NOW + 5, "customer via retailer:r1")
    assert decode_permission(encode_permission(p)) == p


async def test_parties_and_permissions_on_each_backend(kv: KVStore) -> None:
    store = PermissionStore(HubStore(kv))
    assert await store.put_party("p1", "Energy Co") is True
    assert await store.put_party("p1", "Energy Company") is False
    assert await store.get_party("p1") == {"party_id": "p1", "name": "Energy Company"}
    assert await store.get_party("p2") is None

    a = new_permission("perm-a", "p1", "c1", PermissionAsk("an offer", [Scope.CONSUMPTION_PROFILE], 900, NOW - 10,
                                                           NOW, NOW + 100), NOW)
    b = new_permission("perm-b", "p1", "c1|x", PermissionAsk("other client", [Scope.BILLING_DATA], 900, NOW - 10,
                                                             NOW, NOW + 100), NOW + 1)
    await store.put([a, b], [AuditEntry("party:p1", "c1", "permission_send", "party:request-permission",
                                        ref="perm-a", at=NOW)])
    accepted = decide(a, Event.ACCEPT, NOW + 2, "customer via retailer:r1")
    await store.put([accepted], [AuditEntry("customer via retailer:r1", "c1", "permission_accept",
                                            "retailer:current-supplier", ref="perm-a", at=NOW + 2)])

    assert await store.get("perm-a") == accepted
    assert await store.get("nope") is None
    assert [p.permission_id for p in await store.of_client("c1")] == ["perm-a"]  # not c1|x's
    assert [p.state for p in await store.of_client("c1|x")] == [State.SENT_TO_PA]
    log = await HubStore(kv).get_audit("c1", NOW - 1, NOW + 3)
    assert [(e["action"], e["ref"]) for e in log] == [("permission_send", "perm-a"), ("permission_accept", "perm-a")]
