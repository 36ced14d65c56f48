"""The one exclusive file lock (fcntl.flock) the stages share.

Used for the index root's publish + retention, the LATEST pointers and the builtin
model cache's conversion. The lock is held on an open file description, so two
processes (or two threads of one process) exclude each other; the same thread taking
a lock it already holds passes through (publishing writes LATEST under the lock it
already took).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from typing import Iterator

_held = threading.local()


@contextlib.contextmanager
def exclusive_lock(lock_path: str) -> Iterator[None]:
    """Hold an exclusive lock on the local file `lock_path` (created, never deleted)."""
    key = os.path.abspath(lock_path)
    held: set[str] = _held.__dict__.setdefault("paths", set())
    if key in held:  # re-entered by the thread that holds it
        yield
        return
    with open(lock_path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def root_lock(root: str, name: str) -> Iterator[None]:
    """`exclusive_lock` on `<root>/<name>` for a local root (created if needed); a no-op on
    object stores, where the writes it guards are single all-or-nothing objects."""
    from pipelines.core import filesystem as fs
    if not fs.is_local(root):
        yield
        return
    folder = fs.normalize(root)
    os.makedirs(folder, exist_ok=True)
    with exclusive_lock(os.path.join(folder, name)):
        yield
