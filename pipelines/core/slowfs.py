"""`slowfs://`: local files behind an object store's latency, as a Beam FileSystem.

For benchmarks and tests of reading through Beam FileSystems as the embed job does from
gs:// or s3:// (benchmarks/remote_fetch_bench.py, tests/test_slowfs.py), without a cloud
account: `slowfs:///abs/path/img.jpg` is the local file `/abs/path/img.jpg`, and each
request an object store would answer over the network -- `open` (a GET), `metadata` /
`exists` / `size` / `last_updated` / `checksum` (a HEAD), `match` (a LIST) -- first
sleeps `$CATALOG_SEARCH_SLOWFS_LATENCY_MS` milliseconds (default 0; read at each call,
so a benchmark can change it between runs). Writes, deletes and renames are local and
immediate.

Beam finds a FileSystem by its scheme among the imported FileSystem subclasses, so a
process must import this module before it reads a slowfs:// URI: name it in
`$CATALOG_SEARCH_FILESYSTEMS` (pipelines/core/filesystem.py imports the modules listed
there, in the launcher and in the DirectRunner's worker processes, which inherit the
environment). `SlowFileSystem.stats()` counts this process's calls and the most that were
in flight at once (in-process runs only: each worker process has its own counts).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

from apache_beam.io.filesystem import MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem

SCHEME = "slowfs"
PREFIX = f"{SCHEME}://"
LATENCY_ENV = "CATALOG_SEARCH_SLOWFS_LATENCY_MS"

_lock = threading.Lock()
_stats = {"requests": 0, "opens": 0, "in_flight": 0, "max_in_flight": 0}


def uri_of(path: str) -> str:
    """The slowfs:// URI of an absolute local path."""
    return PREFIX + os.path.abspath(path)


def _local(path: str) -> str:
    return path[len(PREFIX):] if path.startswith(PREFIX) else path


def _wrap(path: str) -> str:
    return path if path.startswith(PREFIX) else PREFIX + path


class _Request:
    """One simulated network request: counted, in flight for the configured latency."""

    def __init__(self, is_open: bool = False):
        self.is_open = is_open

    def __enter__(self) -> None:
        with _lock:
            _stats["requests"] += 1
            _stats["opens"] += int(self.is_open)
            _stats["in_flight"] += 1
            _stats["max_in_flight"] = max(_stats["max_in_flight"], _stats["in_flight"])
        latency_ms = float(os.environ.get(LATENCY_ENV) or 0)
        if latency_ms > 0:
            time.sleep(latency_ms / 1000)

    def __exit__(self, *exc: Any) -> None:
        with _lock:
            _stats["in_flight"] -= 1


class SlowFileSystem(LocalFileSystem):
    """LocalFileSystem under the slowfs:// scheme, each remote-style request delayed."""

    @classmethod
    def scheme(cls) -> str:
        return SCHEME

    @staticmethod
    def stats() -> dict[str, int]:
        with _lock:
            return dict(_stats)

    @staticmethod
    def reset_stats() -> None:
        with _lock:
            _stats.update(requests=0, opens=0, max_in_flight=_stats["in_flight"])

    def join(self, basepath, *paths):
        return _wrap(super().join(_local(basepath), *paths))

    def split(self, path):
        head, tail = super().split(_local(path))
        return _wrap(head), tail

    def mkdirs(self, path):
        return super().mkdirs(_local(path))

    def has_dirs(self):
        return True

    def _list(self, dir_or_prefix):
        for meta in super()._list(_local(dir_or_prefix)):
            meta.path = _wrap(meta.path)
            yield meta

    def match(self, patterns, limits=None):
        with _Request():
            results = super().match([_local(p) for p in patterns], limits)
        return [MatchResult(_wrap(r.pattern),
                            [type(m)(_wrap(m.path), m.size_in_bytes, m.last_updated_in_seconds)
                             for m in r.metadata_list]) for r in results]

    def create(self, path, *args, **kwargs):
        return super().create(_local(path), *args, **kwargs)

    def open(self, path, *args, **kwargs):
        with _Request(is_open=True):
            return super().open(_local(path), *args, **kwargs)

    def copy(self, source_file_names, destination_file_names):
        return super().copy([_local(p) for p in source_file_names],
                            [_local(p) for p in destination_file_names])

    def rename(self, source_file_names, destination_file_names):
        return super().rename([_local(p) for p in source_file_names],
                              [_local(p) for p in destination_file_names])

    def exists(self, path):
        with _Request():
            return super().exists(_local(path))

    def size(self, path):
        with _Request():
            return super().size(_local(path))

    def last_updated(self, path):
        with _Request():
            return super().last_updated(_local(path))

    def checksum(self, path):
        with _Request():
            return super().checksum(_local(path))

    def metadata(self, path):
        with _Request():
            meta = super().metadata(_local(path))
        return type(meta)(_wrap(meta.path), meta.size_in_bytes, meta.last_updated_in_seconds)

    def delete(self, paths):
        return super().delete([_local(p) for p in paths])

    def report_lineage(self, path, lineage):
        return None
