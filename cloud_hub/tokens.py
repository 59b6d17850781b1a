"""Bearer tokens: stored as SHA-256 hashes in a JSON file, re-read when the file changes (rotation, no restart).

A token may carry ``expires_at`` (RFC 3339); after it the token is refused as expired. Revoking a principal removes
its tokens from the file, and the hub refuses them from its next request on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cloud_hub.authz import Principal
from mhp_wire.secretfile import write_private

log = logging.getLogger(__name__)


def token_hash(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def _expiry(entry: dict[str, Any]) -> float | None:
    """When a stored token expires (epoch seconds), None if never; an unreadable date expires it at once."""
    text = entry.get("expires_at")
    if text is None:
        return None
    try:
        at = datetime.fromisoformat(str(text))
    except ValueError:
        return 0.0
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


class TokenBook:
    """Maps presented bearer tokens to principals."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = str(self.path)
        self._mtime: float | None = None
        self._by_hash: dict[str, Principal] = {}
        self._expires: dict[str, float | None] = {}
        self._seen: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def _reload(self) -> None:
        # FastAPI runs the (sync) token dependency on a thread pool: one lock, and the new view published only
        # once it is complete, so no request ever sees a half-loaded book.
        with self._lock:
            try:
                st = os.stat(self._file)
            except FileNotFoundError:
                self._by_hash, self._expires, self._mtime, self._seen = {}, {}, None, None
                return
            mtime = st.st_mtime
            seen = (st.st_mtime_ns, st.st_ino, st.st_size)  # a rewrite within the clock's granularity still counts
            if mtime == self._mtime and seen == self._seen:
                return
            try:
                data = json.loads(self.path.read_text() or "{}")
                by_hash = {t["sha256"]: Principal.parse(t["principal"]) for t in data.get("tokens", [])}
                expires = {t["sha256"]: _expiry(t) for t in data.get("tokens", [])}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # Fail closed: a token file that cannot be read accepts no token until it is fixed.
                log.error("tokens file %s is unreadable (%s): every bearer token is refused until it is fixed",
                          self.path, exc)
                by_hash, expires = {}, {}
            self._by_hash, self._expires = by_hash, expires
            self._mtime, self._seen = mtime, seen

    def principal(self, token: str) -> Principal | None:
        """The principal a token stands for, or None (unknown, revoked or expired). One look at the file and one
        hash per call: it runs for every HTTP request."""
        self._reload()
        digest = token_hash(token)
        if self._expired(digest):
            return None
        return self._by_hash.get(digest)

    def expired(self, token: str) -> bool:
        """Whether ``token`` is a known token past its ``expires_at``."""
        self._reload()
        return self._expired(token_hash(token))

    def _expired(self, digest: str) -> bool:
        at = self._expires.get(digest)
        return at is not None and at <= time.time()

    def issue(self, principal: str, expires_in_s: float | None = None) -> str:
        """Create a token for ``principal``, store its hash, and return it (it is shown only this once)."""
        Principal.parse(principal)
        token = secrets.token_urlsafe(32)
        data = self._read()
        entry = {"principal": principal, "sha256": token_hash(token)}
        if expires_in_s is not None:
            entry["expires_at"] = (datetime.now(UTC) + timedelta(seconds=expires_in_s)).isoformat()
        data["tokens"].append(entry)
        self._write(data)
        return token

    def revoke(self, principal: str, *, keep_newest: bool = False) -> int:
        """Remove every token of ``principal`` (but its newest, for a rotation); returns how many went."""
        Principal.parse(principal)
        data = self._read()
        mine = [i for i, t in enumerate(data["tokens"]) if t.get("principal") == principal]
        gone = set(mine[:-1] if keep_newest else mine)
        kept = [t for i, t in enumerate(data["tokens"]) if i not in gone]
        removed = len(data["tokens"]) - len(kept)
        data["tokens"] = kept
        self._write(data)
        return removed

    def _read(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.path.read_text() or "{}") if self.path.exists() else {}
        data.setdefault("tokens", [])
        return data

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_private(self.path, json.dumps(data, indent=1))
