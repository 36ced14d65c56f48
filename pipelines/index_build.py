"""Beam job "build_index": embeddings snapshot -> sharded ScaNN index version, gated, published.

    catalog-search build-index --embeddings SNAPSHOT_OR_ROOT --index-root ROOT --shards N

Steps (run_build_index):
 1. Load and validate the snapshot (launcher). Bad input -- no rows, mixed or wrong
    dimensions, NaN/inf, zero or non-unit vectors, duplicate (image_id, view) rows, rows
    without image_id/product_id/view, several model ids, more shards than vectors --
    raises IndexBuildError before anything is written under the index root.
 2. Assign each row to shard sha256(image_id) mod N (all views of an image share a
    shard), sort rows by (image_id, view) inside each shard, and stage one Parquet input
    per shard in versions/<version>/_build/.
 3. Beam (pipelines.runner.make_pipeline): one element per shard, redistributed to the
    workers; each worker builds its shard's ScaNN searcher and serializes it with
    relative paths, plus rows.parquet, straight into
    versions/<version>/shards/shard-XXXXX-of-NNNNN/ (object stores: via a local temp
    folder, then uploaded), and reports sha256 of every file it wrote.
      - shards with fewer than max(brute_force_below, 256) vectors: exact brute force;
      - otherwise tree (num_leaves = round(sqrt(n))) + asymmetric hashing
        (dimensions_per_block, anisotropic threshold) + float32 reordering
        (num_neighbors x reorder_multiplier candidates); leaves_to_search is tuned
        per shard: the fewest leaves whose recall@k on seeded sample queries (seed
        eval_seed + 1, not the gate's queries) reaches tune_recall_target, or
        leaves_to_search_fraction x num_leaves when tune_recall_target is null;
      - an empty shard (possible when N is close to the number of images) has only an
        empty rows.parquet and is skipped by searches.
 4. Evaluation gate (launcher): eval_queries vectors sampled from the snapshot (seed
    eval_seed) are searched in the sharded index through the reader (checksums
    verified) and ShardedSearcher, and compared with exact numpy search over all
    snapshot vectors; recall@1 and recall@k go into manifest.json. Recall is
    tie-aware: a returned row counts when its exact score reaches the k-th exact score.
    Below index.recall_threshold the manifest is written with status "rejected" plus a
    REJECTED note, and RecallGateError is raised; LATEST is not touched.
 5. Publish: manifest.json (status "passed") is written atomically, then LATEST via
    index_artifact.publish_version, then retention.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import filesystem as fs
from pipelines import index_artifact as art
from pipelines import snapshot as snap
from pipelines.command import Command, UsageError
from pipelines.names import InvalidNameError, check_segment
from pipelines.config import Config
from pipelines.sharded_search import ShardedSearcher, search_exact

log = logging.getLogger(__name__)

# Shards smaller than this always use brute force (tree + AH training needs data).
MIN_TREE_AH_ROWS = 256
# Allowed deviation of a vector's L2 norm from 1.
NORM_TOLERANCE = 1e-3
# Score slack when deciding whether a returned neighbour ties with the k-th exact one.
TIE_EPSILON = 1e-5
BUILD_DIR = "_build"
_EXAMPLES = 5


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


# --------------------------------------------------------------------------- shard assignment

def shard_for(image_id: str, num_shards: int) -> int:
    """The shard of an image: sha256(image_id) mod num_shards (stable across runs/hosts)."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def _shards_for(image_ids: list[str], num_shards: int) -> np.ndarray:
    return np.fromiter((shard_for(i, num_shards) for i in image_ids), np.int64,
                       count=len(image_ids))


# --------------------------------------------------------------------------- validation

@dataclass
class PreparedSnapshot:
    """Validated snapshot rows, sorted by (image_id, view), with their shard assignment."""
    path: str
    summary: dict[str, Any]
    table: pa.Table            # sorted rows (ROW_COLUMNS + embedding)
    vectors: np.ndarray        # float32 [n, dim], same order as table
    shard_of_row: np.ndarray   # int64 [n]
    num_shards: int

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def _examples(values: list[Any]) -> str:
    shown = ", ".join(repr(v) for v in values[:_EXAMPLES])
    return shown + (f" (and {len(values) - _EXAMPLES} more)" if len(values) > _EXAMPLES else "")


