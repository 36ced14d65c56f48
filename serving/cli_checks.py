"""Checks of `query` / `serve` / `evaluate` arguments and input files that run before an
index is loaded (loading takes seconds): each failure is a UsageError, i.e. one line
naming the problem and exit status 2 (catalog_search/cli.py)."""
from __future__ import annotations

import os
import stat

from pipelines.core import filesystem as fs
from pipelines.core.command import UsageError


def embeddings_folder_kind(root: str) -> str | None:
    """"snapshot" / "root" when `root` is an embeddings snapshot folder (it holds
    summary.json) or an embeddings root (its LATEST names such a snapshot), else None."""
    from pipelines.core import latest
    from pipelines.embed.snapshot import SUMMARY_FILE
    from pipelines.index.artifact import VERSIONS_DIR
    if fs.exists(fs.join(root, SUMMARY_FILE)):
        return "snapshot"
    if fs.exists(fs.join(root, VERSIONS_DIR)):
        return None
    try:
        name = latest.read(root, empty_ok=True)
    except (latest.LatestError, ValueError):
        return None
    if name and fs.exists(fs.join(root, name, SUMMARY_FILE)):
        return "root"
    return None


def check_index_root(root: str, what: str = "--index-root", must_exist: bool = True) -> None:
    """UsageError when `root` cannot be an index root: a local path that does not exist
    (with `must_exist`) or is a file, or an embeddings root / snapshot folder."""
    if not root or not root.strip():
        raise UsageError(f"{what} must not be empty")
    if fs.is_local(root):
        path = fs.normalize(root)
        if not os.path.exists(path):
            if must_exist:
                raise UsageError(f"{what} {root} does not exist")
            return
        if not os.path.isdir(path):
            raise UsageError(f"{what} {root} is not a directory")
    kind = embeddings_folder_kind(root)
    if kind == "snapshot":
        raise UsageError(f"{what} {root} is an embeddings snapshot (it holds summary.json), "
                         "not an index root; build an index from it with `catalog-search "
                         f"build-index --embeddings {root} --index-root DIR`")
    if kind == "root":
        raise UsageError(f"{what} {root} is an embeddings root (its LATEST names a snapshot), "
                         "not an index root; build an index from it with `catalog-search "
                         f"build-index --embeddings {root} --index-root DIR`")


def check_query_image(uri: str) -> None:
    """UsageError when a query image argument does not exist, is a directory or another
    non-regular file (a FIFO would block the read), or names a scheme no filesystem
    serves. http(s) URLs pass: `query` fetches them (pipelines.embed.fetch, with
    fetch.deadline_s)."""
    if uri.lower().startswith(("http://", "https://")):
        return
    if fs.is_local(uri):
        path = fs.normalize(uri)
        if os.path.isdir(path):
            raise UsageError(f"query image {uri} is a directory, not an image file")
        try:
            mode = os.stat(path).st_mode  # stat never blocks on a FIFO
        except (OSError, ValueError):
            raise UsageError(f"query image {uri} does not exist") from None
        if not stat.S_ISREG(mode):
            raise UsageError(f"query image {uri} is not a regular file")
        return
    try:
        found = fs.exists(fs.check_supported(uri, f"query image {uri}"))
    except fs.UnsupportedUriError as e:
        raise UsageError(str(e)) from None
    except Exception as e:  # the filesystem's own error (credentials, network): one line
        raise UsageError(f"query image {uri} cannot be read: {type(e).__name__}: {e}") from None
    if not found:
        raise UsageError(f"query image {uri} does not exist")


def check_output_folder(what: str, uri: str | None) -> None:
    """UsageError when a local output folder argument names an existing file."""
    if uri and fs.is_local(uri) and os.path.exists(fs.normalize(uri)) \
            and not os.path.isdir(fs.normalize(uri)):
        raise UsageError(f"{what} {uri} is a file, not a folder")


def check_queries_manifest(uri: str) -> int:
    """The row count of a labelled query manifest read whole (the `evaluate --queries`
    format: a catalog manifest with product_id and image_uri); UsageError naming the
    problem when it is missing, a directory, of an unknown format or lacks a column."""
    from pipelines.embed.manifest import ManifestError, check_manifest, expand_manifests
    try:
        (resolved,) = expand_manifests([uri])
        rows = check_manifest(resolved)
    except ManifestError as e:
        raise UsageError(f"--queries: {e}") from None
    if rows == 0:
        raise UsageError(f"--queries {uri} has no rows")
    return rows
