"""The duplicates job's wall time vs the index build's, and its launcher's memory vs N (issue 21).

    .venv/bin/python benchmarks/fitted_vectors.py fit --snapshot SNAPSHOT --out /tmp/dup-fit.npz
    .venv/bin/python benchmarks/duplicates_scale.py --fit /tmp/dup-fit.npz \
        --sizes 25000,100000 --workdir /tmp/dupscale \
        --out benchmarks/results/duplicates_scale.json

For each size: draws N vectors from the fit (benchmarks/fitted_vectors.py: clusters of
near vectors like a product's photos), writes them as an embeddings snapshot (one product
per --images-per-product rows; metadata seller = one of 500, brand = one of 97, for
benchmarks/crowding_bench.py), then runs, each in a child process (the launcher),
`catalog-search build-index` and `catalog-search duplicates` on the version it
published, with the same runner config. Reports each command's wall time, each
launcher's peak RSS (VmHWM, from /proc/self/status when the command returns) and its
Beam workers' (polled). The snapshot has no images (no image_uri), so the job runs
with `duplicates.pixel_threshold: null`: the embedding threshold decides alone; the
pixel check's cost is per candidate pair below the threshold, see
benchmarks/duplicates_bench.py for it on real images.
Targets (issue 21): duplicates wall time <= 2x the build's; launcher memory flat in N.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.index_build_memory import vm_hwm_kib, watch_workers, write_results  # noqa: E402


def write_snapshot(path: str, vectors: np.ndarray, per_product: int, sellers: int = 500,
                   rows_per_file: int = 20000, row_group: int = 5000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.embed import snapshot
    from pipelines.embed.summary import SnapshotSummary
    n, dim = vectors.shape
    os.makedirs(path, exist_ok=True)
    files = -(-n // rows_per_file)
    for f in range(files):
        lo, hi = f * rows_per_file, min(n, (f + 1) * rows_per_file)
        m = hi - lo
        table = pa.table({
            "image_id": [f"img{i:09d}" for i in range(lo, hi)],
            "product_id": [f"P{i // per_product:09d}" for i in range(lo, hi)],
            "image_uri": pa.nulls(m, pa.string()), "content_sha256": pa.nulls(m, pa.string()),
            "model_id": ["bench@fitted"] * m, "view": ["original"] * m,
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors[lo:hi].reshape(-1)), dim),
            "metadata": [json.dumps({"seller": f"S{(i // per_product) % sellers:04d}",
                                     "brand": f"B{(i // per_product) % 97:02d}"})
                         for i in range(lo, hi)]}, schema=snapshot.embeddings_schema(dim))
        pq.write_table(table, os.path.join(path, f"embeddings-{f:05d}-of-{files:05d}.parquet"),
                       row_group_size=row_group)
    snapshot.write_summary(path, SnapshotSummary(
        run_id=os.path.basename(path), input_rows=n, embedded=n, reused=0, dead_lettered=0,
        model={"handle": "bench", "model_id": "bench@fitted", "dim": dim},
        model_id="bench@fitted", dim=dim, snapshot=path))


def child(args: argparse.Namespace) -> int:
    """The launcher: one CLI command in this process, then this process's VmHWM."""
    from catalog_search.cli import main
    started = time.time()
    rc = main(args.argv)
    with open(args.report, "w") as f:
        json.dump({"rc": rc, "launcher_vmhwm_kib": vm_hwm_kib(),
                   "seconds": round(time.time() - started, 2)}, f)
    return rc


def launch(argv: list[str], report: str) -> dict:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child",
                             "--report", report, "--", *argv],
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    workers = watch_workers(proc)
    with open(report) as f:
        r = json.load(f)
    if r["rc"] != 0:
        raise SystemExit(f"{argv[0]} failed: rc {r['rc']}")
    return {"seconds": r["seconds"],
            "launcher_peak_rss_mib": round(r["launcher_vmhwm_kib"] / 1024, 1),
            "worker_peak_rss_mib": sorted(round(v / 1024, 1) for v in workers.values())}


def measure(n: int, args: argparse.Namespace) -> dict:
    from benchmarks.fitted_vectors import Fit, draw
    snap = os.path.join(args.workdir, f"snap-{n}")
    if not os.path.exists(os.path.join(snap, "summary.json")):
        write_snapshot(snap, draw(Fit.load(args.fit), n, seed=1), args.images_per_product)
    root = os.path.join(args.workdir, f"index-{n}")
    out = os.path.join(args.workdir, f"dups-{n}")
    subprocess.run(["rm", "-rf", root, out], check=True)
    config = os.path.join(args.workdir, "config.yaml")
    with open(config, "w") as f:
        f.write("runner: {direct_running_mode: multi_processing, direct_num_workers: %d}\n"
                "index: {shards: %d, eval_queries: %d}\n"
                "duplicates: {pixel_threshold: null}\n"
                % (args.workers, args.shards, args.eval_queries))
    build = launch(["build-index", "--config", config, "--embeddings", snap,
                    "--index-root", root, "--version", "bench"],
                   os.path.join(args.workdir, f"build-{n}.json"))
    dups = launch(["duplicates", "--config", config, "--index-root", root, "--out", out,
                   "--threshold", str(args.threshold)],
                  os.path.join(args.workdir, f"dups-{n}.json"))
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    return {"num_vectors": n, "build": build, "duplicates": dups,
            "duplicates_to_build_seconds": round(dups["seconds"] / build["seconds"], 3),
            "threshold": args.threshold, "groups": s["groups"], "near_pairs": s["near_pairs"],
            "images_in_groups": s["images_in_groups"], "reconciled": s["reconciled"]}


def main() -> int:
    if "--child" in sys.argv:
        i = sys.argv.index("--")
        ns = argparse.Namespace(report=sys.argv[sys.argv.index("--report") + 1],
                                argv=sys.argv[i + 1:])
        return child(ns)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", required=True, help=".npz from benchmarks/fitted_vectors.py fit")
    ap.add_argument("--sizes", default="25000,100000", help="comma-separated vector counts")
    ap.add_argument("--images-per-product", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=0.97)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
    ap.add_argument("--eval-queries", type=int, default=500)
    ap.add_argument("--workdir", default="/tmp/dupscale")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    runs = []
    for s in args.sizes.split(","):
        runs.append(measure(int(s), args))
        print(json.dumps(runs[-1]), flush=True)
    out: dict = {"command": " ".join(["python"] + sys.argv), "runs": runs}
    if len(runs) >= 2:
        out["launcher_ratio_largest_to_smallest"] = round(
            runs[-1]["duplicates"]["launcher_peak_rss_mib"]
            / runs[0]["duplicates"]["launcher_peak_rss_mib"], 3)
    write_results(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
