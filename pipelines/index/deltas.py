"""The delta log: changes on top of an immutable index version, without a rebuild.

    <index_root>/deltas/<version>/delta-000001/     one committed delta (numbered from 1)
        delta.json      DeltaManifest: format, version, seq, kind, model fingerprint, dim,
                        adapter, counts, and the sha256 + size of every other file
        rows.parquet    upserted rows (ROW_COLUMNS), row i <-> vectors.npy row i
        vectors.npy     float32 [rows, manifest.dim], index space, L2-normalised
        deletes.json    {"image_ids": [...], "product_ids": [...]}
    <index_root>/deltas/<version>/.tmp-<hex>/      a delta being written (never read)
    <index_root>/deltas/.lock                      writers of every log take it

A delta names the version it applies to (its folder and `version` in delta.json) and is
applied in `seq` order: its deletes first (every row of a deleted image_id / product_id,
in the version or in an earlier delta), then its upserts (an upserted image_id replaces
all rows of that image). A version's log starts empty; a full build publishes a new
version, whose log is fresh (the old log stays with the old version, and retention
removes it with it).

Writing is atomic and durable: the files go into a `.tmp-*` folder, each is fsynced, the
folder is fsynced and renamed to the next free `delta-NNNNNN` under the log lock, and the
parent folder is fsynced, all before `write_delta` returns. A writer killed at any point
leaves at most a `.tmp-*` folder, which readers never look at and the next writer
removes. Two writers take the lock in turn, so each gets its own number and neither's
change is lost. Reading verifies every file against delta.json (sha256, size) and the
vectors (shape, dtype, finite, unit norm) and refuses a damaged delta with
`DeltaIntegrityError` naming the file. Nothing is unpickled (`np.load(allow_pickle=False)`).

Vectors are index space (docs/ARCHITECTURE.md "Vector spaces"). A writer holding
model-space vectors (a snapshot's) passes `model_space=True`: they are checked against the
model's dim and projected with the adapter the version carries (`pipelines.adapter`;
identity without one). Index-space vectors must name the adapter they were projected
with (`adapter=`), which must be the version's. delta.json records the adapter id, and
the reader refuses a delta whose adapter, dim or model fingerprint is not the version's.

Writing needs a local index root (the lock and the rename); reading works on any root.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import filesystem as fs
from pipelines.core.contract import FORMAT_KEY, Int, Obj, Str, read
from pipelines.core.locks import exclusive_lock
from pipelines.index.artifact import ROW_COLUMNS, read_manifest, sha256_bytes
from pipelines.index.manifest import IndexArtifactError, IndexManifest

log = logging.getLogger(__name__)

DELTA_FORMAT = "catalog-search-delta/1"
DELTAS_DIR = "deltas"
DELTA_FILE = "delta.json"
ROWS_FILE = "rows.parquet"
VECTORS_FILE = "vectors.npy"
DELETES_FILE = "deletes.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
_PREFIX = "delta-"
#: |norm - 1| allowed for a stored vector (the reader's tolerance, pipelines.index.reader).
NORM_TOLERANCE = 1e-3

KIND_UPSERT = "upsert"
KIND_DELETE = "delete"
KIND_MIXED = "mixed"


class DeltaError(IndexArtifactError):
    """A delta cannot be written: wrong version, model, dimension, adapter or rows.
    Permanent (a retry gets the same answer), unlike the IndexArtifactError it is caught as."""

    permanent = True


class DeltaIntegrityError(DeltaError):
    """A committed delta is damaged or does not follow the contract (names the file)."""


def deltas_root(index_root: str) -> str:
    return fs.join(index_root, DELTAS_DIR)


def log_dir(index_root: str, version: str) -> str:
    return fs.join(index_root, DELTAS_DIR, version)


def delta_name(seq: int) -> str:
    return f"{_PREFIX}{seq:06d}"


def delta_dir(index_root: str, version: str, seq: int) -> str:
    return fs.join(log_dir(index_root, version), delta_name(seq))


def _seq_of(name: str) -> int | None:
    if not name.startswith(_PREFIX):
        return None
    digits = name[len(_PREFIX):]
    return int(digits) if digits.isdigit() and len(digits) == 6 else None


# --------------------------------------------------------------------------- the contract

@dataclass(frozen=True)
class DeltaFile:
    name: Str
    sha256: Str
    bytes: Int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class DeltaManifest:
    """delta.json: what one delta holds and what it applies to."""
    version: Str
    seq: Int
    kind: Str                        # upsert | delete | mixed
    created_at: Str
    dim: Int
    model_fingerprint: Str | None    # null when absent (as adapter)
    adapter: Str | None
    num_rows: Int                    # upserted rows (vectors)
    num_images: Int                  # distinct upserted image_ids
    delete_image_ids: Int
    delete_product_ids: Int
    files: list[DeltaFile]
    source: Obj = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {FORMAT_KEY: DELTA_FORMAT, "version": self.version, "seq": self.seq,
               "kind": self.kind, "created_at": self.created_at, "dim": self.dim,
               "model_fingerprint": self.model_fingerprint, "adapter": self.adapter,
               "num_rows": self.num_rows, "num_images": self.num_images,
               "delete_image_ids": self.delete_image_ids,
               "delete_product_ids": self.delete_product_ids,
               "files": [f.to_dict() for f in self.files], "source": self.source}
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_dict(cls, d: Any, source: str) -> "DeltaManifest":
        if not isinstance(d, Mapping) or d.get(FORMAT_KEY) != DELTA_FORMAT:
            found = d.get(FORMAT_KEY) if isinstance(d, Mapping) else type(d).__name__
            raise DeltaIntegrityError(f"{source}: not a delta of format {DELTA_FORMAT} "
                                      f"(found {found!r})")

        optional = {"model_fingerprint": None, "adapter": None}
        return read(cls, {**optional, **d}, source, DeltaIntegrityError)


@dataclass(frozen=True)
class Delta:
    """One committed, verified delta in memory."""
    manifest: DeltaManifest
    path: str
    rows: pa.Table                   # ROW_COLUMNS (0 rows for a delete-only delta)
    vectors: np.ndarray              # float32 [num_rows, dim]
    delete_image_ids: tuple[str, ...]
    delete_product_ids: tuple[str, ...]

    @property
    def seq(self) -> int:
        return self.manifest.seq


def version_adapter(manifest: IndexManifest) -> str | None:
    """The adapter id an index version carries (None: index space is model space)."""
    adapter = manifest.extra.get("adapter")
    if adapter is None:
        return None
    if isinstance(adapter, Mapping):
        return str(adapter.get("id") or json.dumps(adapter, sort_keys=True))
    return str(adapter)


def _load_version_adapter(index_root: str, manifest: IndexManifest) -> Any:
    from pipelines.adapter import AdapterError, load_for_version
    from pipelines.index.artifact import version_dir
    try:
        return load_for_version(version_dir(index_root, manifest.version),
                                manifest.extra.get("adapter"))
    except AdapterError as e:
        raise DeltaError(f"index version {manifest.version}: its adapter does not load: "
                         f"{e}") from e


# --------------------------------------------------------------------------- writing

def _empty_rows() -> pa.Table:
    return pa.table({c: pa.array([], pa.string()) for c in ROW_COLUMNS})


def _check_rows(rows: pa.Table | None, vectors: np.ndarray | None, dim: int
                ) -> tuple[pa.Table, np.ndarray]:
    if rows is None or rows.num_rows == 0:
        if vectors is not None and len(vectors):
            raise DeltaError("vectors were given without rows")
        return _empty_rows(), np.zeros((0, dim), np.float32)
    missing = [c for c in ROW_COLUMNS if c not in rows.column_names]
    if missing:
        raise DeltaError(f"upserted rows lack columns {missing} (need {list(ROW_COLUMNS)})")
    rows = rows.select(list(ROW_COLUMNS)).cast(pa.schema([(c, pa.string()) for c in ROW_COLUMNS]))
    if vectors is None:
        raise DeltaError("upserted rows need their vectors")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (rows.num_rows, dim):
        raise DeltaError(f"vectors have shape {list(vectors.shape)}; {rows.num_rows} rows of "
                         f"the version's dim {dim} were expected")
    _check_vectors(vectors, "the upserted vectors")
    seen: set[tuple[str, str]] = set()
    for i, (img, pid, view) in enumerate(zip(rows.column("image_id").to_pylist(),
                                             rows.column("product_id").to_pylist(),
                                             rows.column("view").to_pylist())):
        if not img or not pid or not view:
            raise DeltaError(f"upserted row {i}: image_id, product_id and view must be "
                             f"non-empty (got {img!r}, {pid!r}, {view!r})")
        if (img, view) in seen:
            raise DeltaError(f"upserted row {i}: duplicate (image_id, view) ({img!r}, {view!r})")
        seen.add((img, view))
    return rows, vectors


def _check_vectors(vectors: np.ndarray, where: str) -> None:
    if not np.all(np.isfinite(vectors)):
        raise DeltaIntegrityError(f"{where}: NaN or infinite values")
    if len(vectors):
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        off = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
        if off.size:
            raise DeltaIntegrityError(f"{where}: {off.size} vectors are not unit length "
                                      f"(row {int(off[0])} has norm {norms[off[0]]:.6f})")


def _ids(values: Iterable[str], what: str) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for v in values:
        if not isinstance(v, str) or not v:
            raise DeltaError(f"{what}: ids must be non-empty strings, got {v!r}")
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: str, data: bytes) -> DeltaFile:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return DeltaFile(os.path.basename(path), sha256_bytes(data), len(data))


def committed_seqs(index_root: str, version: str) -> list[int]:
    """The committed deltas of a version's log, in order (temp folders are not deltas)."""
    seqs = [s for s in (_seq_of(n) for n in fs.list_children(log_dir(index_root, version)))
            if s is not None]
    return sorted(seqs)


