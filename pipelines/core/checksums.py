"""sha256 of local files, read in chunks (model cache, index artifacts, model dirs)."""
from __future__ import annotations

import hashlib
from typing import Any

CHUNK_BYTES = 1 << 22


def update_from_file(h: Any, path: str) -> int:
    """Feed a local file's bytes into hash object `h` (one hash over several files, which
    `hashlib.file_digest` cannot continue); returns the number of bytes."""
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
            size += len(chunk)
    return size


def sha256_file(path: str) -> tuple[str, int]:
    """(sha256 hex, size in bytes: the bytes hashed) of a local file."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
        return digest.hexdigest(), f.tell()
