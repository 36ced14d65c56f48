"""Benchmark of build_index + ShardedSearcher on synthetic clustered vectors.

    .venv/bin/python benchmarks/index_bench.py --num-vectors 1000000 --dims 1280,256 \
        --shards 1,8 --workdir out/index-bench --out out/index-bench/results.json

For every dimension, in one run: a snapshot of clustered unit vectors is written, then
run_build_index builds it with each shard count on the multi-process DirectRunner (2
workers), and the published version is measured: build wall time, recall@10 of the
sharded ScaNN index against exact search on held-out queries (same distribution, not in
the index), queries/s batched (all queries in one call) and single-query, for ScaNN
(ShardedSearcher), numpy brute force (sharded_search.search_exact) and a peer library
(faiss-cpu HNSW, inner product, efSearch raised until its recall reaches ScaNN's
1-shard recall). Searches run on one thread for every library. Peak memory: max RSS of
this process and of the largest finished child (Beam worker) process.

faiss-cpu is installed into the venv for the benchmark only (`pip install faiss-cpu`);
it is not a project dependency. Without it the peer columns are skipped.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import shutil
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import filesystem as fs  # noqa: E402
from pipelines import index_artifact as art  # noqa: E402
from pipelines import snapshot  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.index_build import run_build_index  # noqa: E402
from pipelines.sharded_search import ShardedSearcher, search_exact  # noqa: E402

log = logging.getLogger("index_bench")
K = 10


def clustered(n: int, dim: int, centres: np.ndarray, seed: int, spread: float) -> np.ndarray:
    """Unit vectors around `centres`, generated in chunks (bounded temporary memory)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 65536):
        m = min(65536, n - start)
        v = centres[rng.integers(0, len(centres), m)] + spread * rng.standard_normal(
            (m, dim), dtype=np.float32)
        out[start:start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def write_bench_snapshot(path: str, vectors: np.ndarray) -> None:
    n, dim = vectors.shape
    ids = [f"img{i:08d}" for i in range(n)]
    table = pa.table({
        "image_id": ids, "product_id": [f"P{i // 4:08d}" for i in range(n)],
        "image_uri": pa.nulls(n, pa.string()), "content_sha256": pa.nulls(n, pa.string()),
        "model_id": ["bench@synthetic"] * n, "view": ["original"] * n,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        "metadata": pa.nulls(n, pa.string())}, schema=snapshot.embeddings_schema(dim))
    snapshot.write_table(path, table)
    fs.write_json(fs.join(path, snapshot.SUMMARY_FILE), {
        "model": {"model_id": "bench@synthetic", "dim": dim, "handle": "synthetic"},
        "dim": dim, "run_id": os.path.basename(path)})


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def qps(fn, queries: np.ndarray, single: int) -> tuple[float, float]:
    """(batched queries/s over all queries, single-query queries/s over `single` queries)."""
    fn(queries[:8])  # warm-up
    t = time.perf_counter()
    fn(queries)
    batched = len(queries) / (time.perf_counter() - t)
    t = time.perf_counter()
    for q in queries[:single]:
        fn(q[None, :])
    return batched, single / (time.perf_counter() - t)


def peak_rss_mb() -> dict[str, float]:
    return {"this_process_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "largest_child_mb": round(
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def bench_faiss(vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray,
                target: float, single: int) -> dict[str, Any]:
    try:
        import faiss
    except ImportError:
        return {"skipped": "faiss-cpu not installed (pip install faiss-cpu)"}
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t = time.time()
    index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(vectors)
    build_s = time.time() - t
    faiss.omp_set_num_threads(1)
    chosen = None
    for ef in (16, 32, 64, 128, 256, 512, 1024):
        index.hnsw.efSearch = ef
        _, idx = index.search(queries, K)
        r = recall_at_k(idx, exact)
        chosen = (ef, r)
        if r >= target:
            break
    index.hnsw.efSearch = chosen[0]
    batched, one = qps(lambda q: index.search(q, K), queries, single)
    return {"library": f"faiss-cpu {faiss.__version__} IndexHNSWFlat(M=32, efConstruction=80)",
            "build_seconds": round(build_s, 2), "build_threads": os.cpu_count(),
            "efSearch": chosen[0], "recall@10": round(chosen[1], 4),
            "qps_batched": round(batched, 1), "qps_single": round(one, 1)}


def run_dim(dim: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(dim)
    centres = rng.standard_normal((args.clusters, dim)).astype(np.float32)
    t = time.time()
    vectors = clustered(args.num_vectors, dim, centres, seed=1, spread=args.spread)
    queries = clustered(args.queries, dim, centres, seed=2, spread=args.spread)
    snap_path = os.path.join(args.workdir, f"snap-{dim}")
    shutil.rmtree(snap_path, ignore_errors=True)
    write_bench_snapshot(snap_path, vectors)
    gen_s = time.time() - t
    t = time.time()
    _, exact = search_exact(vectors, queries, K)
    exact_s = time.time() - t
    result: dict[str, Any] = {"dim": dim, "num_vectors": args.num_vectors,
                              "queries": args.queries, "generate_seconds": round(gen_s, 1)}
    bf_batched, bf_single = qps(lambda q: search_exact(vectors, q, K), queries,
                                min(args.single_queries, 50))
    result["numpy_brute_force"] = {"qps_batched": round(bf_batched, 1),
                                   "qps_single": round(bf_single, 1),
                                   "exact_ground_truth_seconds": round(exact_s, 2)}
    result["scann"] = {}
    for shards in args.shards:
        root = os.path.join(args.workdir, f"index-{dim}-{shards}")
        shutil.rmtree(root, ignore_errors=True)
        config = load_config(args.config, overrides={
            # tree-AH for every shard, so 1 and N shards compare the same kind of search
            "index": {"shards": shards, "brute_force_below": 0},
            "runner": {"direct_running_mode": "multi_processing", "direct_num_workers": 2}})
        t = time.time()
        manifest = run_build_index(snap_path, root, config)
        build_s = time.time() - t
        searcher = ShardedSearcher(art.open_index(root).load_shards())
        _, rows = searcher.search(queries, K)
        found = np.array([[int(searcher.image_ids[r][3:]) if r >= 0 else -1 for r in row]
                          for row in rows])
        batched, one = qps(lambda q, s=searcher: s.search(q, K), queries, args.single_queries)
        result["scann"][str(shards)] = {
            "build_wall_seconds": round(build_s, 1),
            "beam_seconds": manifest["build"]["beam_seconds"],
            "shard_build_seconds": [s["build_seconds"] for s in manifest["shards"]],
            "kinds": sorted({s["kind"] for s in manifest["shards"]}),
            "leaves_to_search": [s.get("search", {}).get("leaves_to_search")
                                 for s in manifest["shards"]],
            "num_leaves": [s.get("num_leaves") for s in manifest["shards"]],
            "gate_recall@10": manifest["evaluation"]["recall@10"],
            "recall@10": round(recall_at_k(found, exact), 4),
            "qps_batched": round(batched, 1), "qps_single": round(one, 1)}
        log.info("dim %d, %d shards: %s", dim, shards, result["scann"][str(shards)])
        del searcher
        gc.collect()
        shutil.rmtree(root, ignore_errors=True)
    first = result["scann"][str(args.shards[0])]
    if not args.no_peer:
        result["peer"] = bench_faiss(vectors, queries, exact, first["recall@10"],
                                     args.single_queries)
    last = result["scann"][str(args.shards[-1])]
    result["ratios"] = {
        f"qps_batched_{args.shards[-1]}_vs_{args.shards[0]}_shards":
            round(last["qps_batched"] / first["qps_batched"], 3),
        f"qps_single_{args.shards[-1]}_vs_{args.shards[0]}_shards":
            round(last["qps_single"] / first["qps_single"], 3),
        "scann_1shard_vs_brute_force_batched": round(first["qps_batched"] / bf_batched, 1),
        "scann_1shard_vs_brute_force_single": round(first["qps_single"] / bf_single, 1),
        f"build_{args.shards[0]}_vs_{args.shards[-1]}_shards":
            round(first["build_wall_seconds"] / last["build_wall_seconds"], 3)}
    peer = result.get("peer") or {}
    if "qps_batched" in peer:
        result["ratios"]["scann_1shard_vs_peer_batched"] = round(
            first["qps_batched"] / peer["qps_batched"], 2)
        result["ratios"]["scann_1shard_vs_peer_single"] = round(
            first["qps_single"] / peer["qps_single"], 2)
    shutil.rmtree(snap_path, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-vectors", type=int, default=1_000_000)
    p.add_argument("--dims", default="1280,256", help="comma-separated dimensions")
    p.add_argument("--shards", default="1,8", help="comma-separated shard counts")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single-queries", type=int, default=300,
                   help="queries timed one at a time")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.5, help="noise around cluster centres")
    p.add_argument("--config", help="YAML config deep-merged over configs/default.yaml")
    p.add_argument("--workdir", default="out/index-bench")
    p.add_argument("--out", help="write the results JSON here too")
    p.add_argument("--no-peer", action="store_true", help="skip the faiss comparison")
    args = p.parse_args(argv)
    args.dims = [int(d) for d in args.dims.split(",")]
    args.shards = [int(s) for s in args.shards.split(",")]
    if args.num_vectors < 1 or args.queries < 1 or any(s < 1 for s in args.shards):
        p.error("--num-vectors, --queries and shard counts must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.makedirs(args.workdir, exist_ok=True)
    started = time.time()
    results = {"command": " ".join(sys.argv), "cpus": os.cpu_count(),
               "runner": "DirectRunner (FnApiRunner multi_processing, 2 workers)", "dims": []}
    for dim in args.dims:
        results["dims"].append(run_dim(dim, args))
        gc.collect()
    results["peak_memory"] = peak_rss_mb()
    results["total_seconds"] = round(time.time() - started, 1)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