def load_snapshot(embeddings: str) -> snap.Snapshot:
    """Load a snapshot folder, or the snapshot an embeddings root's LATEST names."""
    path = embeddings
    try:
        if not snap.is_complete(path):
            latest = snap.latest(path)
            if latest is None:
                raise IndexBuildError(
                    f"{embeddings} is neither a complete embeddings snapshot (no "
                    f"{snap.SUMMARY_FILE}) nor an embeddings root with a {snap.LATEST_FILE}")
            path = latest
        return snap.load(path)
    except snap.SnapshotError as e:
        raise IndexBuildError(f"cannot read embeddings snapshot {path}: {e}") from e
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise IndexBuildError(
            f"cannot read embeddings snapshot {path}: its Parquet files disagree (mixed "
            f"embedding dimensions or schemas?): {e}") from e


def _vectors_of(table: pa.Table, path: str) -> np.ndarray:
    col = table.column("embedding")
    image_ids = table.column("image_id")
    if col.null_count:
        bad = pc.filter(image_ids, pc.is_null(col)).to_pylist()
        raise IndexBuildError(f"snapshot {path}: {len(bad)} rows have no embedding, e.g. "
                              f"image_id {_examples(bad)}")
    col = col.combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        dim = col.type.list_size
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        dims = np.unique(lengths)
        if len(dims) != 1:
            first = int(np.flatnonzero(lengths != lengths[0])[0])
            raise IndexBuildError(
                f"snapshot {path}: mixed embedding dimensions {dims.tolist()}: row 0 "
                f"(image_id {image_ids[0].as_py()!r}) has {lengths[0]}, row {first} "
                f"(image_id {image_ids[first].as_py()!r}) has {lengths[first]}")
        dim = int(dims[0])
    else:
        raise IndexBuildError(f"snapshot {path}: embedding column has type {col.type}, "
                              f"expected a list of float32")
    if dim < 1:
        raise IndexBuildError(f"snapshot {path}: embeddings have dimension 0")
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(len(table), dim)


