"""Operator and customer passwords as scrypt hashes (pure): one place for the retailer's personal area and the DSO's
console."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

__all__ = ["ScryptCost", "hash_cost", "hash_password", "verify_password"]


@dataclass(frozen=True, slots=True)
class ScryptCost:
    """scrypt's cost parameters; stored with each hash, so raising them later keeps old hashes valid."""

    n: int = 2**17
    r: int = 8
    p: int = 1

    @property
    def maxmem(self) -> int:
        """Memory scrypt may use (128·N·r bytes, with room to spare)."""
        return 2 * 128 * self.n * self.r + 1024 * 1024


def hash_password(password: str, cost: ScryptCost = ScryptCost(), salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64) of ``password`` with a fresh random salt."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode(), salt=salt, n=cost.n, r=cost.r, p=cost.p, maxmem=cost.maxmem,
                            dklen=32)
    b64 = base64.b64encode
    return f"scrypt${cost.n}${cost.r}${cost.p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a hash made by :func:`hash_password` (compared in constant time)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        cost = ScryptCost(int(n), int(r), int(p))
        expected = base64.b64decode(digest, validate=True)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt, validate=True), n=cost.n, r=cost.r,
                             p=cost.p, maxmem=cost.maxmem, dklen=len(expected))
    except ValueError:
        return False
    return hmac.compare_digest(got, expected)


def hash_cost(stored: str) -> ScryptCost | None:
    """The cost parameters written in a hash made by :func:`hash_password` (None if it is not one)."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    try:
        return ScryptCost(int(parts[1]), int(parts[2]), int(parts[3]))
    except ValueError:
        return None
