"""A Beam FileSystem over local folders that stands in for an object store in tests.

`register_prefixed_filesystem("catalogtestfs")` makes `catalogtestfs://<abs path>` URIs
work through Beam FileSystems, so the code paths for remote roots and handles (no
local-path shortcut applies to them) run for real.
"""
from __future__ import annotations

from apache_beam.io.filesystem import MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem

# Beam finds file systems through __subclasses__ (weak references): keep classes alive.
_REGISTERED: dict[str, type] = {}


def register_prefixed_filesystem(scheme: str) -> str:
    """Register (once) a FileSystem for `<scheme>://<abs path>`; returns the URI prefix."""
    prefix = f"{scheme}://"
    if scheme in _REGISTERED:
        return prefix

    class PrefixedLocalFileSystem(LocalFileSystem):
        @classmethod
        def scheme(cls) -> str:
            return scheme

        @staticmethod
        def _local(uri: str) -> str:
            return uri[len(prefix):] if uri.startswith(prefix) else uri

        def join(self, basepath, *paths):
            return basepath.rstrip("/") + "/" + "/".join(p.strip("/") for p in paths)

        def mkdirs(self, path):
            return super().mkdirs(self._local(path))

        def create(self, path, *args, **kwargs):
            return super().create(self._local(path), *args, **kwargs)

        def open(self, path, *args, **kwargs):
            return super().open(self._local(path), *args, **kwargs)

        def exists(self, path):
            return super().exists(self._local(path))

        def delete(self, paths):
            return super().delete([self._local(p) for p in paths])

        def match(self, patterns, limits=None):
            results = super().match([self._local(p) for p in patterns], limits)
            out = []
            for pattern, result in zip(patterns, results):
                for m in result.metadata_list:
                    m.path = prefix + m.path
                out.append(MatchResult(pattern, result.metadata_list))
            return out

    _REGISTERED[scheme] = PrefixedLocalFileSystem
    return prefix
