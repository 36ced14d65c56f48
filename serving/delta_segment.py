"""A ScaNN searcher over a version's delta rows, built in memory (serving.delta_index).

Searching the delta rows exactly costs one dot product per row and query: at 10,000
1280-d rows that is a 51 MB scan per query, several times the ScaNN search of a 100k
version (docs/BENCHMARKS.md, "Deltas and takedowns"). Once the live delta rows reach
`serving.delta_scann_min_rows`, `DeltaIndex` builds a `DeltaSegment` over them: a ScaNN
tree + asymmetric hashing + float32 reordering searcher with the version's builder options
(config.index: PCA, SOAR, 4 x sqrt(N) leaves, AH block size), or brute force below
MIN_TREE_ROWS rows. Its scores are exact dot products (float32 reordering), so they merge
with the base's by score like another shard.

Nothing of it is written anywhere: it is built from the verified delta files when the
deltas are applied or loaded, and holds no docids (ScaNN would pickle them); its local
indices map to our own rows through `rows`. A segment covers a prefix of the delta log
(`covers`: seq, path and row count of each delta): the next `DeltaIndex` of the same base
reuses it while its log starts with that prefix, and searches the rows added since (the
tail) exactly until the tail itself reaches the threshold, when one segment over every
live delta row is built. Rows deleted after the build stay in the segment; the caller
over-fetches by their number and drops them (`DeltaIndex.search`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: Below this many rows a segment is ScaNN brute force (tree + AH training needs data;
#: the same floor as a shard's, pipelines.index.build_shard.MIN_TREE_AH_ROWS).
MIN_TREE_ROWS = 256


@dataclass(frozen=True)
class SegmentParams:
    """How segments are built and searched (config.serving.delta_scann_*, the builder
    options from config.index)."""
    min_rows: int                    # 0: never (delta rows always searched exactly)
    leaves_fraction: float           # tree leaves searched per query
    reorder_multiplier: int          # float32 reordering of n x this AH candidates
    leaves_per_sqrt_n: float
    projection_dim: int | None
    soar_lambda: float | None
    dimensions_per_block: int
    anisotropic_threshold: float

    @classmethod
    def from_config(cls, config: Any) -> "SegmentParams":
        sv, ix = config.serving, config.index
        return cls(min_rows=int(sv.delta_scann_min_rows),
                   leaves_fraction=float(sv.delta_scann_leaves_fraction),
                   reorder_multiplier=int(sv.delta_scann_reorder_multiplier),
                   leaves_per_sqrt_n=float(ix.leaves_per_sqrt_n),
                   projection_dim=ix.projection_dim, soar_lambda=ix.soar_lambda,
                   dimensions_per_block=int(ix.dimensions_per_block),
                   anisotropic_threshold=float(ix.anisotropic_threshold))

    def wants_segment(self, rows: int) -> bool:
        return self.min_rows > 0 and rows >= self.min_rows


class DeltaSegment:
    """A ScaNN searcher over `vectors`, whose local index i is the global row rows[i]."""

    def __init__(self, vectors: np.ndarray, rows: np.ndarray,
                 covers: tuple[tuple[int, str, int], ...], params: SegmentParams):
        from scann.scann_ops.py import scann_ops_pybind

        started = time.perf_counter()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.rows = np.asarray(rows, np.int64)
        self.covers = covers
        self.params = params
        n, dim = vectors.shape
        self.num_rows = n
        k = min(10, n)
        if n < MIN_TREE_ROWS:
            self.kind = "scann_brute_force"
            self.num_leaves = self.leaves_to_search = 0
            self.searcher = scann_ops_pybind.builder(vectors, k, "dot_product") \
                .score_brute_force().build()
        else:
            from pipelines.index.build_shard import leaves_for, make_tree_ah_builder
            self.kind = "scann_tree_ah"
            self.num_leaves = leaves_for(n, n, params.leaves_per_sqrt_n)
            self.leaves_to_search = max(1, min(self.num_leaves, math.ceil(
                params.leaves_fraction * self.num_leaves)))
            projection = (params.projection_dim if params.projection_dim is not None
                          and dim > params.projection_dim else None)
            options = {"projection_dim": projection, "soar_lambda": params.soar_lambda,
                       "dimensions_per_block": params.dimensions_per_block,
                       "anisotropic_threshold": params.anisotropic_threshold,
                       "reorder_dtype": "float32"}
            builder = make_tree_ah_builder(scann_ops_pybind, vectors, k, self.num_leaves,
                                           self.leaves_to_search,
                                           k * params.reorder_multiplier, options)
            self.searcher = builder.build()
        self.build_seconds = time.perf_counter() - started

    def covers_prefix_of(self, deltas: Sequence[Any]) -> bool:
        """True when `deltas` (in seq order) start with the deltas this segment covers."""
        if len(deltas) < len(self.covers):
            return False
        return all((d.seq, d.path, d.rows.num_rows) == c for d, c in zip(deltas, self.covers))

    def search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """One query's top-n: (exact scores [n'], global rows [n']), best first."""
        n = max(1, min(int(n), self.num_rows))
        if self.kind == "scann_brute_force":
            idx, dist = self.searcher.search(query, n, -1, -1)
        else:
            pre = min(self.num_rows, max(n, n * self.params.reorder_multiplier))
            idx, dist = self.searcher.search(query, n, pre, self.leaves_to_search)
        idx = np.asarray(idx, np.int64)
        dist = np.asarray(dist, np.float32)
        keep = ~np.isnan(dist)
        return dist[keep], self.rows[idx[keep]]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "rows": self.num_rows, "num_leaves": self.num_leaves,
                "leaves_to_search": self.leaves_to_search,
                "build_s": round(self.build_seconds, 3)}
