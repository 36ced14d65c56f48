"""The index artifact: layout, manifest, checksums, publish/LATEST/retention, and the reader.

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

The reader (`open_index` -> `IndexVersion.load_shards`) copies object-store shards to
a local directory (ScaNN loads from local files), verifies every file's sha256 against
the manifest and loads the ScaNN searchers plus their row tables.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ContextManager, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import filesystem as fs
from pipelines.core import latest as latest_pointer
from pipelines.core.checksums import sha256_file
from pipelines.core.command import Command, check_uri_arg
from pipelines.core.config import Config
from pipelines.core.locks import root_lock
from pipelines.core.names import InvalidNameError, check_segment, is_safe_segment

log = logging.getLogger(__name__)

FORMAT = "catalog-search-index/1"
VERSIONS_DIR = "versions"
SHARDS_DIR = "shards"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = latest_pointer.LATEST_FILE
REJECTED_FILE = "REJECTED"
ROWS_FILE = "rows.parquet"
LOCK_FILE = latest_pointer.LOCK_FILE
STATUS_PASSED = "passed"
STATUS_REJECTED = "rejected"
STATUS_INCOMPLETE = "incomplete"
# Retention leaves an incomplete version alone until nothing in it changed for this long.
INCOMPLETE_GRACE_S = 3600.0
# Row table columns (rows.parquet), in shard row order (= ScaNN datapoint index).
ROW_COLUMNS = ("image_id", "view", "product_id", "image_uri", "metadata")



class IndexArtifactError(ValueError):
    """An index root, version or manifest is missing or does not follow the contract."""


class IndexIntegrityError(IndexArtifactError):
    """A shard file is missing or its sha256 / size differs from the manifest."""


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


def read_manifest(index_root: str, version: str) -> dict[str, Any]:
    """The manifest of a version; IndexArtifactError if it is missing or unreadable."""
    uri = manifest_uri(index_root, version)
    if not fs.exists(uri):
        raise IndexArtifactError(f"index version {version} under {index_root} is incomplete "
                                 f"(no {MANIFEST_FILE})")
    try:
        manifest = fs.read_json(uri)
    except ValueError as e:
        raise IndexArtifactError(f"{uri}: not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexArtifactError(f"{uri}: not an index manifest of format {FORMAT}")
    if manifest.get("version") != version:
        raise IndexArtifactError(f"{uri}: names version {manifest.get('version')!r}, "
                                 f"but lies in folder {version!r}")
    return manifest


_SHARD_KINDS = ("scann_tree_ah", "scann_brute_force", "empty")


def check_manifest_structure(manifest: dict[str, Any], version: str) -> None:
    """IndexIntegrityError when a manifest's shard table is malformed or inconsistent.

    Checks the fields the loader relies on (so a tampered manifest is refused with a
    reason, not a KeyError): dim, num_vectors = sum of the shards' num_vectors, shard
    numbers 0..N-1, each shard's path exactly `shards/shard-XXXXX-of-NNNNN` and its file
    names plain relative names (nothing outside the shard folder), known shard kinds.
    """
    def bad(msg: str) -> IndexIntegrityError:
        return IndexIntegrityError(f"version {version}: manifest {msg}")

    dim, total, shards = manifest.get("dim"), manifest.get("num_vectors"), manifest.get("shards")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise bad(f"has an invalid dim {dim!r}")
    if not isinstance(shards, list) or not shards:
        raise bad("has no shard table")
    counted = 0
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise bad(f"shard entry {i} is not an object")
        if entry.get("shard") != i:
            raise bad(f"shard entry {i} names shard {entry.get('shard')!r}")
        if entry.get("path") != shard_relpath(i, len(shards)):
            raise bad(f"shard {i} has path {entry.get('path')!r}, expected "
                      f"{shard_relpath(i, len(shards))!r}")
        n = entry.get("num_vectors")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise bad(f"shard {i} has an invalid num_vectors {n!r}")
        counted += n
        if entry.get("kind") not in _SHARD_KINDS:
            raise bad(f"shard {i} has an unknown kind {entry.get('kind')!r}")
        files = entry.get("files")
        if not isinstance(files, list):
            raise bad(f"shard {i} lists no files")
        names = []
        for f in files:
            name = f.get("name") if isinstance(f, dict) else None
            if (not isinstance(name, str) or not name or name.startswith("/")
                    or any(not is_safe_segment(part) for part in name.split("/"))
                    or not isinstance(f.get("sha256"), str)
                    or not isinstance(f.get("bytes"), int)):
                raise bad(f"shard {i} has an invalid file entry {f!r}")
            names.append(name)
        if ROWS_FILE not in names:
            raise bad(f"shard {i} lists no {ROWS_FILE}")
        if entry["kind"] != "empty" and "dataset.npy" not in names:
            raise bad(f"shard {i} lists no dataset.npy")
    if counted != total:
        raise bad(f"says num_vectors {total!r}, but its shards hold {counted}")


def write_manifest(index_root: str, version: str, manifest: dict[str, Any]) -> str:
    """Write manifest.json atomically: the version is complete once this returns."""
    uri = manifest_uri(index_root, version)
    fs.write_json(uri, manifest, atomic=True)
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


def version_state(index_root: str, version: str) -> str:
    """"passed", "rejected" or "incomplete" (see the module docstring)."""
    try:
        manifest = read_manifest(index_root, version)
    except IndexArtifactError:
        return STATUS_INCOMPLETE
    return STATUS_PASSED if manifest.get("status") == STATUS_PASSED else STATUS_REJECTED


@dataclass(frozen=True)
class VersionInfo:
    """One folder under versions/, as `list_versions` and `index-info` report it."""
    version: str
    state: str                 # passed | rejected | incomplete
    is_latest: bool
    manifest: dict[str, Any] | None

    def summary(self) -> dict[str, Any]:
        m = self.manifest or {}
        ev = m.get("evaluation") or {}
        return {"version": self.version, "state": self.state, "latest": self.is_latest,
                "created_at": m.get("created_at"), "num_vectors": m.get("num_vectors"),
                "num_shards": len(m.get("shards") or []) or None, "dim": m.get("dim"),
                "model_id": (m.get("model") or {}).get("model_id"),
                "recall": {key: v for key, v in ev.items() if key.startswith("recall@")},
                "threshold": ev.get("threshold")}


def list_versions(index_root: str) -> list[VersionInfo]:
    """Every version folder under the root, oldest first (names sort by time)."""
    latest = read_latest(index_root)
    out = []
    for name in fs.list_children(versions_dir(index_root)):
        if not is_safe_segment(name):
            continue
        try:
            manifest: dict[str, Any] | None = read_manifest(index_root, name)
        except IndexArtifactError:
            manifest = None
        if manifest is None:
            state = STATUS_INCOMPLETE
        else:
            state = STATUS_PASSED if manifest.get("status") == STATUS_PASSED else STATUS_REJECTED
        out.append(VersionInfo(name, state, name == latest, manifest))
    return out


# --------------------------------------------------------------------------- publish

def _publish_lock(index_root: str) -> ContextManager[None]:
    """Exclusive lock for publish + retention on local roots (no-op on object stores)."""
    return root_lock(index_root, LOCK_FILE)


def write_latest(index_root: str, version: str) -> None:
    """Point LATEST at a version, atomically. Use `publish_version`, which checks first."""
    latest_pointer.write(index_root, check_version_name(version), "version name")


def publish_version(index_root: str, version: str, retention: int | None = None,
                    allow_rollback: bool = False) -> bool:
    """Make a passed version LATEST, then apply retention; True when LATEST now names it.

    Refuses (IndexArtifactError) a version without a "passed" manifest, so LATEST can never
    name an incomplete or rejected version. When LATEST already names a newer version (a
    concurrent publisher won), LATEST is left alone and False is returned, unless
    `allow_rollback`.
    """
    manifest = read_manifest(index_root, version)
    if manifest.get("status") != STATUS_PASSED:
        raise IndexArtifactError(f"index version {version} has status "
                                 f"{manifest.get('status')!r}; only passed versions publish")
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
            read_manifest(index_root, version)
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
            changed = fs.last_modified(version_dir(index_root, v.version))
            if changed is not None and time.time() - changed < INCOMPLETE_GRACE_S:
                continue
        fs.delete_tree(version_dir(index_root, v.version))
        deleted.append(v.version)
    if deleted:
        log.info("retention (keep %d): deleted %s", keep, ", ".join(deleted))
    return deleted


# --------------------------------------------------------------------------- reader

@dataclass
class LoadedShard:
    """One shard in memory: its ScaNN searcher, its rows and the search parameters."""
    shard: int
    num_shards: int
    num_vectors: int
    dim: int
    kind: str                       # scann_tree_ah | scann_brute_force | empty
    searcher: Any                   # scann ScannSearcher, or None for an empty shard
    rows: pa.Table                  # ROW_COLUMNS, row i = ScaNN datapoint i
    local_dir: str                  # local folder holding the shard's files
    leaves_to_search: int = -1      # -1: the searcher's default / brute force
    reorder_multiplier: int = 1
    info: dict[str, Any] = field(default_factory=dict)  # the manifest's shard entry

    def vectors(self) -> np.ndarray:
        """float32 [num_vectors, dim] (memory-mapped from the shard's dataset.npy)."""
        if self.num_vectors == 0:
            return np.zeros((0, self.dim), np.float32)
        path = os.path.join(self.local_dir, "dataset.npy")
        if not os.path.exists(path):
            raise IndexArtifactError(f"shard {self.shard}: no dataset.npy in {self.local_dir}")
        return np.load(path, mmap_mode="r")


class IndexVersion:
    """An opened index version: its manifest, and shards loaded on demand."""

    def __init__(self, index_root: str, version: str, manifest: dict[str, Any],
                 verify: bool = True, cache_dir: str | None = None):
        self.index_root = index_root
        self.version = version
        self.manifest = manifest
        self.verify = verify
        self.cache_dir = cache_dir
        self.path = version_dir(index_root, version)

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def check_files(self) -> None:
        """Every file the manifest lists exists with the recorded size (cheap; no hashing)."""
        for entry in self.manifest["shards"]:
            base = fs.join(self.path, entry["path"])
            for f in entry["files"]:
                uri = fs.join(base, f["name"])
                if not fs.exists(uri):
                    raise IndexIntegrityError(f"version {self.version} shard {entry['shard']}: "
                                              f"file {uri} is missing")
                if fs.is_local(uri):
                    size = os.path.getsize(fs.normalize(uri))
                    if size != f["bytes"]:
                        raise IndexIntegrityError(
                            f"version {self.version} shard {entry['shard']}: {uri} has "
                            f"{size} bytes, manifest says {f['bytes']}")

    def load_shards(self, shard_ids: Sequence[int] | None = None) -> list[LoadedShard]:
        """Load all shards, or the chosen ones (for serving shards on several hosts)."""
        entries = self.manifest["shards"]
        if shard_ids is None:
            shard_ids = list(range(len(entries)))
        bad = [s for s in shard_ids if not isinstance(s, (int, np.integer))
               or not 0 <= s < len(entries)]
        if bad:
            raise IndexArtifactError(f"version {self.version} has shards 0..{len(entries) - 1}; "
                                     f"cannot load {bad}")
        return [self._load_shard(entries[int(s)]) for s in shard_ids]

    def _load_shard(self, entry: dict[str, Any]) -> LoadedShard:
        from scann.scann_ops.py import scann_ops_pybind
        base = fs.join(self.path, entry["path"])
        local = self._local_copy(base, entry)
        rows = pq.read_table(os.path.join(local, ROWS_FILE))
        if rows.num_rows != entry["num_vectors"]:
            raise IndexIntegrityError(f"version {self.version} shard {entry['shard']}: "
                                      f"{ROWS_FILE} has {rows.num_rows} rows, manifest says "
                                      f"{entry['num_vectors']}")
        searcher = None
        if self.verify and entry["kind"] != "empty":
            check_shard_vectors(os.path.join(local, "dataset.npy"), entry["num_vectors"],
                                int(self.manifest["dim"]),
                                f"version {self.version} shard {entry['shard']}")
        if entry["kind"] != "empty":
            searcher = scann_ops_pybind.load_searcher(local, assets_backcompat_shim=False)
            if searcher.size() != entry["num_vectors"]:
                raise IndexIntegrityError(
                    f"version {self.version} shard {entry['shard']}: searcher holds "
                    f"{searcher.size()} vectors, manifest says {entry['num_vectors']}")
        search = entry.get("search") or {}
        return LoadedShard(shard=int(entry["shard"]), num_shards=len(self.manifest["shards"]),
                           num_vectors=int(entry["num_vectors"]), dim=int(self.manifest["dim"]),
                           kind=entry["kind"], searcher=searcher, rows=rows, local_dir=local,
                           leaves_to_search=int(search.get("leaves_to_search", -1)),
                           reorder_multiplier=int(search.get("reorder_multiplier", 1)),
                           info=entry)

    def _local_copy(self, base: str, entry: dict[str, Any]) -> str:
        """A local folder with the shard's files, checksums verified when `self.verify`."""
        files = entry["files"]
        if fs.is_local(base):
            local = fs.normalize(base)
            for f in files:
                path = os.path.join(local, f["name"])
                if not os.path.exists(path):
                    raise IndexIntegrityError(f"version {self.version} shard {entry['shard']}: "
                                              f"file {path} is missing")
                if self.verify:
                    digest, size = sha256_file(path)
                    _check_file(self.version, entry["shard"], path, f, digest, size)
            return local
        root = self.cache_dir or tempfile.mkdtemp(prefix="catalog-index-")
        local = os.path.join(root, self.version, entry["path"])
        os.makedirs(local, exist_ok=True)
        for f in files:
            uri = fs.join(base, f["name"])
            data = fs.read_bytes(uri)
            if self.verify:
                _check_file(self.version, entry["shard"], uri, f, sha256_bytes(data), len(data))
            dest = os.path.join(local, f["name"])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as out:
                out.write(data)
        return local


#: Stored vectors must be L2-normalised: |norm - 1| <= this (float32 rounding is ~1e-6).
NORM_TOLERANCE = 1e-3
_NORM_BLOCK_ROWS = 65536


def check_shard_vectors(path: str, num_vectors: int, dim: int, where: str) -> None:
    """IndexIntegrityError unless `path` (a shard's dataset.npy) holds float32
    [num_vectors, dim] vectors, all finite and of unit length within NORM_TOLERANCE.

    Checksums only prove the files are the ones the manifest lists; this catches a
    shard whose vectors were zeroed or scaled and whose checksums were recomputed (it
    would otherwise load and silently drop out of every result). Every row is checked,
    in blocks, from a memory map.
    """
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexIntegrityError(f"{where}: dataset.npy is not a readable array: {e}") from e
    if vectors.dtype != np.float32 or vectors.shape != (num_vectors, dim):
        raise IndexIntegrityError(f"{where}: dataset.npy holds {vectors.dtype} "
                                  f"{list(vectors.shape)}, manifest says float32 "
                                  f"[{num_vectors}, {dim}]")
    for start in range(0, num_vectors, _NORM_BLOCK_ROWS):
        block = np.asarray(vectors[start:start + _NORM_BLOCK_ROWS], dtype=np.float64)
        if not np.all(np.isfinite(block)):
            raise IndexIntegrityError(f"{where}: dataset.npy holds NaN or infinite values")
        norms = np.linalg.norm(block, axis=1)
        off = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
        if off.size:
            raise IndexIntegrityError(
                f"{where}: {off.size} vectors in rows {start}..{start + len(block) - 1} are "
                f"not unit length (row {start + int(off[0])} has norm {norms[off[0]]:.6f}; "
                f"tolerance {NORM_TOLERANCE}); the shard's vectors were altered")


def _check_file(version: str, shard: int, where: str, expected: dict[str, Any],
                digest: str, size: int) -> None:
    if digest != expected["sha256"] or size != expected["bytes"]:
        raise IndexIntegrityError(
            f"version {version} shard {shard}: checksum mismatch for {where}: sha256 "
            f"{digest[:16]}… ({size} bytes), manifest says {expected['sha256'][:16]}… "
            f"({expected['bytes']} bytes); the file is corrupted or was modified")


def open_index(index_root: str, version: str | None = None, verify: bool = True,
               allow_unpublished: bool = False, cache_dir: str | None = None) -> IndexVersion:
    """Open the version LATEST names (or `version`) under a local or object-store root.

    With `verify`, every shard file is checked against the manifest's sha256 when loaded
    (and sizes are checked now). A rejected or incomplete version opens only with
    `allow_unpublished=True` (for inspection). Object-store shards are copied into
    `cache_dir` (default: a new temp folder) because ScaNN loads from local files.
    """
    if version is None:
        version = read_latest(index_root)
        if version is None:
            raise IndexArtifactError(f"no published index under {index_root} (no {LATEST_FILE})")
    manifest = read_manifest(index_root, version)
    if manifest.get("status") != STATUS_PASSED and not allow_unpublished:
        raise IndexArtifactError(f"index version {version} has status "
                                 f"{manifest.get('status')!r} and is not servable")
    check_manifest_structure(manifest, version)
    opened = IndexVersion(index_root, version, manifest, verify=verify, cache_dir=cache_dir)
    if verify:
        opened.check_files()
    return opened


def verify_version(index_root: str, version: str) -> None:
    """Fully verify one version (manifest structure, every file's size and sha256, row
    counts, vector norms, the searchers load); IndexArtifactError names the first problem.
    Works for rejected versions too (they are verified, not served)."""
    opened = open_index(index_root, version, verify=True, allow_unpublished=True)
    opened.load_shards()


# --------------------------------------------------------------------------- CLI

def _add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-root", required=True,
                   help="index root (local path, file://, gs://, s3://)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--verify", action="store_true",
                   help="verify every version with a manifest (checksums, row counts, vector "
                        "norms, searchers load); corrupted ones are reported as such; exit 1 "
                        "when any is corrupted")


