"""Model-only throughput of the builtin models with TensorFlow's oneDNN kernels on and off.

    .venv/bin/python benchmarks/onednn_bench.py [--models efficientnet_lite0,...] [--rounds 3]
    .venv/bin/python benchmarks/onednn_bench.py --compare precision [--models ...]

`--compare precision` instead alternates `model bench --precision fp32` and `--precision
bf16` (oneDNN on in both; model.precision, issue 20) and reports bf16 over fp32.

Each measurement is `catalog-search model bench --json` in a fresh process (oneDNN is fixed
when TensorFlow starts) with TF_ENABLE_ONEDNN_OPTS=1 or =0, alternated round by round so that
load from other work on the machine hits both settings alike. Reports the median images/s,
CPU ms per image and the on/off ratio per model, and writes the raw runs as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys


def bench_once(model: str, onednn: str, batch_size: int, batches: int, threads: int,
               precision: str = "fp32") -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS=onednn)
    out = subprocess.run(
        [sys.executable, "-m", "catalog_search.cli", "model", "bench", "--handle", f"builtin:{model}",
         "--batch-size", str(batch_size), "--batches", str(batches), "--threads", str(threads),
         "--precision", precision, "--json"],
        env=env, capture_output=True, text=True, check=True, timeout=900).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    ap.add_argument("--rounds", type=int, default=3, help="on/off pairs per model")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="TF threads (0 = all cores)")
    ap.add_argument("--compare", choices=("onednn", "precision"), default="onednn",
                    help="oneDNN on vs off (default), or model.precision bf16 vs fp32")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/onednn_bench.json "
                    "(--compare precision: precision_bench.json)")
    args = ap.parse_args()
    if args.out is None:
        args.out = ("benchmarks/results/onednn_bench.json" if args.compare == "onednn"
                    else "benchmarks/results/precision_bench.json")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    report: dict = {"cpu": cpu, "cores": os.cpu_count(), "batch_size": args.batch_size,
                    "batches": args.batches, "tf_threads": args.threads, "models": {},
                    "compare": args.compare}
    for model in args.models.split(","):
        if args.compare == "precision":
            report["models"][model] = _precision_row(model, args)
            continue
        runs: dict[str, list[dict]] = {"1": [], "0": []}
        for _ in range(args.rounds):
            for setting in ("1", "0"):
                runs[setting].append(bench_once(model, setting, args.batch_size, args.batches,
                                                args.threads))
        row = {}
        for setting, name in (("1", "on"), ("0", "off")):
            row[f"{name}_images_per_s"] = statistics.median(r["images_per_s"] for r in runs[setting])
            row[f"{name}_cpu_ms_per_image"] = statistics.median(
                r["cpu_ms_per_image"] for r in runs[setting])
        row["on_over_off_images_per_s"] = row["on_images_per_s"] / row["off_images_per_s"]
        row["runs"] = runs
        report["models"][model] = row
        print(f"{model}: oneDNN on {row['on_images_per_s']:.1f} img/s "
              f"({row['on_cpu_ms_per_image']:.1f} CPU ms/img), off {row['off_images_per_s']:.1f} "
              f"img/s ({row['off_cpu_ms_per_image']:.1f} CPU ms/img): "
              f"on/off = {row['on_over_off_images_per_s']:.2f}x", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    print(f"wrote {args.out}")


def _precision_row(model: str, args: argparse.Namespace) -> dict:
    runs: dict[str, list[dict]] = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for precision in ("fp32", "bf16"):
            runs[precision].append(bench_once(model, "1", args.batch_size, args.batches,
                                              args.threads, precision))
    row: dict = {}
    for precision in runs:
        row[f"{precision}_images_per_s"] = statistics.median(
            r["images_per_s"] for r in runs[precision])
        row[f"{precision}_cpu_ms_per_image"] = statistics.median(
            r["cpu_ms_per_image"] for r in runs[precision])
    row["bf16_over_fp32_images_per_s"] = row["bf16_images_per_s"] / row["fp32_images_per_s"]
    row["fp32_over_bf16_cpu_ms_per_image"] = (row["fp32_cpu_ms_per_image"]
                                              / row["bf16_cpu_ms_per_image"])
    row["runs"] = runs
    print(f"{model}: fp32 {row['fp32_images_per_s']:.1f} img/s "
          f"({row['fp32_cpu_ms_per_image']:.2f} CPU ms/img), bf16 {row['bf16_images_per_s']:.1f} "
          f"img/s ({row['bf16_cpu_ms_per_image']:.2f} CPU ms/img): CPU ms fp32/bf16 = "
          f"{row['fp32_over_bf16_cpu_ms_per_image']:.2f}x", flush=True)
    return row


if __name__ == "__main__":
    main()
