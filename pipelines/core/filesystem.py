"""Small file operations on any Beam FileSystems URI (local path, gs://, s3://, ...).

Every stage reads and writes artifacts through these, so the same code runs on a
laptop and on a cluster runner with object-store paths.

`$CATALOG_SEARCH_FILESYSTEMS` (comma-separated module names) are imported with this
module: Beam finds a FileSystem among the imported FileSystem subclasses, so a plugin
named there (e.g. pipelines.core.slowfs) serves its scheme in the launcher and in the
local runner's worker processes, which inherit the environment.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import urllib.parse
import uuid
from typing import TYPE_CHECKING, Any, Iterable

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.core.storage_errors import with_path
from pipelines.core.errors import BadInputError

if TYPE_CHECKING:
    import pyarrow as pa

#: Env var: comma-separated modules defining extra Beam FileSystems, imported here.
PLUGINS_ENV = "CATALOG_SEARCH_FILESYSTEMS"


def import_plugins() -> list[str]:
    """Import the FileSystem modules named in $CATALOG_SEARCH_FILESYSTEMS (their names)."""
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    for name in names:
        importlib.import_module(name)
    return names


import_plugins()


#: Schemes Beam serves only with an optional extra installed: scheme -> pip requirement.
SCHEME_EXTRAS = {"gs": "apache-beam[gcp]", "s3": "apache-beam[aws]",
                 "azfs": "apache-beam[azure]", "hdfs": "apache-beam[hadoop] (hdfs)"}
#: Beam registers these filesystems even when their client library is missing (every
#: operation then fails, e.g. AssertionError('Missing boto3 requirement')): scheme ->
#: the module that must be importable.
_CLIENT_MODULES = {"s3": "boto3", "azfs": "azure.storage.blob"}
#: URIs longer than this are shortened in messages (a data: URI can be megabytes).
_SHOWN_URI_CHARS = 120


class TooLargeError(BadInputError):
    """A file is larger than the byte limit it was read with."""


class UnsupportedUriError(BadInputError):
    """No Beam filesystem serves a URI's scheme (unknown, or its extra is not installed)."""

    def __init__(self, uri: str, scheme: str, extra: str | None):
        if extra:
            message = (f"{uri}: the {scheme}:// filesystem is not available; install it with "
                       f"pip install '{extra}'")
        else:
            message = (f"{uri}: unsupported URI scheme {scheme!r}; use a local path, file://, "
                       f"gs://, s3:// or http(s)://")
        super().__init__(message)
        self.scheme = scheme
        self.extra = extra


def normalize(uri: str) -> str:
    """`file://` URIs become plain local paths (`file:///a%20b` -> `/a b`,
    `file://localhost/a` -> `/a`); others (plain paths, gs://, ...) as given.

    The one place the file:// prefix is stripped: Beam's local filesystem does not
    understand it, so every helper here (and the fetch/manifest readers) normalises
    first, and code that opens a local URI with `open`/`os` calls this for the path.
    """
    if uri.startswith("file://"):
        rest = uri[len("file://"):]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        return urllib.parse.unquote(rest) or "/"
    return uri


def scheme_of(uri: str) -> str:
    """"" for local paths (and file://), else the URI scheme in lower case."""
    uri = normalize(uri)
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def shown(uri: str) -> str:
    """`uri` as messages show it (long ones shortened)."""
    return uri if len(uri) <= _SHOWN_URI_CHARS else uri[:_SHOWN_URI_CHARS] + "..."


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _client_missing(scheme: str, filesystem: object) -> bool:
    """Beam's own filesystem for `scheme` is registered but its client library is absent."""
    module = _CLIENT_MODULES.get(scheme)
    return (module is not None and type(filesystem).__module__.startswith("apache_beam.")
            and not _importable(module))


def check_supported(uri: str, what: str | None = None) -> str:
    """`uri` normalised when a Beam filesystem serves it, else UnsupportedUriError (naming
    the pip extra to install for gs://, s3://, ...); `what` prefixes the message.
    `data:` URIs (inline bytes) are not storage: unsupported."""
    uri = normalize(uri)
    scheme = scheme_of(uri)
    err: UnsupportedUriError | None = None
    cause: BaseException | None = None
    if uri[:5].lower() == "data:":
        err = UnsupportedUriError(shown(uri), "data", None)
    elif scheme:
        try:
            filesystem = FileSystems.get_filesystem(uri)
        except ValueError as e:
            err, cause = UnsupportedUriError(shown(uri), scheme, SCHEME_EXTRAS.get(scheme)), e
        else:
            if _client_missing(scheme, filesystem):
                err = UnsupportedUriError(shown(uri), scheme, SCHEME_EXTRAS.get(scheme))
    if err is not None:
        if what:
            err.args = (f"{what}: {err.args[0]}",)
        raise err from cause
    return uri


