"""The LATEST pointer of a root: one small file naming a single, safe folder name.

    <embeddings_root>/LATEST   the newest complete snapshot's run id
    <index_root>/LATEST        the published index version

Reading refuses anything but a safe name (pipelines.core.names: no path, no garbage,
no binary bytes) with LatestError. Writing checks the name first, writes atomically
(local: temp file + rename; object stores: one small object) and, on local roots, holds
the root's exclusive lock (`LOCK_FILE`, pipelines.core.locks), so writers that read
LATEST before moving it (`advance`) do not interleave.
"""
from __future__ import annotations

from pipelines.core import filesystem as fs
from pipelines.core.locks import root_lock
from pipelines.core.names import InvalidNameError, check_segment
from pipelines.core.errors import BadArtifactError

LATEST_FILE = "LATEST"
#: The lock file under a local root, shared with what else must not run beside a
#: LATEST write (the index root's publish + retention).
LOCK_FILE = ".publish.lock"
#: LATEST is never larger than this (a name is at most 128 characters).
MAX_BYTES = 4096


class LatestError(BadArtifactError):
    """LATEST exists but does not hold a safe name (corrupted)."""


def pointer_uri(root: str) -> str:
    return fs.join(root, LATEST_FILE)


def read(root: str, what: str = "name", empty_ok: bool = False) -> str | None:
    """The name LATEST holds under `root`; None when there is no LATEST (or, with
    `empty_ok`, an empty one). LatestError when it holds anything but a safe name."""
    pointer = pointer_uri(root)
    if not fs.exists(pointer):
        return None
    try:
        text = fs.read_bytes(pointer, max_bytes=MAX_BYTES).decode("utf-8").strip()
    except ValueError as e:  # larger than any name, or not UTF-8
        raise LatestError(f"{pointer} is corrupted: it does not hold a {what} "
                          f"({type(e).__name__})") from e
    if not text:
        if empty_ok:
            return None
        raise LatestError(f"{pointer} is empty; it should name a {what}")
    try:
        return check_segment(text, f"the {what} in {pointer}")
    except InvalidNameError as e:
        raise LatestError(f"{pointer} is corrupted: {e}") from e


def absent_reason(root: str) -> str:
    """Why LATEST under `root` names nothing, for messages: it is missing, or empty."""
    pointer = pointer_uri(root)
    try:
        present = fs.exists(pointer)
    except Exception:  # the root itself cannot be read: say missing
        present = False
    return f"{pointer} is empty" if present else f"no {LATEST_FILE} under {root}"


def write(root: str, name: str, what: str = "name") -> None:
    """Point LATEST under `root` at `name` (checked first: InvalidNameError), atomically,
    under the root's lock."""
    data = (check_segment(name, what) + "\n").encode()
    with root_lock(root, LOCK_FILE):
        fs.write_bytes_atomic(pointer_uri(root), data)


def advance(root: str, name: str, what: str = "name") -> bool:
    """Point LATEST at `name` unless it already names a newer one (names sort by time);
    True when LATEST now names `name`. The read and the write happen under the root's
    lock, so of two racing writers the newer name wins. LatestError when LATEST holds
    garbage (it is not overwritten blindly)."""
    with root_lock(root, LOCK_FILE):
        current = read(root, what)
        if current is not None and current > name:
            return False
        write(root, name, what)
        return True
