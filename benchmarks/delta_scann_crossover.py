"""Delta rows: exact search vs the in-memory ScaNN segment (serving/delta_segment.py), per
number of delta rows: where ScaNN starts to pay (serving.delta_scann_min_rows).

    .venv/bin/python benchmarks/delta_scann_crossover.py --fit FIT.npz \
        --sizes 500,1000,2000,4000,10000,20000 \
        --out benchmarks/results/delta_scann_crossover.json

For each size: N delta rows drawn from the fit (benchmarks/fitted_vectors.py; queries
around the same centres, another seed), the segment built as serving builds it (the
configured index.* builder options and serving.delta_scann_leaves_fraction; build
seconds), then single-query latency of (a) exact search over the N rows (what
DeltaIndex does below the threshold: pipelines.index.sharded_search.search_exact) and
(b) the segment's search, both asked for --fetch neighbours (about what a k=10 collapsed
query asks for), in alternating rounds on the same queries; recall@10 of (b) against (a).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from index_build_memory import write_results  # noqa: E402
from serving_bench import _percentiles  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fit", required=True, help="benchmarks/fitted_vectors.py fit (.npz)")
    p.add_argument("--sizes", default="500,1000,2000,4000,10000,20000")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--fetch", type=int, default=50)
    p.add_argument("--leaves-fraction", type=float,
                   help="override serving.delta_scann_leaves_fraction")
    p.add_argument("--out")
    args = p.parse_args()
    import dataclasses

    from fitted_vectors import Fit, draw

    from pipelines.core.config import load_config
    from pipelines.index.sharded_search import search_exact
    from serving.delta_segment import DeltaSegment, SegmentParams
    config = load_config()
    params = SegmentParams.from_config(config)
    if args.leaves_fraction:
        params = dataclasses.replace(params, leaves_fraction=args.leaves_fraction)
    fit = Fit.load(args.fit)
    queries = draw(fit, args.queries, seed=3)
    out: dict[str, Any] = {"fit": args.fit, "fetch": args.fetch, "params": dataclasses.asdict(
        params), "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
        "sizes": {}}
    for n in [int(s) for s in args.sizes.split(",")]:
        vecs = draw(fit, n, seed=4)
        rows = np.arange(n, dtype=np.int64)
        seg = DeltaSegment(vecs, rows, (), params)
        exact_t: list[float] = []
        seg_t: list[float] = []

        def run_exact(q: np.ndarray, vecs: np.ndarray = vecs) -> np.ndarray:
            return search_exact(vecs, q[None], args.fetch)[1][0]

        def run_seg(q: np.ndarray, seg: DeltaSegment = seg) -> np.ndarray:
            return seg.search(q, args.fetch)[1]

        for q in queries[:20]:
            run_exact(q)
            run_seg(q)
        found = 0
        for r in range(args.rounds):
            pairs = ((run_exact, exact_t), (run_seg, seg_t))
            for fn, samples in pairs if r % 2 == 0 else pairs[::-1]:
                for q in queries:
                    t0 = time.perf_counter()
                    fn(q)
                    samples.append(time.perf_counter() - t0)
        for q in queries:
            found += len(set(run_exact(q)[:10].tolist()) & set(run_seg(q)[:10].tolist()))
        ex, sg = _percentiles(exact_t), _percentiles(seg_t)
        out["sizes"][str(n)] = {"segment": seg.describe(), "exact": ex, "scann": sg,
                                "p50_exact_over_scann": round(ex["p50_ms"] / sg["p50_ms"], 2),
                                "p99_exact_over_scann": round(ex["p99_ms"] / sg["p99_ms"], 2),
                                "scann_recall@10_vs_exact": round(found / (10 * len(queries)),
                                                                  4)}
        print(n, out["sizes"][str(n)], flush=True)
    out["load_average_at_end"] = os.getloadavg()
    write_results(out, args.out)


if __name__ == "__main__":
    main()
