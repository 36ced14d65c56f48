"""Peak resident memory of the build-index launcher (and of its Beam workers) vs catalog size.

    .venv/bin/python benchmarks/index_build_memory.py --sizes 20000,100000 --dim 1280 \
        --shards 2 --workdir /tmp/bim --out benchmarks/results/index_build_memory.json

For each size: writes a synthetic snapshot (unit vectors, files of --rows-per-file rows in
row groups of --row-group rows, like the embed job's output) in this process, then runs
`catalog-search build-index` in a child process -- the launcher -- which reports its own
VmHWM (peak RSS) from /proc/self/status when the build returns. Beam's workers are
separate processes; this script polls /proc for the launcher's descendants and records
each one's VmHWM too. Target (issue 12): launcher peak at the larger size no more than 10%
above the smaller one. `--sizes 1000000` is the issue's 1M run (a larger machine).
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


def vm_hwm_kib(pid: int | str = "self") -> int | None:
    """VmHWM (peak resident set) of a process in KiB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def descendants(pid: int) -> set[int]:
    """Pids of all living descendants of `pid`."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def write_results(out: dict, path: str | None) -> None:
    """The results as JSON at `path` (when given); the summary without the runs on stdout."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}))


def watch_workers(proc: subprocess.Popen) -> dict[int, int]:
    """Until `proc` exits: the peak resident set (KiB) of each of its descendants, polled
    every 0.5 s (Beam's worker processes)."""
    workers: dict[int, int] = {}
    while proc.poll() is None:
        for pid in descendants(proc.pid):
            hwm = vm_hwm_kib(pid)
            if hwm:
                workers[pid] = max(workers.get(pid, 0), hwm)
        time.sleep(0.5)
    return workers


def write_snapshot(path: str, n: int, dim: int, rows_per_file: int, row_group: int,
                   seed: int = 0) -> None:
    """A complete synthetic snapshot: clustered unit vectors, several files and row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pipelines.embed import snapshot

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim)).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    files = -(-n // rows_per_file)
    for f in range(files):
        lo, hi = f * rows_per_file, min(n, (f + 1) * rows_per_file)
        v = centres[rng.integers(0, len(centres), hi - lo)] + 0.3 * rng.standard_normal(
            (hi - lo, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        ids = [f"img{i:09d}" for i in range(lo, hi)]
        table = pa.table({
            "image_id": ids, "product_id": [f"P{i[3:]}" for i in ids],
            "image_uri": [f"file:///catalog/{i}.jpg" for i in ids],
            "content_sha256": ["0" * 64] * len(ids), "model_id": ["bench@1"] * len(ids),
            "view": ["original"] * len(ids),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), dim),
            "metadata": ["{}"] * len(ids)}, schema=snapshot.embeddings_schema(dim))
        pq.write_table(table, os.path.join(path, f"embeddings-{f:05d}-of-{files:05d}.parquet"),
                       row_group_size=row_group)
    from pipelines.embed.summary import SnapshotSummary
    snapshot.write_summary(path, SnapshotSummary(
        run_id=os.path.basename(path), input_rows=n, embedded=n, reused=0, dead_lettered=0,
        model={"handle": "bench", "model_id": "bench@1", "dim": dim}, model_id="bench@1",
        dim=dim, snapshot=path))


def child(args: argparse.Namespace) -> int:
    """The launcher: run build-index in this process, then report this process's VmHWM."""
    from catalog_search.cli import main
    started = time.time()
    rc = main(["build-index", "--config", args.config, "--embeddings", args.embeddings,
               "--index-root", args.index_root, "--version", "bench"])
    with open(args.report, "w") as f:
        json.dump({"rc": rc, "launcher_vmhwm_kib": vm_hwm_kib(),
                   "seconds": round(time.time() - started, 2)}, f)
    return rc


def measure(n: int, args: argparse.Namespace) -> dict:
    """Build one size in a child launcher; its and its workers' peak RSS."""
    snap_dir = os.path.join(args.workdir, f"snap-{n}")
    if not os.path.exists(os.path.join(snap_dir, "summary.json")):
        write_snapshot(snap_dir, n, args.dim, args.rows_per_file, args.row_group)
    index_root = os.path.join(args.workdir, f"index-{n}")
    subprocess.run(["rm", "-rf", index_root], check=True)
    config = os.path.join(args.workdir, "config.yaml")
    with open(config, "w") as f:
        f.write("runner: {direct_running_mode: multi_processing, direct_num_workers: %d}\n"
                "index: {shards: %d, brute_force_below: %d, eval_queries: %d}\n"
                % (args.workers, args.shards, 10 ** 9 if args.brute_force else 20000,
                   args.eval_queries))
    report = os.path.join(args.workdir, f"report-{n}.json")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child",
                             "--config", config, "--embeddings", snap_dir,
                             "--index-root", index_root, "--report", report],
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    workers = watch_workers(proc)
    with open(report) as f:
        result = json.load(f)
    from pipelines.index import artifact as art
    manifest = art.read_manifest(index_root, "bench")
    return {"num_vectors": n, "dim": args.dim, "vector_mib": round(n * args.dim * 4 / 2 ** 20, 1),
            "rc": result["rc"], "build_seconds": result["seconds"],
            "launcher_peak_rss_mib": round(result["launcher_vmhwm_kib"] / 1024, 1),
            "worker_peak_rss_mib": sorted(round(v / 1024, 1) for v in workers.values()),
            "shard_kinds": [s.kind for s in manifest.shards],
            "splits": manifest.build["splits"],
            "recall@10": manifest.recall(10)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20000,100000", help="comma-separated vector counts")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
    ap.add_argument("--rows-per-file", type=int, default=20000)
    ap.add_argument("--row-group", type=int, default=5000)
    ap.add_argument("--eval-queries", type=int, default=500)
    ap.add_argument("--brute-force", action="store_true",
                    help="brute-force shards (fast; the launcher's work is the same)")
    ap.add_argument("--workdir", default="/tmp/index-build-memory")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--embeddings", help=argparse.SUPPRESS)
    ap.add_argument("--index-root", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    os.makedirs(args.workdir, exist_ok=True)
    runs = [measure(int(s), args) for s in args.sizes.split(",")]
    for r in runs:
        print(json.dumps(r))
    out = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "runs": runs}
    if len(runs) >= 2:
        out["launcher_ratio_largest_to_smallest"] = round(
            runs[-1]["launcher_peak_rss_mib"] / runs[0]["launcher_peak_rss_mib"], 3)
    write_results(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
