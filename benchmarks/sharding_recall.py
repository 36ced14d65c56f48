"""Recall vs vectors scanned: one ScaNN tree over all vectors vs S hash-partitioned shards.

    .venv/bin/python benchmarks/sharding_recall.py --fit /tmp/grocery-fit.npz \
        --num-vectors 50000 --shards 8 --shard-leaves 28,80,224 \
        --out benchmarks/results/sharding_recall-50k.json

Why 8 shards on one host need more work than 1 shard for the same recall@10: the
database is split at random (as sha256(image_id) does), each part gets its own tree +
AH + reorder searcher, and the same number of leaves is searched in every shard; per-shard
top-10 lists are merged by score. Reports recall@10 and the vectors scanned (leaves x
leaf size x shards) for the single tree (round(sqrt(n)) leaves) and for each per-shard
leaf count.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fitted_vectors import Fit, draw  # noqa: E402
from pipelines.index.sharded_search import search_exact  # noqa: E402

K = 10


def build(x: np.ndarray, leaves: int):
    from scann.scann_ops.py import scann_ops_pybind
    return (scann_ops_pybind.builder(x, K, "dot_product")
            .tree(num_leaves=leaves, num_leaves_to_search=1, training_sample_size=len(x))
            .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(K * 10).build())


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return round(float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact)])), 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", required=True)
    ap.add_argument("--num-vectors", type=int, default=50000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-leaves", default="28,80,224")
    ap.add_argument("--leaves", default="1,2,4,8,16", help="leaves searched per tree")
    ap.add_argument("--out")
    args = ap.parse_args()
    f = Fit.load(args.fit)
    n = args.num_vectors
    v, q = draw(f, n, seed=1), draw(f, args.queries, seed=2)
    _, exact = search_exact(v, q, K)
    ladder = [int(x) for x in args.leaves.split(",")]
    one_leaves = max(2, int(round(math.sqrt(n))))
    one = build(v, one_leaves)
    result = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "num_vectors": n, "queries": args.queries, "shards": args.shards,
              "one_tree": {"num_leaves": one_leaves, "points": []}, "sharded": {}}
    for L in ladder:
        idx, _ = one.search_batched(q, K, K * 10, L)
        result["one_tree"]["points"].append({"leaves": L, "scanned": L * n // one_leaves,
                                             "recall@10": recall(np.asarray(idx), exact)})
    assign = np.random.default_rng(0).integers(0, args.shards, n)
    parts = [np.flatnonzero(assign == s) for s in range(args.shards)]
    for nl in (int(x) for x in args.shard_leaves.split(",")):
        shards = [build(v[p], nl) for p in parts]
        points = []
        for L in ladder:
            rows, scores = [], []
            for p, s in zip(parts, shards):
                idx, d = s.search_batched(q, K, K * 10, L)
                rows.append(p[np.asarray(idx)])
                scores.append(np.asarray(d))
            r, sc = np.concatenate(rows, 1), np.concatenate(scores, 1)
            top = np.take_along_axis(r, np.argsort(-sc, 1)[:, :K], 1)
            points.append({"leaves_per_shard": L, "scanned": L * n // nl,
                           "recall@10": recall(top, exact)})
        result["sharded"][str(nl)] = points
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
