"""Writing one delta to a version's log (pipelines/index/deltas.py): checked against the
version (status, model fingerprint, dims, adapter), then committed atomically and durably
under the log lock."""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import shutil
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from pipelines.core import filesystem as fs
from pipelines.core.locks import exclusive_lock
from pipelines.index.artifact import ROW_COLUMNS, read_manifest, sha256_bytes
from pipelines.index.delta_format import (DELETES_FILE, DELTA_FILE, KIND_DELETE, KIND_MIXED,
                                          KIND_UPSERT, LOCK_FILE, ROWS_FILE, TMP_PREFIX,
                                          VECTORS_FILE, DeltaError, DeltaFile, DeltaManifest,
                                          check_vectors, committed_seqs, delta_name,
                                          deltas_root, empty_rows, log_dir, version_adapter)
from pipelines.index.manifest import IndexManifest

log = logging.getLogger("pipelines.index.deltas")


def _load_version_adapter(index_root: str, manifest: IndexManifest) -> Any:
    from pipelines.adapter import AdapterError, load_for_version
    from pipelines.index.artifact import version_dir
    try:
        return load_for_version(version_dir(index_root, manifest.version),
                                manifest.extra.get("adapter"))
    except AdapterError as e:
        raise DeltaError(f"index version {manifest.version}: its adapter does not load: "
                         f"{e}") from e



def _check_rows(rows: pa.Table | None, vectors: np.ndarray | None, dim: int
                ) -> tuple[pa.Table, np.ndarray]:
    if rows is None or rows.num_rows == 0:
        if vectors is not None and len(vectors):
            raise DeltaError("vectors were given without rows")
        return empty_rows(), np.zeros((0, dim), np.float32)
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
    check_vectors(vectors, "the upserted vectors")
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



def log_lock(index_root: str) -> Any:
    """The lock every writer of the delta logs and the takedown list holds (local roots;
    a no-op elsewhere, where deltas are not written)."""
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
    manifest = _target_version(index_root, version, manifest)
    version = manifest.version
    version_fp = manifest.model.get("fingerprint")
    if model_fingerprint is not None and version_fp is not None \
            and model_fingerprint != version_fp:
        raise DeltaError(f"model fingerprint {model_fingerprint} differs from index version "
                         f"{version}'s {version_fp}: the vectors are of another model")
    if vectors is not None and len(vectors):
        vectors = _index_space(index_root, manifest, vectors, dim, model_space, adapter)
    rows_, vectors_ = _check_rows(rows, vectors, manifest.dim)
    del_images = _ids(delete_image_ids, "delete_image_ids")
    del_products = _ids(delete_product_ids, "delete_product_ids")
    if rows_.num_rows == 0 and not del_images and not del_products:
        raise DeltaError("an empty delta (no rows, no deletes) is not written")
    kind = KIND_MIXED if rows_.num_rows and (del_images or del_products) else (
        KIND_UPSERT if rows_.num_rows else KIND_DELETE)

    def describe(seq: int, files: list[DeltaFile]) -> DeltaManifest:
        return DeltaManifest(
            version=version, seq=seq, kind=kind,
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            dim=manifest.dim, model_fingerprint=version_fp, adapter=version_adapter(manifest),
            num_rows=rows_.num_rows, num_images=len(set(rows_.column("image_id").to_pylist())),
            delete_image_ids=len(del_images), delete_product_ids=len(del_products),
            files=files, source=dict(source or {}))

    dm = _commit(index_root, version, rows_, vectors_,
                 {"image_ids": del_images, "product_ids": del_products}, describe)
    log.info("delta %s of index version %s: %d rows upserted, %d image_ids and %d "
             "product_ids deleted", dm.seq, version, dm.num_rows, len(del_images),
             len(del_products))
    return dm


def _target_version(index_root: str, version: str | None,
                    manifest: IndexManifest | None) -> IndexManifest:
    """The passed version a delta is written for (default: LATEST's), on a local root."""
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
    return manifest


def _index_space(index_root: str, manifest: IndexManifest, vectors: np.ndarray,
                 dim: int | None, model_space: bool, adapter: str | None) -> np.ndarray:
    """Upserted vectors in the version's index space: model-space ones checked against the
    model's dim and projected with the version's adapter; index-space ones checked to name
    the version's adapter and dim."""
    version = manifest.version
    if not model_space:
        version_adapter_id = version_adapter(manifest)
        if adapter != version_adapter_id:
            raise DeltaError(f"index-space vectors projected with adapter {adapter!r}, but index "
                             f"version {version} has adapter {version_adapter_id!r}")
        if dim is not None and dim != manifest.dim:
            raise DeltaError(f"vectors have dim {dim}, index version {version} has "
                             f"{manifest.dim}")
        return vectors
    model_dim = int(manifest.model.get("dim") or manifest.dim)
    given = np.asarray(vectors, np.float32)
    if dim is not None and dim != model_dim:
        raise DeltaError(f"vectors have dim {dim}, the model of index version {version} "
                         f"gives {model_dim}")
    if given.ndim != 2 or given.shape[1] != model_dim:
        raise DeltaError(f"model-space vectors have shape {list(given.shape)}; the model of "
                         f"index version {version} gives {model_dim}-d vectors")
    from pipelines.adapter import AdapterError, apply_adapter
    try:
        return apply_adapter(_load_version_adapter(index_root, manifest), given)
    except AdapterError as e:
        raise DeltaError(str(e)) from e


def _commit(index_root: str, version: str, rows: pa.Table, vectors: np.ndarray,
            deletes: dict[str, list[str]],
            describe: Callable[[int, list[DeltaFile]], DeltaManifest]) -> DeltaManifest:
    """Under the log lock: write the files into a fresh temp folder (each fsynced), then
    delta.json (`describe(seq, files)`), fsync the folder, rename it to the next free
    delta-NNNNNN (the commit) and fsync the log folder. A failure removes the temp folder."""
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
            if rows.num_rows:
                files.append(_write_synced(os.path.join(tmp, ROWS_FILE),
                                           fs.parquet_to_bytes(rows)))
                buf = io.BytesIO()
                np.save(buf, vectors, allow_pickle=False)
                files.append(_write_synced(os.path.join(tmp, VECTORS_FILE), buf.getvalue()))
            files.append(_write_synced(os.path.join(tmp, DELETES_FILE),
                                       json.dumps(deletes, sort_keys=True).encode()))
            dm = describe(seq, files)
            _write_synced(os.path.join(tmp, DELTA_FILE),
                          (json.dumps(dm.to_dict(), indent=2, sort_keys=True) + "\n").encode())
            _fsync_dir(tmp)
            os.rename(tmp, os.path.join(folder, delta_name(seq)))  # the commit
            _fsync_dir(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dm
