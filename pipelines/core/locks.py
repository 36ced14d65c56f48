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

from pipelines.core.storage_errors import with_path
from pipelines.core.errors import UnavailableError

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


# --------------------------------------------------------------------------- run locks

class RunLockedError(UnavailableError):
    """Another live process holds the run lock (`holder` describes it, as it wrote itself)."""

    def __init__(self, message: str, lock_path: str, holder: str):
        super().__init__(message)
        self.lock_path = lock_path
        self.holder = holder


def _holder_line() -> str:
    import datetime as dt
    import socket
    import sys
    since = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    return f"pid {os.getpid()} on {socket.gethostname()} since {since} ({command[:300]})"


def _read_holder(path: str) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read(1024).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "another process (it has not written its name yet)"


@contextlib.contextmanager
def run_lock(root: str, name: str, what: str) -> Iterator[None]:
    """Hold the run lock `<root>/<name>` for the whole of one run, or refuse at once.

    Non-blocking: when another process holds it, RunLockedError names the holder (pid,
    host, start time and command line, which the holder writes into the lock file). The
    lock is an fcntl.flock on a local root, released by the kernel when the holder dies
    (a SIGKILLed run never leaves a stale lock); the file is removed when the run ends.
    On object stores there is nothing to lock (a no-op): runs there are serialised by the
    scheduler (one DAG run per date). `what` names the run in the message, e.g.
    "embed --run-id r1".
    """
    from pipelines.core import filesystem as fs
    if not fs.is_local(root):
        yield
        return
    folder = fs.normalize(root)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC: workers do not inherit it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_holder(path)
            raise RunLockedError(f"{what} is already running: {holder} holds {path}; wait for "
                                 "it to finish or choose another name", path, holder) from None
        try:  # the previous holder may have removed the file between our open and flock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (_holder_line() + "\n").encode())
        except OSError as e:  # a full disk: name the lock file
            raise with_path(e, path) from e
        yield
    finally:
        try:
            os.unlink(path)  # while still holding it: a waiter re-opens the new file
        except OSError:
            pass
        os.close(fd)


def is_run_locked(root: str, name: str) -> bool:
    """True when a live process holds the run lock `<root>/<name>` (local roots only)."""
    from pipelines.core import filesystem as fs
    if not fs.is_local(root):
        return False
    path = os.path.join(fs.normalize(root), name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
