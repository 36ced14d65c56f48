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
      - otherwise tree (leaves of about sqrt(total vectors) / leaves_per_sqrt_n each:
        round(leaves_per_sqrt_n x sqrt(n)) for one shard, see leaves_for; PCA projection
        and SOAR per index.projection_dim / soar_lambda) + asymmetric hashing + float32
        (or int8 / bfloat16) reordering. The search budget is global: the tuning queries' global k-th exact
        score (merged over all shards in the pipeline) tells each shard which of its
        rows belong to a global top-k; each shard picks the fewest leaves_to_search that
        find tune_recall_target of *those* (so the union reaches it globally), with its
        reorder pool scaled down to ceil(reorder_multiplier / N) x k (the full
        reorder_multiplier when the scaled pool cannot reach the target);
        leaves_to_search_fraction x num_leaves when tune_recall_target is null;
        with partition routing each shard tunes on the tuning queries routed to it,
        to tune_recall_target / (the routed shards' share of the global top-k);
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
    pipelines.index.artifact.publish_version, then retention.

Where each step lives, by its public name (the only names one build module takes from
another): 1 build_plan.plan_build, 2 build_rows.read_split (and routing_sample,
duplicate_ids for partition routing), 3 build_shard.build_shard, 4 recall_gate.gate_shard
and merge_gate; build_pipeline.run_build_pipeline wires 2-4 as one Beam job; this module
is the launcher (run_build_index: plan, run, merge, manifest, publish) and `catalog-search
build-index` is in pipelines/index/commands.py.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import contextlib
import shutil
import time
from dataclasses import dataclass
from typing import Any, ContextManager


from pipelines.core import filesystem as fs
from pipelines.index import artifact as art
from pipelines.core.config import Config
from pipelines.index.build_pipeline import run_build_pipeline
from pipelines.core.locks import RunLockedError, run_lock
from pipelines.embed.summary import SnapshotSummary
from pipelines.index.build_plan import (BuildSpec, IndexBuildError, Split, check_version,
                                        claim_version_dir, plan_build)
from pipelines.index.build_rows import merge_error_summaries, describe_errors
from pipelines.index.build_routing import routing_entry
from pipelines.index.manifest import FORMAT, FORMAT_V3
from pipelines.index.projection import SHARED
from pipelines.index.build_shard import MIN_TREE_AH_ROWS
from pipelines.index.recall_gate import TIE_EPSILON, RecallGateError, merge_gate

log = logging.getLogger(__name__)


def _scann_description(config: Config) -> dict[str, Any]:
    ix = config.index
    return {"distance": "dot_product", "num_neighbors": ix.num_neighbors,
            "brute_force_below": max(ix.brute_force_below, MIN_TREE_AH_ROWS),
            "tree": {"num_leaves": "round(shard vectors x leaves_per_sqrt_n / sqrt(total "
                                   "vectors)), >= 2",
                     "leaves_per_sqrt_n": ix.leaves_per_sqrt_n,
                     "soar_lambda": ix.soar_lambda,
                     "leaves_to_search_fraction": ix.leaves_to_search_fraction,
                     "tune_recall_target": ix.tune_recall_target,
                     "tuning": "per shard, to its share of the global top-k"},
            "score_ah": {"dimensions_per_block": ix.dimensions_per_block,
                         "anisotropic_quantization_threshold": ix.anisotropic_threshold,
                         "hash_type": "lut16"},
            "projection": {"pca_dim": ix.projection_dim,
                           "shared": ix.shared_projection,
                           "applies": "only when the index dim is larger (each shard's "
                                      "options say what it was built with); shared: one "
                                      "PCA trained by the build, each shard's "
                                      "projection.npy, float32 rescoring by the searcher "
                                      "(float32 reorder_dtype only)"},
            "reorder": {"reorder_multiplier": ix.reorder_multiplier, "dtype": ix.reorder_dtype,
                        "stored_vectors": "each shard's vectors_file (float32): ScaNN's "
                                          "dataset.npy, or vectors.npy when ScaNN reorders "
                                          "with int8 / bfloat16",
                        "per_shard": "ceil(reorder_multiplier / shards) unless tuning needs "
                                     "the full one"},
            "serialized": "relative paths, no docids (ids in rows.parquet)"}


def _fail_and_clean(spec: BuildSpec, created: list[str], message: str) -> IndexBuildError:
    """Remove what this build wrote (the version, and folders it created if now empty)."""
    fs.delete_tree(art.version_dir(spec.index_root, spec.version))
    _remove_if_empty(created)
    return IndexBuildError(message)


def _apply_takedowns(spec: BuildSpec, files: list[str]) -> tuple[BuildSpec, dict[str, Any]]:
    """The spec with the index root's takedown list (rows left out by ReadSplit), and what
    it does to this snapshot: rows removed, and the listed ids the snapshot no longer holds
    (the catalog dropped them: cleared from the list once this version is published)."""
    import dataclasses

    from pipelines.index import takedowns as td
    try:
        listed = td.read_takedowns(spec.index_root)
    except td.TakedownError as e:
        raise IndexBuildError(f"{e}; repair or remove it before building") from e
    if not listed:
        return spec, {}
    counted = td.count_in_snapshot(files, listed)
    return dataclasses.replace(spec, takedown_image_ids=frozenset(listed.image_ids),
                               takedown_product_ids=frozenset(listed.product_ids)), counted


def _load_adapter(path: str | None) -> Any:
    """The adapter `index.adapter` / `--adapter` names (verified), or None."""
    if path is None:
        return None
    from pipelines.adapter import AdapterError, load_adapter
    try:
        fs.check_supported(path, "index.adapter")
        return load_adapter(fs.normalize(path))
    except (AdapterError, fs.UnsupportedUriError) as e:
        raise IndexBuildError(f"adapter: {e}") from e


def run_build_index(embeddings: str, index_root: str, config: Config,
                    version: str | None = None) -> art.IndexManifest:
    """Build, evaluate and publish one index version; returns its manifest.

    Two builds of one version under one local index root never overlap: the second is
    refused at once (IndexBuildError naming the holder). An incomplete version (an
    interrupted build, never published) is replaced by the re-run (claim_version_dir).
    Raises IndexBuildError for bad input (nothing is left under the index root) and
    RecallGateError when the recall gate fails (the version stays on disk marked
    rejected, LATEST unchanged).
    """
    started = time.time()
    if version is not None:
        check_version(version)
    try:
        fs.check_all_supported([("embeddings", embeddings), ("index root", index_root)])
    except fs.UnsupportedUriError as e:
        raise IndexBuildError(str(e)) from e
    embeddings, index_root = fs.normalize(embeddings), fs.normalize(index_root)
    created = [d for d in (art.versions_dir(index_root), index_root)
               if fs.is_local(d) and not fs.exists(d)]
    adapter = _load_adapter(config.index.adapter)
    try:
        with contextlib.ExitStack() as stack:
            if version is not None:  # before planning: a concurrent build is refused at once
                stack.enter_context(_build_lock(index_root, version))
            spec, splits, summary = plan_build(embeddings, index_root, config, version, adapter)
            if version is None:
                stack.enter_context(_build_lock(index_root, spec.version))
            claim_version_dir(index_root, spec.version, locked=fs.is_local(index_root))
            if adapter is not None:  # the version carries its adapter under its checksums
                from pipelines.adapter.artifact import copy_into_version
                copy_into_version(adapter, art.version_dir(index_root, spec.version))
            return _build_locked(config, spec, splits, summary, created, started, adapter)
    except RunLockedError as e:
        _remove_if_empty(created)
        raise IndexBuildError(str(e)) from e
    except IndexBuildError:
        _remove_if_empty(created)  # after the lock file went: folders this build created
        raise


def _build_lock(index_root: str, version: str) -> ContextManager[None]:
    return run_lock(index_root, art.build_lock_name(version),
                    f"build-index --version {version} (--index-root {index_root})")


def _remove_if_empty(created: list[str]) -> None:
    for folder in created:  # innermost first
        if fs.is_local(folder) and fs.exists(folder) and not fs.list_children(folder):
            shutil.rmtree(fs.normalize(folder), ignore_errors=True)


def _build_locked(config: Config, spec: BuildSpec, splits: list[Split], summary: SnapshotSummary,
                  created: list[str], started: float, adapter: Any = None
                  ) -> art.IndexManifest:
    """Under the build's lock: run the Beam job, gate, write the manifest, publish."""
    try:
        spec, takedowns = _apply_takedowns(spec, sorted({s.uri for s in splits}))
    except IndexBuildError as e:
        raise _fail_and_clean(spec, created, str(e)) from e
    log.info("build-index: %d vectors (dim %d) in %d splits from %s -> %s, %d shards",
             spec.num_rows, spec.dim, len(splits), spec.snapshot_path,
             art.version_dir(spec.index_root, spec.version), spec.num_shards)
    timing = {"plan_seconds": round(time.time() - started, 3)}
    results = _run_pipeline(config, spec, splits, created)
    timing["beam_seconds"] = round(results.beam_s, 3)
    evaluation = _evaluate(config, spec, results)
    removed = takedowns["rows_removed"] if takedowns else 0
    built = sum(r["num_vectors"] for r in results.reports)
    if built != spec.num_rows - removed:
        raise IndexBuildError(f"version {spec.version}: shards hold {built} vectors but the "
                              f"snapshot has {spec.num_rows} ({removed} taken down); the "
                              f"build lost rows")
    build = {"runner": config.runner.name, "workers": config.runner.direct_num_workers
             if config.runner.is_direct else None,
             "worker_pids": sorted({r.get("pid") for r in results.reports}),
             "splits": len(splits), "parts": sum(r.get("parts", 0) for r in results.reports),
             **timing, "total_seconds": round(time.time() - started, 3)}
    if takedowns:
        build["takedowns"] = {k: v for k, v in takedowns.items() if k != "absent"}
    manifest = _manifest(config, spec, summary, results, evaluation, build, removed, adapter)
    _publish(config, spec, manifest, evaluation, takedowns, started)
    return manifest


@dataclass
class _PipelineResults:
    """What the Beam job left in the build's staging folder, read back by the launcher."""
    reports: list[Any]                 # one build report (dict) per shard
    gate_results: list[Any]            # the built shards' gate answers
    sample_ids: list[str]              # the gate queries' "image_id\0view"
    routing: dict[str, Any] | None     # the manifest's routing entry (partition routing)
    gate_routes: Any                   # which shards each gate query is routed to
    views: list[str]
    num_products: int
    beam_s: float


def _run_pipeline(config: Config, spec: BuildSpec, splits: list[Split], created: list[str]
                  ) -> _PipelineResults:
    """Run the Beam job and read what it wrote; bad rows fail the build (cleaned up)."""
    try:
        t0 = time.time()
        from pipelines.core import progress
        with progress.report_progress("build-index", spec.num_shards, "shards",
                                      enabled=config.runner.is_direct):
            run_build_pipeline(config, spec, splits)
        beam_s = time.time() - t0
        errors = fs.read_json(spec.stats_uri("errors"))
        if errors:
            raise _fail_and_clean(spec, created, f"snapshot {spec.snapshot_path}: "
                                  f"{describe_errors(errors)}")
        reports = []
        for s in range(spec.num_shards):
            uri = spec.result_uri(s)
            if not fs.exists(uri):
                raise IndexBuildError(f"shard {s} of version {spec.version} reported no "
                                      f"result ({uri} missing); the build failed")
            reports.append(fs.read_json(uri))
        shard_errors = merge_error_summaries(r["errors"] for r in reports if "errors" in r)
        if shard_errors:
            raise _fail_and_clean(spec, created, f"snapshot {spec.snapshot_path}: "
                                  f"{describe_errors(shard_errors)}")
        routing = gate_routes = None
        if spec.partitioned:
            routing = routing_entry(fs.read_json(spec.stats_uri("routing")),
                                    fs.read_json(spec.stats_uri("routing_budget")))
            gate_routes = fs.read_json(spec.stats_uri("gate_routes"))
        return _PipelineResults(
            reports=reports, sample_ids=fs.read_json(spec.stats_uri("gate_sample")),
            gate_results=[fs.read_json(spec.gate_uri(r["shard"])) for r in reports
                          if r.get("num_vectors")],
            routing=routing, gate_routes=gate_routes,
            views=fs.read_json(spec.stats_uri("views")),
            num_products=int(fs.read_json(spec.stats_uri("products"))), beam_s=beam_s)
    finally:
        fs.delete_tree(spec.staging)


def _evaluate(config: Config, spec: BuildSpec, results: _PipelineResults) -> dict[str, Any]:
    """The manifest's evaluation: the gate's merged recall, the metric and its verdict."""
    ix = config.index
    t0 = time.time()
    evaluation: dict[str, Any] = {
        "queries": len(results.sample_ids), "seed": ix.eval_seed, "k": spec.k,
        "sample": "the eval_queries rows with the smallest sha256(seed, image_id, view)",
        "reference": "exact numpy dot-product search over all snapshot vectors (per shard, "
                     "in the pipeline, merged)",
        "tie_epsilon": TIE_EPSILON}
    if results.routing is not None:
        budget = results.routing["budget"]
        evaluation.update(merge_gate(results.gate_results, results.sample_ids, spec.k,
                                     results.gate_routes, budget))
        evaluation["routing_budget"] = budget
    else:
        evaluation.update(merge_gate(results.gate_results, results.sample_ids, spec.k))
    evaluation["merge_seconds"] = round(time.time() - t0, 4)
    metric = f"recall@{spec.k}"
    evaluation.update(metric=metric, threshold=ix.recall_threshold,
                      passed=evaluation[metric] >= ix.recall_threshold)
    return evaluation


def _manifest(config: Config, spec: BuildSpec, summary: SnapshotSummary,
              results: _PipelineResults, evaluation: dict[str, Any], build: dict[str, Any],
              removed: int, adapter: Any) -> art.IndexManifest:
    """The version's manifest (status from the gate's verdict)."""
    model = summary.model
    run_id = summary.run_id or os.path.basename(spec.snapshot_path.rstrip("/"))
    reports = results.reports
    shared = any((r.get("options") or {}).get("projection") == SHARED for r in reports)
    return art.IndexManifest(
        # format 3 when shards are on the shared projection: an older reader refuses it
        format=FORMAT_V3 if shared else FORMAT,
        version=spec.version,
        status=art.STATUS_PASSED if evaluation["passed"] else art.STATUS_REJECTED,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        model=model, dim=spec.dim, distance="dot_product", num_vectors=spec.num_rows - removed,
        num_images=sum(r.get("num_images", 0) for r in reports),
        num_products=results.num_products, views=results.views,
        shard_assignment=("partition: the shard of the row's nearest k-means centroid "
                          "(routing); rows sorted by (image_id, view) within a shard"
                          if results.routing is not None else
                          "sha256(image_id)[:8] big-endian mod num_shards; rows sorted by "
                          "(image_id, view) within a shard"),
        routing=results.routing,
        shards=[art.ShardEntry.from_dict({k: v for k, v in r.items() if k not in ("pid", "parts")},
                                         f"shard {r['shard']} build report") for r in reports],
        scann=_scann_description(config),
        source_snapshot={"path": spec.snapshot_path, "run_id": run_id,
                         "num_rows": spec.num_rows, "model_id": model.get("model_id")},
        build=build, evaluation=evaluation,
        extra={"adapter": {**adapter.record(), "source": config.index.adapter}}
        if adapter else {})


def _publish(config: Config, spec: BuildSpec, manifest: art.IndexManifest,
             evaluation: dict[str, Any], takedowns: dict[str, Any], started: float) -> None:
    """Write the manifest; a passed version is published (LATEST, retention, takedowns
    cleared of absent ids), a rejected one marked so (RecallGateError)."""
    ix = config.index
    index_root, version = spec.index_root, spec.version
    metric = evaluation["metric"]
    measured = evaluation[metric]
    if not manifest.passed:
        art.write_manifest(index_root, version, manifest)
        err = RecallGateError(version, metric, measured, ix.recall_threshold,
                              art.version_dir(index_root, version))
        art.mark_rejected(index_root, version, str(err))
        log.error("%s", err)
        raise err
    art.write_manifest(index_root, version, manifest)
    published = art.publish_version(index_root, version, retention=ix.retention,
                                    manifest=manifest)
    if published and takedowns and (takedowns["absent"]["image_ids"]
                                    or takedowns["absent"]["product_ids"]):
        from pipelines.index.takedowns import clear_absent
        clear_absent(index_root, takedowns["absent"])
    log.info("build-index: version %s %s: %s=%.4f (threshold %.2f), %.1fs", version,
             "published" if published else "passed (a newer version is LATEST)", metric,
             measured, ix.recall_threshold, time.time() - started)
