"""build_index, step 3 (Beam workers): build one shard's ScaNN searcher and tune its budget.

Brute force below max(brute_force_below, MIN_TREE_AH_ROWS) vectors, otherwise tree + AH +
reordering with leaves_to_search tuned to the shard's share of the global top-k; the
serialized searcher, rows.parquet and every file's sha256 go to the version's shard folder.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core import filesystem as fs
from pipelines.index import artifact as art
from pipelines.index.projection import SHARED, project, project_queries, save_projection
from pipelines.index.sharded_search import RESCORE_FACTOR, search_exact

from pipelines.index.build_plan import BuildParams, BuildSpec
from pipelines.index.manifest import DEFAULT_VECTORS_FILE
from pipelines.index.build_rows import read_staged_shard, summarise_errors
from pipelines.index.recall_gate import sample_queries, tie_aware_found
from pipelines.index.build_routing import shard_tuning_target

log = logging.getLogger(__name__)

# Shards smaller than this always use brute force (tree + AH training needs data).
MIN_TREE_AH_ROWS = 256
# Fewer relevant (global top-k) neighbours than this in a shard's tuning set: tune the
# shard against its own top-k instead (too few to estimate its share reliably).
MIN_RELEVANT_FOR_GLOBAL_TUNING = 100


def shard_exact_scores(item: tuple[int, list[dict]], spec: BuildSpec, tune: list[tuple]
                       ) -> np.ndarray:
    """A shard's exact top-k scores for the tuning queries, [T, k] (-inf padded)."""
    _, parts = item
    queries = sample_queries(tune, spec.dim)
    out = np.full((len(queries), spec.k), -np.inf, np.float32)
    if not parts or not len(queries):
        return out
    _, vectors = read_staged_shard(parts, spec.dim)
    scores, _ = search_exact(vectors, queries, spec.k)
    out[:, :scores.shape[1]] = scores
    return out


def merge_top_scores(arrays: Iterable[np.ndarray]) -> np.ndarray | None:
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


def _search_found(searcher: Any, vectors: np.ndarray, queries: np.ndarray, k: int,
                  pre_reorder: int, leaves: int, kth: np.ndarray, rescore: bool = False,
                  projection: np.ndarray | None = None) -> np.ndarray:
    """Per query, how many of the shard's approximate top-k reach `kth` (true scores).

    `rescore`: as serving searches a quantized-reorder shard (RESCORE_FACTOR x k
    candidates, the best k by exact score). `projection`: as serving searches a shard
    built on the shared projection (the projected query; the pre_reorder pool of
    candidates by hashing score, the best k by exact score)."""
    fetch = min(len(vectors), RESCORE_FACTOR * k) if rescore else k
    if projection is not None:
        rescore, fetch = True, min(len(vectors), max(pre_reorder, k))
        queries_in = project_queries(queries, projection)
    else:
        queries_in = queries
    idx, dist = searcher.search_batched(queries_in, fetch, max(pre_reorder, fetch), leaves)
    idx = np.asarray(idx, np.int64)
    valid = ~np.isnan(np.asarray(dist, np.float32)) & (idx >= 0)
    true = np.where(valid, np.einsum("qd,qkd->qk", queries, vectors[np.where(valid, idx, 0)]),
                    -np.inf)
    if rescore:
        true = -np.sort(-true, axis=1)[:, :k]
    return tie_aware_found(true, kth)


