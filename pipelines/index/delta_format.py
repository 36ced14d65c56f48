"""The delta file format (pipelines/index/deltas.py describes the log): paths, the
delta.json contract (`DeltaManifest`), a committed delta in memory (`Delta`), the errors,
and the checks readers and writers share (unit-length finite vectors, the version's
adapter id)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from pipelines.core import filesystem as fs
from pipelines.core.contract import FORMAT_KEY, Int, Obj, Str, read
from pipelines.index.artifact import ROW_COLUMNS
from pipelines.index.manifest import IndexArtifactError, IndexManifest, ShardFile

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


def seq_of(name: str) -> int | None:
    if not name.startswith(_PREFIX):
        return None
    digits = name[len(_PREFIX):]
    return int(digits) if digits.isdigit() and len(digits) == 6 else None


# --------------------------------------------------------------------------- the contract

# One file of a delta: the same {name, sha256, bytes} record as a shard's files.
DeltaFile = ShardFile


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




def empty_rows() -> pa.Table:
    return pa.table({c: pa.array([], pa.string()) for c in ROW_COLUMNS})



def check_vectors(vectors: np.ndarray, where: str) -> None:
    if not np.all(np.isfinite(vectors)):
        raise DeltaIntegrityError(f"{where}: NaN or infinite values")
    if len(vectors):
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        off = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
        if off.size:
            raise DeltaIntegrityError(f"{where}: {off.size} vectors are not unit length "
                                      f"(row {int(off[0])} has norm {norms[off[0]]:.6f})")



def committed_seqs(index_root: str, version: str) -> list[int]:
    """The committed deltas of a version's log, in order (temp folders are not deltas)."""
    seqs = [s for s in (seq_of(n) for n in fs.list_children(log_dir(index_root, version)))
            if s is not None]
    return sorted(seqs)

