"""The shared projection (index.shared_projection): one PCA for every shard of a version.

ScaNN's own `.pca` projects each query inside each shard's searcher: a query fanned out to
8 shards paid 8 projections of 1280 x 256 (most of a small shard's single-query cost,
docs/BENCHMARKS.md, issue 18). With a shared projection the build trains one matrix P
[projection_dim, dim] on a seeded sample of the snapshot (Beam: the routing sample), every
tree-AH shard indexes P x (its vectors) without ScaNN's PCA and without ScaNN's reorder,
and the searcher projects a query once for all shards; each shard returns its pool
(reorder_pool) of candidates by asymmetric-hashing score, rescored exactly with the
shard's stored float32 vectors (`vectors.npy`), so scores stay exact dot products.

P has orthonormal rows: the top eigenvectors of the sample's second moment X^T X / n
(uncentred: it keeps the most of the vectors' energy, and so of their dot products). Each
shard folder carries its own copy (`projection.npy`, checksummed with the shard's files);
the loader shares one array between shards whose copies have the same sha256.
"""
from __future__ import annotations

import io
import os

import numpy as np

PROJECTION_FILE = "projection.npy"
SHARED = "shared"  # a shard's options["projection"] when built on the shared projection


def train_projection(sample: np.ndarray, out_dim: int) -> np.ndarray:
    """P [out_dim, dim] float32, orthonormal rows: the top eigenvectors of sample's
    second moment (sample rows that are not finite or not unit length are left out)."""
    x = np.asarray(sample, np.float64)
    ok = np.all(np.isfinite(x), axis=1) & (np.linalg.norm(x, axis=1) > 0.5)
    x = x[ok]
    if not len(x):
        raise ValueError("the projection sample is empty")
    dim = x.shape[1]
    if not 1 <= out_dim < dim:
        raise ValueError(f"projection to {out_dim} dims of {dim}-d vectors")
    values, vectors = np.linalg.eigh(x.T @ x / len(x))      # ascending
    top = vectors[:, np.argsort(-values, kind="stable")[:out_dim]].T
    # a deterministic sign per row (eigh's is arbitrary): the largest entry positive
    signs = np.sign(top[np.arange(out_dim), np.argmax(np.abs(top), axis=1)])
    return np.ascontiguousarray(top * signs[:, None], np.float32)


def projection_bytes(matrix: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(matrix, np.float32), allow_pickle=False)
    return buf.getvalue()


def save_projection(local_dir: str, matrix: np.ndarray) -> None:
    with open(os.path.join(local_dir, PROJECTION_FILE), "wb") as fh:
        fh.write(projection_bytes(matrix))


def load_projection(path: str, out_dim: int, dim: int, where: str) -> np.ndarray:
    """A shard's projection.npy, checked: float32 [out_dim, dim], finite; ValueError
    naming `where` otherwise."""
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: {PROJECTION_FILE} is not a readable array: {e}") from e
    if (matrix.dtype != np.float32 or matrix.shape != (out_dim, dim)
            or not np.all(np.isfinite(matrix))):
        raise ValueError(f"{where}: {PROJECTION_FILE} holds {matrix.dtype} "
                         f"{list(matrix.shape)}, expected float32 [{out_dim}, {dim}] finite")
    return np.ascontiguousarray(matrix)


def project(vectors: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """[N, out_dim] float32: database vectors [N, dim] through the projection
    (C-contiguous, as ScaNN takes it). Queries go through `project_queries`."""
    return np.ascontiguousarray(vectors @ matrix.T, np.float32)


def project_queries(queries: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """[Q, out_dim] float32: queries [Q, dim] through the projection, the same values
    whatever Q. A float32 matmul rounds one row (gemv) differently from many (gemm); a
    last-bit change in a projected query can swap a candidate at the edge of the reorder
    pool, so one query would not get the hits it gets in a batch. Each row is projected as
    a stack of one-row products (numpy's matmul runs one vector-matrix product per row),
    which is what a single query gets: 20-26 us for one 1280 -> 256 query, as before;
    17-21 us a row in a batch against 3-4 us a row for one gemm (measured 2026-12-04; a
    float64 product rounded once cost 72-225 us a query)."""
    q = np.asarray(queries, np.float32)
    out = (q[:, None, :] @ matrix.T)[:, 0, :]
    return np.ascontiguousarray(out, np.float32)
