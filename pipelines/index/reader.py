"""The index reader: open a version and load its shards, verified against the manifest.

`open_index` -> `IndexVersion.load_shards` copies object-store shards to a local directory
(ScaNN loads from local files), verifies every file's sha256 against the manifest, checks
the stored vectors (float32, finite, unit length) and loads the ScaNN searchers plus their
row tables. The layout and the manifest are pipelines/index/artifact.py's.
"""
from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import filesystem as fs
from pipelines.core import latest as latest_pointer
from pipelines.core.checksums import sha256_file
from pipelines.index.artifact import (ROWS_FILE, IndexArtifactError,
                                      IndexIntegrityError, check_manifest_structure, read_latest,
                                      read_manifest, sha256_bytes, version_dir)
from pipelines.index.manifest import DEFAULT_VECTORS_FILE, IndexManifest, ShardEntry, ShardFile


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
    info: ShardEntry | None = None  # the manifest's shard entry
    tuned_k: int = 0                # the k its budget was tuned for (0: unknown, old index)
    # the shared projection [projection_dim, dim] its searcher indexes (projection.npy;
    # one array for all shards of a version with the same copy), or None: raw queries
    projection: np.ndarray | None = field(default=None, repr=False, compare=False)
    _vectors: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def quantized_reorder(self) -> bool:
        """ScaNN reorders this shard with int8 / bfloat16 vectors (approximate scores)."""
        options = (self.info.options if self.info is not None else None) or {}
        return options.get("reorder_dtype", "float32") != "float32"

    @property
    def vectors_file(self) -> str:
        """The shard's stored-vectors file (the manifest entry's; version 1: dataset.npy)."""
        return self.info.stored_vectors if self.info is not None else DEFAULT_VECTORS_FILE

    def vectors(self) -> np.ndarray:
        """float32 [num_vectors, dim] from the shard's stored-vectors file (`vectors_file`:
        vectors.npy, or ScaNN's dataset.npy when ScaNN keeps float32): memory-mapped, or
        read into memory for a shard on the shared projection."""
        if self.num_vectors == 0:
            return np.zeros((0, self.dim), np.float32)
        if self._vectors is None:
            path = os.path.join(self.local_dir, self.vectors_file)
            if not os.path.exists(path):
                raise IndexArtifactError(f"shard {self.shard}: no {self.vectors_file} in "
                                         f"{self.local_dir}")
            # a shard on the shared projection rescores every query's candidates from
            # these vectors: held in memory (as ScaNN holds its float32 reorder copy);
            # otherwise memory-mapped (read for exact search and quantized rescoring)
            self._vectors = np.load(path, mmap_mode=None if self.projection is not None
                                    else "r", allow_pickle=False)
        return self._vectors


