"""Storage that refuses writes (disk full, read-only, quota, permission): one line.

A command that hits a full disk or a read-only root anywhere (the run lock, a Beam
worker's output, the LATEST write) exits 1 with one line naming the path and the errno
instead of tracebacks (catalog_search/cli.py). Standard library only: the CLI imports
it before any heavy module.
"""
from __future__ import annotations

import errno
import logging
import re

#: errno values that mean "this storage does not take the write".
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES,
                            errno.EPERM, errno.EFBIG})
# An OSError flattened into text by a runner ("... [Errno 28] No space left on device: '/x'")
_FLATTENED = re.compile(r"\[Errno (\d+)\] ([^:'\"\[\n]+)(?:: '([^'\n]*)')?")


def storage_failure(exc: BaseException | None) -> OSError | None:
    """The OSError of a storage refusing a write in `exc` or its cause/context chain
    (also when a runner re-raised it as text); None when there is none."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return exc
        for match in _FLATTENED.finditer(str(exc)):
            code = int(match.group(1))
            if code in STORAGE_ERRNOS:
                return OSError(code, match.group(2).strip(), match.group(3))
        exc = exc.__cause__ or exc.__context__
    return None


def describe(e: OSError) -> str:
    """`cannot write PATH: [Errno 28 ENOSPC] No space left on device`."""
    code = e.errno if e.errno is not None else 0
    name = errno.errorcode.get(code, "?")
    where = e.filename if e.filename is not None else "(the path was not reported)"
    return f"cannot write {where}: [Errno {code} {name}] {e.strerror or e}"


def with_path(e: OSError, path: str) -> OSError:
    """`e` with `path` as its filename when it has none (same errno: same subclass)."""
    if e.filename is not None or e.errno is None:
        return e
    return OSError(e.errno, e.strerror, path)


class DropStorageTracebacks(logging.Filter):
    """Drops a runner's ERROR record (with its traceback) of a storage refusing a write:
    the command reports that failure itself, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.name.startswith("apache_beam"):
            return True
        error = record.exc_info[1] if record.exc_info else None
        return storage_failure(error) is None and storage_failure(
            Exception(record.getMessage())) is None
