"""Cost of `catalog-search train-adapter` vs catalog size, to extrapolate 1M (docs/SCALE.md).

    .venv/bin/python benchmarks/adapter_train_bench.py --fit /tmp/grocery-fit.npz \
        --sizes 10000,30000,100000 --epochs 2 --probe-epochs 5 --workdir /tmp/adapter-bench \
        --out benchmarks/results/adapter_train-100k.json

For each N it writes a synthetic embeddings snapshot of N model-space vectors in product
groups (--per-product images each), then runs the real command
`catalog-search train-adapter --embeddings SNAP --out DIR --epochs E --json` in a fresh
process and measures that process: wall time, CPU time (user + system) and peak RSS
(`os.wait4`'s rusage of the child), plus the command's own figures (fit seconds of
`train_linear`, whole-command seconds, validation queries, gate). Vectors: with --fit,
product centres are drawn from the fit's between-cluster spectrum around its mean and each
product's images around its centre from the within-cluster spectrum (the model of
benchmarks/fitted_vectors.py, but with product ids: one centre = one product); without
--fit, a generated two-level Gaussian of the same dimension (--dim). Then least-squares
lines of fit seconds, command seconds, CPU seconds and peak RSS against N give the 1M
estimate (the model and its assumptions are recorded in the JSON's "model").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

MODEL_ID = "bench-fitted@000000000000"
FINGERPRINT = "be0c4f17ed00" * 4


def synthetic_fit(dim: int, seed: int = 7) -> Any:
    """A stand-in fit when no real one is given: a shared mean, a decaying between-product
    spectrum and a smaller within-product one (unit-norm-scale vectors)."""
    from fitted_vectors import Fit
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(dim).astype(np.float32)
    mean /= np.linalg.norm(mean) / 0.8
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    decay = np.exp(-np.arange(dim) / 60.0).astype(np.float32)
    between = (q[:, :dim].astype(np.float32), (0.30 / decay.sum()) * decay)
    q2, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    within = (q2.astype(np.float32), (0.08 / decay.sum()) * decay)
    return Fit(mean, between, within, 12.0, "synthetic", 0)


def draw_products(f: Any, n: int, per_product: int, seed: int = 0, chunk: int = 32768
                  ) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors [n, dim] in groups of `per_product` around product centres, and the
    product index of each row."""
    from fitted_vectors import _gaussian
    rng = np.random.default_rng(seed)
    n_products = max(2, -(-n // per_product))
    centres = f.mean[None, :] + _gaussian(rng, n_products, f.between)
    products = np.arange(n) // per_product
    out = np.empty((n, len(f.mean)), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centres[products[s:s + m]] + _gaussian(rng, m, f.within)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, products


def write_snapshot(path: str, vectors: np.ndarray, products: np.ndarray) -> str:
    """A complete embeddings snapshot (Parquet + summary.json) of these vectors."""
    from pipelines.embed import snapshot
    n, dim = vectors.shape
    model = {"handle": "bench", "model_id": MODEL_ID, "dim": dim, "input_size": 224,
             "fingerprint": FINGERPRINT}
    return snapshot.write_vectors(path, [f"img{i:07d}" for i in range(n)],
                                  [f"P{p:07d}" for p in products.tolist()], vectors, model)


def run_command(snap: str, out_dir: str, epochs: int, timeout: float) -> dict[str, Any]:
    """The real CLI in a fresh process; wall, CPU and peak RSS of that process."""
    argv = [os.path.join(REPO, ".venv", "bin", "catalog-search"), "train-adapter",
            "--embeddings", snap, "--out", out_dir, "--epochs", str(epochs), "--json"]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    # communicate() reaped the child with waitpid; its rusage is read from RUSAGE_CHILDREN
    # deltas instead (see main), so here: wall time and the command's JSON.
    wall = time.perf_counter() - started
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"train-adapter exited {proc.returncode}: {stderr.decode()[-2000:]}")
    return {"argv": argv[1:], "returncode": proc.returncode, "wall_s": round(wall, 2),
            "result": json.loads(stdout.decode().strip().splitlines()[-1])}


def line(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares y = a + b * x."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return {"intercept": float(a), "slope_per_vector": float(b)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit", help="fit .npz (benchmarks/fitted_vectors.py fit); default: a "
                                  "generated two-level Gaussian of --dim")
    ap.add_argument("--dim", type=int, default=1280, help="without --fit (default 1280)")
    ap.add_argument("--sizes", default="10000,30000,100000", help="catalog sizes N")
    ap.add_argument("--per-product", type=int, default=4, help="images per product")
    ap.add_argument("--epochs", type=int, default=10,
                    help="epochs per run (config default 60; per-epoch cost scales it)")
    ap.add_argument("--probe-epochs", type=int, default=0,
                    help="also run the largest N at this many epochs: the difference gives "
                         "the cost of one epoch apart from the one-off start (SVD init, "
                         "TF tracing)")
    ap.add_argument("--extrapolate", type=int, default=1_000_000, help="N to estimate")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per run")
    ap.add_argument("--workdir", default="/tmp/adapter-bench")
    ap.add_argument("--keep", action="store_true", help="keep the snapshots")
    ap.add_argument("--out", required=True, help="JSON results")
    args = ap.parse_args()

    import resource

    from fitted_vectors import Fit
    f = Fit.load(args.fit) if args.fit else synthetic_fit(args.dim)
    sizes = [int(s) for s in args.sizes.split(",")]
    os.makedirs(args.workdir, exist_ok=True)
    runs = []
    t0 = time.time()
    load_start = os.getloadavg()
    for n in sizes:
        snap = os.path.join(args.workdir, f"emb-{n}")
        out_dir = os.path.join(args.workdir, f"adapter-{n}")
        for p in (snap, out_dir):
            shutil.rmtree(p, ignore_errors=True)
        s = time.perf_counter()
        vectors, products = draw_products(f, n, args.per_product, seed=n)
        write_snapshot(snap, vectors, products)
        del vectors
        build_s = time.perf_counter() - s
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = run_command(snap, out_dir, args.epochs, args.timeout_s)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        res = r["result"]
        t = res["training"]
        run = {"n": n, "products": int(products.max()) + 1, "snapshot_build_s": round(build_s, 2),
               "snapshot_bytes": sum(os.path.getsize(os.path.join(d, x))
                                     for d, _, fs in os.walk(snap) for x in fs),
               "wall_s": r["wall_s"], "cpu_s": round(cpu, 2),
               # ru_maxrss of RUSAGE_CHILDREN is the largest child so far; sizes ascend, so
               # it is this run's peak unless an earlier, smaller run peaked higher
               "peak_rss_mib": round(after.ru_maxrss / 1024, 1),
               "command_s": res["seconds"], "fit_s": t["seconds"],
               "steps": t["steps"], "train_rows": t["train"]["catalog_rows"],
               "validation_queries": res["validation"]["queries"],
               "recall@1": {"identity": res["validation"]["identity"]["recall@1"],
                            "adapter": res["validation"]["with_adapter"]["recall@1"]},
               "gate_passed": res["passed"], "returncode": r["returncode"],
               "argv": r["argv"]}
        runs.append(run)
        print(json.dumps(run), flush=True)
        if not args.keep:
            shutil.rmtree(snap, ignore_errors=True)
    probe = None
    if args.probe_epochs and args.probe_epochs != args.epochs:
        n = sizes[-1]
        snap = os.path.join(args.workdir, f"emb-{n}-probe")
        shutil.rmtree(snap, ignore_errors=True)
        vectors, products = draw_products(f, n, args.per_product, seed=n)
        write_snapshot(snap, vectors, products)
        del vectors
        r = run_command(snap, os.path.join(args.workdir, f"adapter-{n}-probe"),
                        args.probe_epochs, args.timeout_s)
        t = r["result"]["training"]
        base = runs[-1]
        per_epoch_s = (t["seconds"] - base["fit_s"]) / (args.probe_epochs - args.epochs)
        per_step_s = per_epoch_s / (base["steps"] / args.epochs)
        probe = {"n": n, "epochs": args.probe_epochs, "fit_s": t["seconds"], "steps": t["steps"],
                 "per_epoch_s": round(per_epoch_s, 3), "per_step_s": round(per_step_s, 5)}
        print(json.dumps(probe), flush=True)
        if not args.keep:
            shutil.rmtree(snap, ignore_errors=True)
    ns = [float(r["n"]) for r in runs]
    x = float(args.extrapolate)
    est: dict[str, Any] = {}
    for key in ("fit_s", "command_s", "cpu_s", "wall_s", "peak_rss_mib"):
        ln = line(ns, [float(r[key]) for r in runs])
        est[key] = {**ln, f"at_{args.extrapolate}": round(ln["intercept"] + ln["slope_per_vector"] * x, 1)}
    for r in runs:  # load + split + validation (exact search: queries x gallery)
        r["command_minus_fit_s"] = round(float(r["command_s"]) - float(r["fit_s"]), 2)
    if probe is not None:
        steps_per_row = np.mean([r["steps"] / args.epochs / r["train_rows"] for r in runs])
        train_rows = x * runs[-1]["train_rows"] / runs[-1]["n"]
        one_off = line(ns, [float(r["fit_s"]) - args.epochs * probe["per_step_s"]
                            * r["steps"] / args.epochs for r in runs])
        est["epochs_apart"] = {
            "per_step_s": probe["per_step_s"], "steps_per_train_row_per_epoch": float(steps_per_row),
            f"per_epoch_s_at_{args.extrapolate}": round(
                probe["per_step_s"] * steps_per_row * train_rows, 1),
            "one_off_s_line": one_off,
            f"one_off_s_at_{args.extrapolate}": round(
                one_off["intercept"] + one_off["slope_per_vector"] * x, 1)}
        e = est["epochs_apart"]
        for epochs in sorted({args.epochs, 60}):
            e[f"fit_s_{epochs}_epochs_at_{args.extrapolate}"] = round(
                e[f"one_off_s_at_{args.extrapolate}"]
                + epochs * e[f"per_epoch_s_at_{args.extrapolate}"], 0)
    out = {
        "benchmark": "adapter_train_bench",
        "command": " ".join([".venv/bin/python", "benchmarks/adapter_train_bench.py",
                             *sys.argv[1:]]),
        "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "machine": {"cpus": os.cpu_count(), "load_avg_start": load_start,
                    "platform": platform.platform(), "note": "shared 2-core machine"},
        "vectors": {"fit": args.fit or "synthetic", "dim": int(len(f.mean)),
                    "per_product": args.per_product},
        "epochs": args.epochs, "runs": runs, "probe": probe, "estimate": est,
        "model": ("least-squares lines against N over the measured sizes: an epoch visits "
                  "every training row once in batches of products_per_batch x "
                  "samples_per_product rows, so fit time is linear in N x epochs (plus a "
                  "fixed start); peak RSS is linear in N (vectors held in RAM as Arrow, "
                  "numpy and a TF constant) plus the TF runtime; validation is exact search "
                  "of held-out queries (val_products x N) against all N vectors, so it grows "
                  "as N^2 and a line underestimates it at 1M"),
        "total_s": round(time.time() - t0, 1),
    }
    out["machine"]["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(json.dumps(est, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
