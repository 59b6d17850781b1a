"""Bearer tokens: stored as SHA-256 hashes in a JSON file, re-read when the file changes (rotation, no restart)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

from cloud_hub.authz import Principal


def token_hash(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenBook:
    """Maps presented bearer tokens to principals."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mtime: float | None = None
        self._by_hash: dict[str, Principal] = {}

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._by_hash, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        data = json.loads(self.path.read_text() or "{}")
        self._by_hash = {t["sha256"]: Principal.parse(t["principal"]) for t in data.get("tokens", [])}
        self._mtime = mtime

    def principal(self, token: str) -> Principal | None:
        """The principal a token stands for, or None."""
        self._reload()
        return self._by_hash.get(token_hash(token))

    def issue(self, principal: str) -> str:
        """Create a token for ``principal``, store its hash, and return it (it is shown only this once)."""
        Principal.parse(principal)
        token = secrets.token_urlsafe(32)
        data = json.loads(self.path.read_text()) if self.path.exists() else {"tokens": []}
        data["tokens"].append({"principal": principal, "sha256": token_hash(token)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)
        return token
