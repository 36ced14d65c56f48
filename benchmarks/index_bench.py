"""Benchmark of build_index + ShardedSearcher: queries/s at fixed recall@10, as curves.

    .venv/bin/python benchmarks/index_bench.py --num-vectors 1000000 --fit FIT.npz \
        --shards 1,8 --workdir out/index-bench --out out/index-bench/results.json
    .venv/bin/python benchmarks/index_bench.py --num-vectors 100000 --dims 1280 ...  # clustered

Data: vectors drawn from a fit to real embeddings (--fit, benchmarks/fitted_vectors.py),
or synthetic clustered unit vectors (--dims); held-out queries from the same distribution.
For each shard count, run_build_index builds the index on the multi-process DirectRunner
(2 workers; tree-AH on every shard), then one global search budget (leaves_to_search
as a fraction of each shard's num_leaves x reorder multiplier, the same on every shard)
is swept; recall@10 against exact search and batched queries/s are measured at every
point, and at each --targets recall the fastest point reaching it is reported with its
single-query rate (the ann-benchmarks way: a curve, not one operating point). The same
is done for numpy brute force (recall 1) and faiss-cpu HNSW (efSearch swept), if
installed (`pip install faiss-cpu`; not a project dependency). Every library searches on
one thread, except that ShardedSearcher searches shards concurrently (thread pool);
the build-tuned budget is also timed with shards searched sequentially.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pipelines.index import reader  # noqa: E402
from pipelines.embed import snapshot  # noqa: E402
from pipelines.core.config import load_config  # noqa: E402
from pipelines.index.build import run_build_index  # noqa: E402
from pipelines.index.sharded_search import ShardedSearcher, search_exact  # noqa: E402

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
    os.makedirs(path, exist_ok=True)
    import pyarrow.parquet as pq
    pq.write_table(table, os.path.join(path, "embeddings-00000-of-00001.parquet"),
                   row_group_size=10000)  # row groups = parallel read splits
    from pipelines.embed.summary import SnapshotSummary
    snapshot.write_summary(path, SnapshotSummary(
        run_id=os.path.basename(path), input_rows=n, embedded=n, reused=0, dead_lettered=0,
        model={"model_id": "bench@synthetic", "dim": dim, "handle": "synthetic"},
        model_id="bench@synthetic", dim=dim, snapshot=path))


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def qps(fn, queries: np.ndarray, single: int, repeats: int = 3) -> tuple[float, float]:
    """(batched queries/s over all queries, single-query queries/s over `single` queries).

    Each is the best of `repeats` timings (the machine is shared: the best run is the one
    least disturbed by other work).
    """
    fn(queries[:8])  # warm-up
    batched = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        fn(queries)
        batched = max(batched, len(queries) / (time.perf_counter() - t))
    if single <= 0:
        return batched, float("nan")
    one = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for q in queries[:single]:
            fn(q[None, :])
        one = max(one, single / (time.perf_counter() - t))
    return batched, one


def batched_qps(fn, queries: np.ndarray) -> float:
    return qps(fn, queries, 0)[0]


def peak_rss_mb() -> dict[str, float]:
    return {"this_process_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "largest_child_mb": round(
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def at_targets(points: list[dict[str, Any]], targets: list[float], measure_single
               ) -> dict[str, Any]:
    """For each recall target: the fastest (batched) swept point reaching it, plus its
    single-query rate (measured by `measure_single(point)`); None when none reaches it."""
    out: dict[str, Any] = {}
    for t in targets:
        ok = [p for p in points if p["recall@10"] >= t]
        if not ok:
            out[f"{t:.2f}"] = None
            continue
        best = max(ok, key=lambda p: p["qps_batched"])
        if "qps_single" not in best:
            best["qps_single"] = round(measure_single(best), 1)
        out[f"{t:.2f}"] = dict(best)
    return out


def bench_faiss(vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray,
                targets: list[float], single: int) -> dict[str, Any]:
    """faiss HNSW: efSearch swept; queries/s at each recall target (one search thread)."""
    try:
        import faiss
    except ImportError:
        msg = ("faiss-cpu is not installed, so this run has NO faiss HNSW comparison "
               "(it is not a project dependency: .venv/bin/pip install faiss-cpu)")
        log.warning("%s", msg)
        print(f"WARNING: {msg}", file=sys.stderr)
        return {"skipped": msg}
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t = time.time()
    rss0 = _rss_bytes()
    index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(vectors)
    build_s = time.time() - t
    ram = _rss_bytes() - rss0
    faiss.omp_set_num_threads(1)
    points = []
    for ef in (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024):
        index.hnsw.efSearch = ef
        _, idx = index.search(queries, K)
        r = recall_at_k(idx, exact)
        points.append({"efSearch": ef, "recall@10": round(r, 4),
                       "qps_batched": round(batched_qps(lambda q: index.search(q, K), queries), 1)})
        if r >= max(targets) + 0.004:
            break

    def single_rate(point: dict[str, Any]) -> float:
        index.hnsw.efSearch = point["efSearch"]
        return qps(lambda q: index.search(q, K), queries, single)[1]

    return {"library": f"faiss-cpu {faiss.__version__} IndexHNSWFlat(M=32, efConstruction=80)",
            "build_seconds": round(build_s, 2), "build_threads": os.cpu_count(),
            "ram_bytes_per_vector": round(ram / len(vectors), 1),
            "ram_note": "RSS growth of this process while the index is built (a copy of "
                        "the float32 vectors + the graph)",
            "curve": points, "at_recall": at_targets(points, targets, single_rate)}


LEAF_FRACTIONS = (0.002, 0.003, 0.005, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08, 0.12,
                  0.2, 0.3, 0.5)
REORDER_MULTIPLIERS = (2, 4, 10)
#: ScaNN builder variants (index.* overrides) this benchmark can compare (--variants).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "pca256-soar-4sqrt": {"projection_dim": 256, "soar_lambda": 1.5, "leaves_per_sqrt_n": 4.0},
    "pca256-soar-4sqrt-int8": {"projection_dim": 256, "soar_lambda": 1.5,
                               "leaves_per_sqrt_n": 4.0, "reorder_dtype": "int8"},
    "baseline": {"projection_dim": None, "soar_lambda": None, "leaves_per_sqrt_n": 1.0,
                 "reorder_dtype": "float32"},
}


def bench_scann(searcher: ShardedSearcher, queries: np.ndarray, exact: np.ndarray,
                targets: list[float], single: int, image_row: np.ndarray) -> dict[str, Any]:
    """Sweep one global budget (leaves fraction x reorder multiplier, same on every shard)."""
    shards = [s for s in searcher.shards if s.num_vectors]
    tuned = [(s.leaves_to_search, s.reorder_multiplier) for s in shards]
    routing = searcher.routing
    tuned_budget = routing.budget if routing is not None else None
    budgets = ([b for b in (1, 2, 3, 4, 6) if b < len(shards)] + [len(shards)]
               if routing is not None else [None])

    def set_budget(fraction: float, mult: int) -> None:
        for s in shards:
            if s.kind == "scann_tree_ah":
                s.leaves_to_search = max(1, math.ceil(fraction * s.info.num_leaves))
                s.reorder_multiplier = mult

    def recall() -> float:
        _, rows = searcher.search(queries, K)
        return recall_at_k(image_row[rows], exact)

    points = []
    for shard_budget in budgets:
        if routing is not None:
            routing.budget = shard_budget
        for mult in REORDER_MULTIPLIERS:
            for fraction in LEAF_FRACTIONS:
                set_budget(fraction, mult)
                r = recall()
                point = {"leaves_fraction": fraction, "reorder_multiplier": mult,
                         "recall@10": round(r, 4),
                         "qps_batched": round(batched_qps(lambda q: searcher.search(q, K),
                                                          queries), 1)}
                if routing is not None:
                    point["routing_budget"] = shard_budget
                points.append(point)
                if r >= max(targets) + 0.004:
                    break

    def single_rate(point: dict[str, Any]) -> float:
        set_budget(point["leaves_fraction"], point["reorder_multiplier"])
        if routing is not None:
            routing.budget = point["routing_budget"]
        return qps(lambda q: searcher.search(q, K), queries, single)[1]

    result = {"curve": points, "at_recall": at_targets(points, targets, single_rate)}
    for s, (leaves, mult) in zip(shards, tuned):  # the build's own (gate-tuned) budget
        s.leaves_to_search, s.reorder_multiplier = leaves, mult
    if routing is not None:
        routing.budget = tuned_budget
    b, one = qps(lambda q: searcher.search(q, K), queries, single)
    result["build_tuned"] = {"recall@10": round(recall(), 4), "qps_batched": round(b, 1),
                             "qps_single": round(one, 1)}
    return result


def make_data(dim: int, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """(database vectors, held-out queries, description) for one dimension."""
    if args.fit:
        from fitted_vectors import Fit, draw
        f = Fit.load(args.fit)
        return (draw(f, args.num_vectors, seed=1), draw(f, args.queries, seed=2),
                f"fitted to {f.source} ({f.num_vectors} real vectors): mean + PCA spectrum")
    rng = np.random.default_rng(dim)
    centres = rng.standard_normal((args.clusters, dim)).astype(np.float32)
    return (clustered(args.num_vectors, dim, centres, seed=1, spread=args.spread),
            clustered(args.queries, dim, centres, seed=2, spread=args.spread),
            f"clustered: {args.clusters} centres, spread {args.spread}")


def run_dim(dim: int, args: argparse.Namespace) -> dict[str, Any]:
    # loaded before any RSS is measured, so the first index's RAM figure is not ScaNN's
    # shared library (the builds run in worker processes)
    from scann.scann_ops.py import scann_ops_pybind  # noqa: F401
    t = time.time()
    vectors, queries, data = make_data(dim, args)
    dim = vectors.shape[1]
    snap_path = os.path.join(args.workdir, f"snap-{dim}")
    shutil.rmtree(snap_path, ignore_errors=True)
    write_bench_snapshot(snap_path, vectors)
    gen_s = time.time() - t
    t = time.time()
    _, exact = search_exact(vectors, queries, K)
    exact_s = time.time() - t
    result: dict[str, Any] = {"dim": dim, "num_vectors": args.num_vectors, "data": data,
                              "queries": args.queries, "generate_seconds": round(gen_s, 1)}
    bf_batched, bf_single = qps(lambda q: search_exact(vectors, q, K), queries,
                                min(args.single_queries, 50))
    result["numpy_brute_force"] = {"recall@10": 1.0, "qps_batched": round(bf_batched, 1),
                                   "qps_single": round(bf_single, 1),
                                   "exact_ground_truth_seconds": round(exact_s, 2)}
    result["scann"] = {}
    runs = [(v, a, n) for v in args.variants for n in args.shards
            for a in (args.assignments if n > 1 else ["hash"])
            if n == 1 or not args.multi_shard_variants or v in args.multi_shard_variants]
    for variant, assignment, shards in runs:
        name = f"{variant}/{assignment}/{shards}"
        root = os.path.join(args.workdir, f"index-{dim}-{variant}-{assignment}-{shards}")
        shutil.rmtree(root, ignore_errors=True)
        config = load_config(args.config, overrides={
            # tree-AH for every shard, so 1 and N shards compare the same kind of search
            "index": {"shards": shards, "brute_force_below": 0,
                      "eval_queries": min(500, args.num_vectors),
                      "shard_assignment": assignment, **VARIANTS[variant]},
            "runner": {"direct_running_mode": "multi_processing", "direct_num_workers": 2}})
        t = time.time()
        manifest = run_build_index(snap_path, root, config)
        build_s = time.time() - t
        rss0 = _rss_bytes()
        opened = reader.open_index(root)
        searcher = ShardedSearcher(opened.load_shards(), routing=opened.routing())
        ram = _rss_bytes() - rss0
        disk = sum(f.bytes for s in manifest.shards for f in s.files)
        ours = sum(f.bytes for s in manifest.shards for f in s.files
                   if f.name in ("vectors.npy", "rows.parquet"))
        image_row = np.array([int(i[3:]) for i in searcher.image_ids] + [-1])  # row -1 -> -1
        entry = {
            "variant": VARIANTS[variant], "shard_assignment": assignment,
            "build_wall_seconds": round(build_s, 1),
            "beam_seconds": manifest.build["beam_seconds"],
            "shard_build_seconds": [s.build_seconds for s in manifest.shards],
            "num_leaves": [s.num_leaves for s in manifest.shards],
            "shard_sizes": [s.num_vectors for s in manifest.shards],
            "tuned_search": [s.search for s in manifest.shards],
            "routing_budget": (manifest.routing or {}).get("budget"),
            "gate_recall@10": manifest.recall(10),
            "disk_bytes_per_vector": round(disk / args.num_vectors, 1),
            "disk_bytes_per_vector_scann_only": round((disk - ours) / args.num_vectors, 1),
            "ram_bytes_per_vector_at_load": round(ram / args.num_vectors, 1),
            "ram_note": "RSS growth of this process while the shards load (ScaNN searcher "
                        "+ row tables; the stored float32 vectors are memory-mapped and "
                        "not counted until read)"}
        entry.update(bench_scann(searcher, queries, exact, args.targets, args.single_queries,
                                 image_row))
        if shards > 1:  # the same tuned budget, shards searched one after another
            sequential = ShardedSearcher(searcher.shards, concurrent=False)
            b, one = qps(lambda q, s=sequential: s.search(q, K), queries, args.single_queries)
            entry["build_tuned_sequential"] = {"qps_batched": round(b, 1),
                                               "qps_single": round(one, 1)}
        result["scann"][name] = entry
        log.info("dim %d, %s: %s", dim, name, json.dumps(entry["at_recall"]))
        del searcher, opened
        gc.collect()
        shutil.rmtree(root, ignore_errors=True)
    if not args.no_peer:
        result["peer"] = bench_faiss(vectors, queries, exact, args.targets, args.single_queries)
    result["ratios"] = ratios(result, args)
    shutil.rmtree(snap_path, ignore_errors=True)
    return result


def ratios(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per run and recall target: vs numpy brute force, vs the peer (faiss HNSW), and for
    N shards vs the same variant on 1 shard (queries/s ratios within this run)."""
    out: dict[str, Any] = {}
    bf = result["numpy_brute_force"]
    peer = (result.get("peer") or {}).get("at_recall", {})
    for name, entry in result["scann"].items():
        variant, _, shards = name.split("/")
        one = result["scann"].get(f"{variant}/hash/1", {}).get("at_recall", {})
        per: dict[str, Any] = {}
        for t, a in entry["at_recall"].items():
            if a is None:
                per[t] = None
                continue
            r = {"vs_brute_force_batched": round(a["qps_batched"] / bf["qps_batched"], 1),
                 "vs_brute_force_single": round(a["qps_single"] / bf["qps_single"], 1)}
            if peer.get(t):
                r["vs_peer_batched"] = round(a["qps_batched"] / peer[t]["qps_batched"], 2)
                r["vs_peer_single"] = round(a["qps_single"] / peer[t]["qps_single"], 2)
            if shards != "1" and one.get(t):
                r["vs_1_shard_batched"] = round(a["qps_batched"] / one[t]["qps_batched"], 3)
                r["vs_1_shard_single"] = round(a["qps_single"] / one[t]["qps_single"], 3)
            per[t] = r
        out[name] = per
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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
    p.add_argument("--fit", help="draw vectors from this benchmarks/fitted_vectors.py fit "
                                 "(.npz) instead of clusters; --dims is then ignored")
    p.add_argument("--targets", default="0.90,0.95,0.99", help="recall@10 targets")
    p.add_argument("--variants", default="default",
                   help=f"comma-separated ScaNN builder variants: {', '.join(VARIANTS)}")
    p.add_argument("--multi-shard-variants", default="",
                   help="comma-separated variants also built with N > 1 shards (default: all "
                        "of --variants); the others are built with 1 shard only")
    p.add_argument("--assignments", default="hash",
                   help="comma-separated shard assignments for N > 1 shards: hash, partition")
    args = p.parse_args(argv)
    args.variants = args.variants.split(",")
    args.assignments = args.assignments.split(",")
    args.multi_shard_variants = [v for v in args.multi_shard_variants.split(",") if v]
    if any(v not in VARIANTS for v in args.variants):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if any(a not in ("hash", "partition") for a in args.assignments):
        p.error("--assignments: hash and/or partition")
    args.targets = [float(t) for t in args.targets.split(",")]
    args.dims = [int(d) for d in args.dims.split(",")] if not args.fit else [0]
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