def tune_leaves(searcher: Any, vectors: np.ndarray, queries: np.ndarray, k: int,
                pre_reorder: int, num_leaves: int, target: float,
                global_kth: np.ndarray | None, rescore: bool = False,
                projection: np.ndarray | None = None) -> tuple[int, float, dict[str, Any]]:
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
        relevant = tie_aware_found(exact, global_kth)
        if relevant.sum() >= MIN_RELEVANT_FOR_GLOBAL_TUNING:
            kth, basis = global_kth, "shard share of the global top-k"
    relevant = np.minimum(tie_aware_found(exact, kth), k)
    total = int(relevant.sum())
    candidates = sorted({max(1, min(num_leaves, int(round(1.35 ** i))))
                         for i in range(0, 64)} | {num_leaves})
    cache: dict[int, float] = {}

    def recall(leaves: int) -> float:
        if leaves not in cache:
            found = _search_found(searcher, vectors, queries, k, pre_reorder, leaves, kth,
                                  rescore, projection)
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
                global_kth: np.ndarray | None, errors: dict,
                routed: dict[str, Any] | None = None,
                projection: np.ndarray | None = None) -> dict[str, Any]:
    """BuildShard (worker): read a shard's parts, build, serialize, checksum; its report.

    `routed` (partition routing, build_routing.budget_step): the shard is tuned on the
    tuning queries routed to it, to the recall that makes the routed index reach
    tune_recall_target as a whole. `projection` (index.shared_projection,
    build_routing.projection_step): a tree-AH shard is built on it."""
    from scann.scann_ops.py import scann_ops_pybind

    shard, parts = item
    started = time.time()
    p = spec.params
    report: dict[str, Any] = {"shard": shard,
                              "path": art.shard_relpath(shard, spec.num_shards)}
    if errors:  # a split found bad rows: the build fails, write nothing
        report["skipped"] = True
        return report
    rows, vectors = read_staged_shard(parts, spec.dim)
    n = rows.num_rows
    report.update(num_vectors=n, parts=len(parts))
    if n:
        keys = pc.binary_join_element_wise(rows.column("image_id"), rows.column("view"), "\0")
        same = pc.equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        dups = np.flatnonzero(same)
        if len(dups):
            ids, vws = rows.column("image_id"), rows.column("view")
            report["errors"] = summarise_errors(
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
            report.update(kind="scann_brute_force", search={},
                          vectors_file=_stored_vectors(local_dir, vectors))
        else:
            report.update(_build_tree_ah(scann_ops_pybind, vectors, spec, tune, global_kth,
                                         local_dir, shard, routed, projection))
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


def leaves_for(shard_rows: int, total_rows: int, per_sqrt_n: float = 1.0) -> int:
    """Tree leaves of a shard: per_sqrt_n x sqrt(total_rows) leaves over the whole index,
    of equal size, so each shard gets its share.

    One shard gets round(per_sqrt_n x sqrt(n)) leaves; N shards together get about as
    many leaves, of the same size, as one shard of the whole catalog would, so searching a
    fraction of every shard's leaves scans about as many vectors as the same fraction of
    one shard (with sqrt(shard rows) per shard they would scan sqrt(N) times more).
    """
    leaf_size = math.sqrt(max(1, total_rows)) / per_sqrt_n
    return max(2, min(shard_rows, int(round(shard_rows / leaf_size))))


#: Our own float32 copy of a shard's vectors when ScaNN keeps only quantized ones.
VECTORS_FILE = "vectors.npy"


def _stored_vectors(local_dir: str, vectors: np.ndarray) -> str:
    """The stored-vectors file of a serialized shard: ScaNN's float32 dataset.npy when it
    holds exactly the shard's vectors, else our own vectors.npy (written here)."""
    scann_copy = os.path.join(local_dir, DEFAULT_VECTORS_FILE)
    if os.path.exists(scann_copy):
        kept = np.load(scann_copy, mmap_mode="r", allow_pickle=False)
        if kept.dtype == np.float32 and kept.shape == vectors.shape:
            return DEFAULT_VECTORS_FILE
    np.save(os.path.join(local_dir, VECTORS_FILE), np.ascontiguousarray(vectors, np.float32),
            allow_pickle=False)
    return VECTORS_FILE


def builder_options(p: BuildParams, dim: int) -> dict[str, Any]:
    """The ScaNN builder options a shard of `dim`-d vectors is built with (manifest)."""
    return {"leaves_per_sqrt_n": p.leaves_per_sqrt_n, "projection_dim": p.projection_for(dim),
            "soar_lambda": p.soar_lambda, "reorder_dtype": p.reorder_dtype,
            "dimensions_per_block": p.dimensions_per_block,
            "anisotropic_threshold": p.anisotropic_threshold}


def make_tree_ah_builder(scann_ops_pybind: Any, vectors: np.ndarray, k: int,
                         num_leaves: int, leaves: int, pre_reorder: int,
                         options: Mapping[str, Any]) -> Any:
    """The ScaNN builder of a tree + AH + reorder shard with `options` (builder_options).
    On the shared projection (options["projection"] == "shared": `vectors` are already
    projected) no ScaNN PCA and no ScaNN reorder: the searcher rescores in float32."""
    shared = options.get("projection") == SHARED
    from scann.scann_ops.py.scann_builder import ReorderType

    n = len(vectors)
    min_partition = max(1, min(50, n // (2 * num_leaves)))
    builder = (scann_ops_pybind.builder(vectors, k, "dot_product")
               .tree(num_leaves=num_leaves, num_leaves_to_search=leaves,
                     training_sample_size=min(n, 100_000), min_partition_size=min_partition,
                     soar_lambda=options.get("soar_lambda"))
               .score_ah(int(options["dimensions_per_block"]),
                         anisotropic_quantization_threshold=options["anisotropic_threshold"],
                         training_sample_size=min(n, 100_000)))
    if not shared:
        builder = builder.reorder(pre_reorder, quantize=getattr(ReorderType, _REORDER_TYPES[
            options["reorder_dtype"]]))
    if options.get("projection_dim") and not shared:
        # both arguments, else ScaNN 1.4.2 raises ValueError
        builder = builder.pca(reduction_dim=int(options["projection_dim"]),
                              pca_significance_threshold=None)
    return builder


# index.reorder_dtype -> ScaNN's ReorderType member
_REORDER_TYPES = {"float32": "FLOAT32", "int8": "INT8", "bfloat16": "BFLOAT16"}


def _build_tree_ah(scann_ops_pybind: Any, vectors: np.ndarray, spec: BuildSpec,
                   tune: list[tuple], global_kth: np.ndarray | None, local_dir: str,
                   shard: int = 0, routed: dict[str, Any] | None = None,
                   projection: np.ndarray | None = None) -> dict[str, Any]:
    """Train and serialize a tree + AH + reorder searcher; tune its search budget.
    With the shared `projection` the searcher indexes the projected vectors (its copy
    written as the shard's projection.npy) and search rescores exactly."""
    p = spec.params
    n = len(vectors)
    k = p.num_neighbors
    num_leaves = leaves_for(n, spec.num_rows, p.leaves_per_sqrt_n)
    leaves = max(1, min(num_leaves, math.ceil(p.leaves_to_search_fraction * num_leaves)))
    full_pre = k * p.reorder_multiplier
    options = builder_options(p, spec.dim)
    indexed = vectors
    if projection is not None:
        options["projection"] = SHARED
        indexed = project(vectors, projection)
        save_projection(local_dir, projection)
    builder = make_tree_ah_builder(scann_ops_pybind, indexed, k, num_leaves, leaves, full_pre,
                                   options)
    builder.set_n_training_threads(p.training_threads)
    searcher = builder.build()
    multiplier = p.reorder_multiplier
    tuning: dict[str, Any] = {"target": p.tune_recall_target}
    queries = sample_queries(tune, spec.dim)
    target, routing_note = (shard_tuning_target(p.tune_recall_target, routed)
                            if p.tune_recall_target is not None else (None, {}))
    if routed is not None and len(queries):  # only the queries routed here count
        mine = np.asarray(routed["mask"], bool)[:, shard]
        queries = queries[mine]
        if global_kth is not None:
            global_kth = global_kth[mine]
    if target is not None and len(queries):
        kk = min(k, n)
        scaled = max(1, math.ceil(p.reorder_multiplier / spec.num_shards))
        for mult in dict.fromkeys([scaled, p.reorder_multiplier]):
            leaves, tuned, details = tune_leaves(searcher, vectors, queries, kk, kk * mult,
                                                 num_leaves, target, global_kth,
                                                 rescore=p.reorder_dtype != "float32",
                                                 projection=projection)
            multiplier = mult
            if tuned >= target:
                break
        tuning.update(queries=int(len(queries)), shard_recall=round(tuned, 6), **details)
    if routing_note:
        tuning.update(shard_target=round(float(target or 0), 6), **routing_note)
    searcher.serialize(local_dir, relative_path=True)
    return {"kind": "scann_tree_ah", "num_leaves": num_leaves,
            "search": {"leaves_to_search": int(leaves), "reorder_multiplier": int(multiplier)},
            "tuning": tuning, "options": options,
            "vectors_file": _stored_vectors(local_dir, vectors)}
