"""Writing a file that holds a secret (passwords, tokens, private keys, configurations that carry them).

The file is created with its final mode by ``os.open(..., O_CREAT | O_EXCL, mode)`` under a fresh temporary name
in the same directory, written, flushed to disk and renamed over the target: no moment exists in which it is
readable by others, whatever the umask (a umask can only narrow the mode), and a reader never sees half a file.
Never ``write_text`` then ``chmod``: between the two the secret is readable under a permissive umask.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE = 0o600


def write_private(path: Path | str, data: bytes | str, mode: int = PRIVATE) -> Path:
    """Write ``data`` (text is UTF-8) atomically to ``path``, created with permissions ``mode`` (default 0600).

    Refuses to follow a symbolic link at the temporary name (``O_NOFOLLOW``, ``O_EXCL``). Returns ``path``.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