STATUS_CORRUPTED = "corrupted"


def info_report(index_root: str, verify: bool = False) -> dict[str, Any]:
    """What `index-info` prints: LATEST, and each version's state and summary.

    Never raises for a damaged root: a LATEST that holds garbage is reported under
    `latest_error`; with `verify`, a version that fails verification gets state
    "corrupted" and its reason under `error` (a passed version is only reported passed
    when it verifies).
    """
    report: dict[str, Any] = {"index_root": index_root, "latest": None, "latest_error": None,
                              "verified": verify, "versions": []}
    try:
        report["latest"] = read_latest(index_root)
    except IndexArtifactError as e:
        report["latest_error"] = str(e)
    names = fs.list_children(versions_dir(index_root))
    for name in names:
        if not is_safe_segment(name):
            continue
        entry: dict[str, Any] = {"version": name, "state": STATUS_INCOMPLETE,
                                 "latest": name == report["latest"], "error": None}
        manifest = None
        if fs.exists(manifest_uri(index_root, name)):
            try:
                manifest = read_manifest(index_root, name)
            except IndexArtifactError as e:
                entry.update(state=STATUS_CORRUPTED, error=str(e))
        if manifest is not None:
            info = VersionInfo(name, STATUS_PASSED if manifest.get("status") == STATUS_PASSED
                               else STATUS_REJECTED, entry["latest"], manifest)
            entry.update(info.summary())
            entry["error"] = None
            if verify:
                try:
                    verify_version(index_root, name)
                    entry["verified"] = True
                except Exception as e:  # any failure to load is a corrupted version
                    entry.update(state=STATUS_CORRUPTED, verified=False,
                                 error=f"{type(e).__name__}: {e}"
                                 if not isinstance(e, IndexArtifactError) else str(e))
        report["versions"].append(entry)
    if report["latest"] and report["latest"] not in names:
        report["latest_error"] = (f"LATEST names {report['latest']}, which does not exist "
                                  f"under {versions_dir(index_root)}")
    return report


