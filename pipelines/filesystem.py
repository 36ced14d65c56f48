"""Small file operations on any Beam FileSystems URI (local path, gs://, s3://, ...).

Every stage reads and writes artifacts through these, so the same code runs on a
laptop and on a cluster runner with object-store paths.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any, Iterable

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    return FileSystems.join(base, *parts) if parts else base


def exists(uri: str) -> bool:
    return FileSystems.exists(uri)


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """Whole file; with `max_bytes`, raises ValueError when the file is larger."""
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        if max_bytes is None:
            return f.read()
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{uri} is larger than {max_bytes} bytes")
    return data


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file; parent folders are created for local paths."""
    if is_local(uri):
        os.makedirs(os.path.dirname(os.path.abspath(uri)) or ".", exist_ok=True)
    with FileSystems.create(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Readers see the old content or the new one, never a partial file.

    Local: a temp file in the same folder, fsync, then rename (atomic on POSIX).
    Object stores: a single object upload is already all-or-nothing.
    """
    if not is_local(uri):
        write_bytes(uri, data)
        return
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(uri: str, obj: Any, atomic: bool = True) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")
    (write_bytes_atomic if atomic else write_bytes)(uri, data)


def match(pattern: str) -> list[str]:
    """Sorted paths matching a glob pattern; empty when nothing matches."""
    result = FileSystems.match([pattern])[0]
    return sorted(m.path for m in result.metadata_list)


def list_children(folder: str) -> list[str]:
    """Names (not paths) of the immediate entries of a folder; empty if it does not exist."""
    if is_local(folder):
        path = folder[len("file://"):] if folder.startswith("file://") else folder
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    prefix = folder.rstrip("/") + "/"
    names = set()
    for p in match(prefix + "**"):
        rest = p[len(prefix):]
        if rest:
            names.add(rest.split("/", 1)[0])
    return sorted(names)


def delete_tree(folder: str) -> None:
    """Delete a folder (or object prefix) and everything below it; no error if absent."""
    if is_local(folder):
        import shutil
        path = folder[len("file://"):] if folder.startswith("file://") else folder
        shutil.rmtree(path, ignore_errors=True)
        return
    paths = match(folder.rstrip("/") + "/**")
    if paths:
        FileSystems.delete(paths)


def delete_files(paths: Iterable[str]) -> None:
    paths = [p for p in paths if exists(p)]
    if paths:
        FileSystems.delete(paths)
