"""Beam job "build_index": embeddings snapshot -> sharded ScaNN index version, gated, published.

    catalog-search build-index --embeddings SNAPSHOT_OR_ROOT --index-root ROOT --shards N

Everything that touches a vector runs in the Beam pipeline; the launcher reads only
summary.json and the Parquet footers, and merges Q x shards x k gate results. Its memory
does not grow with the catalog (benchmarks/index_build_memory.py measures it).

Steps (run_build_index):
 1. Plan (launcher): resolve the snapshot, check summary.json's model, read every
    embeddings file's Parquet footer (schema, row groups; no data): no rows, mixed
    dimensions between files, more shards than rows or dimensions_per_block > dim raise
    IndexBuildError before anything is written. One split per (file, row group).
 2. Beam, ReadSplit (one split per element, spread over the workers): read the row
    group in batches and validate every row -- no embedding, wrong dimension, NaN/inf,
    zero or non-unit vector, empty image_id/product_id/view, another model_id than the
    summary's. A bad row is reported with its file and row number; when any split
    reports one, no shard is built and IndexBuildError names them. Rows are keyed by
    shard sha256(image_id) mod N (all views of an image share a shard) and written as
    one staged Parquet part per (split, shard) under versions/<version>/_build/ (a
    shuffle through files: the runner moves only part names, never vectors). The same
    pass draws the gate and tuning queries: the rows with the smallest
    sha256(seed, image_id, view) (a deterministic sample; seed eval_seed for the gate,
    eval_seed + 1 for tuning), combined with Top.Smallest into side inputs.
 3. Beam, per shard (CoGroupByKey of its part names with every shard id, so empty shards
    are built too): read the parts, sort by (image_id, view), refuse duplicate
    (image_id, view) rows, build the ScaNN searcher and serialize it with relative
    paths, plus rows.parquet, into versions/<version>/shards/shard-XXXXX-of-NNNNN/
    (object stores: via a local temp folder), with the sha256 of every file.
      - shards with fewer than max(brute_force_below, 256) vectors: exact brute force;
      - otherwise tree (leaves of about sqrt(total vectors) each: round(sqrt(n)) for one
        shard, see leaves_for) + asymmetric hashing + float32
        reordering. The search budget is global: the tuning queries' global k-th exact
        score (merged over all shards in the pipeline) tells each shard which of its
        rows belong to a global top-k; each shard picks the fewest leaves_to_search that
        find tune_recall_target of *those* (so the union reaches it globally), with its
        reorder pool scaled down to ceil(reorder_multiplier / N) x k (the full
        reorder_multiplier when the scaled pool cannot reach the target);
        leaves_to_search_fraction x num_leaves when tune_recall_target is null;
      - an empty shard has only an empty rows.parquet and is skipped by searches.
 4. Evaluation gate (Beam): each built shard is reopened through the reader (checksums
    verified) and answers the gate queries (side input) with the serving code path
    (ShardedSearcher) and with exact numpy search; it returns its approximate top-k
    (scores, true scores, ids) and its exact top-k scores. The launcher merges these
    Q x shards x k lists into recall@1 and recall@k (tie-aware: a returned row counts
    when its exact score reaches the k-th exact score) and the fraction of queries that
    find their own row (covers the row -> image_id mapping). Below
    index.recall_threshold the manifest is written with status "rejected" plus a
    REJECTED note, and RecallGateError is raised; LATEST is not touched.
 5. Publish: manifest.json (status "passed") is written atomically, then LATEST via
    index_artifact.publish_version, then retention.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core import filesystem as fs
from pipelines.index import artifact as art
from pipelines.embed import snapshot as snap
from pipelines.core.command import Command, UsageError, check_uri_arg
from pipelines.core.names import InvalidNameError, check_segment
from pipelines.core.config import Config
from pipelines.index.sharded_search import ShardedSearcher, search_exact

log = logging.getLogger(__name__)

# Shards smaller than this always use brute force (tree + AH training needs data).
MIN_TREE_AH_ROWS = 256
# Allowed deviation of a vector's L2 norm from 1.
NORM_TOLERANCE = 1e-3
# Score slack when deciding whether a returned neighbour ties with the k-th exact one.
TIE_EPSILON = 1e-5
BUILD_DIR = "_build"
# Rows read per Arrow batch inside a split (bounds a worker's memory per batch).
READ_BATCH_ROWS = 8192
# Candidate rows per sample drawn inside ReadSplit: this many times the sample size.
SAMPLE_OVERDRAW = 4
# Fewer relevant (global top-k) neighbours than this in a shard's tuning set: tune the
# shard against its own top-k instead (too few to estimate its share reliably).
MIN_RELEVANT_FOR_GLOBAL_TUNING = 100
_EXAMPLES = 5
_ROW_STRING_COLUMNS = ("image_id", "product_id", "view")


class IndexBuildError(ValueError):
    """The snapshot or the build request is unusable; nothing was published."""


class RecallGateError(RuntimeError):
    """The built version's recall is below the threshold; it is kept but marked rejected."""

    def __init__(self, version: str, metric: str, measured: float, threshold: float,
                 version_path: str):
        super().__init__(
            f"index version {version} rejected: {metric} = {measured:.4f} is below the "
            f"recall threshold {threshold:.4f}; it stays at {version_path} marked rejected, "
            f"and LATEST was not changed")
        self.version = version
        self.metric = metric
        self.measured = measured
        self.threshold = threshold
        self.version_path = version_path


# --------------------------------------------------------------------------- hashing