def _run_info(args: argparse.Namespace, config: Config) -> int:
    root = check_uri_arg("--index-root", args.index_root)
    if fs.is_local(root) and not os.path.isdir(root):
        print(f"catalog-search index-info: error: --index-root {args.index_root} is not a "
              "folder", file=sys.stderr)
        return 1
    try:
        report = info_report(root, verify=args.verify)
    except (IndexArtifactError, OSError) as e:
        print(f"catalog-search index-info: error: {e}", file=sys.stderr)
        return 1
    corrupted = [v["version"] for v in report["versions"] if v["state"] == STATUS_CORRUPTED]
    rc = 1 if corrupted or report["latest_error"] else 0
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return rc
    print(f"index root: {args.index_root}")
    if report["latest_error"]:
        print(f"LATEST:     ERROR: {report['latest_error']}")
    else:
        print(f"LATEST:     {report['latest'] or '(none published)'}")
    if not report["versions"]:
        print("no versions")
        return rc
    print(f"{'':2}{'version':<32} {'state':<10} {'vectors':>9} {'shards':>6} {'recall':<24} "
          f"created_at")
    for v in report["versions"]:
        recall = " ".join(f"{k}={val:.4f}" for k, val in sorted((v.get("recall") or {}).items())
                          if isinstance(val, (int, float)))
        nv = v.get("num_vectors")
        print(f"{'*' if v['latest'] else ' ':2}{v['version']:<32} {v['state']:<10} "
              f"{nv if nv is not None else '-':>9} "
              f"{v.get('num_shards') or '-':>6} {recall or '-':<24} {v.get('created_at') or '-'}")
        if v.get("error"):
            print(f"{'':4}{v['error']}")
    if args.verify:
        print(f"verified: {len(report['versions']) - len(corrupted)} ok, {len(corrupted)} "
              f"corrupted" + (f" ({', '.join(corrupted)})" if corrupted else ""))
    return rc


COMMANDS = {
    "index-info": Command(help="versions, LATEST, counts and recall of an index root",
                          add_arguments=_add_info_arguments, run=_run_info),
}
