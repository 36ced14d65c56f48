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

This module is the one the rest of the project imports; the code lives in
pipelines/index/delta_format.py (paths, delta.json, the shared checks),
delta_write.py (`write_delta`, the log lock), delta_read.py (`read_delta`, `read_log`,
`log_stamp`, `summarize`) and delta_accounting.py (`served_rows`).
"""
from __future__ import annotations

from pipelines.index.delta_accounting import served_rows
from pipelines.index.delta_format import (DELETES_FILE, DELTA_FILE, DELTA_FORMAT, DELTAS_DIR,
                                          KIND_DELETE, KIND_MIXED, KIND_UPSERT, LOCK_FILE,
                                          NORM_TOLERANCE, ROWS_FILE, TMP_PREFIX, VECTORS_FILE,
                                          Delta, DeltaError, DeltaFile, DeltaIntegrityError,
                                          DeltaManifest, committed_seqs, delta_dir, delta_name,
                                          deltas_root, log_dir, version_adapter)
from pipelines.index.delta_read import (DeltaLog, log_stamp, oldest_age_s, read_delta, read_log,
                                        summarize)
from pipelines.index.delta_write import log_lock, write_delta

__all__ = [
    "DELETES_FILE", "DELTA_FILE", "DELTA_FORMAT", "DELTAS_DIR", "KIND_DELETE", "KIND_MIXED",
    "KIND_UPSERT", "LOCK_FILE", "NORM_TOLERANCE", "ROWS_FILE", "TMP_PREFIX", "VECTORS_FILE",
    "Delta", "DeltaError", "DeltaFile", "DeltaIntegrityError", "DeltaLog", "DeltaManifest",
    "committed_seqs", "delta_dir", "delta_name", "deltas_root", "log_dir", "log_lock",
    "log_stamp", "oldest_age_s", "read_delta", "read_log", "served_rows", "summarize", "version_adapter",
    "write_delta"]
