"""Crowded queries' latency vs today's collapsed queries, in process (issue 21).

    .venv/bin/python benchmarks/crowding_bench.py --index-root /tmp/dupscale/index-100000 \
        --queries 400 --out benchmarks/results/crowding_bench-100k.json

Opens the published index with serving's CatalogSearcher (no query model: vector and
similar-product queries; a photo query is the same ranking walk after the embed) and
times, per query, every mode in turn (interleaved, so that load on a shared machine
hits every mode alike): today's default (collapsed to products), crowding by product_id
(max 2 images per product: replaces the collapse), and crowding by seller and by brand
(collapsed, then at most N products per seller / brand). Vector queries are stored
vectors plus small noise; similar-product queries name random products. p50/p99 per
mode and kind; target: crowded p99 within 1.2x of the collapsed p99.
The index needs `seller` and `brand` metadata (benchmarks/duplicates_scale.py writes them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = {
    "collapsed": {},
    "product_id<=2": {"group_by": "product_id", "max_per_group": 2},
    "seller<=2": {"group_by": "seller", "max_per_group": 2},
    "brand<=1": {"group_by": "brand", "max_per_group": 1},
}


def _stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3),
            "mean_ms": round(float(a.mean()), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index-root", required=True)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args()
    from pipelines.core.config import load_config
    from serving.searcher import CatalogSearcher
    config = load_config()
    t0 = time.perf_counter()
    searcher = CatalogSearcher.open(args.index_root, config=config, load_embedder=False)
    load_s = time.perf_counter() - t0
    idx = searcher.current
    rng = np.random.default_rng(0)
    rows = rng.choice(idx.num_vectors, args.queries, replace=False)
    vectors = idx.vectors_of(rows)
    vectors = (vectors + rng.normal(scale=0.02, size=vectors.shape)).astype(np.float32)
    products = [idx.product_id(int(r)) for r in rng.choice(idx.num_vectors, args.queries)]
    kinds = {
        "vector": lambda i, **kw: searcher.search_vector(vectors[i], k=args.k, **kw),
        "similar product": lambda i, **kw: searcher.similar_to(product_id=products[i],
                                                               k=args.k, **kw),
    }
    results: dict = {}
    for kind, fn in kinds.items():
        for i in range(min(5, args.queries)):  # warm-up
            for kw in MODES.values():
                fn(i, **kw)
        lat: dict[str, list[float]] = {m: [] for m in MODES}
        short: dict[str, int] = {m: 0 for m in MODES}
        for i in range(args.queries):
            for mode, kw in MODES.items():
                t = time.perf_counter()
                res = fn(i, **kw)
                lat[mode].append(time.perf_counter() - t)
                short[mode] += len(res.hits) < args.k
        stats = {m: {**_stats(v), "queries_with_fewer_than_k": short[m]}
                 for m, v in lat.items()}
        base = stats["collapsed"]["p99_ms"]
        for m in MODES:
            stats[m]["p99_to_collapsed"] = round(stats[m]["p99_ms"] / base, 3)
        results[kind] = stats
        print(kind, json.dumps(stats), flush=True)
    out = {"command": " ".join(["python"] + sys.argv), "index_root": args.index_root,
           "version": idx.version, "num_vectors": idx.num_vectors, "k": args.k,
           "load_seconds": round(load_s, 1), "modes": MODES, "results": results,
           "worst_crowded_p99_to_collapsed": max(
               s["p99_to_collapsed"] for r in results.values()
               for m, s in r.items() if m != "collapsed")}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps({"worst_crowded_p99_to_collapsed": out["worst_crowded_p99_to_collapsed"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
