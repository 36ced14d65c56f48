"""Reading a version's delta log (pipelines/index/deltas.py): every committed delta
verified against delta.json (sha256, size) and the contract, stopping at the first damaged
one; a cheap stamp of the log; its counts as written. Nothing is unpickled."""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import filesystem as fs
from pipelines.index.artifact import ROW_COLUMNS, sha256_bytes
from pipelines.index.delta_format import (DELETES_FILE, DELTA_FILE, ROWS_FILE, VECTORS_FILE,
                                          Delta, DeltaIntegrityError, DeltaManifest,
                                          check_vectors, committed_seqs, delta_dir,
                                          empty_rows, log_dir, seq_of)

log = logging.getLogger("pipelines.index.deltas")


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
        check_vectors(vectors, vec_path)
        rows = rows.select(list(ROW_COLUMNS))
    else:
        rows, vectors = empty_rows(), np.zeros((0, dm.dim), np.float32)
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
        if seq_of(name) is None:
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


def oldest_age_s(deltas: Sequence[Delta]) -> float | None:
    """Seconds since the oldest of `deltas` was written (None: none, or no readable time)."""
    now = dt.datetime.now(dt.timezone.utc)
    ages = []
    for d in deltas:
        try:
            ages.append((now - dt.datetime.fromisoformat(d.manifest.created_at)).total_seconds())
        except ValueError:
            pass
    return round(max(ages), 3) if ages else None


def summarize(log_: DeltaLog) -> dict[str, Any]:
    """Counts of a log as written (what index-info reports before applying it)."""
    newest = log_.deltas[-1].manifest.created_at if log_.deltas else None
    return {"deltas": len(log_.deltas),
            "rows_upserted": sum(d.manifest.num_rows for d in log_.deltas),
            "image_ids_deleted": sum(len(d.delete_image_ids) for d in log_.deltas),
            "product_ids_deleted": sum(len(d.delete_product_ids) for d in log_.deltas),
            "oldest_age_s": oldest_age_s(log_.deltas),
            "newest_created_at": newest,
            "error": log_.error, "not_applied": log_.pending}

