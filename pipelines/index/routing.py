"""Partition-routed shards (index.shard_assignment: partition).

Build: spherical k-means on a seeded sample of the snapshot (inside the Beam job, before
rows are assigned) gives shards x routing_partitions_per_shard coarse centroids in index
space; the centroids are given to the shards greedily, largest first to the least
loaded shard (balanced by the sample's counts), and every row goes to the shard of its
nearest centroid (by dot product). The centroids are written to
`routing/centroids.npy` in the version folder; the manifest's `routing` entry names it
with its sha256 and size, lists each centroid's shard and the search budget.

Search: a query's shards are ranked by their best centroid's dot product and only the
first `budget` are searched (`route_order`, `route_mask`). The budget is set by the
build: the fewest shards per query whose shards hold `routing_min_coverage` of the
tuning queries' exact global top-k (`choose_budget`); the gate then measures recall with
that routing. A budget of every shard is the full fan-out of hash sharding.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

ROUTING_DIR = "routing"
CENTROIDS_FILE = f"{ROUTING_DIR}/centroids.npy"
KMEANS_ITERATIONS = 20


@dataclass(frozen=True)
class Partitions:
    """Coarse centroids [C, dim] (unit length) and the shard of each (C)."""
    centroids: np.ndarray
    centroid_shard: np.ndarray

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """The shard of each row: the shard of its nearest centroid (dot product)."""
        if not len(vectors):
            return np.zeros(0, np.int64)
        nearest = np.argmax(np.asarray(vectors, np.float32) @ self.centroids.T, axis=1)
        return self.centroid_shard[nearest].astype(np.int64)


def train_partitions(sample: np.ndarray, num_shards: int, per_shard: int, seed: int
                     ) -> tuple[Partitions, dict[str, Any]]:
    """Spherical k-means of `sample` into num_shards x per_shard centroids, balanced onto
    the shards; (partitions, details for the manifest)."""
    sample = np.asarray(sample, np.float32)
    ok = np.all(np.isfinite(sample), axis=1) & (np.linalg.norm(sample, axis=1) > 0.5)
    sample = sample[ok]  # rows the build will refuse anyway stay out of the fit
    c = max(1, min(num_shards * per_shard, len(sample)))
    rng = np.random.default_rng(seed)
    centroids = sample[rng.choice(len(sample), size=c, replace=False)].copy()
    assign = np.zeros(len(sample), np.int64)
    for _ in range(KMEANS_ITERATIONS):
        assign = np.argmax(sample @ centroids.T, axis=1)
        for j in range(c):
            members = sample[assign == j]
            if len(members):
                m = members.sum(axis=0)
                centroids[j] = m / max(np.linalg.norm(m), 1e-12)
            else:  # an empty centroid restarts at a random sample row
                centroids[j] = sample[rng.integers(len(sample))]
    counts = np.bincount(assign, minlength=c)
    load = np.zeros(num_shards, np.int64)
    owner = np.zeros(c, np.int64)
    for j in np.argsort(-counts, kind="stable"):  # largest first, to the least loaded shard
        s = int(np.argmin(load))
        owner[j] = s
        load[s] += counts[j]
    details = {"partitions": int(c), "per_shard": int(per_shard), "sample_rows": int(len(sample)),
               "kmeans_iterations": KMEANS_ITERATIONS, "seed": int(seed),
               "sample_share_per_shard": [round(float(x) / max(1, len(sample)), 4)
                                          for x in load]}
    return Partitions(centroids.astype(np.float32), owner), details


@dataclass
class Routing:
    """How a ShardedSearcher routes queries: the partitions and the budget (shards per
    query; the build's, or set later, e.g. by a benchmark's sweep)."""
    partitions: Partitions
    budget: int


def centroids_bytes(partitions: Partitions) -> bytes:
    buf = io.BytesIO()
    np.save(buf, partitions.centroids, allow_pickle=False)
    return buf.getvalue()


def route_order(queries: np.ndarray, partitions: Partitions,
                shards: Sequence[int] | None = None) -> np.ndarray:
    """[Q, S'] the shards (of `shards`, default all) in the order a query should search
    them: by their best centroid's dot product with the query, best first."""
    owners = partitions.centroid_shard
    held = sorted(set(int(s) for s in owners)) if shards is None else [int(s) for s in shards]
    scores = np.asarray(queries, np.float32) @ partitions.centroids.T      # [Q, C]
    best = np.full((scores.shape[0], len(held)), -np.inf, np.float32)
    for j, s in enumerate(held):
        mine = owners == s
        if mine.any():
            best[:, j] = scores[:, mine].max(axis=1)
    order = np.argsort(-best, axis=1, kind="stable")
    return np.asarray(held, np.int64)[order]


def route_mask(queries: np.ndarray, partitions: Partitions, shards: Sequence[int],
               budget: int) -> np.ndarray:
    """[Q, len(shards)] bool: which of `shards` each query searches (its `budget` best)."""
    shards = [int(s) for s in shards]
    order = route_order(queries, partitions, shards)[:, :max(1, budget)]
    position = {s: j for j, s in enumerate(shards)}
    mask = np.zeros((len(order), len(shards)), bool)
    for q, row in enumerate(order):
        mask[q, [position[int(s)] for s in row]] = True
    return mask


def choose_budget(per_shard_exact: Mapping[int, np.ndarray], queries: np.ndarray,
                  partitions: Partitions, num_shards: int, min_coverage: float
                  ) -> tuple[int, list[float]]:
    """The fewest shards per query whose shards hold `min_coverage` of the queries' exact
    global top-k: (budget, coverage for budgets 1..num_shards).

    `per_shard_exact`: shard -> [T, k] exact top-k scores of the queries in that shard
    (-inf padded)."""
    shards = list(range(num_shards))
    k = next(iter(per_shard_exact.values())).shape[1] if per_shard_exact else 1
    t = len(queries)
    if not t or not per_shard_exact:
        return num_shards, [1.0] * num_shards
    full = np.full((t, num_shards, k), -np.inf, np.float32)
    for s, a in per_shard_exact.items():
        full[:, int(s), :a.shape[1]] = a
    flat = full.reshape(t, -1)
    kth = -np.sort(-flat, axis=1)[:, k - 1]
    held = (full >= kth[:, None, None] - 1e-6).sum(axis=2)           # [T, S] top-k rows held
    order = route_order(queries, partitions, shards)
    covered = np.cumsum(np.take_along_axis(held, order, axis=1), axis=1)
    coverage = [float(np.mean(np.minimum(covered[:, b], k) / k)) for b in range(num_shards)]
    budget = next((b + 1 for b, c in enumerate(coverage) if c >= min_coverage), num_shards)
    return budget, [round(c, 4) for c in coverage]


def load_partitions(data: bytes, centroid_shards: Sequence[int], dim: int, where: str
                    ) -> Partitions:
    """Partitions from a centroids file's bytes; ValueError naming `where` when malformed."""
    try:
        centroids = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: not a readable array: {e}") from e
    if (centroids.dtype != np.float32 or centroids.ndim != 2 or centroids.shape[1] != dim
            or centroids.shape[0] != len(centroid_shards)
            or not np.all(np.isfinite(centroids))):
        raise ValueError(f"{where}: holds {centroids.dtype} {list(centroids.shape)}, expected "
                         f"float32 [{len(centroid_shards)}, {dim}] finite")
    return Partitions(centroids, np.asarray(centroid_shards, np.int64))
