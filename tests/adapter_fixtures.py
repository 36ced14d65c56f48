"""Generated vectors for the adapter tests (imported by tests/test_adapter*.py; no tests).

A catalog whose raw features confuse products: each image's vector is dominated by one
of a few shared "backgrounds" (nuisance directions common to many products), while the
product's own direction is weaker. Exact search on the raw vectors then mostly finds an
image of another product on the same background; a linear projection that drops the
background subspace separates the products, and it generalises to products it never saw.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from pipelines.embed import snapshot

MODEL_ID = "testmodel@0123456789ab"
FINGERPRINT = "0123456789ab" * 4
DIM = 32
BACKGROUNDS = 8


def confusing_vectors(products: Sequence[int], per_product: int, seed: int,
                      dim: int = DIM, product_weight: float = 0.3, noise: float = 0.08
                      ) -> tuple[np.ndarray, list[str]]:
    """Unit vectors [len(products) * per_product, dim] and their product ids."""
    basis = np.random.default_rng(1234)  # fixed: the same products and backgrounds per call
    directions = basis.standard_normal((1000, dim))
    backgrounds = directions[:BACKGROUNDS]
    product_dirs = directions[BACKGROUNDS:]
    rng = np.random.default_rng(seed)
    vecs, pids = [], []
    for p in products:
        for _ in range(per_product):
            bg = backgrounds[rng.integers(BACKGROUNDS)]
            v = bg + product_weight * product_dirs[p] + noise * rng.standard_normal(dim)
            vecs.append(v)
            pids.append(f"P{p:03d}")
    v = np.asarray(vecs, np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32), pids


def write_snapshot(path: str, vectors: np.ndarray, product_ids: Sequence[str],
                   prefix: str = "img", fingerprint: str = FINGERPRINT,
                   model_id: str = MODEL_ID) -> str:
    """A complete embeddings snapshot (Parquet + summary.json) holding these vectors."""
    n, dim = vectors.shape
    model = {"handle": "test", "model_id": model_id, "dim": dim, "input_size": 64,
             "fingerprint": fingerprint}
    return snapshot.write_vectors(
        path, [f"{prefix}{i:05d}" for i in range(n)], list(product_ids), vectors, model,
        metadata=[json.dumps({"title": f"item {p}"}) for p in product_ids])


def confused_snapshots(root, products: Sequence[int]) -> dict:
    """Under ROOT: a catalog snapshot (4 confused images per product) and labelled query
    photos as a pairs snapshot (5 per product), with the catalog's vectors and products."""
    v, p = confusing_vectors(products, 4, seed=0)
    catalog = write_snapshot(str(root / "catalog"), v, p)
    q, qp = confusing_vectors(products, 5, seed=1)
    pairs = write_snapshot(str(root / "pairs"), q, qp, prefix="q")
    return {"root": root, "catalog": catalog, "pairs": pairs, "vectors": v,
            "products": np.asarray(p, object)}


def edit_manifest(change):
    """A damage step for the refusal tests: apply CHANGE to an adapter dir's manifest dict."""
    from pipelines.adapter.artifact import MANIFEST_FILE

    def edit(d):
        path = os.path.join(d, MANIFEST_FILE)
        meta = json.loads(open(path).read())
        change(meta)
        open(path, "w").write(json.dumps(meta))
    return edit


def adapter_config(**adapter):
    from pipelines.core.config import load_config
    return load_config(overrides={
        "runner": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
        "index": {"eval_queries": 100},
        "adapter": {"dim": 16, "epochs": 40, "learning_rate": 0.01, "products_per_batch": 8,
                    "samples_per_product": 4, "val_products": 0.2, "val_pairs": 0.2,
                    **adapter}})
