"""Search several loaded index shards as one index, plus the exact brute-force reference.

    shards = open_index(root).load_shards()          # pipelines.index.reader
    searcher = ShardedSearcher(shards)
    scores, rows = searcher.search(queries, k=10)    # float32 [Q,k'], int64 [Q,k'] (-1 = none)
    hits = searcher.hits(scores, rows)               # [[Hit(image_id, product_id, ...), ...]]
    exact_scores, exact_rows = searcher.search_exact(queries, k=10)

Global rows number the rows of all given shards in order: the rows of shards[0] first,
then shards[1], ... `image_ids[row]`, `product_ids[row]`, `views[row]`,
`image_uris[row]` and `metadata[row]` (JSON text) map a row back to the catalog;
`vectors(rows)` returns the indexed vectors; `hit(row, score)` maps a row to a `Hit`
(metadata parsed by `parse_metadata`). Scores are dot products of L2-normalised
vectors (cosine similarity), best first; k' = min(k, num_vectors). A query for which
the approximate search finds fewer than k' neighbours gets score -inf and row -1 in the
remaining slots (`hits` leaves those out).

Each shard answers its own top-k with ScaNN (tree + asymmetric hashing + exact
reordering, using the leaves_to_search and reorder pool tuned at build time for the
index as a whole, or brute force for small shards); the per-shard lists are merged into
the global top-k. Shards on the version's shared projection (pipelines/index/projection.py)
get the query projected once for all of them, their candidates rescored in float32.
Shards are searched concurrently on a thread pool shared by all searchers of the process (ScaNN releases the GIL while it searches); the merge is the
same either way, so concurrent and sequential searches return the same hits
(`concurrent=False` searches one shard after another).
"""
from __future__ import annotations

import bisect
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from pipelines.index.exact_search import (as_queries, exact_dots, rescore_candidates,
                                          search_exact, top_k_rows)
from pipelines.index.hits import Hit, new_hit, parse_metadata
from pipelines.index.projection import project_queries

