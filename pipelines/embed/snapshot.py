"""The embeddings snapshot contract (see ../shared/DESIGN.md and docs/ARCHITECTURE.md).

    <embeddings_root>/<run_id>/embeddings-SSSSS-of-NNNNN.parquet   embedded rows
    <embeddings_root>/<run_id>/embeddings-reused-<digest>.parquet  reused / carried rows
                                       (readers take every embeddings-*.parquet)
    <embeddings_root>/<run_id>/dead_letter-SSSSS-of-NNNNN.jsonl
    <embeddings_root>/<run_id>/summary.json     written last: a snapshot without it is incomplete
    <embeddings_root>/LATEST                    the newest complete run_id, written atomically
                                                under the root's lock (pipelines.core.latest)

Embedding rows: image_id, product_id, image_uri, content_sha256, model_id, view,
embedding (fixed-size list of float32, L2-normalised), metadata (JSON object as text).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.core import filesystem as fs
from pipelines.core import latest as latest_pointer
from pipelines.core.names import InvalidNameError, check_segment
from pipelines.embed.summary import SnapshotError, SnapshotSummary

SUMMARY_FILE = "summary.json"
LATEST_FILE = latest_pointer.LATEST_FILE
EMBEDDINGS_PREFIX = "embeddings"
DEAD_LETTER_PREFIX = "dead_letter"

DEAD_LETTER_FIELDS = ("image_id", "product_id", "image_uri", "stage", "error", "message")


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("image_id", pa.string()),
        ("product_id", pa.string()),
        ("image_uri", pa.string()),
        ("content_sha256", pa.string()),
        ("model_id", pa.string()),
        ("view", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
        ("metadata", pa.string()),
    ])


@dataclass(frozen=True)
class Snapshot:
    """A complete snapshot loaded into memory (what build_index and merges read)."""
    path: str
    summary: SnapshotSummary
    table: pa.Table  # embeddings rows, schema = embeddings_schema(dim)

    @property
    def dim(self) -> int:
        return int(self.table.schema.field("embedding").type.list_size)

    def vectors(self) -> np.ndarray:
        """float32 [num_rows, dim]."""
        return embedding_matrix(self.table.column("embedding"), self.dim)


def embedding_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """An embedding column whose rows all hold `dim` values as float32 [rows, dim]
    (the one conversion of the column to numpy; [0, dim] when it is empty)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if not n:
        return np.zeros((0, dim), np.float32)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, np.float32).reshape(n, dim)


def check_run_id(run_id: str, what: str = "run id") -> str:
    """`run_id` when it is a safe snapshot folder name (pipelines.core.names), else SnapshotError."""
    try:
        return check_segment(run_id, what)
    except InvalidNameError as e:
        raise SnapshotError(str(e)) from e


def snapshot_path(root: str, run_id: str) -> str:
    """`<root>/<run_id>`; SnapshotError when run_id is not a safe single folder name."""
    return fs.join(root, check_run_id(run_id))


def is_complete(path: str) -> bool:
    return fs.exists(fs.join(path, SUMMARY_FILE))


def read_summary(path: str) -> SnapshotSummary:
    """The snapshot's summary.json, parsed once into its contract (pipelines.embed.summary);
    SnapshotError when missing, not JSON or not following the contract (SummaryError)."""
    summary_uri = fs.join(path, SUMMARY_FILE)
    if not fs.exists(summary_uri):
        raise SnapshotError(f"{path} is not a complete embeddings snapshot (no {SUMMARY_FILE})")
    try:
        data = fs.read_json(summary_uri)
    except ValueError as e:
        raise SnapshotError(f"{summary_uri}: not valid JSON: {e}") from e
    return SnapshotSummary.from_dict(data, summary_uri, legacy=True)


def write_summary(path: str, summary: SnapshotSummary, name: str = SUMMARY_FILE) -> str:
    """Write a summary into a snapshot folder (summary.json: the snapshot is complete)."""
    uri = fs.join(path, name)
    fs.write_json(uri, summary.to_dict())
    return uri


def embedding_files(path: str) -> list[str]:
    return fs.match(fs.join(path, f"{EMBEDDINGS_PREFIX}-*.parquet"))


