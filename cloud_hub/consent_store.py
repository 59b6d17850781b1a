"""Eligible parties and permissions on the hub's store (both backends: tables ``parties``, ``permissions``,
``permissions_by_client``, ``permissions_by_party``); every change of a permission is written in one batch with its
lines of the data access log, so the permission log and the access log never disagree."""

from __future__ import annotations

import json
from typing import Any

from cloud_hub.consent import Change, Event, Permission, Scope, State
from cloud_hub.storage import Mutation, prefix_stop
from cloud_hub.store import AuditEntry, HubStore, audit_mutation, issuer_key


def encode_permission(p: Permission) -> bytes:
    """The stored form of a permission (JSON)."""
    return json.dumps({
        "permission_id": p.permission_id, "party_id": p.party_id, "client_id": p.client_id, "purpose": p.purpose,
        "scopes": [s.value for s in p.scopes], "resolution_s": p.resolution_s, "data_from": p.data_from,
        "data_to": p.data_to, "valid_until": p.valid_until, "decide_by": p.decide_by, "created_at": p.created_at,
        "state": p.state.value,
        "history": [[c.at, c.event.value, c.by, c.state.value] for c in p.history]}, separators=(",", ":")).encode()


def decode_permission(raw: bytes) -> Permission:
    """A stored permission."""
    d: dict[str, Any] = json.loads(raw)
    return Permission(d["permission_id"], d["party_id"], d["client_id"], d["purpose"],
                      tuple(Scope(s) for s in d["scopes"]), int(d["resolution_s"]), float(d["data_from"]),
                      float(d["data_to"]), float(d["valid_until"]), float(d["decide_by"]), float(d["created_at"]),
                      State(d["state"]),
                      tuple(Change(float(at), Event(ev), by, State(st)) for at, ev, by, st in d["history"]))


class PermissionStore:
    """Parties and permissions, through :class:`HubStore`'s key-value store."""

    def __init__(self, store: HubStore) -> None:
        self.store = store

    async def put_party(self, party_id: str, name: str) -> bool:
        """Register or rename a party; True if it is new."""
        kv = self.store.kv
        created = not await kv.get("parties", party_id)
        await kv.batch([Mutation("parties", party_id, {"d:name": name.encode()})])
        return created

    async def get_party(self, party_id: str) -> dict[str, str] | None:
        """A registered party, or None."""
        row = await self.store.kv.get("parties", party_id)
        return {"party_id": party_id, "name": row["d:name"].decode()} if row else None

    async def put(self, permissions: list[Permission], audit: list[AuditEntry]) -> None:
        """Store permissions (new or changed) and their access-log lines in one batch (the log first: a write
        that fails leaves at worst a logged change that did not happen, never an unlogged one)."""
        muts = [audit_mutation(e) for e in audit]
        for p in permissions:
            muts.append(Mutation("permissions", p.permission_id, {"d:p": encode_permission(p)}))
            muts.append(Mutation("permissions_by_client", f"{p.client_id}|{p.permission_id}", {"d:x": b"1"}))
            muts.append(Mutation("permissions_by_party", issuer_key(p.party_id, p.created_at, p.permission_id),
                                 {"d:x": b"1"}))
        await self.store.kv.batch(muts)

    async def get(self, permission_id: str) -> Permission | None:
        """One permission, or None."""
        row = await self.store.kv.get("permissions", permission_id)
        return decode_permission(row["d:p"]) if row else None

    async def of_client(self, client_id: str) -> list[Permission]:
        """Every permission any party asked of ``client_id``, oldest first."""
        prefix = f"{client_id}|"
        keys = [k for k, _ in await self.store.kv.scan("permissions_by_client", start=prefix,
                                                        stop=prefix_stop(prefix))]
        ids = [k[len(prefix):] for k in keys]
        rows = await self.store.kv.get_many("permissions", ids) if ids else {}
        found = [decode_permission(r["d:p"]) for r in rows.values() if "d:p" in r]
        return sorted(found, key=lambda p: (p.created_at, p.permission_id))

    async def of_party(self, party_id: str, after: str | None, limit: int) -> list[tuple[str, Permission | None]]:
        """Up to ``limit`` entries ``(cursor, permission)`` of ``party_id``'s permissions, newest first, after the
        cursor ``after`` (the cursor of the last entry of the previous page). Permissions stored before this index
        existed are not in it (they are rewritten into it by their next change)."""
        prefix = f"{party_id}|"
        start = prefix + (after + "\x00" if after is not None else "")
        keys = [k for k, _ in await self.store.kv.scan("permissions_by_party", start=start, stop=prefix_stop(prefix),
                                                        limit=limit, columns=["d:x"])]
        rows = await self.store.kv.get_many("permissions", [k.rsplit("|", 1)[1] for k in keys]) if keys else {}
        out: list[tuple[str, Permission | None]] = []
        for k in keys:  # an index entry whose row is gone still moves the cursor (None)
            row = rows.get(k.rsplit("|", 1)[1])
            out.append((k[len(prefix):], decode_permission(row["d:p"]) if row and "d:p" in row else None))
        return out