class IndexVersion:
    """An opened index version: its manifest, and shards loaded on demand."""

    def __init__(self, index_root: str, version: str, manifest: IndexManifest,
                 verify: bool = True, cache_dir: str | None = None):
        self.index_root = index_root
        self.version = version
        self.manifest = manifest
        self.verify = verify
        self.cache_dir = cache_dir
        self.path = version_dir(index_root, version)

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    def routing(self) -> Any:
        """The version's partition routing (pipelines.index.routing.Routing: centroids read
        and, with `verify`, checked against the manifest's sha256), or None (hash shards)."""
        entry = self.manifest.routing
        if entry is None:
            return None
        from pipelines.index.routing import Routing, load_partitions
        uri = fs.join(self.path, entry["centroids_file"])
        if not fs.exists(uri):
            raise IndexIntegrityError(f"version {self.version}: routing file {uri} is missing")
        data = fs.read_bytes(uri)
        if self.verify and (sha256_bytes(data) != entry["sha256"]
                            or len(data) != entry["bytes"]):
            raise IndexIntegrityError(
                f"version {self.version}: checksum mismatch for {uri}: the routing "
                f"centroids are corrupted or were modified")
        try:
            partitions = load_partitions(data, entry["centroid_shards"], self.manifest.dim,
                                         f"version {self.version} {uri}")
        except ValueError as e:
            raise IndexIntegrityError(str(e)) from e
        return Routing(partitions, int(entry["budget"]))

    def check_files(self) -> None:
        """Every file the manifest lists exists with the recorded size (cheap; no hashing)."""
        for entry in self.manifest.shards:
            base = fs.join(self.path, entry.path)
            for f in entry.files:
                uri = fs.join(base, f.name)
                if not fs.exists(uri):
                    raise IndexIntegrityError(f"version {self.version} shard {entry.shard}: "
                                              f"file {uri} is missing")
                if fs.is_local(uri):
                    size = os.path.getsize(fs.normalize(uri))
                    if size != f.bytes:
                        raise IndexIntegrityError(
                            f"version {self.version} shard {entry.shard}: {uri} has "
                            f"{size} bytes, manifest says {f.bytes}")

    def load_adapter(self) -> Any:
        """The adapter this version carries (pipelines.adapter.Adapter, verified against
        the manifest's record), or None when its vectors are model space;
        IndexIntegrityError when the copy is missing, damaged or not the recorded one."""
        from pipelines.adapter import AdapterError, load_for_version
        try:
            adapter = load_for_version(self.path, self.manifest.adapter)
        except AdapterError as e:
            raise IndexIntegrityError(f"version {self.version}: adapter: {e}") from e
        if adapter is not None and adapter.out_dim != self.manifest.dim:
            raise IndexIntegrityError(f"version {self.version}: adapter {adapter.id} gives "
                                      f"{adapter.out_dim}-d vectors, the index holds "
                                      f"{self.manifest.dim}-d")
        return adapter

    def load_shards(self, shard_ids: Sequence[int] | None = None) -> list[LoadedShard]:
        """Load all shards, or the chosen ones (for serving shards on several hosts)."""
        entries = self.manifest.shards
        if shard_ids is None:
            shard_ids = list(range(len(entries)))
        bad = [s for s in shard_ids if not isinstance(s, (int, np.integer))
               or not 0 <= s < len(entries)]
        if bad:
            raise IndexArtifactError(f"version {self.version} has shards 0..{len(entries) - 1}; "
                                     f"cannot load {bad}")
        return [self._load_shard(entries[int(s)]) for s in shard_ids]

    def _load_shard(self, entry: ShardEntry) -> LoadedShard:
        from scann.scann_ops.py import scann_ops_pybind
        base = fs.join(self.path, entry.path)
        local = self._local_copy(base, entry)
        where = f"version {self.version} shard {entry.shard}"
        rows = pq.read_table(os.path.join(local, ROWS_FILE))
        if rows.num_rows != entry.num_vectors:
            raise IndexIntegrityError(f"{where}: {ROWS_FILE} has {rows.num_rows} rows, manifest "
                                      f"says {entry.num_vectors}")
        searcher = None
        if self.verify and entry.kind != "empty":
            check_shard_vectors(os.path.join(local, entry.stored_vectors), entry.num_vectors,
                                self.manifest.dim, where)
        projection = self._projection(entry, local, where)
        if entry.kind != "empty":
            searcher = scann_ops_pybind.load_searcher(local, assets_backcompat_shim=False)
            if searcher.size() != entry.num_vectors:
                raise IndexIntegrityError(
                    f"{where}: searcher holds {searcher.size()} vectors, manifest says "
                    f"{entry.num_vectors}")
        return LoadedShard(shard=entry.shard, num_shards=self.manifest.num_shards,
                           num_vectors=entry.num_vectors, dim=self.manifest.dim,
                           kind=entry.kind, searcher=searcher, rows=rows, local_dir=local,
                           leaves_to_search=entry.leaves_to_search,
                           reorder_multiplier=entry.reorder_multiplier, info=entry,
                           tuned_k=_tuned_k(self.manifest), projection=projection)

    def _projection(self, entry: ShardEntry, local: str, where: str) -> np.ndarray | None:
        """The shard's shared projection (its projection.npy, checked), or None. Shards
        whose copies have the same sha256 share one array (ShardedSearcher projects a
        query once per distinct array)."""
        from pipelines.index.projection import PROJECTION_FILE, SHARED, load_projection
        options = entry.options or {}
        if options.get("projection") != SHARED:
            return None
        digest = next((f.sha256 for f in entry.files if f.name == PROJECTION_FILE), None)
        if digest is None:
            raise IndexIntegrityError(f"{where}: built on the shared projection but "
                                      f"{PROJECTION_FILE} is not among its files")
        cache = self.__dict__.setdefault("_projections", {})
        if digest not in cache:
            try:
                cache[digest] = load_projection(
                    os.path.join(local, PROJECTION_FILE), int(options["projection_dim"]),
                    self.manifest.dim, where)
            except (ValueError, KeyError, TypeError) as e:
                raise IndexIntegrityError(str(e)) from e
        return cache[digest]

    def _local_copy(self, base: str, entry: ShardEntry) -> str:
        """A local folder with the shard's files, checksums verified when `self.verify`."""
        files = entry.files
        if fs.is_local(base):
            local = fs.normalize(base)
            for f in files:
                path = os.path.join(local, f.name)
                if not os.path.exists(path):
                    raise IndexIntegrityError(f"version {self.version} shard {entry.shard}: "
                                              f"file {path} is missing")
                if self.verify:
                    digest, size = sha256_file(path)
                    _check_file(self.version, entry.shard, path, f, digest, size)
            return local
        root = self.cache_dir or tempfile.mkdtemp(prefix="catalog-index-")
        local = os.path.join(root, self.version, entry.path)
        os.makedirs(local, exist_ok=True)
        for f in files:
            uri = fs.join(base, f.name)
            data = fs.read_bytes(uri)
            if self.verify:
                _check_file(self.version, entry.shard, uri, f, sha256_bytes(data), len(data))
            dest = os.path.join(local, f.name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as out:
                out.write(data)
        return local


def _tuned_k(manifest: IndexManifest) -> int:
    """The k a version's search budget was tuned and gated for (its evaluation's k)."""
    k = (manifest.evaluation or {}).get("k")
    return int(k) if isinstance(k, int) and not isinstance(k, bool) and k > 0 else 0


#: Stored vectors must be L2-normalised: |norm - 1| <= this (float32 rounding is ~1e-6);
#: the build refuses rows outside it too (pipelines/index/build_rows.py).
NORM_TOLERANCE = 1e-3
_NORM_BLOCK_ROWS = 65536


def check_shard_vectors(path: str, num_vectors: int, dim: int, where: str) -> None:
    """IndexIntegrityError unless `path` (a shard's stored vectors) holds float32
    [num_vectors, dim] vectors, all finite and of unit length within NORM_TOLERANCE.

    Checksums only prove the files are the ones the manifest lists; this catches a
    shard whose vectors were zeroed or scaled and whose checksums were recomputed (it
    would otherwise load and silently drop out of every result). Every row is checked,
    in blocks, from a memory map.
    """
    name = os.path.basename(path)
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexIntegrityError(f"{where}: {name} is not a readable array: {e}") from e
    if vectors.dtype != np.float32 or vectors.shape != (num_vectors, dim):
        raise IndexIntegrityError(f"{where}: {name} holds {vectors.dtype} "
                                  f"{list(vectors.shape)}, manifest says float32 "
                                  f"[{num_vectors}, {dim}]")
    for start in range(0, num_vectors, _NORM_BLOCK_ROWS):
        block = np.asarray(vectors[start:start + _NORM_BLOCK_ROWS], dtype=np.float64)
        if not np.all(np.isfinite(block)):
            raise IndexIntegrityError(f"{where}: {name} holds NaN or infinite values")
        norms = np.linalg.norm(block, axis=1)
        off = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
        if off.size:
            raise IndexIntegrityError(
                f"{where}: {off.size} vectors in rows {start}..{start + len(block) - 1} are "
                f"not unit length (row {start + int(off[0])} has norm {norms[off[0]]:.6f}; "
                f"tolerance {NORM_TOLERANCE}); the shard's vectors were altered")


def _check_file(version: str, shard: int, where: str, expected: ShardFile,
                digest: str, size: int) -> None:
    if digest != expected.sha256 or size != expected.bytes:
        raise IndexIntegrityError(
            f"version {version} shard {shard}: checksum mismatch for {where}: sha256 "
            f"{digest[:16]}… ({size} bytes), manifest says {expected.sha256[:16]}… "
            f"({expected.bytes} bytes); the file is corrupted or was modified")


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
            raise IndexArtifactError(f"no published index under {index_root} "
                                     f"({latest_pointer.absent_reason(index_root)})")
    manifest = read_manifest(index_root, version)
    if not manifest.passed and not allow_unpublished:
        raise IndexArtifactError(f"index version {version} has status "
                                 f"{manifest.status!r} and is not servable")
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
    opened.load_adapter()
    opened.load_shards()


def shard_rows(index_root: str, manifest: IndexManifest, columns: Sequence[str] | None = None
               ) -> Iterator[tuple[ShardEntry, pa.Table]]:
    """Each non-empty shard of a version with its row table (rows.parquet; `columns` of
    artifact.ROW_COLUMNS, default all), in shard order; no searcher is loaded."""
    base = version_dir(index_root, manifest.version)
    for entry in manifest.shards:
        if entry.num_vectors:
            uri = fs.join(base, entry.path, ROWS_FILE)
            yield entry, fs.read_parquet(uri, list(columns) if columns is not None else None)


def read_stored_vectors(index_root: str, manifest: IndexManifest, entry: ShardEntry
                        ) -> np.ndarray:
    """A shard's stored float32 vectors (its vectors_file), read whole, no searcher
    loaded; IndexArtifactError when the file does not read as an array."""
    uri = fs.join(version_dir(index_root, manifest.version), entry.path, entry.stored_vectors)
    try:
        return np.load(io.BytesIO(fs.read_bytes(uri)), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexArtifactError(f"version {manifest.version} shard {entry.shard}: "
                                 f"{uri} is not a readable array: {e}") from e


def version_matches_snapshot(index_root: str, manifest: IndexManifest, snapshot_dir: str,
                             atol: float = 1e-4) -> tuple[bool, str]:
    """Does an index version (its manifest, already read) hold exactly a snapshot's rows
    (same ids, metadata, model and, within `atol`, the same vectors, in the version's
    index space: through its adapter)? (answer, reason when not)."""
    from pipelines.adapter import AdapterError, apply_adapter, load_for_version
    from pipelines.embed import snapshot

    snap = snapshot.load(snapshot_dir)
    try:  # a version with an adapter holds adapter(raw): compare in its space
        adapter = load_for_version(version_dir(index_root, manifest.version), manifest.adapter)
    except AdapterError as e:
        return False, f"its adapter does not read: {e}"
    if manifest.model_id != snap.summary.model_id:
        return False, f"model {manifest.model_id} != snapshot model {snap.summary.model_id}"
    if manifest.num_vectors != snap.table.num_rows:
        return False, (f"{manifest.num_vectors} vectors != {snap.table.num_rows} "
                       "snapshot rows")
    table = snap.table.select(["image_id", "view", "product_id", "image_uri", "metadata"])
    vectors = apply_adapter(adapter, snap.vectors())
    expected = {(r["image_id"], r["view"]): (r, i) for i, r in enumerate(table.to_pylist())}
    for entry, rows in shard_rows(index_root, manifest):
        try:
            shard_vectors = read_stored_vectors(index_root, manifest, entry)
        except IndexArtifactError as e:
            return False, f"shard {entry.shard} vectors unreadable: {e}"
        for j, row in enumerate(rows.to_pylist()):
            found = expected.get((row["image_id"], row["view"]))
            if found is None:
                return False, f"image {row['image_id']!r} is not in the snapshot"
            want, i = found
            if any(row.get(k) != want[k] for k in ("product_id", "image_uri", "metadata")):
                return False, f"image {row['image_id']!r} has other product/uri/metadata"
            if not np.allclose(shard_vectors[j], vectors[i], atol=atol):
                return False, f"image {row['image_id']!r} has another vector"
    return True, ""
