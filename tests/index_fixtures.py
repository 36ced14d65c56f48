"""Index test helpers shared by the index, search and reliability tests: clustered unit
vectors, complete embeddings snapshots as the embed job writes them (Parquet +
summary.json), a build config on the in-process runner, and exact neighbours."""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import pyarrow as pa

from pipelines.core.config import Config, load_config
from pipelines.embed import snapshot
from pipelines.embed.summary import SnapshotSummary
from pipelines.index.sharded_search import search_exact

MODEL_ID = "testmodel@0123456789ab"



def clustered_vectors(n: int, dim: int, seed: int = 0, clusters: int | None = None,
                      spread: float = 0.3) -> np.ndarray:
    """Unit vectors around random centres (clusters=0: uniform on the sphere)."""
    rng = np.random.default_rng(seed)
    clusters = max(1, n // 50) if clusters is None else clusters
    if clusters == 0:
        v = rng.standard_normal((n, dim)).astype(np.float32)
    else:
        centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        v = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal(
            (n, dim)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def snapshot_table(vectors: np.ndarray, image_ids: Sequence[str] | None = None,
                   views: Sequence[str] | None = None, model_id: str = MODEL_ID) -> pa.Table:
    n, dim = vectors.shape
    ids = list(image_ids) if image_ids is not None else [f"img{i:06d}" for i in range(n)]
    return pa.table({
        "image_id": ids,
        "product_id": [f"P{int(i[3:]) // 3:05d}" if i[3:].isdigit() else f"P-{i}" for i in ids],
        "image_uri": [f"file:///catalog/{i}.jpg" for i in ids],
        "content_sha256": ["0" * 64] * n,
        "model_id": [model_id] * n,
        "view": list(views) if views is not None else ["original"] * n,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        "metadata": [json.dumps({"title": f"item {i}", "category": "c" + str(k % 3)})
                     for k, i in enumerate(ids)],
    }, schema=snapshot.embeddings_schema(dim))


def write_snapshot(path: str, vectors: np.ndarray, image_ids: Sequence[str] | None = None,
                   views: Sequence[str] | None = None, model_id: str = MODEL_ID,
                   table: pa.Table | None = None) -> str:
    """A complete embeddings snapshot folder (Parquet + summary.json), as the embed job writes."""
    dim = int(vectors.shape[1]) if vectors is not None else 0
    if table is None:
        table = snapshot_table(vectors, image_ids, views, model_id)
    snapshot.write_table(path, table)
    snapshot.write_summary(path, summary_for(
        os.path.basename(path), table.num_rows, dim, model_id,
        {"handle": "test", "model_id": model_id, "dim": dim, "input_size": 64,
         "fingerprint": "0123456789ab" * 4}))
    return path


def summary_for(run_id: str, rows: int, dim: int, model_id: str = MODEL_ID,
                 model: dict | None = None) -> SnapshotSummary:
    """The summary of a snapshot whose `rows` rows were all embedded (the contract's
    required fields)."""
    return SnapshotSummary(run_id=run_id, input_rows=rows, embedded=rows, reused=0,
                           dead_lettered=0, model_id=model_id, dim=dim,
                           model=model or {"handle": "test", "model_id": model_id, "dim": dim})


def make_config(**index) -> Config:
    """In-process DirectRunner (FnApiRunner in_memory) unless the test asks otherwise."""
    runner = index.pop("runner", {"direct_running_mode": "in_memory", "direct_num_workers": 1})
    return load_config(overrides={"runner": runner, "index": {"eval_queries": 200, **index}})


def exact_ids(snapshot_path: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, list]:
    snap = snapshot.load(snapshot_path)
    scores, idx = search_exact(snap.vectors(), queries, k)
    ids = snap.table.column("image_id").to_pylist()
    return scores, [[ids[i] for i in row] for row in idx]