def prepare_snapshot(snapshot: snap.Snapshot, num_shards: int,
                     dimensions_per_block: int = 1) -> PreparedSnapshot:
    """Validate a loaded snapshot and assign its rows to shards; IndexBuildError if bad."""
    path, table, summary = snapshot.path, snapshot.table, snapshot.summary
    n = table.num_rows
    if n == 0:
        raise IndexBuildError(f"snapshot {path} has no embedding rows; nothing to index")
    if num_shards < 1:
        raise IndexBuildError(f"shard count must be >= 1, got {num_shards}")
    if num_shards > n:
        raise IndexBuildError(f"{num_shards} shards requested but snapshot {path} has only "
                              f"{n} vectors; use at most {n} shards")
    model = summary.get("model")
    if not isinstance(model, dict) or not model.get("model_id"):
        raise IndexBuildError(f"snapshot {path}: {snap.SUMMARY_FILE} has no 'model' with a "
                              f"model_id; cannot record which model the index serves")
    for name in ("image_id", "product_id", "view"):
        col = table.column(name)
        empty = pc.fill_null(pc.or_kleene(pc.is_null(col),
                                          pc.equal(pc.utf8_length(col), 0)), True)
        bad_rows = np.flatnonzero(empty.to_numpy(zero_copy_only=False))
        if len(bad_rows):
            ids = [table.column("image_id")[int(i)].as_py() for i in bad_rows[:_EXAMPLES]]
            raise IndexBuildError(f"snapshot {path}: {len(bad_rows)} rows have no {name}, "
                                  f"e.g. rows {bad_rows[:_EXAMPLES].tolist()} "
                                  f"(image_id {ids})")
    model_ids = pc.unique(table.column("model_id")).to_pylist()
    if len(model_ids) != 1:
        raise IndexBuildError(f"snapshot {path} mixes embeddings of several models: "
                              f"{_examples(sorted(map(str, model_ids)))}")
    if model_ids[0] != model["model_id"]:
        raise IndexBuildError(f"snapshot {path}: rows were embedded with {model_ids[0]!r} but "
                              f"{snap.SUMMARY_FILE} names model {model['model_id']!r}")
    counts = table.group_by(["image_id", "view"]).aggregate([("image_id", "count")])
    dup = counts.filter(pc.greater(counts.column("image_id_count"), 1))
    if dup.num_rows:
        pairs = list(zip(dup.column("image_id").to_pylist(), dup.column("view").to_pylist()))
        raise IndexBuildError(f"snapshot {path}: {dup.num_rows} duplicate (image_id, view) "
                              f"pairs, e.g. {_examples(pairs)}")

    order = pc.sort_indices(table, sort_keys=[("image_id", "ascending"),
                                              ("view", "ascending")])
    table = table.take(order)
    vectors = _vectors_of(table, path)
    dim = vectors.shape[1]
    summary_dim = summary.get("dim")
    if summary_dim is not None and int(summary_dim) != dim:
        raise IndexBuildError(f"snapshot {path}: embeddings have {dim} dimensions but "
                              f"{snap.SUMMARY_FILE} says dim={summary_dim}")
    if model.get("dim") and int(model["dim"]) != dim:
        raise IndexBuildError(f"snapshot {path}: embeddings have {dim} dimensions but model "
                              f"{model['model_id']} produces {model['dim']}")
    if dimensions_per_block > dim:
        raise IndexBuildError(f"index.dimensions_per_block={dimensions_per_block} exceeds the "
                              f"embedding dimension {dim}")
    image_ids = table.column("image_id").to_pylist()
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        bad = [image_ids[i] for i in np.flatnonzero(~finite)]
        raise IndexBuildError(f"snapshot {path}: {len(bad)} vectors contain NaN or infinite "
                              f"values, e.g. image_id {_examples(bad)}")
    norms = np.linalg.norm(vectors, axis=1)
    zero = norms < 1e-6
    if zero.any():
        bad = [image_ids[i] for i in np.flatnonzero(zero)]
        raise IndexBuildError(f"snapshot {path}: {len(bad)} zero vectors (cannot be "
                              f"L2-normalised), e.g. image_id {_examples(bad)}")
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        bad = [f"{image_ids[i]} (norm {norms[i]:.4f})" for i in np.flatnonzero(off)]
        raise IndexBuildError(f"snapshot {path}: {len(bad)} vectors are not L2-normalised "
                              f"(|norm - 1| > {NORM_TOLERANCE}), e.g. {_examples(bad)}")
    keep = [c for c in art.ROW_COLUMNS if c in table.column_names] + ["embedding"]
    table = table.select(keep)
    for c in art.ROW_COLUMNS:
        if c not in table.column_names:
            table = table.add_column(len(table.column_names) - 1, c,
                                     pa.nulls(n, pa.string()))
    return PreparedSnapshot(path=path, summary=summary, table=table, vectors=vectors,
                            shard_of_row=_shards_for(image_ids, num_shards),
                            num_shards=num_shards)


# --------------------------------------------------------------------------- per-shard build

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
    training_threads: int = 0

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
class ShardTask:
    """One Beam element: build shard `shard` from `input_uri` into `shard_uri`."""
    shard: int
    num_shards: int
    input_uri: str            # staged Parquet: ROW_COLUMNS + embedding
    shard_uri: str            # final folder of the shard inside the version
    result_uri: str           # JSON report the worker writes for the launcher
    tune_queries_uri: str     # .npy float32 [T, dim]
    params: BuildParams


def _read_parquet(uri: str) -> pa.Table:
    if fs.is_local(uri):
        return pq.read_table(art._local_path(uri))
    return pq.read_table(io.BytesIO(fs.read_bytes(uri)))


def _write_parquet(table: pa.Table, uri: str, compression: str = "zstd") -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    fs.write_bytes(uri, sink.getvalue().to_pybytes())


def _tie_aware_recall(queries: np.ndarray, vectors: np.ndarray, found: np.ndarray,
                      kth_exact: np.ndarray, k: int) -> float:
    """Mean over queries of |found rows scoring >= the k-th exact score| / k."""
    valid = found >= 0
    safe = np.where(valid, found, 0)
    true_scores = np.einsum("qd,qkd->qk", queries, np.asarray(vectors[safe], np.float32))
    good = valid & (true_scores >= kth_exact[:, None] - TIE_EPSILON)
    return float(np.minimum(good.sum(axis=1), k).mean() / k)


