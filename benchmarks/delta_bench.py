"""Delta log benchmark (issue 19): a drop searchable without a rebuild, a takedown's
visibility, query latency with delta rows, deltas applied under load.

    .venv/bin/python benchmarks/delta_bench.py --num-vectors 100000 --fit FIT.npz \
        --drop 1000 --delta-rows 10000 --workdir /tmp/delta-bench \
        --out benchmarks/results/delta_bench-100k-scann.json

One run, one JSON. Data: --fit (benchmarks/fitted_vectors.py: vectors drawn from a fit to
real embeddings; the drop and the queries are drawn around the same centres with other
seeds), else clustered synthetic vectors of --dim. The version is built and published by
the real build_index job (recall gate off: its measured recall@k is reported as the
"gate figure"); serving is the library (CatalogSearcher without a model: vector queries),
two searchers on the same root: one applies the deltas, one stays on the version alone.
1. drop: --drop new rows written as one delta (write_delta: checksummed, fsynced) and
   applied by the searcher's reload (what polling / POST /v1/reload run): seconds from the
   write's start until the rows are searchable (each drop row found by its own vector),
   beside the full build of the version at this size (what a drop cost before). recall@k
   (rows, collapse off) of the merged search against exact search over version + delta,
   beside the version alone on the same queries (exact truth over the version).
2. takedown: delete_ids (takedown list + delete delta, fsynced) then apply: seconds until
   the call returns and until the product is absent from vector, filtered and similar
   queries; absent again from a freshly opened searcher (a restart).
3. latency: vector-query p50/p99 (one thread, k, collapse on) on the version alone vs with
   --delta-rows delta rows (the drop counts towards them), in alternating rounds on the
   same queries; the ratio of the p99s. With serving.delta_scann_min_rows or more delta
   rows, applying the bulk delta builds the in-memory ScaNN segment (serving.delta_segment;
   its apply seconds are reported) and the merged recall@k is measured again with every
   delta row (truth: exact over version + delta rows, less the takedown).
4. under load: one client thread queries while --swaps deltas (10 upserts + 1 delete each)
   are written and applied; every exception or deleted id returned is a failed request.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from serving_bench import _percentiles  # noqa: E402

log = logging.getLogger("delta_bench")


class Vectors:
    """Draws unit vectors: from a fit (benchmarks/fitted_vectors.py) or clustered."""

    def __init__(self, fit_path: str | None, dim: int) -> None:
        self.fit = None
        if fit_path:
            from fitted_vectors import Fit
            self.fit = Fit.load(fit_path)
            dim = len(self.fit.mean)
        self.dim = dim
        self._centres = np.random.default_rng(12345).normal(size=(1000, dim)).astype(np.float32)

    def draw(self, n: int, seed: int) -> np.ndarray:
        if self.fit is not None:
            from fitted_vectors import draw
            return draw(self.fit, n, seed=seed)
        rng = np.random.default_rng(seed)
        v = self._centres[rng.integers(len(self._centres), size=n)] + rng.normal(
            scale=0.6, size=(n, self.dim)).astype(np.float32)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def write_snapshot(out: str, vectors: np.ndarray, model: dict[str, Any]) -> str:
    import pyarrow as pa

    from pipelines.embed import snapshot as snap
    from pipelines.embed.summary import SnapshotSummary
    if snap.is_complete(out):
        log.info("snapshot %s exists: reusing it", out)
        return out
    n, dim = vectors.shape
    chunk = 100_000
    parts = list(range(0, n, chunk))
    for j, start in enumerate(parts):
        v = vectors[start:start + chunk]
        m = len(v)
        snap.write_table(out, pa.table({
            "image_id": [f"base-{start + i:08d}" for i in range(m)],
            "product_id": [f"basep-{(start + i) // 4:07d}" for i in range(m)],
            "image_uri": [""] * m, "content_sha256": [""] * m,
            "model_id": [model["model_id"]] * m, "view": ["original"] * m,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), dim),
            "metadata": ['{"category": "base"}'] * m,
        }, schema=snap.embeddings_schema(dim)),
            name=f"embeddings-{j:05d}-of-{len(parts):05d}.parquet")
    snap.write_summary(out, SnapshotSummary(
        input_rows=n, embedded=n, reused=0, dead_lettered=0,
        run_id=os.path.basename(out.rstrip("/")), snapshot=out, model=model,
        model_id=model["model_id"], dim=dim))
    return out


def delta_rows(prefix: str, vectors: np.ndarray) -> Any:
    import pyarrow as pa
    n = len(vectors)
    return pa.table({"image_id": [f"{prefix}-{i:07d}" for i in range(n)],
                     "view": ["original"] * n,
                     "product_id": [f"{prefix}p-{i // 2:07d}" for i in range(n)],
                     "image_uri": [""] * n,
                     "metadata": ['{"category": "drop"}'] * n})


def recall(searcher: Any, queries: np.ndarray, ids: list[str], vectors: np.ndarray,
           k: int) -> float:
    """recall@k of the searcher's rows (collapse off) against exact search over `vectors`
    (row i has image id ids[i])."""
    found = 0
    for q in queries:
        scores = vectors @ q
        top = np.argpartition(-scores, k)[:k]
        truth = {ids[i] for i in top}
        got = {h.image_id for h in searcher.search_vector(q, k=k, collapse=False).hits}
        found += len(truth & got)
    return found / (k * len(queries))


def latency_ab(a: Any, b: Any, queries: np.ndarray, k: int, rounds: int = 6
               ) -> tuple[dict[str, float], dict[str, float]]:
    """p50/p99 of searcher a and b, measured in alternating rounds over the same queries."""
    sa: list[float] = []
    sb: list[float] = []
    for q in queries[:20]:  # warm both
        a.search_vector(q, k=k)
        b.search_vector(q, k=k)
    for r in range(rounds):
        for searcher, samples in ((a, sa), (b, sb)) if r % 2 == 0 else ((b, sb), (a, sa)):
            for q in queries:
                t0 = time.perf_counter()
                searcher.search_vector(q, k=k)
                samples.append(time.perf_counter() - t0)
    return _percentiles(sa), _percentiles(sb)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-vectors", type=int, default=100_000)
    p.add_argument("--fit", help="benchmarks/fitted_vectors.py fit (.npz); else synthetic")
    p.add_argument("--dim", type=int, default=256, help="synthetic vectors only")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--drop", type=int, default=1000)
    p.add_argument("--delta-rows", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "pipelines", "serving"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pipelines.core.config import load_config
    from pipelines.index import artifact as art
    from pipelines.index import deltas as dl
    from pipelines.index.build import run_build_index
    from pipelines.index.delete import delete_ids
    from serving.searcher import CatalogSearcher
    os.makedirs(args.workdir, exist_ok=True)
    gen = Vectors(args.fit, args.dim)
    dim, k = gen.dim, args.k
    t0 = time.perf_counter()
    base = gen.draw(args.num_vectors, seed=0)
    model = {"model_id": "synthetic", "fingerprint": "synthetic-bench", "dim": dim}
    snap = write_snapshot(os.path.join(args.workdir, f"snapshot-{args.num_vectors}-{dim}"),
                          base, model)
    root = os.path.join(args.workdir, f"index-{args.num_vectors}-{dim}")
    config = load_config(overrides={
        "index": {"shards": args.shards, "eval_queries": 200, "recall_threshold": 0.0},
        "runner": {"direct_running_mode": "multi_processing", "direct_num_workers": 2}})
    version = "bench-v1"
    build_s = None
    if not os.path.exists(art.manifest_uri(root, version)):
        t0 = time.perf_counter()
        run_build_index(snap, root, config, version=version)
        build_s = round(time.perf_counter() - t0, 1)
        log.info("built %s in %ss", version, build_s)
    # every run starts from the version alone
    shutil.rmtree(os.path.join(root, "deltas"), ignore_errors=True)
    if os.path.exists(os.path.join(root, "takedowns.json")):
        os.unlink(os.path.join(root, "takedowns.json"))
    manifest = art.read_manifest(root, version)
    alone = CatalogSearcher.open(root, config=config, load_embedder=False)  # + imports
    t0 = time.perf_counter()
    s = CatalogSearcher.open(root, config=config, load_embedder=False)
    open_s = round(time.perf_counter() - t0, 2)  # a (re)load of the version
    base_ids = [alone.current.image_id(i) for i in range(alone.current.num_vectors)]
    base_vecs = alone.current.vectors_of(np.arange(alone.current.num_vectors))
    queries = gen.draw(args.queries, seed=2)
    out: dict[str, Any] = {
        "num_vectors": args.num_vectors, "dim": dim, "shards": args.shards, "k": k,
        "data": f"fit {args.fit}" if args.fit else "clustered synthetic",
        "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
        "version": {"full_build_s": build_s, "open_s": open_s,
                    f"gate_recall@{k}": manifest.recall(k)}}

    # 1. the drop
    drop_vecs = gen.draw(args.drop, seed=1)
    rows = delta_rows("drop", drop_vecs)
    t0 = time.perf_counter()
    dl.write_delta(root, version, rows=rows, vectors=drop_vecs, source={"bench": "drop"})
    t_write = time.perf_counter() - t0
    outcome = s.reload()
    t_apply = time.perf_counter() - t0 - t_write
    drop_ids = rows.column("image_id").to_pylist()
    self_found = sum(s.search_vector(v, k=1, collapse=False).hits[0].image_id == drop_ids[i]
                     for i, v in enumerate(drop_vecs))
    all_ids = base_ids + drop_ids
    all_vecs = np.concatenate([base_vecs, drop_vecs])
    near_drop = gen.draw(args.queries, seed=3)  # the same centres: drop and version rows mix
    out["drop"] = {
        "rows": args.drop, "write_s": round(t_write, 4), "apply_s": round(t_apply, 4),
        "searchable_after_s": round(t_write + t_apply, 4), "outcome": outcome.status,
        "drop_rows_found_top1": f"{self_found}/{args.drop}",
        f"merged_recall@{k}": round(recall(s, np.concatenate([queries, near_drop]), all_ids,
                                           all_vecs, k), 4),
        f"version_alone_recall@{k}": round(recall(alone, np.concatenate([queries, near_drop]),
                                                  base_ids, base_vecs, k), 4)}
    log.info("drop: %s", out["drop"])

    # 2. a takedown
    victim_hit = s.search_vector(queries[0], k=1).hits[0]
    victim = victim_hit.product_id
    other = next(h.product_id for h in s.search_vector(queries[0], k=5).hits
                 if h.product_id != victim)
    t0 = time.perf_counter()
    result = delete_ids(root, product_ids=[victim], reason="bench")
    t_delete = time.perf_counter() - t0
    s.apply_deltas_now()
    t_total = time.perf_counter() - t0

    def absent_from(searcher: Any) -> dict[str, bool]:
        return {
            "vector": victim not in {h.product_id for h in searcher.search_vector(
                queries[0], k=50).hits},
            "vector_rows": victim not in {h.product_id for h in searcher.search_vector(
                queries[0], k=50, collapse=False).hits},
            "filtered": searcher.search_vector(queries[0], k=10,
                                               filters={"product_id": victim}).hits == [],
            "similar": victim not in {h.product_id for h in searcher.similar_to(
                product_id=other, k=50).hits}}

    absent = absent_from(s)
    restarted = CatalogSearcher.open(root, config=config, load_embedder=False)
    out["takedown"] = {"product": victim, "removed": result["removed"],
                       "durable_s": round(t_delete, 4), "absent_after_s": round(t_total, 4),
                       "absent": absent, "absent_after_restart": absent_from(restarted)}
    del restarted
    log.info("takedown: %s", out["takedown"])

    # 3. latency with --delta-rows delta rows (the drop counts towards them)
    more = args.delta_rows - args.drop
    bulk_apply_s = None
    if more > 0:
        bulk = gen.draw(more, seed=4)
        dl.write_delta(root, version, rows=delta_rows("bulk", bulk), vectors=bulk,
                       source={"bench": "bulk"})
        t0 = time.perf_counter()
        s.reload()  # from serving.delta_scann_min_rows live rows: builds the ScaNN segment
        bulk_apply_s = round(time.perf_counter() - t0, 3)
    info = s.current.delta_info()
    lat_none, lat_with = latency_ab(alone, s, queries, k)
    # recall@k with every delta row: truth over version + delta rows, less the takedown
    gone = {alone.current.image_id(r) for r in alone.current.product_rows(victim)}
    ids_now = all_ids + ([f"bulk-{i:07d}" for i in range(more)] if more > 0 else [])
    vecs_now = np.concatenate([all_vecs] + ([bulk] if more > 0 else []))
    live = np.asarray([i not in gone for i in ids_now])
    with_recall = round(recall(s, np.concatenate([queries, near_drop]),
                               [i for i in ids_now if i not in gone], vecs_now[live], k), 4)
    del vecs_now
    out["latency"] = {"version_alone": lat_none, f"with_{info['rows_added']}_delta_rows": lat_with,
                      "p99_ratio": round(lat_with["p99_ms"] / lat_none["p99_ms"], 3),
                      "p50_ratio": round(lat_with["p50_ms"] / lat_none["p50_ms"], 3),
                      "apply_s_of_the_bulk_delta": bulk_apply_s,
                      f"merged_recall@{k}": with_recall,
                      "delta_info": info}
    log.info("latency: %s", out["latency"])
    del alone

    # 4. deltas applied under load
    stop = threading.Event()
    failures: list[str] = []
    served = [0]
    deleted: set[str] = set()

    def load() -> None:
        i = 0
        while not stop.is_set():
            try:
                gone = set(deleted)  # ids whose delete was applied before this query
                hits = s.search_vector(near_drop[i % len(near_drop)], k=k, collapse=False).hits
                bad = gone & {h.image_id for h in hits}
                if bad:
                    failures.append(f"deleted {sorted(bad)[:3]} returned")
                served[0] += 1
            except Exception as e:  # noqa: BLE001 - counted
                failures.append(repr(e))
            i += 1

    t = threading.Thread(target=load)
    t.start()
    apply_s = []
    try:
        for i in range(args.swaps):
            vecs3 = gen.draw(10, seed=100 + i)
            t0 = time.perf_counter()
            dl.write_delta(root, version, rows=delta_rows(f"swap{i}", vecs3), vectors=vecs3,
                           delete_image_ids=[drop_ids[i]])
            s.reload()
            apply_s.append(time.perf_counter() - t0)
            deleted.add(drop_ids[i])
    finally:
        stop.set()
        t.join()
    out["under_load"] = {"deltas": args.swaps, "requests": served[0],
                         "failed": len(failures), "first_failure": failures[:1],
                         "write_and_apply": _percentiles(apply_s),
                         "final_delta_info": s.current.delta_info()}
    log.info("under load: %s", out["under_load"])
    out["load_average_at_end"] = os.getloadavg()
    text = json.dumps(out, indent=2, sort_keys=True, default=str)
    for path in [os.path.join(args.workdir, "delta_bench.json")] + (
            [args.out] if args.out else []):
        with open(path, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
