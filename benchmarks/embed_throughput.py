"""Embed throughput: model-only vs the whole Beam pipeline vs the tutorial loop, in one run.

    python benchmarks/embed_throughput.py --images ../shared/datasets/grocery-store/dataset \
        --limit 2000 --out out/bench/embed.json

Measures, on the same machine in the same run (ratios are what to compare; absolute
numbers move with machine load):
  1. model-only images/s: the same SavedModel, same batch size, synthetic uint8 tensors,
     one process using every core (TF default threads);
  2. pipeline images/s: `run_embed` on the real JPEGs (fetch, sha256, decode with draft,
     preprocess, RunInference, Parquet), DirectRunner multi-processing, end to end
     (worker start-up and model loading included) and from the first to the last image;
  3. incremental re-run with 1% of the images changed, against the full run's wall time;
  4. the naive approach of many tutorials: per image, PIL full decode + resize, then
     Keras `predict` on a batch of one, in a Python loop (on a subset).

`--precision fp32|bf16` runs 1. and 2. at that model.precision (one per process: the bf16
rewrite is process-global); `--rounds N` alternates 1. and 2. N times and reports the
pipeline / model-only ratio of each round; `--no-extras` skips 3. and 4.:

    python benchmarks/embed_throughput.py --images ../shared/datasets/grocery-store/dataset \
        --limit 600 --precision bf16 --rounds 2 --no-extras --out out/bench/embed-bf16.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pipelines.embed import snapshot  # noqa: E402
from pipelines.core.config import load_config  # noqa: E402
from pipelines.embed.job import run_embed  # noqa: E402
from pipelines.model.resolve import Embedder, resolve_model  # noqa: E402


def find_images(root: str, limit: int) -> list[str]:
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        found += [os.path.abspath(os.path.join(dirpath, f)) for f in sorted(files)
                  if f.lower().endswith((".jpg", ".jpeg"))]
    if len(found) < limit:
        raise SystemExit(f"only {len(found)} JPEGs under {root}, --limit {limit} asked")
    return found[:limit]


def write_manifest(paths: list[str], out: str) -> str:
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["product_id", "image_id", "image_uri"])
        for i, p in enumerate(paths):
            w.writerow([os.path.basename(os.path.dirname(p)), f"img{i:06d}", p])
    return out


def model_only(spec, batch: int, n: int) -> float:
    emb = Embedder(spec)
    x = np.random.default_rng(0).integers(0, 255, (batch, spec.input_size, spec.input_size, 3),
                                          dtype=np.uint8)
    emb.embed(x)  # trace + warm up
    emb.embed(x)
    t = time.perf_counter()
    done = 0
    while done < n:
        emb.embed(x)
        done += batch
    return done / (time.perf_counter() - t)


def naive_loop(spec, paths: list[str]) -> float:
    """The tutorial recipe: load_img(target_size) + model.predict(x[None]) per image."""
    import tensorflow as tf
    from PIL import Image
    model = tf.saved_model.load(spec.path)
    fn = model.signatures["serving_default"] if hasattr(model, "signatures") and \
        "serving_default" in model.signatures else None
    keras_in = tf.keras.Input((spec.input_size, spec.input_size, 3))

    class Wrapped(tf.keras.layers.Layer):
        def call(self, x):
            y = model((x - spec.mean) / spec.std) if fn is None else \
                next(iter(fn(**{list(fn.structured_input_signature[1])[0]:
                                (x - spec.mean) / spec.std}).values()))
            return tf.math.l2_normalize(y, axis=1)

    keras_model = tf.keras.Model(keras_in, Wrapped()(keras_in))
    keras_model.predict(np.zeros((1, spec.input_size, spec.input_size, 3), np.float32), verbose=0)
    t = time.perf_counter()
    for p in paths:
        img = Image.open(p).convert("RGB").resize((spec.input_size, spec.input_size))
        keras_model.predict(np.asarray(img, np.float32)[None], verbose=0)
    return len(paths) / (time.perf_counter() - t)


def _write(figures: dict, out: str | None) -> None:
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(figures, f, indent=2)
    print(json.dumps(figures, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="folder searched recursively for JPEGs")
    ap.add_argument("--limit", type=int, default=2000, help="images for the pipeline runs")
    ap.add_argument("--naive-limit", type=int, default=200, help="images for the naive loop")
    ap.add_argument("--model", default="builtin:efficientnet_lite0")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--changed", type=float, default=0.01, help="fraction changed for re-run")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="model.precision of both the model-only and the pipeline runs")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternating model-only / pipeline rounds (default 1)")
    ap.add_argument("--no-extras", action="store_true",
                    help="skip the incremental re-run and the naive loop")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    config = load_config(overrides={"model": {"handle": args.model, "precision": args.precision},
                                    "runner": {"direct_num_workers": args.workers}})
    from pipelines.model.precision import apply_precision
    apply_precision(args.precision)  # this process's model-only runs (workers apply their own)
    spec = resolve_model(config.model.handle, config.model.resolved_cache_dir(),
                         config.model.input_size)
    work = tempfile.mkdtemp(prefix="embed-bench-")
    try:
        src = find_images(args.images, args.limit)
        # Copies, so the incremental step can change some without touching the dataset.
        img_dir = os.path.join(work, "images")
        os.makedirs(img_dir)
        paths = []
        for i, p in enumerate(src):
            dst = os.path.join(img_dir, f"{i:06d}.jpg")
            shutil.copyfile(p, dst)
            paths.append(dst)
        manifest = write_manifest(paths, os.path.join(work, "manifest.csv"))
        print(f"{len(paths)} JPEGs, model {spec.model_id}, batch {config.model.batch_size}, "
              f"{args.workers} workers", flush=True)

        rounds = []
        for r in range(args.rounds):
            model_ips = model_only(spec, config.model.batch_size, max(512, args.limit // 4))
            print(f"[{r}] model-only         {model_ips:8.1f} images/s", flush=True)
            t = time.perf_counter()
            full = run_embed([manifest], os.path.join(work, f"emb-{r}"), config,
                             run_id=f"full-{r}")
            full_wall = time.perf_counter() - t
            assert full.embedded == len(paths), full
            pipe_ips = len(paths) / full_wall
            print(f"[{r}] pipeline (e2e)     {pipe_ips:8.1f} images/s  ({full_wall:.1f}s wall, "
                  f"ratio {pipe_ips / model_ips:.2f} of model-only)", flush=True)
            for stage, row in full.timings.get("stages", {}).items():
                print(f"[{r}]   stage {stage:10s} {json.dumps(row)}", flush=True)
            rounds.append({"model_only_ips": round(model_ips, 1),
                           "pipeline_e2e_ips": round(pipe_ips, 1),
                           "pipeline_wall_s": round(full_wall, 2),
                           "pipeline_over_model_only": round(pipe_ips / model_ips, 3),
                           "summary_timings": full.timings})
        head = {"images": len(paths), "model_id": spec.model_id,
                "precision": args.precision, "batch_size": config.model.batch_size,
                "workers": args.workers, "rounds": rounds,
                "mean_pipeline_over_model_only": round(
                    sum(r["pipeline_over_model_only"] for r in rounds) / len(rounds), 3)}
        if args.no_extras:
            _write(head, args.out)
            return 0

        # Change 1% of the images (re-encode at another quality: new bytes, same picture).
        from PIL import Image
        changed = paths[:: max(1, int(round(1 / args.changed)))]
        for p in changed:
            Image.open(p).convert("RGB").save(p, "JPEG", quality=83)
        t = time.perf_counter()
        inc = run_embed([manifest], os.path.join(work, "emb"), config, run_id="incremental",
                        previous=full.snapshot)
        inc_wall = time.perf_counter() - t
        assert inc.embedded == len(changed) and inc.reused == len(paths) - len(changed), inc
        print(f"incremental        {inc_wall:8.1f} s for {len(changed)} changed "
              f"= {inc_wall / full_wall:.1%} of the full run", flush=True)

        naive_ips = naive_loop(spec, paths[: args.naive_limit])
        print(f"naive Keras loop   {naive_ips:8.1f} images/s  (pipeline is "
              f"{pipe_ips / naive_ips:.1f}x faster)", flush=True)

        figures = {
            **head, "model_only_ips": round(model_ips, 1),
            "pipeline_e2e_ips": round(pipe_ips, 1), "pipeline_wall_s": round(full_wall, 2),
            "pipeline_over_model_only": round(pipe_ips / model_ips, 3),
            "incremental_changed": len(changed), "incremental_wall_s": round(inc_wall, 2),
            "incremental_over_full": round(inc_wall / full_wall, 4),
            "naive_ips": round(naive_ips, 1), "naive_images": min(args.naive_limit, len(paths)),
            "pipeline_over_naive": round(pipe_ips / naive_ips, 2),
            "summary_timings": full.timings,
        }
        _write(figures, args.out)
        snapshot.read_summary(inc.snapshot)  # the snapshot is complete
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