def log_lock(index_root: str) -> Any:
    """The lock every writer of the delta logs and the takedown list holds (local roots;
    a no-op elsewhere, where deltas are not written)."""
    import contextlib
    if not fs.is_local(index_root):
        return contextlib.nullcontext()
    folder = fs.normalize(deltas_root(index_root))
    os.makedirs(folder, exist_ok=True)
    return exclusive_lock(os.path.join(folder, LOCK_FILE))


def write_delta(index_root: str, version: str | None = None, rows: pa.Table | None = None,
                vectors: np.ndarray | None = None, delete_image_ids: Sequence[str] = (),
                delete_product_ids: Sequence[str] = (),
                model_fingerprint: str | None = None, dim: int | None = None,
                source: Mapping[str, Any] | None = None,
                manifest: IndexManifest | None = None, model_space: bool = False,
                adapter: str | None = None) -> DeltaManifest:
    """Commit one delta to `version`'s log (default: the version LATEST names).

    `rows` (ROW_COLUMNS) and `vectors` (float32 [rows, dim], unit length) are upserts:
    index space, projected with adapter `adapter` (None: no adapter), or with
    `model_space=True` model-space vectors, projected here with the version's adapter.
    `delete_*` are deletes. `model_fingerprint` / `dim` (of the vectors as given), when
    given, must be the version's (DeltaError otherwise, nothing written). Durable when it
    returns.
    """
    from pipelines.index.artifact import read_latest
    if not fs.is_local(index_root):
        raise DeltaError(f"deltas are written to local index roots only (the log lock and the "
                         f"atomic rename); {index_root} is not local")
    if version is None:
        version = read_latest(index_root)
        if version is None:
            raise DeltaError(f"no published version under {index_root} to write a delta for")
    if manifest is None or manifest.version != version:
        manifest = read_manifest(index_root, version)
    if not manifest.passed:
        raise DeltaError(f"index version {version} has status {manifest.status!r}; deltas "
                         "apply to passed versions only")
    version_adapter_id = version_adapter(manifest)
    version_fp = manifest.model.get("fingerprint")
    if model_fingerprint is not None and version_fp is not None \
            and model_fingerprint != version_fp:
        raise DeltaError(f"model fingerprint {model_fingerprint} differs from index version "
                         f"{version}'s {version_fp}: the vectors are of another model")
    model_dim = int(manifest.model.get("dim") or manifest.dim)
    if model_space and vectors is not None and len(vectors):
        given = np.asarray(vectors, np.float32)
        if dim is not None and dim != model_dim:
            raise DeltaError(f"vectors have dim {dim}, the model of index version {version} "
                             f"gives {model_dim}")
        if given.ndim != 2 or given.shape[1] != model_dim:
            raise DeltaError(f"model-space vectors have shape {list(given.shape)}; the model of "
                             f"index version {version} gives {model_dim}-d vectors")
        from pipelines.adapter import AdapterError, apply_adapter
        try:
            vectors = apply_adapter(_load_version_adapter(index_root, manifest), given)
        except AdapterError as e:
            raise DeltaError(str(e)) from e
    elif not model_space and vectors is not None and len(vectors):
        if adapter != version_adapter_id:
            raise DeltaError(f"index-space vectors projected with adapter {adapter!r}, but index "
                             f"version {version} has adapter {version_adapter_id!r}")
        if dim is not None and dim != manifest.dim:
            raise DeltaError(f"vectors have dim {dim}, index version {version} has "
                             f"{manifest.dim}")
    rows_, vectors_ = _check_rows(rows, vectors, manifest.dim)
    del_images = _ids(delete_image_ids, "delete_image_ids")
    del_products = _ids(delete_product_ids, "delete_product_ids")
    if rows_.num_rows == 0 and not del_images and not del_products:
        raise DeltaError("an empty delta (no rows, no deletes) is not written")
    kind = KIND_MIXED if rows_.num_rows and (del_images or del_products) else (
        KIND_UPSERT if rows_.num_rows else KIND_DELETE)
    folder = fs.normalize(log_dir(index_root, version))
    with log_lock(index_root):
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):  # left by a writer that was killed
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        seqs = committed_seqs(index_root, version)
        seq = (seqs[-1] if seqs else 0) + 1
        tmp = os.path.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        os.makedirs(tmp)
        try:
            files = []
            if rows_.num_rows:
                files.append(_write_synced(os.path.join(tmp, ROWS_FILE),
                                           fs.parquet_to_bytes(rows_)))
                buf = io.BytesIO()
                np.save(buf, vectors_, allow_pickle=False)
                files.append(_write_synced(os.path.join(tmp, VECTORS_FILE), buf.getvalue()))
            deletes = {"image_ids": del_images, "product_ids": del_products}
            files.append(_write_synced(os.path.join(tmp, DELETES_FILE),
                                       json.dumps(deletes, sort_keys=True).encode()))
            dm = DeltaManifest(
                version=version, seq=seq, kind=kind,
                created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                dim=manifest.dim, model_fingerprint=version_fp, adapter=version_adapter_id,
                num_rows=rows_.num_rows,
                num_images=len(set(rows_.column("image_id").to_pylist())),
                delete_image_ids=len(del_images), delete_product_ids=len(del_products),
                files=files, source=dict(source or {}))
            _write_synced(os.path.join(tmp, DELTA_FILE),
                          (json.dumps(dm.to_dict(), indent=2, sort_keys=True) + "\n").encode())
            _fsync_dir(tmp)
            os.rename(tmp, os.path.join(folder, delta_name(seq)))  # the commit
            _fsync_dir(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("delta %s of index version %s: %d rows upserted, %d image_ids and %d "
             "product_ids deleted", seq, version, dm.num_rows, len(del_images),
             len(del_products))
    return dm


# --------------------------------------------------------------------------- reading

def read_delta(index_root: str, version: str, seq: int, dim: int | None = None,
               adapter: str | None = None) -> Delta:
    """One committed delta, verified against the version's `dim` and `adapter` id when
    given; DeltaIntegrityError names the damaged or mismatched file."""
    folder = delta_dir(index_root, version, seq)
    manifest_path = fs.join(folder, DELTA_FILE)
    try:
        d = json.loads(fs.read_bytes(manifest_path).decode("utf-8"))
    except (OSError, ValueError) as e:
        raise DeltaIntegrityError(f"{manifest_path}: unreadable: {e}") from e
    dm = DeltaManifest.from_dict(d, manifest_path)
    if dm.version != version or dm.seq != seq:
        raise DeltaIntegrityError(f"{manifest_path}: names version {dm.version!r} delta "
                                  f"{dm.seq}, but lies in {version}'s log as delta {seq}")
    if dim is not None and dm.dim != dim:
        raise DeltaIntegrityError(f"{manifest_path}: dim {dm.dim}, the version has {dim}")
    if dim is not None and dm.adapter != adapter:
        raise DeltaIntegrityError(f"{manifest_path}: vectors of adapter {dm.adapter!r}, the "
                                  f"version has adapter {adapter!r}")
    data: dict[str, bytes] = {}
    for f in dm.files:
        if f.name not in (ROWS_FILE, VECTORS_FILE, DELETES_FILE):
            raise DeltaIntegrityError(f"{manifest_path}: unknown file {f.name!r}")
        path = fs.join(folder, f.name)
        try:
            blob = fs.read_bytes(path)
        except OSError as e:
            raise DeltaIntegrityError(f"{path}: missing or unreadable: {e}") from e
        if len(blob) != f.bytes or sha256_bytes(blob) != f.sha256:
            raise DeltaIntegrityError(f"{path}: checksum mismatch ({len(blob)} bytes, "
                                      f"delta.json says {f.bytes}); the delta is damaged")
        data[f.name] = blob
    if DELETES_FILE not in data:
        raise DeltaIntegrityError(f"{manifest_path}: lists no {DELETES_FILE}")
    try:
        deletes = json.loads(data[DELETES_FILE])
        del_images = tuple(str(x) for x in deletes["image_ids"])
        del_products = tuple(str(x) for x in deletes["product_ids"])
    except (ValueError, KeyError, TypeError) as e:
        raise DeltaIntegrityError(f"{fs.join(folder, DELETES_FILE)}: malformed: {e}") from e
    if dm.num_rows:
        if ROWS_FILE not in data or VECTORS_FILE not in data:
            raise DeltaIntegrityError(f"{manifest_path}: {dm.num_rows} rows but no "
                                      f"{ROWS_FILE} / {VECTORS_FILE}")
        vec_path = fs.join(folder, VECTORS_FILE)
        try:
            vectors = np.load(io.BytesIO(data[VECTORS_FILE]), allow_pickle=False)
            rows = pq.read_table(pa.BufferReader(data[ROWS_FILE]))
        except (OSError, ValueError) as e:
            raise DeltaIntegrityError(f"{folder}: rows or vectors unreadable: {e}") from e
        if vectors.dtype != np.float32 or vectors.shape != (dm.num_rows, dm.dim):
            raise DeltaIntegrityError(f"{vec_path}: holds {vectors.dtype} {list(vectors.shape)}"
                                      f", delta.json says float32 [{dm.num_rows}, {dm.dim}]")
        if rows.num_rows != dm.num_rows or any(c not in rows.column_names for c in ROW_COLUMNS):
            raise DeltaIntegrityError(f"{fs.join(folder, ROWS_FILE)}: {rows.num_rows} rows with "
                                      f"columns {rows.column_names}; expected {dm.num_rows} "
                                      f"rows of {list(ROW_COLUMNS)}")
        _check_vectors(vectors, vec_path)
        rows = rows.select(list(ROW_COLUMNS))
    else:
        rows, vectors = _empty_rows(), np.zeros((0, dm.dim), np.float32)
    return Delta(dm, folder, rows, vectors, del_images, del_products)


@dataclass
class DeltaLog:
    """The deltas of one version that apply: every committed one up to the first damaged."""
    version: str
    deltas: list[Delta]
    error: str | None = None          # the first damaged delta (file named), if any
    pending: list[int] = field(default_factory=list)  # seqs not applied after the error


def read_log(index_root: str, version: str, dim: int | None = None,
             cache: dict[tuple[str, int], Delta] | None = None,
             adapter: str | None = None) -> DeltaLog:
    """Every committed delta of `version`, in order, stopping at the first damaged one
    (the ones after it are not applied: later deltas may build on it). `cache` keeps
    already verified deltas (committed deltas never change) between calls."""
    out = DeltaLog(version, [])
    seqs = committed_seqs(index_root, version)
    for i, seq in enumerate(seqs):
        key = (version, seq)
        delta = cache.get(key) if cache is not None else None
        if delta is None:
            try:
                delta = read_delta(index_root, version, seq, dim, adapter)
            except DeltaIntegrityError as e:
                out.error = str(e)
                out.pending = seqs[i:]
                log.error("index version %s: delta %d refused (deltas from it on are not "
                          "applied): %s", version, seq, e)
                return out
            if cache is not None:
                cache[key] = delta
        out.deltas.append(delta)
    return out


def log_stamp(index_root: str, version: str) -> str:
    """A cheap digest of a version's log (committed delta folders: names, sizes, mtimes);
    changes when a delta is committed, removed or repaired."""
    import hashlib
    h = hashlib.sha256()
    folder = log_dir(index_root, version)
    for name in sorted(fs.list_children(folder)):
        if _seq_of(name) is None:
            continue
        h.update(name.encode() + b"\n")
        if fs.is_local(folder):
            sub = os.path.join(fs.normalize(folder), name)
            try:
                for entry in sorted(os.scandir(sub), key=lambda e: e.name):
                    st = entry.stat()
                    h.update(f"{entry.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(b"unreadable\n")
    return h.hexdigest()


def summarize(log_: DeltaLog) -> dict[str, Any]:
    """Counts of a log as written (what index-info reports before applying it)."""
    now = dt.datetime.now(dt.timezone.utc)
    oldest = None
    if log_.deltas:
        try:
            oldest = dt.datetime.fromisoformat(log_.deltas[0].manifest.created_at)
        except ValueError:
            oldest = None
    newest = log_.deltas[-1].manifest.created_at if log_.deltas else None
    return {"deltas": len(log_.deltas),
            "rows_upserted": sum(d.manifest.num_rows for d in log_.deltas),
            "image_ids_deleted": sum(len(d.delete_image_ids) for d in log_.deltas),
            "product_ids_deleted": sum(len(d.delete_product_ids) for d in log_.deltas),
            "oldest_age_s": round((now - oldest).total_seconds(), 3) if oldest else None,
            "newest_created_at": newest,
            "error": log_.error, "not_applied": log_.pending}


# --------------------------------------------------------------------------- accounting

def served_rows(index_root: str, version: str, log_: DeltaLog | None = None,
                takedown_image_ids: Iterable[str] = (),
                takedown_product_ids: Iterable[str] = ()) -> dict[str, Any]:
    """What serving holds for a version + its log + the takedown list, from the ids alone
    (the version's rows.parquet id columns; no vectors, no ScaNN): the same rules as
    serving.delta_index.DeltaIndex. Returns the counts (base_rows, rows_added,
    rows_removed, searchable_rows = base + added - removed) and `live`, the set of
    (image_id, view) served."""
    from pipelines.index.artifact import version_dir
    manifest = read_manifest(index_root, version)
    log_ = log_ if log_ is not None else read_log(index_root, version, manifest.dim,
                                                  adapter=version_adapter(manifest))
    rows: list[tuple[str, str, str]] = []  # (image_id, view, product_id) by row
    base = version_dir(index_root, version)
    for entry in manifest.shards:
        if not entry.num_vectors:
            continue
        t = fs.read_parquet(fs.join(base, entry.path, ROWS_FILE),
                            columns=["image_id", "view", "product_id"])
        rows += zip(t.column("image_id").to_pylist(), t.column("view").to_pylist(),
                    t.column("product_id").to_pylist())
    n_base = len(rows)
    images: dict[str, set[int]] = {}
    products: dict[str, set[int]] = {}
    for i, (img, _, pid) in enumerate(rows):
        images.setdefault(img, set()).add(i)
        products.setdefault(pid, set()).add(i)
    removed = 0

    def drop(found: set[int]) -> None:
        nonlocal removed
        for r in list(found):
            img, _, pid = rows[r]
            images[img].discard(r)
            products[pid].discard(r)
            removed += 1

    for d in log_.deltas:
        for img in d.delete_image_ids:
            drop(images.get(img, set()))
        for pid in d.delete_product_ids:
            drop(products.get(pid, set()))
        if not d.rows.num_rows:
            continue
        new = list(zip(d.rows.column("image_id").to_pylist(), d.rows.column("view").to_pylist(),
                       d.rows.column("product_id").to_pylist()))
        for img in dict.fromkeys(r[0] for r in new):
            drop(images.get(img, set()))
        for row in new:
            rows.append(row)
            images.setdefault(row[0], set()).add(len(rows) - 1)
            products.setdefault(row[2], set()).add(len(rows) - 1)
    for img in set(takedown_image_ids):
        drop(images.get(img, set()))
    for pid in set(takedown_product_ids):
        drop(products.get(pid, set()))
    live = {(rows[r][0], rows[r][1]) for found in images.values() for r in found}
    added = len(rows) - n_base
    return {"version": version, "base_rows": n_base, "rows_added": added,
            "rows_removed": removed, "searchable_rows": n_base + added - removed,
            "deltas": len(log_.deltas), "error": log_.error, "live": live}
