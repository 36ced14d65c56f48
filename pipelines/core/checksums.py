"""sha256 of local files, read in chunks (model cache, index artifacts, model dirs)."""
from __future__ import annotations

import hashlib
from typing import Any

CHUNK_BYTES = 1 << 22


def update_from_file(h: Any, path: str) -> int:
    """Feed a local file's bytes into hash object `h`; returns the number of bytes."""
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
            size += len(chunk)
    return size


def sha256_file(path: str) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a local file."""
    h = hashlib.sha256()
    size = update_from_file(h, path)
    return h.hexdigest(), size