def dead_letter_files(path: str) -> list[str]:
    return fs.match(fs.join(path, f"{DEAD_LETTER_PREFIX}-*.jsonl"))


def read_table(path: str, summary: SnapshotSummary | None = None) -> pa.Table:
    """All embedding rows of a snapshot, as one Arrow table (may be empty); `summary`: its
    summary when the caller has read it already."""
    summary = summary or read_summary(path)
    files = embedding_files(path)
    dim = summary.dim
    if not files:
        if not dim:
            raise SnapshotError(f"{path}: no embeddings files and no dim in {SUMMARY_FILE}")
        return embeddings_schema(dim).empty_table()
    tables = [fs.read_parquet(uri) for uri in files]
    table = pa.concat_tables(tables, promote_options="none") if len(tables) > 1 else tables[0]
    missing = [n for n in embeddings_schema(1).names if n not in table.column_names]
    if missing:
        raise SnapshotError(f"{path}: embeddings files lack columns {missing}")
    return table


def load(path: str) -> Snapshot:
    summary = read_summary(path)
    return Snapshot(path=path, summary=summary, table=read_table(path, summary))


def read_dead_letters(path: str) -> list[dict[str, Any]]:
    rows = []
    for uri in dead_letter_files(path):
        for line in fs.read_text(uri).splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def latest(root: str) -> str | None:
    """Path of the snapshot LATEST names under `root`, or None when there is none yet."""
    run_id = latest_run_id(root)
    if run_id is None:
        return None
    path = snapshot_path(root, run_id)
    if not is_complete(path):
        raise SnapshotError(f"{latest_pointer.pointer_uri(root)} names {run_id!r}, which is "
                            f"not a complete snapshot")
    return path


def latest_run_id(root: str) -> str | None:
    """The run_id LATEST names under `root`, or None; SnapshotError when LATEST holds
    anything but a safe run id (garbage, a path, binary bytes, nothing)."""
    try:
        return latest_pointer.read(root, "run id")
    except latest_pointer.LatestError as e:
        raise SnapshotError(str(e)) from e


def mark_latest(root: str, run_id: str) -> None:
    """Point `<root>/LATEST` at a run id, atomically (the id is checked first)."""
    latest_pointer.write(root, check_run_id(run_id), "run id")


def advance_latest(root: str, run_id: str) -> bool:
    """Point `<root>/LATEST` at a run id unless it names a newer one; True when it now
    names `run_id` (read and write under the root's lock: racing runs keep the newest)."""
    try:
        return latest_pointer.advance(root, check_run_id(run_id), "run id")
    except latest_pointer.LatestError as e:
        raise SnapshotError(str(e)) from e


def write_table(path: str, table: pa.Table, name: str = "embeddings-00000-of-00001.parquet") -> str:
    """Write rows as one Parquet file of a snapshot (used by merges and tests)."""
    uri = fs.join(path, name)
    fs.write_parquet(uri, table)
    return uri


def write_vectors(path: str, image_ids: list[str], product_ids: list[str], vectors: np.ndarray,
                  model: dict[str, Any], metadata: list[str] | None = None) -> str:
    """A complete snapshot (one Parquet file + summary.json) holding VECTORS as the embed job
    would have written them, for benchmarks and tests that fit or generate vectors instead of
    embedding images. MODEL is the summary's model record (model_id, dim, fingerprint, ...)."""
    n, dim = vectors.shape
    table = pa.table({
        "image_id": image_ids, "product_id": product_ids,
        "image_uri": [f"file:///catalog/{i}.jpg" for i in image_ids],
        "content_sha256": ["0" * 64] * n, "model_id": [model["model_id"]] * n,
        "view": ["original"] * n,
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(np.asarray(vectors, np.float32).reshape(-1)), dim),
        "metadata": metadata if metadata is not None else ["{}"] * n,
    }, schema=embeddings_schema(dim))
    write_table(path, table)
    write_summary(path, SnapshotSummary(
        run_id=path.rstrip("/").rsplit("/", 1)[-1], input_rows=n, embedded=n, reused=0,
        dead_lettered=0, model_id=model["model_id"], dim=dim, model=model))
    return path