def shard_for(image_id: str, num_shards: int) -> int:
    """The shard of an image: sha256(image_id) mod num_shards (stable across runs/hosts)."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def sample_key(seed: int, image_id: str, view: str) -> float:
    """A row's place in the seeded deterministic sample: uniform in [0, 1)."""
    digest = hashlib.sha256(f"{seed}\0{image_id}\0{view}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


# --------------------------------------------------------------------------- plan (launcher)

@dataclass(frozen=True)
class BuildParams:
    """What a worker needs from config.index to build one shard."""
    num_neighbors: int
    brute_force_below: int
    leaves_to_search_fraction: float
    reorder_multiplier: int
    anisotropic_threshold: float
    dimensions_per_block: int
    tune_recall_target: float | None
    training_threads: int

    @classmethod
    def from_config(cls, config: Config) -> "BuildParams":
        ix = config.index
        return cls(num_neighbors=ix.num_neighbors, brute_force_below=ix.brute_force_below,
                   leaves_to_search_fraction=ix.leaves_to_search_fraction,
                   reorder_multiplier=ix.reorder_multiplier,
                   anisotropic_threshold=ix.anisotropic_threshold,
                   dimensions_per_block=ix.dimensions_per_block,
                   tune_recall_target=ix.tune_recall_target,
                   training_threads=ix.training_threads)


@dataclass(frozen=True)
class Split:
    """One unit of parallel reading: a row group of one embeddings file."""
    index: int
    uri: str
    row_group: int
    first_row: int   # row number (0-based, within the file) of the row group's first row
    num_rows: int


@dataclass(frozen=True)
class BuildSpec:
    """Everything the pipeline's steps need (small; pickled to the workers)."""
    snapshot_path: str
    index_root: str
    version: str
    staging: str
    num_shards: int
    num_rows: int
    dim: int
    model_id: str
    k: int                    # min(num_neighbors, num_rows)
    eval_queries: int
    eval_seed: int
    params: BuildParams
    model: dict[str, Any] | None = None   # summary.json's model (for the gate's reader)

    @property
    def sample_fraction(self) -> float:
        return min(1.0, SAMPLE_OVERDRAW * self.eval_queries / max(1, self.num_rows))

    def part_uri(self, shard: int, split: int) -> str:
        return fs.join(self.staging, "parts", f"shard-{shard:05d}", f"split-{split:06d}.parquet")

    def products_uri(self, bucket: int, split: int) -> str:
        return fs.join(self.staging, "products", f"bucket-{bucket:05d}",
                       f"split-{split:06d}.parquet")

    def shard_uri(self, shard: int) -> str:
        return fs.join(art.version_dir(self.index_root, self.version),
                       art.shard_relpath(shard, self.num_shards))

    def result_uri(self, shard: int) -> str:
        return fs.join(self.staging, f"result-{shard:05d}.json")

    def gate_uri(self, shard: int) -> str:
        return fs.join(self.staging, f"gate-{shard:05d}.json")

    def stats_uri(self, name: str) -> str:
        return fs.join(self.staging, f"{name}.json")


def _examples(values: list[Any]) -> str:
    shown = ", ".join(str(v) for v in values[:_EXAMPLES])
    return shown + (f" (and {len(values) - _EXAMPLES} more)" if len(values) > _EXAMPLES else "")


def resolve_snapshot(embeddings: str) -> str:
    """The snapshot folder itself, or the snapshot an embeddings root's LATEST names."""
    try:
        if snap.is_complete(embeddings):
            return embeddings
        latest = snap.latest(embeddings)
    except snap.SnapshotError as e:
        raise IndexBuildError(f"cannot read embeddings snapshot {embeddings}: {e}") from e
    if latest is None:
        raise IndexBuildError(
            f"{embeddings} is neither a complete embeddings snapshot (no "
            f"{snap.SUMMARY_FILE}) nor an embeddings root with a {snap.LATEST_FILE}")
    return latest


def _embedding_dim(schema: pa.Schema, uri: str) -> int | None:
    """The fixed embedding dimension a file's schema declares (None: variable lists)."""
    missing = [c for c in ("image_id", "product_id", "view", "model_id", "embedding")
               if c not in schema.names]
    if missing:
        raise IndexBuildError(f"{uri}: embeddings file lacks columns {missing}")
    t = schema.field("embedding").type
    if pa.types.is_fixed_size_list(t):
        return int(t.list_size)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return None
    raise IndexBuildError(f"{uri}: embedding column has type {t}, expected a list of float32")


def plan_splits(path: str) -> tuple[list[Split], int | None, int]:
    """(splits, fixed dim or None, total rows) from the Parquet footers only."""
    splits: list[Split] = []
    dims: dict[int, str] = {}
    total = 0
    for uri in snap.embedding_files(path):
        with fs.FileSystems.open(uri) as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
        dim = _embedding_dim(schema, uri)
        if dim is not None:
            dims.setdefault(dim, os.path.basename(uri))
        first = 0
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            if rows:
                splits.append(Split(len(splits), uri, rg, first, rows))
            first += rows
        total += meta.num_rows
    if len(dims) > 1:
        shown = ", ".join(f"{name} has {d}" for d, name in sorted(dims.items()))
        raise IndexBuildError(f"snapshot {path}: mixed embedding dimensions "
                              f"{sorted(dims)} between files: {shown}")
    return splits, (next(iter(dims)) if dims else None), total


def plan_build(embeddings: str, index_root: str, config: Config, version: str | None
               ) -> tuple[BuildSpec, list[Split], dict[str, Any]]:
    """Check the request against summary.json and the footers; IndexBuildError if bad."""
    ix = config.index
    path = resolve_snapshot(embeddings)
    try:
        summary = snap.read_summary(path)
    except snap.SnapshotError as e:
        raise IndexBuildError(f"cannot read embeddings snapshot {path}: {e}") from e
    if ix.shards < 1:
        raise IndexBuildError(f"shard count must be >= 1, got {ix.shards}")
    model = summary.get("model")
    if not isinstance(model, dict) or not model.get("model_id"):
        raise IndexBuildError(f"snapshot {path}: {snap.SUMMARY_FILE} has no 'model' with a "
                              f"model_id; cannot record which model the index serves")
    splits, file_dim, n = plan_splits(path)
    if n == 0:
        raise IndexBuildError(f"snapshot {path} has no embedding rows; nothing to index")
    if ix.shards > n:
        raise IndexBuildError(f"{ix.shards} shards requested but snapshot {path} has only "
                              f"{n} vectors; use at most {n} shards")
    dim = file_dim or int(summary.get("dim") or model.get("dim") or 0)
    if dim < 1:
        raise IndexBuildError(f"snapshot {path}: the embedding dimension is unknown (variable "
                              f"length lists and no dim in {snap.SUMMARY_FILE})")
    for where, declared in (("summary.json dim", summary.get("dim")),
                            (f"model {model['model_id']} dim", model.get("dim"))):
        if declared and int(declared) != dim:
            raise IndexBuildError(f"snapshot {path}: embeddings have {dim} dimensions but "
                                  f"{where} is {declared}")
    if ix.dimensions_per_block > dim:
        raise IndexBuildError(f"index.dimensions_per_block={ix.dimensions_per_block} exceeds the "
                              f"embedding dimension {dim}")
    run_id = str(summary.get("run_id") or os.path.basename(path.rstrip("/")))
    if version is None:
        version = art.new_version_name(salt=f"{path}|{run_id}")
    try:
        art.check_version_name(version)
    except art.IndexArtifactError as e:
        raise IndexBuildError(str(e)) from e
    vdir = art.version_dir(index_root, version)
    if fs.list_children(vdir):
        raise IndexBuildError(f"index version {version} already exists at {vdir}; versions "
                              f"are immutable, choose another name")
    spec = BuildSpec(snapshot_path=path, index_root=index_root, version=version,
                     staging=fs.join(vdir, BUILD_DIR), num_shards=ix.shards, num_rows=n,
                     dim=dim, model_id=str(model["model_id"]), k=min(ix.num_neighbors, n),
                     eval_queries=ix.eval_queries, eval_seed=ix.eval_seed,
                     params=BuildParams.from_config(config), model=dict(model))
    return spec, splits, summary


# --------------------------------------------------------------------------- read + validate

def _row_error(kind: str, split: Split, row: int, image_id: Any, detail: str = "") -> dict:
    return {"kind": kind, "file": os.path.basename(split.uri), "row": int(row),
            "image_id": image_id, "detail": detail}


def _batch_vectors(col: pa.ChunkedArray | pa.Array, dim: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors [n, dim] float32, row has embedding, row has the right dimension)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    present = ~col.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(col.type) and col.type.list_size == dim and present.all():
        return snap.embedding_matrix(col, dim), present, np.ones(n, bool)
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    good_dim = present & (lengths == dim)
    out = np.zeros((n, dim), np.float32)
    idx = np.flatnonzero(good_dim)
    if len(idx):
        sub = col.take(pa.array(idx))
        out[idx] = np.asarray(pc.list_flatten(sub).to_numpy(zero_copy_only=False),
                              np.float32).reshape(len(idx), dim)
    return out, present, good_dim


def validate_batch(batch: pa.RecordBatch, spec: BuildSpec, split: Split, first_row: int
                   ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(vectors, good-row mask, row errors) of one batch; errors name file and row."""
    n = batch.num_rows
    ids = batch.column("image_id").to_pylist()
    errors: list[dict] = []
    good = np.ones(n, bool)

    def flag(mask: np.ndarray, kind: str, detail: Any = None) -> None:
        nonlocal good
        for i in np.flatnonzero(mask & good):
            d = detail(i) if callable(detail) else (detail or "")
            errors.append(_row_error(kind, split, first_row + int(i), ids[i], d))
        good &= ~mask

    for name in _ROW_STRING_COLUMNS:
        col = batch.column(name)
        empty = pc.fill_null(pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_length(col), 0)),
                             True).to_numpy(zero_copy_only=False)
        flag(empty, f"missing:{name}")
    model_ids = batch.column("model_id")
    other = pc.fill_null(pc.not_equal(model_ids, spec.model_id), True).to_numpy(
        zero_copy_only=False)
    mids = model_ids.to_pylist()
    flag(other, "model", lambda i: repr(mids[i]))
    vectors, present, good_dim = _batch_vectors(batch.column("embedding"), spec.dim)
    flag(~present, "no_embedding")
    flag(~good_dim, "dimension", f"expected {spec.dim}")
    finite = np.isfinite(vectors).all(axis=1)
    flag(~finite, "nan")
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0), axis=1)
    flag(norms < 1e-6, "zero")
    flag(np.abs(norms - 1.0) > NORM_TOLERANCE, "norm", lambda i: f"{norms[i]:.4f}")
    return vectors, good, errors


_ERROR_TEXT = {
    "missing:image_id": "rows have no image_id",
    "missing:product_id": "rows have no product_id",
    "missing:view": "rows have no view",
    "model": ("rows have another model_id than summary.json's (the snapshot mixes "
              "embeddings of several models)"),
    "no_embedding": "rows have no embedding",
    "dimension": "rows have mixed embedding dimensions",
    "nan": "vectors contain NaN or infinite values",
    "zero": "zero vectors (cannot be L2-normalised)",
    "norm": f"vectors are not L2-normalised (|norm - 1| > {NORM_TOLERANCE})",
    "duplicate": "duplicate (image_id, view) pairs",
}


def _example_text(e: dict) -> str:
    where = f"{e['file']} row {e['row']}" if "file" in e else ""
    if e["kind"] == "norm":
        return f"{e['image_id']} (norm {e['detail']}) in {where}"
    if e["kind"] == "duplicate":
        return e["detail"]
    detail = f" ({e['detail']})" if e.get("detail") else ""
    return f"image_id {e['image_id']!r}{detail} in {where}"


def describe_errors(summary: dict[str, Any]) -> str:
    """One sentence per kind of bad row: count, what is wrong, examples with file and row."""
    parts = []
    for kind in sorted(summary):
        entry = summary[kind]
        text = _ERROR_TEXT.get(kind, kind)
        examples = [_example_text(e) for e in entry["examples"]]
        more = entry["count"] - len(examples)
        parts.append(f"{entry['count']} {text}, e.g. {', '.join(examples)}"
                     + (f" (and {more} more)" if more > 0 else ""))
    return "; ".join(parts)


def _merge_error_summaries(summaries: Iterable[dict]) -> dict:
    out: dict[str, dict] = {}
    for s in summaries:
        for kind, entry in s.items():
            cur = out.setdefault(kind, {"count": 0, "examples": []})
            cur["count"] += entry["count"]
            cur["examples"] = sorted(cur["examples"] + entry["examples"],
                                     key=lambda e: (e.get("file", ""), e.get("row", 0),
                                                    str(e.get("detail"))))[:_EXAMPLES]
    return out


def _summarise_errors(errors: Iterable[dict]) -> dict:
    out: dict[str, dict] = {}
    for e in errors:
        cur = out.setdefault(e["kind"], {"count": 0, "examples": []})
        cur["count"] += 1
        cur["examples"].append(e)
    return _merge_error_summaries([out])


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _part_schema(dim: int) -> pa.Schema:
    return pa.schema([(c, pa.string()) for c in art.ROW_COLUMNS]
                     + [("embedding", pa.list_(pa.float32(), dim))])


def read_split(split: Split, spec: BuildSpec) -> Iterator[Any]:
    """ReadSplit (worker): validate one row group, stage per-shard parts, draw samples.

    Yields TaggedOutputs: "part" (shard, {"uri", "rows"}), "errors" (a summary of bad rows,
    capped at a few examples per kind), "gate"/"tune" (sample_key, image_id, view, vector
    bytes) candidates, "views" (set of views), "products" (bucket, uri).
    """
    from apache_beam import pvalue

    seeds = {"gate": spec.eval_seed, "tune": spec.eval_seed + 1}
    fraction = spec.sample_fraction
    errors: list[dict] = []
    by_shard: dict[int, list[pa.Table]] = {}
    products: set[str] = set()
    views: set[str] = set()
    columns = list(dict.fromkeys([*art.ROW_COLUMNS, "model_id", "embedding"]))
    with fs.FileSystems.open(split.uri) as f:
        pf = pq.ParquetFile(f)
        present = [c for c in columns if c in pf.schema_arrow.names]
        row = split.first_row
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[split.row_group],
                                     columns=present):
            vectors, good, errs = validate_batch(batch, spec, split, row)
            row += batch.num_rows
            if errs:
                errors += errs
            if errors:
                continue  # the build will fail: stop staging, keep collecting errors
            ids = batch.column("image_id").to_pylist()
            vws = batch.column("view").to_pylist()
            views.update(vws)
            products.update(batch.column("product_id").to_pylist())
            for name, seed in seeds.items():
                for i, (iid, v) in enumerate(zip(ids, vws)):
                    key = sample_key(seed, iid, v)
                    if key < fraction:
                        yield pvalue.TaggedOutput(name, (key, iid, v, vectors[i].tobytes()))
            shards = np.fromiter((shard_for(i, spec.num_shards) for i in ids), np.int64,
                                 count=len(ids))
            table = pa.table({c: (batch.column(c) if c in batch.schema.names
                                  else pa.nulls(batch.num_rows, pa.string()))
                              for c in art.ROW_COLUMNS})
            table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), spec.dim))
            for s in np.unique(shards):
                by_shard.setdefault(int(s), []).append(
                    table.take(pa.array(np.flatnonzero(shards == s))))
    if errors:
        yield pvalue.TaggedOutput("errors", _summarise_errors(errors))
        return
    schema = _part_schema(spec.dim)
    for s, tables in sorted(by_shard.items()):
        part = pa.concat_tables(tables).cast(schema)
        uri = spec.part_uri(s, split.index)
        fs.write_parquet(uri, part, compression="none")
        yield pvalue.TaggedOutput("part", (s, {"uri": uri, "rows": part.num_rows}))
    buckets: dict[int, list[str]] = {}
    for pid in products:
        buckets.setdefault(shard_for(pid, spec.num_shards), []).append(pid)
    for b, pids in sorted(buckets.items()):
        uri = spec.products_uri(b, split.index)
        fs.write_parquet(uri, pa.table({"product_id": sorted(pids)}), compression="zstd")
        yield pvalue.TaggedOutput("products", (b, uri))
    yield pvalue.TaggedOutput("views", sorted(views))


def _read_shard(parts: list[dict], dim: int) -> tuple[pa.Table, np.ndarray]:
    """A shard's staged rows sorted by (image_id, view), and their vectors."""
    tables = [fs.read_parquet(p["uri"]) for p in sorted(parts, key=lambda p: p["uri"])]
    table = pa.concat_tables(tables) if tables else _part_schema(dim).empty_table()
    if table.num_rows:
        table = table.take(pc.sort_indices(table, sort_keys=[("image_id", "ascending"),
                                                             ("view", "ascending")]))
    vectors = snap.embedding_matrix(table.column("embedding"), dim)
    return table.select(list(art.ROW_COLUMNS)), vectors


def _queries(sample: list[tuple], dim: int) -> np.ndarray:
    if not sample:
        return np.zeros((0, dim), np.float32)
    return np.stack([np.frombuffer(s[3], np.float32) for s in sample])


# --------------------------------------------------------------------------- per-shard build

def shard_exact_scores(item: tuple[int, list[dict]], spec: BuildSpec, tune: list[tuple]
                       ) -> np.ndarray:
    """A shard's exact top-k scores for the tuning queries, [T, k] (-inf padded)."""
    _, parts = item
    queries = _queries(tune, spec.dim)
    out = np.full((len(queries), spec.k), -np.inf, np.float32)
    if not parts or not len(queries):
        return out
    _, vectors = _read_shard(parts, spec.dim)
    scores, _ = search_exact(vectors, queries, spec.k)
    out[:, :scores.shape[1]] = scores
    return out


def _merge_top_scores(arrays: Iterable[np.ndarray]) -> np.ndarray | None:
    """Per row, the best k of several [T, k] score arrays (a CombineFn's merge)."""
    best = None
    for a in arrays:
        if a is None:
            continue
        if best is None:
            best = a
            continue
        k = a.shape[1]
        both = np.concatenate([best, a], axis=1)
        best = -np.sort(-both, axis=1)[:, :k]
    return best


def _tie_aware_found(true_scores: np.ndarray, kth_exact: np.ndarray) -> np.ndarray:
    """Per query, how many returned rows score at least the k-th exact score."""
    return (true_scores >= kth_exact[:, None] - TIE_EPSILON).sum(axis=1)


def _search_found(searcher: Any, vectors: np.ndarray, queries: np.ndarray, k: int,
                  pre_reorder: int, leaves: int, kth: np.ndarray) -> np.ndarray:
    """Per query, how many of the shard's approximate top-k reach `kth` (true scores)."""
    idx, dist = searcher.search_batched(queries, k, pre_reorder, leaves)
    idx = np.asarray(idx, np.int64)
    valid = ~np.isnan(np.asarray(dist, np.float32)) & (idx >= 0)
    true = np.einsum("qd,qkd->qk", queries, vectors[np.where(valid, idx, 0)])
    return _tie_aware_found(np.where(valid, true, -np.inf), kth)


def tune_leaves(searcher: Any, vectors: np.ndarray, queries: np.ndarray, k: int,
                pre_reorder: int, num_leaves: int, target: float,
                global_kth: np.ndarray | None) -> tuple[int, float, dict[str, Any]]:
    """Fewest leaves_to_search finding `target` of this shard's share of the global top-k.

    The relevant rows of a query are the shard's rows whose exact score reaches the
    query's global k-th exact score (`global_kth`); when the shard holds fewer than
    MIN_RELEVANT_FOR_GLOBAL_TUNING of them (or global_kth is None), its own top-k.
    Returns (leaves, recall on the relevant rows, details).
    """
    exact, _ = search_exact(vectors, queries, k)
    kth = exact[:, -1]
    basis = "shard top-k"
    if global_kth is not None:
        relevant = _tie_aware_found(exact, global_kth)
        if relevant.sum() >= MIN_RELEVANT_FOR_GLOBAL_TUNING:
            kth, basis = global_kth, "shard share of the global top-k"
    relevant = np.minimum(_tie_aware_found(exact, kth), k)
    total = int(relevant.sum())
    candidates = sorted({max(1, min(num_leaves, int(round(1.35 ** i))))
                         for i in range(0, 64)} | {num_leaves})
    cache: dict[int, float] = {}

    def recall(leaves: int) -> float:
        if leaves not in cache:
            found = _search_found(searcher, vectors, queries, k, pre_reorder, leaves, kth)
            cache[leaves] = float(np.minimum(found, relevant).sum() / max(1, total))
        return cache[leaves]

    details = {"basis": basis, "relevant": total}
    lo, hi = 0, len(candidates) - 1
    if recall(candidates[hi]) < target:
        return candidates[hi], cache[candidates[hi]], details
    while lo < hi:  # recall grows with the leaves searched: binary search the first >= target
        mid = (lo + hi) // 2
        if recall(candidates[mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo], cache[candidates[lo]], details


def build_shard(item: tuple[int, list[dict]], spec: BuildSpec, tune: list[tuple],
                global_kth: np.ndarray | None, errors: dict) -> dict[str, Any]:
    """BuildShard (worker): read a shard's parts, build, serialize, checksum; its report."""
    from scann.scann_ops.py import scann_ops_pybind

    shard, parts = item
    started = time.time()
    p = spec.params
    report: dict[str, Any] = {"shard": shard,
                              "path": art.shard_relpath(shard, spec.num_shards)}
    if errors:  # a split found bad rows: the build fails, write nothing
        report["skipped"] = True
        return report
    rows, vectors = _read_shard(parts, spec.dim)
    n = rows.num_rows
    report.update(num_vectors=n, parts=len(parts))
    if n:
        keys = pc.binary_join_element_wise(rows.column("image_id"), rows.column("view"), "\0")
        same = pc.equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        dups = np.flatnonzero(same)
        if len(dups):
            ids, vws = rows.column("image_id"), rows.column("view")
            report["errors"] = _summarise_errors(
                {"kind": "duplicate", "detail": repr((ids[int(i)].as_py(), vws[int(i)].as_py())),
                 "image_id": ids[int(i)].as_py()} for i in dups)
            fs.write_json(spec.result_uri(shard), report)
            return report
    report["num_images"] = len(pc.unique(rows.column("image_id"))) if n else 0
    shard_uri = spec.shard_uri(shard)
    local_final = fs.is_local(shard_uri)
    fs.delete_tree(shard_uri)  # a retried bundle starts clean
    local_dir = fs.normalize(shard_uri) if local_final else tempfile.mkdtemp(
        prefix=f"catalog-shard-{shard:05d}-")
    os.makedirs(local_dir, exist_ok=True)
    try:
        if n == 0:
            report.update(kind="empty", search={})
        elif n < max(p.brute_force_below, MIN_TREE_AH_ROWS):
            k = min(p.num_neighbors, n)
            searcher = (scann_ops_pybind.builder(vectors, k, "dot_product")
                        .score_brute_force().build())
            searcher.serialize(local_dir, relative_path=True)
            report.update(kind="scann_brute_force", search={})
        else:
            report.update(_build_tree_ah(scann_ops_pybind, vectors, spec, tune, global_kth,
                                         local_dir))
        pq.write_table(rows, os.path.join(local_dir, art.ROWS_FILE), compression="zstd")
        files = art.local_dir_checksums(local_dir)
        if not local_final:
            for f in files:
                with open(os.path.join(local_dir, f["name"]), "rb") as fh:
                    fs.write_bytes(fs.join(shard_uri, f["name"]), fh.read())
    finally:
        if not local_final:
            shutil.rmtree(local_dir, ignore_errors=True)
    report.update(files=files, build_seconds=round(time.time() - started, 3), pid=os.getpid())
    fs.write_json(spec.result_uri(shard), report)
    log.info("shard %d/%d: %s, %d vectors, %.1fs", shard, spec.num_shards, report["kind"], n,
             report["build_seconds"])
    from pipelines.core import progress
    progress.tick()
    return report


def leaves_for(shard_rows: int, total_rows: int) -> int:
    """Tree leaves of a shard: leaves of about sqrt(total_rows) vectors each.

    One shard gets round(sqrt(n)) leaves; N shards together get about as many leaves, of
    the same size, as one shard of the whole catalog would, so searching a fraction of
    every shard's leaves scans about as many vectors as the same fraction of one shard
    (with sqrt(shard rows) per shard they would scan sqrt(N) times more).
    """
    leaf_size = math.sqrt(max(1, total_rows))
    return max(2, min(shard_rows, int(round(shard_rows / leaf_size))))


def _build_tree_ah(scann_ops_pybind: Any, vectors: np.ndarray, spec: BuildSpec,
                   tune: list[tuple], global_kth: np.ndarray | None, local_dir: str
                   ) -> dict[str, Any]:
    """Train and serialize a tree + AH + reorder searcher; tune its search budget."""
    p = spec.params
    n = len(vectors)
    k = p.num_neighbors
    num_leaves = leaves_for(n, spec.num_rows)
    leaves = max(1, min(num_leaves, math.ceil(p.leaves_to_search_fraction * num_leaves)))
    full_pre = k * p.reorder_multiplier
    min_partition = max(1, min(50, n // (2 * num_leaves)))
    builder = (scann_ops_pybind.builder(vectors, k, "dot_product")
               .tree(num_leaves=num_leaves, num_leaves_to_search=leaves,
                     training_sample_size=min(n, 100_000), min_partition_size=min_partition)
               .score_ah(p.dimensions_per_block,
                         anisotropic_quantization_threshold=p.anisotropic_threshold,
                         training_sample_size=min(n, 100_000))
               .reorder(full_pre))
    builder.set_n_training_threads(p.training_threads)
    searcher = builder.build()
    multiplier = p.reorder_multiplier
    tuning: dict[str, Any] = {"target": p.tune_recall_target}
    queries = _queries(tune, spec.dim)
    if p.tune_recall_target is not None and len(queries):
        kk = min(k, n)
        scaled = max(1, math.ceil(p.reorder_multiplier / spec.num_shards))
        for mult in dict.fromkeys([scaled, p.reorder_multiplier]):
            leaves, tuned, details = tune_leaves(searcher, vectors, queries, kk, kk * mult,
                                                 num_leaves, p.tune_recall_target, global_kth)
            multiplier = mult
            if tuned >= p.tune_recall_target:
                break
        tuning.update(queries=int(len(queries)), shard_recall=round(tuned, 6), **details)
    searcher.serialize(local_dir, relative_path=True)
    return {"kind": "scann_tree_ah", "num_leaves": num_leaves,
            "search": {"leaves_to_search": int(leaves), "reorder_multiplier": int(multiplier)},
            "tuning": tuning}


# --------------------------------------------------------------------------- gate (worker)

def gate_shard(report: dict[str, Any], spec: BuildSpec, sample: list[tuple]) -> None:
    """GateShard (worker): a built shard's approximate and exact top-k for the gate queries.

    The shard is reopened through the reader (checksums verified) and searched with the
    serving code path. Writes gate-XXXXX.json: per query the approximate top-k (search
    scores, true dot products, "image_id\\0view" ids) and the exact top-k scores.
    """
    shard = report["shard"]
    queries = _queries(sample, spec.dim)
    out: dict[str, Any] = {"shard": shard, "queries": len(queries)}
    if report.get("num_vectors"):
        # the reader on a one-shard view of the version being built (no manifest yet)
        partial = {"format": art.FORMAT, "version": spec.version, "status": "building",
                   "model": spec.model, "dim": spec.dim, "distance": "dot_product",
                   "num_vectors": report["num_vectors"], "shards": [report]}
        version = art.IndexVersion(spec.index_root, spec.version, partial, verify=True)
        loaded = version.load_shards([0])[0]
        k = min(spec.k, loaded.num_vectors)
        scores, rows = ShardedSearcher._search_shard(loaded, queries, k)
        vectors = loaded.vectors()
        valid = rows >= 0
        true = np.einsum("qd,qkd->qk", queries,
                         np.asarray(vectors[np.where(valid, rows, 0).reshape(-1)],
                                    np.float32).reshape(len(queries), k, spec.dim))
        exact, _ = search_exact(vectors, queries, k)
        ids = loaded.rows.column("image_id").to_pylist()
        vws = loaded.rows.column("view").to_pylist()
        out.update(
            approx_scores=np.where(valid, scores, -np.inf).tolist(),
            approx_true=np.where(valid, true, -np.inf).tolist(),
            approx_ids=[[f"{ids[r]}\0{vws[r]}" if r >= 0 else "" for r in row] for row in rows],
            exact_scores=exact.tolist())
    fs.write_json(spec.gate_uri(shard), out)


def merge_gate(results: list[dict[str, Any]], sample_ids: list[str], k: int
               ) -> dict[str, float]:
    """recall@1, recall@k and own-row found rate from the shards' Q x k gate lists."""
    results = [r for r in results if "approx_scores" in r]
    q = len(sample_ids)
    if not q or not results:
        return {"recall@1": 0.0, f"recall@{k}": 0.0, "self_found": 0.0}

    def stack(name: str) -> np.ndarray:
        parts = []
        for r in results:
            a = np.asarray(r[name], np.float32)
            pad = k - a.shape[1]
            parts.append(np.pad(a, ((0, 0), (0, pad)), constant_values=-np.inf) if pad else a)
        return np.concatenate(parts, axis=1)

    approx, true, exact = stack("approx_scores"), stack("approx_true"), stack("exact_scores")
    ids = np.concatenate([np.asarray([row + [""] * (k - len(row)) for row in r["approx_ids"]],
                                     dtype=object) for r in results], axis=1)
    exact = -np.sort(-exact, axis=1)
    order = np.argsort(-approx, axis=1, kind="stable")[:, :k]
    top_true = np.take_along_axis(true, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    out = {}
    for kk in sorted({1, k}):
        found = _tie_aware_found(top_true[:, :kk], exact[:, kk - 1])
        out[f"recall@{kk}"] = round(float(np.minimum(found, kk).mean() / kk), 6)
    out["self_found"] = round(float(np.mean([sid in row for sid, row in
                                             zip(sample_ids, top_ids)])), 6)
    return out


# --------------------------------------------------------------------------- pipeline

def _run_build_pipeline(config: Config, spec: BuildSpec, splits: list[Split]) -> None:
    """The whole build as one Beam job (see the module docstring, steps 2-4)."""
    import apache_beam as beam
    from apache_beam import pvalue
    from pipelines.core.runner import make_pipeline

    def write(name: str):
        return lambda value: fs.write_json(spec.stats_uri(name), value)

    with make_pipeline(config, "build-index") as p:
        read = (p
                | "Splits" >> beam.Create(splits)
                | "SpreadSplits" >> beam.Reshuffle()
                | "ReadSplit" >> beam.FlatMap(read_split, spec).with_outputs(
                    "part", "errors", "gate", "tune", "views", "products"))
        errors = (read.errors
                  | "MergeErrors" >> beam.CombineGlobally(_merge_error_summaries))
        _ = errors | "WriteErrors" >> beam.Map(write("errors"))
        gate_q = read.gate | "GateSample" >> beam.combiners.Top.Smallest(spec.eval_queries)
        tune_q = read.tune | "TuneSample" >> beam.combiners.Top.Smallest(spec.eval_queries)
        _ = gate_q | "WriteGateIds" >> beam.Map(
            lambda s: fs.write_json(spec.stats_uri("gate_sample"),
                                    [f"{x[1]}\0{x[2]}" for x in s]))
        shard_ids = p | "ShardIds" >> beam.Create([(s, None) for s in range(spec.num_shards)])
        shards = (({"part": read.part, "id": shard_ids})
                  | "GroupParts" >> beam.CoGroupByKey()
                  | "PartsOfShard" >> beam.MapTuple(
                      lambda s, g: (s, sorted(g["part"], key=lambda x: x["uri"])))
                  | "SpreadShards" >> beam.Reshuffle())
        tune_side = pvalue.AsSingleton(tune_q)
        if spec.params.tune_recall_target is not None and spec.num_shards > 1:
            global_kth = (shards
                          | "TuneExact" >> beam.Map(shard_exact_scores, spec, tune_side)
                          | "GlobalTopK" >> beam.CombineGlobally(_merge_top_scores)
                          | "KthScore" >> beam.Map(
                              lambda a: None if a is None else a[:, -1].copy()))
            kth_side = pvalue.AsSingleton(global_kth)
        else:
            kth_side = pvalue.AsSingleton(
                p | "NoGlobalKth" >> beam.Create([None]))
        reports = shards | "BuildShard" >> beam.Map(
            build_shard, spec, tune_side, kth_side, pvalue.AsSingleton(errors))
        _ = (reports
             | "BuiltOnly" >> beam.Filter(lambda r: "files" in r)
             | "SpreadGate" >> beam.Reshuffle()
             | "GateShard" >> beam.Map(gate_shard, spec, pvalue.AsSingleton(gate_q)))
        _ = (read.views
             | "Views" >> beam.CombineGlobally(lambda vs: sorted(set().union(*map(set, vs))))
             | "WriteViews" >> beam.Map(write("views")))
        _ = (read.products
             | "GroupProducts" >> beam.GroupByKey()
             | "CountProducts" >> beam.MapTuple(
                 lambda b, uris: len(pc.unique(pa.concat_tables(
                     [fs.read_parquet(u) for u in uris]).column("product_id"))))
             | "SumProducts" >> beam.CombineGlobally(sum)
             | "WriteProducts" >> beam.Map(write("products")))


# --------------------------------------------------------------------------- job

def _scann_description(config: Config) -> dict[str, Any]:
    ix = config.index
    return {"distance": "dot_product", "num_neighbors": ix.num_neighbors,
            "brute_force_below": max(ix.brute_force_below, MIN_TREE_AH_ROWS),
            "tree": {"num_leaves": "round(shard vectors / sqrt(total vectors)), >= 2",
                     "leaves_to_search_fraction": ix.leaves_to_search_fraction,
                     "tune_recall_target": ix.tune_recall_target,
                     "tuning": "per shard, to its share of the global top-k"},
            "score_ah": {"dimensions_per_block": ix.dimensions_per_block,
                         "anisotropic_quantization_threshold": ix.anisotropic_threshold,
                         "hash_type": "lut16"},
            "reorder": {"reorder_multiplier": ix.reorder_multiplier, "dtype": "float32",
                        "per_shard": "ceil(reorder_multiplier / shards) unless tuning needs "
                                     "the full one"},
            "serialized": "relative paths, no docids (ids in rows.parquet)"}


def _fail_and_clean(spec: BuildSpec, created: list[str], message: str) -> IndexBuildError:
    """Remove what this build wrote (the version, and folders it created if now empty)."""
    fs.delete_tree(art.version_dir(spec.index_root, spec.version))
    for folder in created:  # innermost first
        if fs.is_local(folder) and not fs.list_children(folder):
            shutil.rmtree(fs.normalize(folder), ignore_errors=True)
    return IndexBuildError(message)


def run_build_index(embeddings: str, index_root: str, config: Config,
                    version: str | None = None) -> dict[str, Any]:
    """Build, evaluate and publish one index version; returns its manifest.

    Raises IndexBuildError for bad input (nothing is left under the index root) and
    RecallGateError when the recall gate fails (the version stays on disk marked
    rejected, LATEST unchanged).
    """
    started = time.time()
    ix = config.index
    if version is not None:
        try:
            art.check_version_name(version)
        except art.IndexArtifactError as e:
            raise IndexBuildError(str(e)) from e
    try:
        fs.check_all_supported([("embeddings", embeddings), ("index root", index_root)])
    except fs.UnsupportedUriError as e:
        raise IndexBuildError(str(e)) from e
    embeddings, index_root = fs.normalize(embeddings), fs.normalize(index_root)
    spec, splits, summary = plan_build(embeddings, index_root, config, version)
    version = spec.version
    vdir = art.version_dir(index_root, version)
    created = [d for d in (art.versions_dir(index_root), index_root)
               if fs.is_local(d) and not fs.exists(d)]
    log.info("build-index: %d vectors (dim %d) in %d splits from %s -> %s, %d shards",
             spec.num_rows, spec.dim, len(splits), spec.snapshot_path, vdir, spec.num_shards)
    plan_s = time.time() - started
    try:
        t0 = time.time()
        from pipelines.core import progress
        with progress.report_progress("build-index", spec.num_shards, "shards",
                                      enabled=config.runner.is_direct):
            _run_build_pipeline(config, spec, splits)
        beam_s = time.time() - t0
        errors = fs.read_json(spec.stats_uri("errors"))
        if errors:
            raise _fail_and_clean(spec, created, f"snapshot {spec.snapshot_path}: "
                                  f"{describe_errors(errors)}")
        reports = []
        for s in range(spec.num_shards):
            uri = spec.result_uri(s)
            if not fs.exists(uri):
                raise IndexBuildError(f"shard {s} of version {version} reported no result "
                                      f"({uri} missing); the build failed")
            reports.append(fs.read_json(uri))
        shard_errors = _merge_error_summaries(r["errors"] for r in reports if "errors" in r)
        if shard_errors:
            raise _fail_and_clean(spec, created, f"snapshot {spec.snapshot_path}: "
                                  f"{describe_errors(shard_errors)}")
        gate_results = [fs.read_json(spec.gate_uri(r["shard"])) for r in reports
                        if r.get("num_vectors")]
        sample_ids = fs.read_json(spec.stats_uri("gate_sample"))
        views = fs.read_json(spec.stats_uri("views"))
        num_products = fs.read_json(spec.stats_uri("products"))
    finally:
        fs.delete_tree(spec.staging)

    t0 = time.time()
    evaluation: dict[str, Any] = {
        "queries": len(sample_ids), "seed": ix.eval_seed, "k": spec.k,
        "sample": "the eval_queries rows with the smallest sha256(seed, image_id, view)",
        "reference": "exact numpy dot-product search over all snapshot vectors (per shard, "
                     "in the pipeline, merged)",
        "tie_epsilon": TIE_EPSILON}
    evaluation.update(merge_gate(gate_results, sample_ids, spec.k))
    evaluation["merge_seconds"] = round(time.time() - t0, 4)
    model = summary["model"]
    run_id = str(summary.get("run_id") or os.path.basename(spec.snapshot_path.rstrip("/")))
    manifest: dict[str, Any] = {
        "format": art.FORMAT,
        "version": version,
        "status": "building",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "dim": spec.dim,
        "distance": "dot_product",
        "num_vectors": spec.num_rows,
        "num_images": sum(r.get("num_images", 0) for r in reports),
        "num_products": int(num_products),
        "views": views,
        "shard_assignment": "sha256(image_id)[:8] big-endian mod num_shards; rows sorted by "
                            "(image_id, view) within a shard",
        "shards": [{k: v for k, v in r.items() if k not in ("pid", "parts")} for r in reports],
        "scann": _scann_description(config),
        "source_snapshot": {"path": spec.snapshot_path, "run_id": run_id,
                            "num_rows": spec.num_rows, "model_id": model.get("model_id")},
        "build": {"runner": config.runner.name, "workers": config.runner.direct_num_workers
                  if config.runner.is_direct else None,
                  "worker_pids": sorted({r.get("pid") for r in reports}),
                  "splits": len(splits), "parts": sum(r.get("parts", 0) for r in reports),
                  "plan_seconds": round(plan_s, 3), "beam_seconds": round(beam_s, 3)},
    }
    if sum(r["num_vectors"] for r in reports) != spec.num_rows:
        raise IndexBuildError(f"version {version}: shards hold "
                              f"{sum(r['num_vectors'] for r in reports)} vectors but the "
                              f"snapshot has {spec.num_rows}; the build lost rows")
    metric = f"recall@{spec.k}"
    measured = evaluation[metric]
    evaluation.update(metric=metric, threshold=ix.recall_threshold,
                      passed=measured >= ix.recall_threshold)
    manifest["evaluation"] = evaluation
    manifest["build"]["total_seconds"] = round(time.time() - started, 3)
    if not evaluation["passed"]:
        manifest["status"] = art.STATUS_REJECTED
        art.write_manifest(index_root, version, manifest)
        err = RecallGateError(version, metric, measured, ix.recall_threshold, vdir)
        art.mark_rejected(index_root, version, str(err))
        log.error("%s", err)
        raise err
    manifest["status"] = art.STATUS_PASSED
    art.write_manifest(index_root, version, manifest)
    published = art.publish_version(index_root, version, retention=ix.retention)
    log.info("build-index: version %s %s: %s=%.4f (threshold %.2f), %.1fs", version,
             "published" if published else "passed (a newer version is LATEST)", metric,
             measured, ix.recall_threshold, time.time() - started)
    return manifest


# --------------------------------------------------------------------------- CLI

def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True,
                   help="embeddings snapshot folder, or an embeddings root (its LATEST)")
    p.add_argument("--index-root", required=True, help="index root (local path or gs://, s3://)")
    p.add_argument("--shards", type=int, help="number of shards (default: config index.shards)")
    p.add_argument("--version", help="version name (default: UTC time + short hash)")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object instead of text")
    p.add_argument("--recall-threshold", type=float,
                   help="override index.recall_threshold (recall@k below it: not published)")


def _run(args: argparse.Namespace, config: Config) -> int:
    overrides: dict[str, Any] = {}
    if args.shards is not None:
        if args.shards < 1:
            raise UsageError(f"--shards must be >= 1, got {args.shards}")
        overrides["shards"] = args.shards
    if args.recall_threshold is not None:
        if not 0 <= args.recall_threshold <= 1:
            raise UsageError(f"--recall-threshold must be in [0, 1], got {args.recall_threshold}")
        overrides["recall_threshold"] = args.recall_threshold
    if overrides:
        config = config.replace(index=overrides)
    if args.version is not None:
        try:
            check_segment(args.version, "--version")
        except InvalidNameError as e:
            raise UsageError(str(e)) from e
    for what, uri in (("--embeddings", args.embeddings), ("--index-root", args.index_root)):
        check_uri_arg(what, uri)
    try:
        manifest = run_build_index(args.embeddings, args.index_root, config,
                                   version=args.version)
    except IndexBuildError as e:
        print(f"catalog-search build-index: bad input, nothing published: {e}", file=sys.stderr)
        return 1
    except RecallGateError as e:
        print(f"catalog-search build-index: {e}", file=sys.stderr)
        return 3
    ev = manifest["evaluation"]
    result = {"version": manifest["version"], "latest": art.read_latest(args.index_root),
              "num_vectors": manifest["num_vectors"], "shards": len(manifest["shards"]),
              ev["metric"]: ev[ev["metric"]], "recall@1": ev["recall@1"],
              "threshold": ev["threshold"]}
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    print(f"version      {result['version']}  "
          f"({'published as LATEST' if result['latest'] == result['version'] else 'passed; LATEST is ' + str(result['latest'])})\n"
          f"vectors      {result['num_vectors']} in {result['shards']} shard(s)\n"
          f"evaluation   {ev['metric']} {ev[ev['metric']]:.4f}, recall@1 {ev['recall@1']:.4f} "
          f"(threshold {ev['threshold']:.2f})\n"
          f"index root   {args.index_root}")
    return 0


COMMANDS = {
    "build-index": Command(
        help="embeddings snapshot -> sharded ScaNN index version, gated and published "
             "(exit 1: bad input, 3: recall gate failed)",
        add_arguments=_add_arguments, run=_run),
}
