"""Shared projection vs ScaNN's per-shard PCA, 1 and 8 shards, one run (issue 18).

    .venv/bin/python benchmarks/projection_ab.py --fit FIT.npz --num-vectors 50000 \\
        --workdir /tmp/pab --out benchmarks/results/projection_ab-50k.json

Data as benchmarks/index_bench.py (--fit draws, seeds 1 / 2). Builds (in-process Beam,
current defaults, tree-AH on every shard) 1 hash shard with the shared projection, and 8
partition shards with the shared projection and with ScaNN's own PCA per shard
(index.shared_projection false); an index already in --workdir is reused. Each is searched
through ShardedSearcher with the routing budget covering every shard, over a small grid
(leaves fraction x reorder multiplier): recall@10 vs exact, batched q/s (the shard pool)
and single-query q/s (ShardedSearcher.search(q[None], 10)). At each --targets recall the
fastest point per path is reported. One search thread per call; the machine may be
shared: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from index_bench import recall_at_k, write_bench_snapshot  # noqa: E402

K = 10
INDEXES = {"shared-1": ("hash", 1, True), "shared-partition-8": ("partition", 8, True),
           "scann-pca-partition-8": ("partition", 8, False)}
GRID = [(f, m) for m in (2, 4, 10) for f in (0.01, 0.02, 0.04, 0.08, 0.16)]


def build(snap: str, root: str, assignment: str, shards: int, shared: bool) -> None:
    from pipelines.core.config import load_config
    from pipelines.index.build import run_build_index
    config = load_config(overrides={
        "index": {"shards": shards, "brute_force_below": 0, "eval_queries": 500,
                  "shard_assignment": assignment, "shared_projection": shared},
        "runner": {"direct_running_mode": "in_memory", "direct_num_workers": 1}})
    run_build_index(snap, root, config)


def bench(root: str, queries: np.ndarray, exact: np.ndarray, single: int, repeats: int
          ) -> dict[str, Any]:
    from pipelines.index import reader
    from pipelines.index.sharded_search import ShardedSearcher
    opened = reader.open_index(root)
    shards = opened.load_shards()
    routing = opened.routing()
    ss = ShardedSearcher(shards, routing=routing)
    if routing is not None:
        routing.budget = len(shards)  # the full fan-out: every shard searched
    image_row = np.array([int(i[3:]) for i in ss.image_ids] + [-1])
    points = []
    for fraction, mult in GRID:
        for s in shards:
            s.leaves_to_search = max(1, math.ceil(fraction * s.info.num_leaves))
            s.reorder_multiplier = mult
        _, rows = ss.search(queries, K)
        r = recall_at_k(image_row[rows], exact)
        best_b = best_s = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            ss.search(queries, K)
            best_b = max(best_b, len(queries) / (time.perf_counter() - t))
            t = time.perf_counter()
            for q in queries[:single]:
                ss.search(q[None], K)
            best_s = max(best_s, single / (time.perf_counter() - t))
        points.append({"leaves_fraction": fraction, "reorder_multiplier": mult,
                       "recall@10": round(r, 4), "qps_batched": round(best_b, 1),
                       "qps_single": round(best_s, 1)})
    m = opened.manifest
    return {"version": m.version, "shards": len(shards), "format": m.format,
            "projection": [(s.info.options or {}).get("projection") for s in shards],
            "build_seconds": m.build.get("total_seconds"), "gate_recall@10": m.recall(10),
            "curve": points}


def at_targets(entry: dict[str, Any], targets: list[float]) -> dict[str, Any]:
    out = {}
    for t in targets:
        ok = [p for p in entry["curve"] if p["recall@10"] >= t]
        out[f"{t:.2f}"] = None if not ok else {
            "batched": max(ok, key=lambda p: p["qps_batched"]),
            "single": max(ok, key=lambda p: p["qps_single"])}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fit", required=True)
    p.add_argument("--num-vectors", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--single-queries", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--targets", default="0.90,0.95,0.99")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out")
    args = p.parse_args(argv)
    targets = [float(t) for t in args.targets.split(",")]
    from fitted_vectors import Fit, draw

    from pipelines.index.sharded_search import search_exact
    started = time.time()
    f = Fit.load(args.fit)
    vectors = draw(f, args.num_vectors, seed=1)
    queries = draw(f, args.queries, seed=2)
    _, exact = search_exact(vectors, queries, K)
    os.makedirs(args.workdir, exist_ok=True)
    snap = os.path.join(args.workdir, "snap")
    if not os.path.exists(snap):
        write_bench_snapshot(snap, vectors)
    del vectors
    results: dict[str, Any] = {"command": " ".join(sys.argv), "cpus": os.cpu_count(),
                               "num_vectors": args.num_vectors, "queries": args.queries,
                               "single_queries": args.single_queries, "indexes": {}}
    for name, (assignment, shards, shared) in INDEXES.items():
        root = os.path.join(args.workdir, f"index-{name}")
        if not os.path.exists(os.path.join(root, "LATEST")):
            build(snap, root, assignment, shards, shared)
        entry = bench(root, queries, exact, args.single_queries, args.repeats)
        entry["at_recall"] = at_targets(entry, targets)
        results["indexes"][name] = entry
        print(name, json.dumps(entry["at_recall"]), flush=True)
    one = results["indexes"]["shared-1"]["at_recall"]
    ratios: dict[str, Any] = {}
    for name in ("shared-partition-8", "scann-pca-partition-8"):
        per = {}
        for t, a in results["indexes"][name]["at_recall"].items():
            if a is None or one.get(t) is None:
                per[t] = None
                continue
            per[t] = {"vs_1_shard_batched": round(a["batched"]["qps_batched"]
                                                  / one[t]["batched"]["qps_batched"], 3),
                      "vs_1_shard_single": round(a["single"]["qps_single"]
                                                 / one[t]["single"]["qps_single"], 3)}
        ratios[name] = per
    results["ratios"] = ratios
    results["total_seconds"] = round(time.time() - started, 1)
    text = json.dumps(results, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(json.dumps(ratios, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