def _tune_leaves(searcher: Any, vectors: np.ndarray, queries: np.ndarray, k: int,
                 pre_reorder: int, num_leaves: int, target: float) -> tuple[int, float]:
    """Fewest leaves_to_search whose recall@k on `queries` reaches `target`."""
    exact_scores, _ = search_exact(vectors, queries, k)
    kth = exact_scores[:, -1]
    candidates = sorted({max(1, min(num_leaves, int(round(1.35 ** i))))
                         for i in range(0, 64)} | {num_leaves})
    cache: dict[int, float] = {}

    def recall(leaves: int) -> float:
        if leaves not in cache:
            idx, dist = searcher.search_batched(queries, k, pre_reorder, leaves)
            idx = np.where(np.isnan(dist), -1, np.asarray(idx, np.int64))
            cache[leaves] = _tie_aware_recall(queries, vectors, idx, kth, k)
        return cache[leaves]

    lo, hi = 0, len(candidates) - 1
    if recall(candidates[hi]) < target:
        return candidates[hi], cache[candidates[hi]]
    while lo < hi:  # recall grows with the leaves searched: binary search the first >= target
        mid = (lo + hi) // 2
        if recall(candidates[mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo], cache[candidates[lo]]


def build_shard(task: ShardTask) -> dict[str, Any]:
    """Build, serialize and checksum one shard (runs on a Beam worker); returns its report."""
    from scann.scann_ops.py import scann_ops_pybind

    started = time.time()
    p = task.params
    table = _read_parquet(task.input_uri)
    n = table.num_rows
    rows = table.select(list(art.ROW_COLUMNS))
    vectors = _vectors_of(table, task.input_uri) if n else None
    del table
    local_final = fs.is_local(task.shard_uri)
    fs.delete_tree(task.shard_uri)  # a retried bundle starts clean
    local_dir = art._local_path(task.shard_uri) if local_final else tempfile.mkdtemp(
        prefix=f"catalog-shard-{task.shard:05d}-")
    os.makedirs(local_dir, exist_ok=True)
    report: dict[str, Any] = {"shard": task.shard,
                              "path": art.shard_relpath(task.shard, task.num_shards),
                              "num_vectors": n}
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
            k = p.num_neighbors
            num_leaves = max(2, int(round(math.sqrt(n))))
            leaves = max(1, min(num_leaves, math.ceil(p.leaves_to_search_fraction * num_leaves)))
            pre_reorder = k * p.reorder_multiplier
            min_partition = max(1, min(50, n // (2 * num_leaves)))
            builder = (scann_ops_pybind.builder(vectors, k, "dot_product")
                       .tree(num_leaves=num_leaves, num_leaves_to_search=leaves,
                             training_sample_size=min(n, 100_000),
                             min_partition_size=min_partition)
                       .score_ah(p.dimensions_per_block,
                                 anisotropic_quantization_threshold=p.anisotropic_threshold,
                                 training_sample_size=min(n, 100_000))
                       .reorder(pre_reorder))
            builder.set_n_training_threads(p.training_threads)
            searcher = builder.build()
            tuning: dict[str, Any] = {"target": p.tune_recall_target}
            if p.tune_recall_target is not None:
                assert vectors is not None  # n > 0 here
                queries = np.load(io.BytesIO(fs.read_bytes(task.tune_queries_uri)))
                leaves, tuned = _tune_leaves(searcher, vectors, queries, min(k, n),
                                             pre_reorder, num_leaves, p.tune_recall_target)
                tuning.update(queries=int(len(queries)), shard_recall=round(tuned, 6))
            searcher.serialize(local_dir, relative_path=True)
            report.update(kind="scann_tree_ah", num_leaves=num_leaves,
                          search={"leaves_to_search": int(leaves),
                                  "reorder_multiplier": p.reorder_multiplier},
                          tuning=tuning)
        pq.write_table(rows, os.path.join(local_dir, art.ROWS_FILE), compression="zstd")
        files = art.local_dir_checksums(local_dir)
        if not local_final:
            for f in files:
                with open(os.path.join(local_dir, f["name"]), "rb") as fh:
                    fs.write_bytes(fs.join(task.shard_uri, f["name"]), fh.read())
    finally:
        if not local_final:
            shutil.rmtree(local_dir, ignore_errors=True)
    report.update(files=files, build_seconds=round(time.time() - started, 3), pid=os.getpid())
    fs.write_json(task.result_uri, report)
    log.info("shard %d/%d: %s, %d vectors, %.1fs", task.shard, task.num_shards,
             report["kind"], n, report["build_seconds"])
    from pipelines import progress
    progress.tick()
    return report


def _run_build_pipeline(config: Config, tasks: list[ShardTask]) -> None:
    import apache_beam as beam
    from pipelines.runner import make_pipeline

    with make_pipeline(config, "build-index") as p:
        _ = (p
             | "ShardTasks" >> beam.Create(tasks)
             | "SpreadOverWorkers" >> beam.Reshuffle()
             | "BuildShard" >> beam.Map(build_shard))


# --------------------------------------------------------------------------- gate

def evaluate(prepared: PreparedSnapshot, searcher: ShardedSearcher, global_row: np.ndarray,
             k: int, num_queries: int, seed: int) -> dict[str, Any]:
    """recall@1 and recall@k of the sharded index vs exact search over all snapshot vectors."""
    started = time.time()
    n = len(prepared.vectors)
    rng = np.random.default_rng(seed)
    qidx = np.sort(rng.choice(n, size=min(num_queries, n), replace=False))
    queries = prepared.vectors[qidx]
    k = min(k, n)
    t0 = time.time()
    _, approx_rows = searcher.search(queries, k)
    search_s = time.time() - t0
    exact_scores, _ = search_exact(prepared.vectors, queries, k)
    # index rows -> snapshot rows, so the check also covers the row mapping
    snapshot_row = np.empty(n, np.int64)
    snapshot_row[global_row] = np.arange(n)
    found = np.where(approx_rows >= 0, snapshot_row[np.maximum(approx_rows, 0)], -1)
    result = {"queries": int(len(qidx)), "seed": seed, "k": k,
              "reference": "exact numpy dot-product search over all snapshot vectors",
              "tie_epsilon": TIE_EPSILON}
    for kk in sorted({1, k}):
        result[f"recall@{kk}"] = round(_tie_aware_recall(
            queries, prepared.vectors, found[:, :kk], exact_scores[:, kk - 1], kk), 6)
    result["search_seconds"] = round(search_s, 4)
    result["seconds"] = round(time.time() - started, 3)
    return result


# --------------------------------------------------------------------------- job

def _scann_description(config: Config) -> dict[str, Any]:
    ix = config.index
    return {"distance": "dot_product", "num_neighbors": ix.num_neighbors,
            "brute_force_below": max(ix.brute_force_below, MIN_TREE_AH_ROWS),
            "tree": {"num_leaves": "round(sqrt(shard vectors))",
                     "leaves_to_search_fraction": ix.leaves_to_search_fraction,
                     "tune_recall_target": ix.tune_recall_target},
            "score_ah": {"dimensions_per_block": ix.dimensions_per_block,
                         "anisotropic_quantization_threshold": ix.anisotropic_threshold,
                         "hash_type": "lut16"},
            "reorder": {"reorder_multiplier": ix.reorder_multiplier, "dtype": "float32"},
            "serialized": "relative paths, no docids (ids in rows.parquet)"}


def run_build_index(embeddings: str, index_root: str, config: Config,
                    version: str | None = None) -> dict[str, Any]:
    """Build, evaluate and publish one index version; returns its manifest.

    Raises IndexBuildError for bad input (nothing is written) and RecallGateError when
    the recall gate fails (the version stays on disk marked rejected, LATEST unchanged).
    """
    started = time.time()
    ix = config.index
    if version is not None:
        try:
            art.check_version_name(version)
        except art.IndexArtifactError as e:
            raise IndexBuildError(str(e)) from e
    for what, uri in (("embeddings", embeddings), ("index root", index_root)):
        try:
            fs.check_supported(uri, what)
        except fs.UnsupportedUriError as e:
            raise IndexBuildError(str(e)) from e
    embeddings, index_root = fs.normalize(embeddings), fs.normalize(index_root)
    snapshot = load_snapshot(embeddings)
    prepared = prepare_snapshot(snapshot, ix.shards, ix.dimensions_per_block)
    del snapshot
    n, num_shards = len(prepared.vectors), prepared.num_shards
    run_id = str(prepared.summary.get("run_id") or os.path.basename(prepared.path.rstrip("/")))
    if version is None:
        version = art.new_version_name(salt=f"{prepared.path}|{run_id}")
    try:
        art.check_version_name(version)
    except art.IndexArtifactError as e:
        raise IndexBuildError(str(e)) from e
    vdir = art.version_dir(index_root, version)
    if fs.list_children(vdir):
        raise IndexBuildError(f"index version {version} already exists at {vdir}; versions "
                              f"are immutable, choose another name")
    log.info("build-index: %d vectors (dim %d) from %s -> %s, %d shards", n, prepared.dim,
             prepared.path, vdir, num_shards)

    staging = fs.join(vdir, BUILD_DIR)
    try:
        tune_rng = np.random.default_rng(ix.eval_seed + 1)
        tune_idx = tune_rng.choice(n, size=min(ix.eval_queries, n), replace=False)
        tune_uri = fs.join(staging, "tune_queries.npy")
        buf = io.BytesIO()
        np.save(buf, prepared.vectors[np.sort(tune_idx)])
        fs.write_bytes(tune_uri, buf.getvalue())
        params = BuildParams.from_config(config)
        tasks, global_row = [], np.empty(n, np.int64)
        offset = 0
        for s in range(num_shards):
            idx = np.flatnonzero(prepared.shard_of_row == s)
            global_row[idx] = offset + np.arange(len(idx))
            offset += len(idx)
            input_uri = fs.join(staging, f"input-{s:05d}.parquet")
            _write_parquet(prepared.table.take(pa.array(idx)), input_uri, compression="none")
            tasks.append(ShardTask(
                shard=s, num_shards=num_shards, input_uri=input_uri,
                shard_uri=fs.join(vdir, art.shard_relpath(s, num_shards)),
                result_uri=fs.join(staging, f"result-{s:05d}.json"),
                tune_queries_uri=tune_uri, params=params))
        stage_s = time.time() - started
        t0 = time.time()
        from pipelines import progress
        with progress.report_progress("build-index", len(tasks), "shards",
                                      enabled=config.runner.is_direct):
            _run_build_pipeline(config, tasks)
        beam_s = time.time() - t0
        reports = []
        for t in tasks:
            if not fs.exists(t.result_uri):
                raise IndexBuildError(f"shard {t.shard} of version {version} reported no "
                                      f"result ({t.result_uri} missing); the build failed")
            reports.append(fs.read_json(t.result_uri))
    finally:
        fs.delete_tree(staging)

    model = prepared.summary["model"]
    manifest: dict[str, Any] = {
        "format": art.FORMAT,
        "version": version,
        "status": "building",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "dim": prepared.dim,
        "distance": "dot_product",
        "num_vectors": n,
        "num_images": len(pc.unique(prepared.table.column("image_id"))),
        "num_products": len(pc.unique(prepared.table.column("product_id"))),
        "views": sorted(pc.unique(prepared.table.column("view")).to_pylist()),
        "shard_assignment": "sha256(image_id)[:8] big-endian mod num_shards; rows sorted by "
                            "(image_id, view) within a shard",
        "shards": [{k: v for k, v in r.items() if k != "pid"} for r in reports],
        "scann": _scann_description(config),
        "source_snapshot": {"path": prepared.path, "run_id": run_id, "num_rows": n,
                            "model_id": model.get("model_id")},
        "build": {"runner": config.runner.name, "workers": config.runner.direct_num_workers
                  if config.runner.is_direct else None,
                  "worker_pids": sorted({r.get("pid") for r in reports}),
                  "stage_seconds": round(stage_s, 3), "beam_seconds": round(beam_s, 3)},
    }

    opened = art.IndexVersion(index_root, version, manifest, verify=True)
    searcher = ShardedSearcher(opened.load_shards())
    evaluation = evaluate(prepared, searcher, global_row, ix.num_neighbors, ix.eval_queries,
                          ix.eval_seed)
    del searcher
    metric = f"recall@{evaluation['k']}"
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
        if not uri or not uri.strip():
            raise UsageError(f"{what} must not be empty")
        try:
            fs.check_supported(uri, what)
        except fs.UnsupportedUriError as e:
            raise UsageError(str(e)) from e
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
