"""The retrieval metrics of `catalog-search evaluate` (defined in serving/evaluate.py's
docstring): per-query recall@k / precision@1 / mAP@10 and their means. Shared by the
evaluation (serving/evaluate.py) and its HTML page (serving/evaluate_report.py)."""
from __future__ import annotations

from typing import Iterable

import numpy as np

KS = (1, 5, 10)
MAP_DEPTH = 10
METRIC_NAMES = ("recall@1", "recall@5", "recall@10", "precision@1", "mAP@10")


def average_precision(relevant_flags: list[bool], num_relevant: int, depth: int) -> float:
    denominator = min(depth, num_relevant)
    if denominator == 0:
        return 0.0
    hits, total = 0, 0.0
    for rank, rel in enumerate(relevant_flags[:depth], 1):
        if rel:
            hits += 1
            total += hits / rank
    return total / denominator


def query_metrics(product_id: str, products: list[str], images: list[str],
                  num_relevant: int) -> dict[str, float]:
    """Metrics of one query from its collapsed product list and uncollapsed image list."""
    out = {f"recall@{k}": float(product_id in products[:k]) for k in KS}
    out["precision@1"] = float(bool(images) and images[0] == product_id)
    out["mAP@10"] = average_precision([p == product_id for p in images], num_relevant,
                                      MAP_DEPTH)
    return out


def mean_metrics(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    rows = list(rows)
    if not rows:
        return {name: 0.0 for name in METRIC_NAMES}
    return {name: float(np.mean([r[name] for r in rows])) for name in METRIC_NAMES}
