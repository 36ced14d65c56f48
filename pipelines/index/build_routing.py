"""build_index with index.shard_assignment: partition -- the Beam steps around the routing
(pipelines/index/routing.py): train the centroids on a seeded sample before rows are
assigned, rank the gate queries' shards, and choose the search budget from the tuning
queries' exact per-shard top-k. The same sample trains the shared projection
(index.shared_projection, pipelines/index/projection.py)."""
from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.core import filesystem as fs
from pipelines.index.artifact import sha256_bytes
from pipelines.index.build_plan import BuildSpec
from pipelines.index.recall_gate import sample_queries
from pipelines.index.routing import (CENTROIDS_FILE, Partitions, centroids_bytes,
                                     choose_budget, route_mask, route_order,
                                     train_partitions)


def train_step(sample: list[tuple[float, bytes]], spec: BuildSpec) -> Partitions:
    """TrainPartitions (worker): k-means on the routing sample; writes the version's
    routing/centroids.npy and the "routing" stats; returns the partitions (side input)."""
    vectors = (np.stack([np.frombuffer(v, np.float32) for _, v in sample]) if sample
               else np.zeros((0, spec.dim), np.float32))
    if not len(vectors):
        raise ValueError("the routing sample is empty")
    partitions, details = train_partitions(vectors, spec.num_shards,
                                           spec.params.routing_partitions_per_shard,
                                           spec.eval_seed + 2)
    data = centroids_bytes(partitions)
    fs.write_bytes(spec.routing_uri(), data)
    fs.write_json(spec.stats_uri("routing"), {
        **details, "centroids_file": CENTROIDS_FILE, "sha256": sha256_bytes(data),
        "bytes": len(data), "centroid_shards": [int(s) for s in partitions.centroid_shard]})
    return partitions


def projection_step(sample: list[tuple[float, bytes]], spec: BuildSpec) -> np.ndarray:
    """TrainProjection (worker): the version's shared projection (pipelines/index/
    projection.py) from the routing sample; every tree-AH shard is built on it (side
    input of BuildShard, which writes each shard's copy)."""
    from pipelines.index.projection import train_projection
    vectors = (np.stack([np.frombuffer(v, np.float32) for _, v in sample]) if sample
               else np.zeros((0, spec.dim), np.float32))
    return train_projection(vectors, int(spec.shared_projection_dim or 0))


def gate_routes_step(sample: list[tuple], spec: BuildSpec, partitions: Partitions) -> None:
    """GateRoutes (worker): each gate query's shards, best first ("gate_routes" stats)."""
    queries = sample_queries(sample, spec.dim)
    fs.write_json(spec.stats_uri("gate_routes"),
                  route_order(queries, partitions, range(spec.num_shards)).tolist()
                  if len(queries) else [])


def budget_step(per_shard: list[tuple[int, np.ndarray]], spec: BuildSpec, tune: list[tuple],
                partitions: Partitions) -> dict[str, Any]:
    """RoutingBudget (worker): the fewest shards per query holding routing_min_coverage of
    the tuning queries' exact global top-k ("routing_budget" stats). Returns what the
    shard tuner needs (side input of BuildShard): the budget, the share of the global
    top-k the routed shards hold at that budget, and which tuning queries each shard
    answers ([T, shards] bool)."""
    queries = sample_queries(tune, spec.dim)
    budget, coverage = choose_budget(dict(per_shard), queries, partitions, spec.num_shards,
                                     spec.params.routing_min_coverage)
    fs.write_json(spec.stats_uri("routing_budget"), {
        "budget": budget, "min_coverage": spec.params.routing_min_coverage,
        "tuning_queries": int(len(queries)),
        "coverage_by_budget": coverage})
    mask = (route_mask(queries, partitions, range(spec.num_shards), budget) if len(queries)
            else np.zeros((0, spec.num_shards), bool))
    return {"budget": budget, "coverage": coverage[budget - 1], "mask": mask}


def shard_tuning_target(target: float, routed: dict[str, Any] | None
                        ) -> tuple[float, dict[str, Any]]:
    """The recall a shard tunes to so that the routed index as a whole reaches `target`:
    the routed shards hold `coverage` of the global top-k, so their own share must be
    found at target / coverage (when coverage < target no shard budget can make up for
    the routing: the shard tunes to `target` and the note says so)."""
    if routed is None:
        return target, {}
    coverage = float(routed["coverage"])
    note: dict[str, Any] = {"routing_budget": int(routed["budget"]),
                            "routing_coverage": round(coverage, 4)}
    if coverage >= target:
        return min(1.0, target / coverage), note
    note["routing_note"] = (f"routing coverage {coverage:.4f} is below the target "
                            f"{target}: raise index.routing_min_coverage")
    return target, note


def route_mask_for_gate(routes: list[list[int]], budget: int, shards: list[int]
                        ) -> np.ndarray | None:
    """[Q, len(shards)] bool from the gate routes: which shard lists count per query."""
    if not routes:
        return None
    order = np.asarray(routes, np.int64)[:, :budget]
    return np.stack([np.isin(np.asarray(shards), row) for row in order])


def routing_entry(stats: dict[str, Any], budget: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `routing` entry."""
    return {"kind": "partition", **stats, "budget": int(budget["budget"]),
            "budget_tuning": {k: v for k, v in budget.items() if k != "budget"}}
