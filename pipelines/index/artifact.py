"""The index artifact: layout, manifest, checksums, publish/LATEST/retention.

    <index_root>/versions/<version>/manifest.json         written last inside the version
    <index_root>/versions/<version>/shards/shard-XXXXX-of-NNNNN/
        scann_assets.pbtxt, scann_config.pb, dataset.npy, ...   ScaNN, serialized relative
        rows.parquet                                            row -> image_id, view, ...
    <index_root>/versions/<version>/REJECTED               only when the recall gate failed
    <index_root>/LATEST                                     the published version's name

Version states (see `list_versions`):
  - "incomplete": no manifest.json (a build still running, or one that crashed).
  - "rejected":   manifest.json with status "rejected" (failed the recall gate); kept on
                  disk for inspection, never published.
  - "passed":     manifest.json with status "passed"; LATEST may name it.

LATEST is only ever written by `publish_version`, which first checks that the version
has a "passed" manifest, and writes the pointer atomically (local: temp file + rename;
object stores: one small object). LATEST only moves forward (to a newer version name)
unless `allow_rollback=True`, so two publishers racing leave the newer one published.
On local roots publishing and retention run under an exclusive file lock.

The reader (`open_index` -> `IndexVersion.load_shards`) is pipelines/index/reader.py; the
`index-info` command is in pipelines/index/commands.py.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, ContextManager


from pipelines.core import filesystem as fs
from pipelines.core import latest as latest_pointer
from pipelines.core.checksums import sha256_file
from pipelines.core.locks import is_run_locked, root_lock
from pipelines.core.names import InvalidNameError, check_segment, is_safe_segment
from pipelines.index.manifest import (FORMAT, STATUS_PASSED, STATUS_REJECTED, IndexArtifactError,
                                      IndexIntegrityError, IndexManifest, ManifestFormatError,
                                      ShardEntry, ShardFile)

log = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
SHARDS_DIR = "shards"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = latest_pointer.LATEST_FILE
REJECTED_FILE = "REJECTED"
ROWS_FILE = "rows.parquet"
LOCK_FILE = latest_pointer.LOCK_FILE
STATUS_INCOMPLETE = "incomplete"
# Retention leaves an incomplete version alone until nothing in it changed for this long.
INCOMPLETE_GRACE_S = 3600.0
# Row table columns (rows.parquet), in shard row order (= ScaNN datapoint index).
ROW_COLUMNS = ("image_id", "view", "product_id", "image_uri", "metadata")



__all__ = ["FORMAT", "STATUS_PASSED", "STATUS_REJECTED", "IndexArtifactError",
           "IndexIntegrityError", "IndexManifest", "ManifestFormatError", "ShardEntry",
           "ShardFile"]


# --------------------------------------------------------------------------- layout

def versions_dir(index_root: str) -> str:
    return fs.join(index_root, VERSIONS_DIR)


def version_dir(index_root: str, version: str) -> str:
    check_version_name(version)
    return fs.join(index_root, VERSIONS_DIR, version)


def shard_name(shard: int, num_shards: int) -> str:
    """`shard-00003-of-00008` (the shard's folder name inside `shards/`)."""
    return f"shard-{shard:05d}-of-{num_shards:05d}"


def shard_relpath(shard: int, num_shards: int) -> str:
    return f"{SHARDS_DIR}/{shard_name(shard, num_shards)}"


def check_version_name(version: str, what: str = "index version name") -> str:
    """The name itself, or IndexArtifactError when it cannot be a version folder name
    (the rule of `pipelines.core.names.check_segment`, shared with run ids)."""
    try:
        return check_segment(version, what)
    except InvalidNameError as e:
        raise IndexArtifactError(f"invalid {e}") from e


def new_version_name(salt: str = "", now: dt.datetime | None = None) -> str:
    """A new version name that sorts by creation time: `20261122T043512.123Z-1a2b3c4d`.

    The suffix is a short hash of `salt` (e.g. the source snapshot), the time and a random
    uuid, so two builds in the same millisecond still get distinct names.
    """
    now = (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%S") + f".{now.microsecond // 1000:03d}Z"
    digest = hashlib.sha256(f"{salt}|{now.isoformat()}|{uuid.uuid4().hex}".encode()).hexdigest()
    return f"{stamp}-{digest[:8]}"


# --------------------------------------------------------------------------- checksums

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_dir_checksums(folder: str) -> list[dict[str, Any]]:
    """[{name, sha256, bytes}] for every file below a local folder (names relative, '/')."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest, size = sha256_file(full)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            out.append({"name": rel, "sha256": digest, "bytes": size})
    return sorted(out, key=lambda f: f["name"])


# --------------------------------------------------------------------------- manifest / state

def manifest_uri(index_root: str, version: str) -> str:
    return fs.join(version_dir(index_root, version), MANIFEST_FILE)


def read_manifest(index_root: str, version: str) -> IndexManifest:
    """The manifest of a version, parsed into its contract (pipelines.index.manifest);
    IndexArtifactError if it is missing, unreadable or does not follow the contract."""
    uri = manifest_uri(index_root, version)
    if not fs.exists(uri):
        raise IndexArtifactError(f"index version {version} under {index_root} is incomplete "
                                 f"(no {MANIFEST_FILE})")
    try:
        manifest = fs.read_json(uri)
    except ValueError as e:
        raise IndexArtifactError(f"{uri}: not valid JSON: {e}") from e
    parsed = IndexManifest.from_dict(manifest, uri)
    if parsed.version != version:
        raise IndexArtifactError(f"{uri}: names version {parsed.version!r}, "
                                 f"but lies in folder {version!r}")
    return parsed


_SHARD_KINDS = ("scann_tree_ah", "scann_brute_force", "empty")


def check_manifest_structure(manifest: IndexManifest, version: str) -> None:
    """IndexIntegrityError when a manifest's shard table is malformed or inconsistent.

    Checks what the loader relies on beyond the field types the contract checks (so a
    tampered manifest is refused with a reason, not a KeyError): dim >= 1, num_vectors =
    sum of the shards' num_vectors, shard numbers 0..N-1, each shard's path exactly
    `shards/shard-XXXXX-of-NNNNN` and its file names plain relative names (nothing outside
    the shard folder), known shard kinds.
    """
    def bad(msg: str) -> IndexIntegrityError:
        return IndexIntegrityError(f"version {version}: manifest {msg}")

    dim, total, shards = manifest.dim, manifest.num_vectors, manifest.shards
    if dim < 1:
        raise bad(f"has an invalid dim {dim!r}")
    if not shards:
        raise bad("has no shard table")
    counted = 0
    for i, entry in enumerate(shards):
        if entry.shard != i:
            raise bad(f"shard entry {i} names shard {entry.shard!r}")
        if entry.path != shard_relpath(i, len(shards)):
            raise bad(f"shard {i} has path {entry.path!r}, expected "
                      f"{shard_relpath(i, len(shards))!r}")
        n = entry.num_vectors
        if n < 0:
            raise bad(f"shard {i} has an invalid num_vectors {n!r}")
        counted += n
        if entry.kind not in _SHARD_KINDS:
            raise bad(f"shard {i} has an unknown kind {entry.kind!r}")
        names = []
        for f in entry.files:
            name = f.name
            if (not name or name.startswith("/")
                    or any(not is_safe_segment(part) for part in name.split("/"))):
                raise bad(f"shard {i} has an invalid file entry {f.to_dict()!r}")
            names.append(name)
        if ROWS_FILE not in names:
            raise bad(f"shard {i} lists no {ROWS_FILE}")
        if entry.kind != "empty" and entry.stored_vectors not in names:
            raise bad(f"shard {i} lists no {entry.stored_vectors} (its stored vectors)")
    if counted != total:
        raise bad(f"says num_vectors {total!r}, but its shards hold {counted}")
    routing = manifest.routing
    if routing is not None:
        from pipelines.index.routing import CENTROIDS_FILE
        owners = routing.get("centroid_shards")
        budget = routing.get("budget")
        if (routing.get("centroids_file") != CENTROIDS_FILE
                or not isinstance(routing.get("sha256"), str)
                or not isinstance(routing.get("bytes"), int)):
            raise bad(f"routing names no valid {CENTROIDS_FILE} (file, sha256, bytes)")
        if (not isinstance(owners, list) or not owners
                or any(not isinstance(o, int) or not 0 <= o < len(shards) for o in owners)):
            raise bad(f"routing has invalid centroid_shards (shards 0..{len(shards) - 1})")
        if not isinstance(budget, int) or not 1 <= budget <= len(shards):
            raise bad(f"routing has an invalid budget {budget!r} (1..{len(shards)})")


def write_manifest(index_root: str, version: str, manifest: IndexManifest) -> str:
    """Write manifest.json atomically: the version is complete once this returns."""
    uri = manifest_uri(index_root, version)
    fs.write_json(uri, manifest.to_dict(), atomic=True)
    return uri


def mark_rejected(index_root: str, version: str, reason: str) -> None:
    """Leave a human-readable REJECTED note in a version folder (manifest says so too)."""
    fs.write_bytes_atomic(fs.join(version_dir(index_root, version), REJECTED_FILE),
                          (reason.rstrip() + "\n").encode())


def read_latest(index_root: str) -> str | None:
    """The version name LATEST holds, or None when nothing has been published yet."""
    try:
        return latest_pointer.read(index_root, "version name", empty_ok=True)
    except latest_pointer.LatestError as e:
        raise IndexArtifactError(str(e)) from e


def read_version_state(index_root: str, version: str) -> tuple[str, IndexManifest | None]:
    """(state, manifest): "passed" or "rejected" with its manifest, or "incomplete" and
    None when the manifest is missing or does not read (see the module docstring)."""
    try:
        manifest = read_manifest(index_root, version)
    except IndexArtifactError:
        return STATUS_INCOMPLETE, None
    return (STATUS_PASSED if manifest.passed else STATUS_REJECTED), manifest


def version_state(index_root: str, version: str) -> str:
    """"passed", "rejected" or "incomplete" (see the module docstring)."""
    return read_version_state(index_root, version)[0]


@dataclass(frozen=True)
class VersionInfo:
    """One folder under versions/, as `list_versions` and `index-info` report it."""
    version: str
    state: str                 # passed | rejected | incomplete
    is_latest: bool
    manifest: IndexManifest | None

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        if m is None:
            return {"version": self.version, "state": self.state, "latest": self.is_latest,
                    "created_at": None, "num_vectors": None, "num_shards": None, "dim": None,
                    "model_id": None, "recall": {}, "threshold": None}
        ev = m.evaluation
        return {"version": self.version, "state": self.state, "latest": self.is_latest,
                "created_at": m.created_at, "num_vectors": m.num_vectors,
                "num_shards": m.num_shards or None, "dim": m.dim, "model_id": m.model_id,
                "recall": {key: v for key, v in ev.items() if key.startswith("recall@")},
                "threshold": ev.get("threshold")}


def list_versions(index_root: str) -> list[VersionInfo]:
    """Every version folder under the root, oldest first (names sort by time)."""
    latest = read_latest(index_root)
    out = []
    for name in fs.list_children(versions_dir(index_root)):
        if not is_safe_segment(name):
            continue
        state, manifest = read_version_state(index_root, name)
        out.append(VersionInfo(name, state, name == latest, manifest))
    return out


# --------------------------------------------------------------------------- publish

def build_lock_name(version: str) -> str:
    """The run lock a build of `version` holds under its index root for its whole run
    (pipelines.core.locks.run_lock; local roots)."""
    return f".build-{check_version_name(version)}.lock"


def is_being_built(index_root: str, version: str) -> bool:
    """True when a live build of `version` holds its run lock (local roots only)."""
    return is_run_locked(index_root, build_lock_name(version))


def _publish_lock(index_root: str) -> ContextManager[None]:
    """Exclusive lock for publish + retention on local roots (no-op on object stores)."""
    return root_lock(index_root, LOCK_FILE)


def write_latest(index_root: str, version: str) -> None:
    """Point LATEST at a version, atomically. Use `publish_version`, which checks first."""
    latest_pointer.write(index_root, check_version_name(version), "version name")


def publish_version(index_root: str, version: str, retention: int | None = None,
                    allow_rollback: bool = False, manifest: IndexManifest | None = None) -> bool:
    """Make a passed version LATEST, then apply retention; True when LATEST now names it.

    Refuses (IndexArtifactError) a version without a "passed" manifest, so LATEST can never
    name an incomplete or rejected version. When LATEST already names a newer version (a
    concurrent publisher won), LATEST is left alone and False is returned, unless
    `allow_rollback`. `manifest`: the version's manifest when the caller has just read or
    written it (not read again).
    """
    if manifest is None or manifest.version != version:
        manifest = read_manifest(index_root, version)
    if not manifest.passed:
        raise IndexArtifactError(f"index version {version} has status "
                                 f"{manifest.status!r}; only passed versions publish")
    with _publish_lock(index_root):
        try:
            current = read_latest(index_root)
        except IndexArtifactError as e:  # garbage in LATEST: replaced by a verified version
            log.warning("%s; replacing it with %s", e, version)
            current = None
        if current is not None and current > version and not allow_rollback:
            log.warning("LATEST already names %s, newer than %s; leaving it", current, version)
            published = False
        else:
            # Re-check under the lock: retention by another publisher may have run.
            if not read_manifest(index_root, version).passed:
                raise IndexArtifactError(f"index version {version} is no longer passed")
            write_latest(index_root, version)
            log.info("published index version %s (LATEST was %s)", version, current)
            published = True
        if retention is not None:
            apply_retention(index_root, retention, _locked=True)
    return published


def apply_retention(index_root: str, keep: int, _locked: bool = False) -> list[str]:
    """Delete old versions; returns the deleted names.

    Keeps the newest `keep` passed versions and always the one LATEST names. Rejected and
    incomplete versions are deleted only when older than the oldest kept passed version
    (so a fresh rejection stays for inspection), and an incomplete one only once nothing
    in it changed for INCOMPLETE_GRACE_S: it may be a build still writing its shards (a
    build that started before a newer version was published has the older name).
    """
    if keep < 1:
        raise IndexArtifactError(f"retention must keep at least 1 version, got {keep}")
    if not _locked:
        with _publish_lock(index_root):
            return apply_retention(index_root, keep, _locked=True)
    versions = list_versions(index_root)
    latest = read_latest(index_root)
    passed = [v.version for v in versions if v.state == STATUS_PASSED]
    kept = set(passed[-keep:])
    if latest is not None:
        kept.add(latest)
    if not kept:
        return []
    oldest_kept = min(kept)
    deleted = []
    for v in versions:
        if v.version in kept:
            continue
        if v.state != STATUS_PASSED and v.version > oldest_kept:
            continue
        if v.state == STATUS_INCOMPLETE:
            if is_being_built(index_root, v.version):
                continue
            changed = fs.last_modified(version_dir(index_root, v.version))
            if changed is not None and time.time() - changed < INCOMPLETE_GRACE_S:
                continue
        fs.delete_tree(version_dir(index_root, v.version))
        fs.delete_tree(fs.join(index_root, "deltas", v.version))  # its delta log goes with it
        deleted.append(v.version)
    if deleted:
        log.info("retention (keep %d): deleted %s", keep, ", ".join(deleted))
    return deleted