# A shard reordering with int8 / bfloat16 returns this x k candidates, rescored in float32.
RESCORE_FACTOR = 2

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def shard_pool() -> ThreadPoolExecutor:
    """The process-wide thread pool shards are searched on (one thread per CPU)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                       thread_name_prefix="shard-search")
        return _POOL


__all__ = ["Hit", "ShardedSearcher", "parse_metadata", "reorder_pool", "search_exact",
           "shard_pool", "RESCORE_FACTOR"]


class ShardedSearcher:
    """Several `LoadedShard`s searched as one index (see the module docstring)."""

    def __init__(self, shards: Sequence[Any], concurrent: bool = True, routing: Any = None):
        if not shards:
            raise ValueError("ShardedSearcher needs at least one shard")
        # partition routing (pipelines.index.routing.Routing) or None: every shard searched
        self.routing = routing
        dims = {int(s.dim) for s in shards}
        if len(dims) != 1:
            raise ValueError(f"shards have different dimensions: {sorted(dims)}")
        self.shards = list(shards)
        self.concurrent = concurrent
        self._route_cache: tuple[Any, np.ndarray, list[np.ndarray]] | None = None
        self.dim = dims.pop()
        sizes = [int(s.num_vectors) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_vectors = int(self.offsets[-1])
        self.image_ids: list[str] = []
        self.product_ids: list[str] = []
        self.views: list[str] = []
        self.image_uris: list[str] = []
        self.metadata: list[str] = []
        self._shard_of_row = np.repeat(np.arange(len(sizes)), sizes)
        # first row of each non-empty shard (hit(): bisect, cheaper than numpy indexing)
        self._starts = [int(o) for o, n in zip(self.offsets[:-1], sizes) if n]
        self._start_shard = [j for j, n in enumerate(sizes) if n]
        self._shard_numbers = [int(s.shard) for s in self.shards]
        for s in self.shards:
            self.image_ids += s.rows.column("image_id").to_pylist()
            self.product_ids += s.rows.column("product_id").to_pylist()
            self.views += s.rows.column("view").to_pylist()
            self.image_uris += s.rows.column("image_uri").to_pylist()
            self.metadata += s.rows.column("metadata").to_pylist()

    # ---------------------------------------------------------------- approximate search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate global top-k: (scores float32 [Q,k'], rows int64 [Q,k']).

        With partition routing, each query searches only its `routing.budget` best shards
        of those loaded here (ranked by their centroids); a budget of every loaded shard
        is the full fan-out. One query (Q = 1) takes `search_one`'s lean path."""
        if (isinstance(queries, np.ndarray) and queries.ndim == 2 and queries.shape[0] == 1
                and isinstance(k, (int, np.integer)) and k >= 1):
            q = as_queries(queries, self.dim)[0]
            scores, rows = self.search_one(q, int(k))
            return scores[None, :], rows[None, :]
        if self.routing is None or self.routing.budget >= len(self.shards):
            return self._merged_top_k(queries, k, self._search_shard)
        return self._routed_top_k(queries, k)

    def search_one(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One query: (scores float32 [k'], rows int64 [k']), the same hits as `search` on
        it (padding -inf / -1), on a lean path: `query` is taken as given (float32
        [dim], finite: `search` checks it), the shards are searched one after another in
        the calling thread (a single query's shard calls are too short for the thread
        pool: its hand-offs cost more than they overlap), each with ScaNN's single-query
        call, the query projected once per shared projection (not once per shard), the
        candidates of shards on a shared projection rescored in one step, and the merge is
        one sort of the candidates."""
        k = min(int(k), self.num_vectors)
        positions = (self._route_one(query) if self.routing is not None
                     and self.routing.budget < len(self.shards) else range(len(self.shards)))
        part_s: list[np.ndarray] = []
        part_r: list[np.ndarray] = []
        projected: dict[int, np.ndarray] = {}
        gathered: list[np.ndarray] = []  # rows of the shared-projection shards' candidates
        for j in positions:
            shard = self.shards[j]
            n = shard.num_vectors
            if n == 0:
                continue
            offset = int(self.offsets[j])
            matrix = shard.projection
            if matrix is None:
                s, r = self._search_shard_one(shard, query, min(k, n))
                part_s.append(s)
                part_r.append(np.where(r >= 0, r + offset, -1) if offset else r)
                continue
            qp = projected.get(id(matrix))
            if qp is None:
                qp = projected[id(matrix)] = project_queries(query[None], matrix)[0]
            pool = min(n, max(k, reorder_pool(shard, k)))
            idx, dist = shard.searcher.search(qp, pool, pool, shard.leaves_to_search)
            idx = np.asarray(idx, np.int64)
            if np.isnan(dist).any():
                idx = idx[~np.isnan(dist)]
            vectors = shard.vectors()
            gathered.append(np.asarray(vectors[idx], np.float32))
            part_r.append(idx + offset if offset else idx)
            part_s.append(None)  # type: ignore[arg-type]  # scored below
        if gathered:
            exact = exact_dots(query[None], np.concatenate(gathered)[None])[0]
            at = 0
            for i, s in enumerate(part_s):
                if s is None:
                    m = part_r[i].shape[0]
                    part_s[i] = exact[at:at + m]
                    at += m
        if len(part_s) == 1 and part_s[0].shape[0] == k and not gathered:
            return part_s[0], part_r[0]
        scores = np.concatenate(part_s) if part_s else np.zeros(0, np.float32)
        rows = np.concatenate(part_r) if part_r else np.zeros(0, np.int64)
        order = np.lexsort((rows, -scores))[:k]  # best first; ties to the lower row
        scores, rows = scores[order], rows[order]
        if len(order) < k:
            scores = np.concatenate([scores, np.full(k - len(order), -np.inf, np.float32)])
            rows = np.concatenate([rows, np.full(k - len(order), -1, np.int64)])
        return scores.astype(np.float32, copy=False), rows

    def _route_one(self, query: np.ndarray) -> list[int]:
        """Positions (in self.shards) of the `routing.budget` shards one query searches:
        `route_mask`'s choice for that query (best centroid first, ties to the earlier)."""
        cache = self._route_cache
        partitions = self.routing.partitions
        if cache is None or cache[0] is not partitions:
            held = [int(s.shard) for s in self.shards]
            owners = partitions.centroid_shard
            mine = [np.flatnonzero(owners == s) for s in held]
            cache = (partitions, partitions.centroids, mine)
            self._route_cache = cache
        scores = cache[1] @ query
        best = np.array([scores[m].max() if m.size else -np.inf for m in cache[2]],
                        np.float32)
        return sorted(np.argsort(-best, kind="stable")[:max(1, self.routing.budget)].tolist())

    @staticmethod
    def _search_shard_one(shard: Any, query: np.ndarray, k: int
                          ) -> tuple[np.ndarray, np.ndarray]:
        """One shard's top-k of one query (-inf / -1 where ScaNN found fewer than k)."""
        if getattr(shard, "quantized_reorder", False):  # rescored: the batched path
            s, r = ShardedSearcher._search_shard(shard, query[None], k)
            return s[0], r[0]
        if shard.kind == "scann_brute_force":
            idx, dist = shard.searcher.search(query, k, -1, -1)
        else:
            idx, dist = shard.searcher.search(query, k, max(k, reorder_pool(shard, k)),
                                              shard.leaves_to_search)
        idx = np.asarray(idx, np.int64)
        dist = np.asarray(dist, np.float32)
        if idx.shape[0] < k or np.isnan(dist).any():
            found = ~np.isnan(dist)
            idx, dist = idx[found], dist[found]
            pad = k - idx.shape[0]
            idx = np.concatenate([idx, np.full(pad, -1, np.int64)])
            dist = np.concatenate([dist, np.full(pad, -np.inf, np.float32)])
        return dist, idx

    def _routed_top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from pipelines.index.routing import route_mask
        queries = as_queries(queries, self.dim)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), self.num_vectors)
        mask = route_mask(queries, self.routing.partitions, [s.shard for s in self.shards],
                          self.routing.budget)
        todo = [(j, offset, shard) for j, (offset, shard)
                in enumerate(zip(self.offsets[:-1], self.shards))
                if shard.num_vectors > 0 and mask[:, j].any()]

        projected = _projected(queries, [shard for _, _, shard in todo])

        def run(j: int, shard: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            sub = np.flatnonzero(mask[:, j])
            qp = projected.get(id(shard.projection))
            s, r = self._search_shard(shard, queries[sub], min(k, shard.num_vectors),
                                      None if qp is None else qp[sub])
            return sub, s, r

        if self.concurrent and len(todo) > 1:
            pool = shard_pool()
            futures = [pool.submit(run, j, shard) for j, _, shard in todo]
            results = [f.result() for f in futures]
        else:
            results = [run(j, shard) for j, _, shard in todo]
        q = queries.shape[0]
        scores = np.full((q, max(1, k * len(todo))), -np.inf, np.float32)
        rows = np.full(scores.shape, -1, np.int64)
        for t, ((_, offset, _), (sub, s, r)) in enumerate(zip(todo, results)):
            cols = slice(t * k, t * k + s.shape[1])
            scores[sub, cols] = s
            rows[sub, cols] = np.where(r >= 0, r + offset, -1)
        return top_k_rows(scores, rows, k)

    def _merged_top_k(self, queries: np.ndarray, k: int,
                      search_shard: Callable[[Any, np.ndarray, int],
                                             tuple[np.ndarray, np.ndarray]]
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Each non-empty shard's top-k by `search_shard`, merged into the global top-k."""
        queries = as_queries(queries, self.dim)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), self.num_vectors)
        todo = [(offset, shard) for offset, shard in zip(self.offsets[:-1], self.shards)
                if shard.num_vectors > 0]
        if search_shard is self._search_shard:  # project once per shared projection
            projected = _projected(queries, [shard for _, shard in todo])
            if projected:
                def search_shard(shard: Any, q: np.ndarray, kk: int
                                 ) -> tuple[np.ndarray, np.ndarray]:
                    return self._search_shard(shard, q, kk,
                                              projected.get(id(shard.projection)))
        if self.concurrent and len(todo) > 1:
            pool = shard_pool()
            futures = [pool.submit(search_shard, shard, queries, min(k, shard.num_vectors))
                       for _, shard in todo]
            results = [f.result() for f in futures]
        else:
            results = [search_shard(shard, queries, min(k, shard.num_vectors))
                       for _, shard in todo]
        all_s, all_r = [], []
        for (offset, _), (s, r) in zip(todo, results):
            all_s.append(s)
            all_r.append(np.where(r >= 0, r + offset, -1))
        scores = np.concatenate(all_s, axis=1)
        rows = np.concatenate(all_r, axis=1)
        if len(all_s) == 1 and scores.shape[1] == k:
            return scores, rows
        return top_k_rows(scores, rows, k)

    @staticmethod
    def _search_shard(shard: Any, queries: np.ndarray, k: int,
                      projected: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One shard's top-k (local rows, -1 / -inf padding where ScaNN found fewer).

        A shard whose ScaNN reorders with int8 / bfloat16 vectors returns approximate
        scores: it is asked for RESCORE_FACTOR x k neighbours, which are rescored exactly
        with the shard's stored float32 vectors, so every shard's scores are exact dot
        products and merging shards by score compares like with like. A shard on the
        shared projection (`shard.projection`; `projected`: the queries through it, when
        the caller has them) returns its reorder pool by hashing score, rescored the same
        way.
        """
        wanted = k
        matrix = getattr(shard, "projection", None)
        rescore = matrix is not None or getattr(shard, "quantized_reorder", False)
        if matrix is not None:
            k = min(int(shard.num_vectors), max(k, reorder_pool(shard, k)))
            searched = project_queries(queries, matrix) if projected is None else projected
        else:
            searched = queries
            if rescore:
                k = min(int(shard.num_vectors), RESCORE_FACTOR * k)
        brute = shard.kind == "scann_brute_force"
        pre = -1 if brute else max(k, reorder_pool(shard, wanted if rescore else k))
        leaves = -1 if brute else shard.leaves_to_search
        if searched.shape[0] == 1:
            idx, dist = shard.searcher.search(searched[0], k, pre, leaves)
            idx = np.asarray(idx, np.int64)[None, :]
            dist = np.asarray(dist, np.float32)[None, :]
        else:
            idx, dist = shard.searcher.search_batched(searched, k, pre if pre > 0 else None,
                                                      leaves if leaves > 0 else None)
            idx = np.asarray(idx, np.int64)
            dist = np.asarray(dist, np.float32)
        if idx.shape[1] < k:  # single-query search returns only what it found
            pad = k - idx.shape[1]
            idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
            dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.nan)
        missing = np.isnan(dist)
        if missing.any():
            dist = np.where(missing, -np.inf, dist).astype(np.float32)
            idx = np.where(missing, -1, idx)
        if rescore:
            return rescore_candidates(shard.vectors(), queries, dist, idx, wanted)
        return dist, idx

    # ---------------------------------------------------------------- exact reference

    def search_exact(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact global top-k over the shards' stored vectors: (scores, rows) like search."""
        return self._merged_top_k(
            queries, k, lambda shard, q, kk: search_exact(shard.vectors(), q, kk))

    # ---------------------------------------------------------------- rows -> catalog

    def vectors(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 [len(rows), dim]: the indexed vectors of global rows."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_vectors):
            raise IndexError(f"rows must be in [0, {self.num_vectors}), got {rows.min()}.."
                             f"{rows.max()}")
        out = np.empty((rows.size, self.dim), np.float32)
        shard_idx = self._shard_of_row[rows] if rows.size else rows
        for si in np.unique(shard_idx):
            mask = shard_idx == si
            local = rows[mask] - self.offsets[si]
            out[mask] = np.asarray(self.shards[si].vectors()[local], np.float32)
        return out

    def hit(self, row: int, score: float) -> Hit:
        """The catalog entry of one global row."""
        row = int(row)
        shard = self._start_shard[bisect.bisect_right(self._starts, row) - 1]
        # Hit(...) without the frozen dataclass's per-field object.__setattr__ (a query
        # builds k to hundreds of hits: that __init__ was most of a vector query's Python
        # time); the same fields, still frozen, equal to Hit(...) built the usual way.
        hit = new_hit(Hit)
        hit.__dict__.update(row=row, shard=self._shard_numbers[shard], score=float(score),
                            image_id=self.image_ids[row], product_id=self.product_ids[row],
                            view=self.views[row], image_uri=self.image_uris[row],
                            metadata=parse_metadata(self.metadata[row]),
                            visual_score=None, text_score=None)
        return hit

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[list[Hit]]:
        """`search` output -> per query, its hits best first (padding left out)."""
        return [[self.hit(r, s) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]


def reorder_pool(shard: Any, n: int) -> int:
    """Candidates a shard reorders (exactly rescores) to return its top `n`.

    The budget is tuned for the index's k (`shard.tuned_k`, the gate's num_neighbors):
    k x reorder_multiplier. Up to k, n x multiplier; above it (serving over-fetches
    images to collapse them to products or to filter), the tuned pool plus one
    candidate per extra neighbour asked for, not n x multiplier: the ranks past k
    only decide which products fill a page, and a pool growing with n would make an
    over-fetching query reorder 3-4x the tuned pool (docs/BENCHMARKS.md, "Index")."""
    mult = int(shard.reorder_multiplier)
    k = int(getattr(shard, "tuned_k", 0) or 0)
    if k <= 0 or n <= k:
        return n * mult
    return k * mult + (n - k)


def _projected(queries: np.ndarray, shards: Sequence[Any]) -> dict[int, np.ndarray]:
    """id(projection) -> the queries through it, once per distinct shared projection."""
    out: dict[int, np.ndarray] = {}
    for shard in shards:
        matrix = getattr(shard, "projection", None)
        if matrix is not None and id(matrix) not in out:
            out[id(matrix)] = project_queries(queries, matrix)
    return out
