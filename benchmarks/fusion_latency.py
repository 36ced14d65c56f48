"""Latency of photo-only vs photo + text search on a published index (in process).

    python benchmarks/fusion_latency.py --index-root IDX --queries LABELLED.csv \\
        --vector-cache DIR [--text-from category] [--n 300]

Query vectors come from `catalog-search evaluate --vector-cache DIR` (so the model is not
timed: only search, fusion and product collapse). Prints p50/p90/p99 in ms as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index-root", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--vector-cache", required=True)
    p.add_argument("--text-from", default="category")
    p.add_argument("--n", type=int, default=300)
    args = p.parse_args(argv)
    from pipelines.core.config import load_config
    from pipelines.embed.manifest import read_rows
    from serving.evaluate import query_text
    from serving.evaluate_queries import load_vector_cache, vector_cache_file
    from serving.searcher import CatalogSearcher
    config = load_config()
    searcher = CatalogSearcher.open(args.index_root, config=config, load_embedder=False)
    idx = searcher.current
    cache = load_vector_cache(vector_cache_file(args.vector_cache, args.queries,
                                                idx.manifest.model))
    rows = [r for r in read_rows(0, args.queries) if not r.get("error")
            and r["image_uri"] in cache][:: max(1, 2485 // args.n)][:args.n]
    if not rows:
        raise SystemExit("no cached query vectors for this index's model: run evaluate first")
    out = {"index_root": args.index_root, "num_vectors": idx.num_vectors, "queries": len(rows)}
    for name, text in (("photo", None), (f"photo+text({args.text_from})", args.text_from)):
        times = []
        for r in rows:
            t0 = time.perf_counter()
            searcher.search_vector(cache[r["image_uri"]], k=10,
                                   text=query_text(r, text) if text else None)
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = {f"p{q}": round(float(np.percentile(times, q)), 2) for q in (50, 90, 99)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
