"""numpy kernels of the search: exact top-k (brute force, the reference), the merge of
candidate lists into a top-k, and the exact rescoring of approximate candidates.

Re-exported by pipelines.index.sharded_search (search_exact is imported from there).
"""
from __future__ import annotations

import numpy as np

# Database rows scored per block by `search_exact` (bounds its memory to Q x block).
_EXACT_BLOCK_ROWS = 65536


def search_exact(vectors: np.ndarray, queries: np.ndarray, k: int,
                 block_rows: int = _EXACT_BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product (brute force in numpy): (scores [Q,k'], indices [Q,k']).

    k' = min(k, len(vectors)); best first; ties go to the lower index. Memory stays at
    Q x block_rows scores however large `vectors` is (it may be a memory map).
    """
    queries = as_queries(queries, vectors.shape[1] if vectors.ndim == 2 else None)
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


def as_queries(queries: np.ndarray, dim: int | None) -> np.ndarray:
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


def rescore_candidates(vectors: np.ndarray, queries: np.ndarray, dist: np.ndarray,
                       idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates [Q, m] rescored with exact dot products of `vectors`; the best k."""
    valid = idx >= 0
    flat = np.where(valid, idx, 0).reshape(-1)
    order = np.argsort(flat, kind="stable")  # sorted gather: sequential reads of the map
    gathered = np.empty((flat.size, vectors.shape[1]), np.float32)
    gathered[order] = np.asarray(vectors[flat[order]], np.float32)
    exact = exact_dots(queries, gathered.reshape(idx.shape[0], idx.shape[1], -1))
    exact = np.where(valid, exact, -np.inf).astype(np.float32)
    return top_k_rows(exact, idx, k)


def exact_dots(queries: np.ndarray, gathered: np.ndarray) -> np.ndarray:
    """[Q, m] dot products of queries [Q, d] with their candidates [Q, m, d] (one kernel
    for the batched and the single-query paths: both give the same scores)."""
    return np.matmul(gathered, queries[:, :, None])[:, :, 0]


def top_k_rows(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    # Padding (-1) sorts last among equal -inf scores because lexsort breaks ties on rows
    # ascending; map it to a large key so real rows win ties.
    key_rows = np.where(rows < 0, np.iinfo(np.int64).max, rows)
    order = np.lexsort((key_rows, -scores), axis=1)[:, :k]
    return (np.take_along_axis(scores, order, axis=1).astype(np.float32),
            np.take_along_axis(rows, order, axis=1))
