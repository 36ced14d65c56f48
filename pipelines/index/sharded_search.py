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
the global top-k. Shards are searched concurrently on a thread pool shared by all
searchers of the process (ScaNN releases the GIL while it searches); the merge is the
same either way, so concurrent and sequential searches return the same hits
(`concurrent=False` searches one shard after another).
"""
from __future__ import annotations

import bisect
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

# A shard reordering with int8 / bfloat16 returns this x k candidates, rescored in float32.
RESCORE_FACTOR = 2
# Database rows scored per block by `search_exact` (bounds its memory to Q x block).
_EXACT_BLOCK_ROWS = 65536

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


@dataclass(frozen=True)
class Hit:
    """One neighbour of a query, mapped back to the catalog.

    The one result type of the project: ShardedSearcher.hits returns it, and serving
    answers with it (collapsed to the best image per product, filtered, or fused with the
    text score: then `score` is the fused score and `visual_score` / `text_score` its parts).
    """
    row: int
    shard: int
    score: float
    image_id: str
    product_id: str
    view: str
    image_uri: str | None
    metadata: dict[str, Any]
    visual_score: float | None = None
    text_score: float | None = None


_new_hit = object.__new__


def parse_metadata(text: str | None) -> dict[str, Any]:
    """A row's metadata column (JSON object text) as a dict; {} when empty or not an object.

    The one metadata parser: search hits, serving's filters and its text index use it.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def search_exact(vectors: np.ndarray, queries: np.ndarray, k: int,
                 block_rows: int = _EXACT_BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product (brute force in numpy): (scores [Q,k'], indices [Q,k']).

    k' = min(k, len(vectors)); best first; ties go to the lower index. Memory stays at
    Q x block_rows scores however large `vectors` is (it may be a memory map).
    """
    queries = _as_queries(queries, vectors.shape[1] if vectors.ndim == 2 else None)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = int(vectors.shape[0])
    k = min(int(k), n)
    q = queries.shape[0]
    if k == 0:
        return np.zeros((q, 0), np.float32), np.zeros((q, 0), np.int64)
    best_s = np.full((q, 0), -np.inf, np.float32)
    best_i = np.zeros((q, 0), np.int64)
    for start in range(0, n, block_rows):
        block = np.asarray(vectors[start:start + block_rows], dtype=np.float32)
        scores = queries @ block.T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < scores.shape[1] \
            else np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, part, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, part.astype(np.int64) + start], axis=1)
        best_s, best_i = _top_k(cand_s, cand_i, k)
    return best_s, best_i


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k per row of candidate lists; ties broken by the lower id."""
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _as_queries(queries: np.ndarray, dim: int | None) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise ValueError(f"queries must be a [Q, D] array, got shape {q.shape}")
    if dim is not None and q.shape[1] != dim:
        raise ValueError(f"queries have {q.shape[1]} dimensions, the index has {dim}")
    if not np.all(np.isfinite(q)):
        raise ValueError("queries contain NaN or infinite values")
    return np.ascontiguousarray(q, dtype=np.float32)


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
            q = _as_queries(queries, self.dim)[0]
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
        call, and the merge is one sort of at most (shards searched) x k candidates."""
        k = min(int(k), self.num_vectors)
        positions = (self._route_one(query) if self.routing is not None
                     and self.routing.budget < len(self.shards) else range(len(self.shards)))
        part_s: list[np.ndarray] = []
        part_r: list[np.ndarray] = []
        for j in positions:
            shard = self.shards[j]
            if shard.num_vectors == 0:
                continue
            s, r = self._search_shard_one(shard, query, min(k, shard.num_vectors))
            part_s.append(s)
            offset = int(self.offsets[j])
            part_r.append(np.where(r >= 0, r + offset, -1) if offset else r)
        if len(part_s) == 1 and part_s[0].shape[0] == k:
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
        queries = _as_queries(queries, self.dim)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), self.num_vectors)
        mask = route_mask(queries, self.routing.partitions, [s.shard for s in self.shards],
                          self.routing.budget)
        todo = [(j, offset, shard) for j, (offset, shard)
                in enumerate(zip(self.offsets[:-1], self.shards))
                if shard.num_vectors > 0 and mask[:, j].any()]

        def run(j: int, shard: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            sub = np.flatnonzero(mask[:, j])
            s, r = self._search_shard(shard, queries[sub], min(k, shard.num_vectors))
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
        return _top_k_rows(scores, rows, k)

    def _merged_top_k(self, queries: np.ndarray, k: int,
                      search_shard: Callable[[Any, np.ndarray, int],
                                             tuple[np.ndarray, np.ndarray]]
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Each non-empty shard's top-k by `search_shard`, merged into the global top-k."""
        queries = _as_queries(queries, self.dim)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), self.num_vectors)
        todo = [(offset, shard) for offset, shard in zip(self.offsets[:-1], self.shards)
                if shard.num_vectors > 0]
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
        return _top_k_rows(scores, rows, k)

    @staticmethod
    def _search_shard(shard: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One shard's top-k (local rows, -1 / -inf padding where ScaNN found fewer).

        A shard whose ScaNN reorders with int8 / bfloat16 vectors returns approximate
        scores: it is asked for RESCORE_FACTOR x k neighbours, which are rescored exactly
        with the shard's stored float32 vectors, so every shard's scores are exact dot
        products and merging shards by score compares like with like.
        """
        rescore = getattr(shard, "quantized_reorder", False)
        if rescore:
            wanted = k
            k = min(int(shard.num_vectors), RESCORE_FACTOR * k)
        brute = shard.kind == "scann_brute_force"
        pre = -1 if brute else max(k, reorder_pool(shard, wanted if rescore else k))
        leaves = -1 if brute else shard.leaves_to_search
        if queries.shape[0] == 1:
            idx, dist = shard.searcher.search(queries[0], k, pre, leaves)
            idx = np.asarray(idx, np.int64)[None, :]
            dist = np.asarray(dist, np.float32)[None, :]
        else:
            idx, dist = shard.searcher.search_batched(queries, k, pre if pre > 0 else None,
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
            return _rescore(shard.vectors(), queries, dist, idx, wanted)
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
        hit = _new_hit(Hit)
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


def _rescore(vectors: np.ndarray, queries: np.ndarray, dist: np.ndarray, idx: np.ndarray,
             k: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates [Q, m] rescored with exact dot products of `vectors`; the best k."""
    valid = idx >= 0
    flat = np.where(valid, idx, 0).reshape(-1)
    order = np.argsort(flat, kind="stable")  # sorted gather: sequential reads of the map
    gathered = np.empty((flat.size, vectors.shape[1]), np.float32)
    gathered[order] = np.asarray(vectors[flat[order]], np.float32)
    exact = np.einsum("qd,qmd->qm", queries, gathered.reshape(idx.shape[0], idx.shape[1], -1))
    exact = np.where(valid, exact, -np.inf).astype(np.float32)
    return _top_k_rows(exact, idx, k)


def _top_k_rows(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    # Padding (-1) sorts last among equal -inf scores because lexsort breaks ties on rows
    # ascending; map it to a large key so real rows win ties.
    key_rows = np.where(rows < 0, np.iinfo(np.int64).max, rows)
    order = np.lexsort((key_rows, -scores), axis=1)[:, :k]
    return (np.take_along_axis(scores, order, axis=1).astype(np.float32),
            np.take_along_axis(rows, order, axis=1))