def check_all_supported(named: Iterable[tuple[str, str | None]]) -> None:
    """`check_supported` for each (what, uri) pair whose uri is not None."""
    for what, uri in named:
        if uri is not None:
            check_supported(uri, what)


def is_local(uri: str) -> bool:
    """A plain path or a file:// URI (`normalize` gives its path); not gs://, http://, ..."""
    return "://" not in uri or uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    base = normalize(base)
    return FileSystems.join(base, *parts) if parts else base


def exists(uri: str) -> bool:
    return FileSystems.exists(check_supported(uri))


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """Whole file; with `max_bytes`, raises TooLargeError (a ValueError) when it is larger."""
    uri = check_supported(uri)
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        if max_bytes is None:
            return f.read()
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLargeError(f"{uri} is larger than {max_bytes} bytes")
    return data


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file; parent folders are created for local paths."""
    uri = check_supported(uri)
    if is_local(uri):
        os.makedirs(os.path.dirname(os.path.abspath(uri)) or ".", exist_ok=True)
    try:
        with FileSystems.create(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(data)
    except OSError as e:  # a full disk names no file: name the one being written
        raise with_path(e, uri) from e


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Readers see the old content or the new one, never a partial file.

    Local: a temp file in the same folder, fsync, then rename (atomic on POSIX).
    Object stores: a single object upload is already all-or-nothing.
    """
    uri = check_supported(uri)
    if not is_local(uri):
        write_bytes(uri, data)
        return
    path = uri
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk's flush names no file: name the one being written
        raise with_path(e, path) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(uri: str, obj: Any, atomic: bool = True) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")
    (write_bytes_atomic if atomic else write_bytes)(uri, data)


def parquet_to_bytes(table: "pa.Table", compression: str = "snappy",
                     row_group_size: int | None = None) -> bytes:
    """A table as the bytes of one Parquet file (pyarrow's default compression and row
    group size unless told)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression, row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def parquet_from_bytes(data: bytes, columns: list[str] | None = None) -> "pa.Table":
    """The table of one Parquet file held in memory (only `columns` when given)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    return pq.read_table(pa.BufferReader(data), columns=columns)


def write_parquet(uri: str, table: "pa.Table", compression: str = "snappy",
                  row_group_size: int | None = None) -> None:
    """Write a table as one Parquet file (not atomic: see write_bytes)."""
    write_bytes(uri, parquet_to_bytes(table, compression, row_group_size))


def read_parquet(uri: str, columns: list[str] | None = None) -> "pa.Table":
    """A Parquet file (only `columns` when given): local files are read in place, others
    through read_bytes."""
    if is_local(uri):
        import pyarrow.parquet as pq
        return pq.read_table(check_supported(uri), columns=columns)
    return parquet_from_bytes(read_bytes(uri), columns)


def parquet_column_names(uri: str) -> list[str]:
    """The column names of a Parquet file, from its footer (local files: only the footer
    is read; others are read through FileSystems.open, which can seek)."""
    import pyarrow.parquet as pq
    uri = check_supported(uri)
    if is_local(uri):
        return list(pq.read_schema(uri).names)
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return list(pq.read_schema(f).names)


def match(pattern: str) -> list[str]:
    """Sorted paths matching a glob pattern; empty when nothing matches."""
    result = FileSystems.match([check_supported(pattern)])[0]
    return sorted(m.path for m in result.metadata_list)


def list_children(folder: str) -> list[str]:
    """Names (not paths) of the immediate entries of a folder; empty if it does not exist."""
    folder = check_supported(folder)
    if is_local(folder):
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    prefix = folder.rstrip("/") + "/"
    names = set()
    for p in match(prefix + "**"):
        rest = p[len(prefix):]
        if rest:
            names.add(rest.split("/", 1)[0])
    return sorted(names)


def last_modified(folder: str) -> float | None:
    """Newest modification time (epoch seconds) of the folder or anything below it; None if
    it does not exist."""
    folder = check_supported(folder)
    if is_local(folder):
        if not os.path.exists(folder):
            return None
        newest = os.stat(folder).st_mtime
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                try:
                    newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
                except OSError:
                    pass  # deleted while we walked
        return newest
    result = FileSystems.match([folder.rstrip("/") + "/**"])[0]
    times = [m.last_updated_in_seconds for m in result.metadata_list]
    return max(times) if times else None


def delete_tree(folder: str) -> None:
    """Delete a folder (or object prefix) and everything below it; no error if absent."""
    folder = check_supported(folder)
    if is_local(folder):
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
        return
    paths = match(folder.rstrip("/") + "/**")
    if paths:
        FileSystems.delete(paths)


def delete_files(paths: Iterable[str]) -> None:
    paths = [check_supported(p) for p in paths if exists(p)]
    if paths:
        FileSystems.delete(paths)
