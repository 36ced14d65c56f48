"""build_index, step 4: the recall gate.

Each built shard answers the gate queries on the workers (gate_shard: through the reader,
with the serving code path, and exactly); the launcher merges the Q x shards x k lists
into recall@1, recall@k and the own-row found rate (merge_gate). Below the threshold the
version is rejected (RecallGateError) and LATEST is not touched.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.core import filesystem as fs
from pipelines.index import artifact as art
from pipelines.index.sharded_search import ShardedSearcher, search_exact

from pipelines.index.build_plan import BuildSpec
from pipelines.index.reader import IndexVersion
from pipelines.core.errors import RefusedError

# Score slack when deciding whether a returned neighbour ties with the k-th exact one.
TIE_EPSILON = 1e-5


class RecallGateError(RefusedError):
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


def sample_queries(sample: list[tuple], dim: int) -> np.ndarray:
    """The query vectors [Q, dim] of a gate / tuning sample (ReadSplit's side input)."""
    if not sample:
        return np.zeros((0, dim), np.float32)
    return np.stack([np.frombuffer(s[3], np.float32) for s in sample])


def tie_aware_found(true_scores: np.ndarray, kth_exact: np.ndarray) -> np.ndarray:
    """Per query, how many returned rows score at least the k-th exact score."""
    return (true_scores >= kth_exact[:, None] - TIE_EPSILON).sum(axis=1)


def gate_shard(report: dict[str, Any], spec: BuildSpec, sample: list[tuple]) -> None:
    """GateShard (worker): a built shard's approximate and exact top-k for the gate queries.

    The shard is reopened through the reader (checksums verified) and searched with the
    serving code path. Writes gate-XXXXX.json: per query the approximate top-k (search
    scores, true dot products, "image_id\\0view" ids) and the exact top-k scores.
    """
    shard = report["shard"]
    queries = sample_queries(sample, spec.dim)
    out: dict[str, Any] = {"shard": shard, "queries": len(queries)}
    if report.get("num_vectors"):
        # the reader on a one-shard view of the version being built (no manifest yet)
        partial = art.IndexManifest(
            version=spec.version, status="building", model=spec.model or {}, dim=spec.dim,
            num_vectors=report["num_vectors"],
            shards=[art.ShardEntry.from_dict(report, f"shard {shard} build report")])
        version = IndexVersion(spec.index_root, spec.version, partial, verify=True)
        loaded = version.load_shards([0])[0]
        k = min(spec.k, loaded.num_vectors)
        scores, rows = ShardedSearcher._search_shard(loaded, queries, k)
        vectors = loaded.vectors()
        valid = rows >= 0
        true = np.einsum("qd,qkd->qk", queries,
                         np.asarray(vectors[np.where(valid, rows, 0).reshape(-1)],
                                    np.float32).reshape(len(queries), k, spec.dim))
        exact, _ = search_exact(vectors, queries, k)
        ids = loaded.rows.column("image_id").to_pylist()
        vws = loaded.rows.column("view").to_pylist()
        out.update(
            approx_scores=np.where(valid, scores, -np.inf).tolist(),
            approx_true=np.where(valid, true, -np.inf).tolist(),
            approx_ids=[[f"{ids[r]}\0{vws[r]}" if r >= 0 else "" for r in row] for row in rows],
            exact_scores=exact.tolist())
    fs.write_json(spec.gate_uri(shard), out)


def merge_gate(results: list[dict[str, Any]], sample_ids: list[str], k: int,
               routes: list[list[int]] | None = None, budget: int | None = None
               ) -> dict[str, float]:
    """recall@1, recall@k and own-row found rate from the shards' Q x k gate lists.

    With `routes` (per query its shards, best first: partition routing) only the first
    `budget` shards of each query answer it, as in serving."""
    results = [r for r in results if "approx_scores" in r]
    q = len(sample_ids)
    if not q or not results:
        return {"recall@1": 0.0, f"recall@{k}": 0.0, "self_found": 0.0}

    def stack(name: str) -> np.ndarray:
        parts = []
        for r in results:
            a = np.asarray(r[name], np.float32)
            pad = k - a.shape[1]
            parts.append(np.pad(a, ((0, 0), (0, pad)), constant_values=-np.inf) if pad else a)
        return np.concatenate(parts, axis=1)

    approx, true, exact = stack("approx_scores"), stack("approx_true"), stack("exact_scores")
    if routes and budget is not None:
        routed = np.asarray(routes, np.int64)[:, :budget]
        shard_of_column = np.repeat([int(r["shard"]) for r in results], k)
        answers = (shard_of_column[None, :, None] == routed[:, None, :]).any(axis=2)
        approx = np.where(answers, approx, -np.inf)
        true = np.where(answers, true, -np.inf)
    ids = np.concatenate([np.asarray([row + [""] * (k - len(row)) for row in r["approx_ids"]],
                                     dtype=object) for r in results], axis=1)
    exact = -np.sort(-exact, axis=1)
    order = np.argsort(-approx, axis=1, kind="stable")[:, :k]
    top_true = np.take_along_axis(true, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    out = {}
    for kk in sorted({1, k}):
        found = tie_aware_found(top_true[:, :kk], exact[:, kk - 1])
        out[f"recall@{kk}"] = round(float(np.minimum(found, kk).mean() / kk), 6)
    out["self_found"] = round(float(np.mean([sid in row for sid, row in
                                             zip(sample_ids, top_ids)])), 6)
    return out
