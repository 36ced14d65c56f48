"""`catalog-search model info|export|bench`: inspect, export and benchmark the embedding model.

    catalog-search model info   [--handle H] [--json]   resolve (converting a builtin model
                                                        once) and print its spec
    catalog-search model export [--handle H] --out DIR  copy its SavedModel (local or gs://,
                                                        s3://, ...) for cluster runs
    catalog-search model bench  [--handle H] ...        model-only throughput in this process

The builtin models themselves (conversion, cache) live in pipelines.model.efficientnet_lite.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from pipelines.core.command import Command, UsageError
from pipelines.core.config import Config
from pipelines.model.onednn import onednn_status
from pipelines.model.precision import PRECISIONS, Precision, PrecisionError, resolve_precision


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="model_action", metavar="ACTION", required=True)
    info = actions.add_parser("info", help="resolve the configured model (converting the "
                                           "builtin one if needed) and print its spec")
    info.add_argument("--handle", help="model handle (default: model.handle from the config)")
    info.add_argument("--json", action="store_true", help="print the spec as JSON")
    export = actions.add_parser("export", help="copy the model's SavedModel to a directory "
                                               "(local or gs://, s3://, ...) for cluster runs")
    export.add_argument("--handle", help="model handle (default: model.handle from the config)")
    export.add_argument("--out", required=True, help="destination directory; must not exist "
                                                     "or be empty")
    export.add_argument("--json", action="store_true",
                        help="print the result (handle, model id, files, out) as JSON")
    bench = actions.add_parser("bench", help="model-only throughput (images/s) on random "
                                             "images in this process")
    bench.add_argument("--handle", help="model handle (default: model.handle from the config)")
    bench.add_argument("--batch-size", type=int, default=32, help="images per call (default 32)")
    bench.add_argument("--batches", type=int, default=5, help="timed calls (default 5)")
    bench.add_argument("--threads", type=int, default=None,
                       help="TF intra/inter-op threads (default: runner.tf_threads; 0 = TF's)")
    bench.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="fp32, bf16 or auto (default: model.precision from the config)")
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    info.add_argument("--precision", choices=PRECISIONS, default=None,
                      help="fp32, bf16 or auto (default: model.precision from the config)")


def _resolve(args: argparse.Namespace, config: Config) -> Any:
    from pipelines.model.resolve import ModelError, resolve_model
    handle = args.handle or config.model.handle
    try:
        return resolve_model(handle, config.model.resolved_cache_dir(), config.model.input_size)
    except ModelError as e:
        raise UsageError(str(e)) from None


def export_saved_model(src: str, out: str) -> int:
    """Copy a local SavedModel directory to `out` (any Beam FileSystems URI); returns files copied.

    Local destinations are written to a sibling temp dir and renamed into place.
    """
    from pipelines.core import filesystem
    if filesystem.is_local(out) and os.path.isfile(filesystem.normalize(out)):
        raise UsageError(f"--out {out} is an existing file, not a directory")
    if filesystem.list_children(out):
        raise UsageError(f"--out {out} already exists and is not empty")
    files = []
    for root, dirs, names in os.walk(src):
        dirs.sort()
        files += [os.path.relpath(os.path.join(root, n), src) for n in sorted(names)]
    if filesystem.is_local(out):
        dest = os.path.abspath(filesystem.normalize(out))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp-",
                               dir=os.path.dirname(dest))
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            if os.path.isdir(dest):
                os.rmdir(dest)  # empty (checked above)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return len(files)
    # Object stores: saved_model.pb last, so a reader never sees a model without its variables.
    files.sort(key=lambda rel: rel == "saved_model.pb")
    for rel in files:
        with open(os.path.join(src, rel), "rb") as f:
            filesystem.write_bytes(filesystem.join(out, *rel.split(os.sep)), f.read())
    return len(files)


def benchmark(spec: Any, batch_size: int, batches: int) -> dict[str, float]:
    """Embed `batches` random uint8 batches after one warm-up call; returns timings."""
    from pipelines.model.resolve import Embedder
    started = time.monotonic()
    embedder = Embedder(spec)
    images = np.random.default_rng(0).integers(
        0, 256, (batch_size, spec.input_size, spec.input_size, 3), dtype=np.uint8)
    embedder.embed(images)
    ready, cpu_ready = time.monotonic(), time.process_time()
    for _ in range(batches):
        embedder.embed(images)
    elapsed = time.monotonic() - ready
    cpu = time.process_time() - cpu_ready
    # CPU time per image is much less sensitive than images/s to other load on the machine.
    return {"load_and_warmup_s": ready - started, "timed_s": elapsed,
            "images_per_s": batch_size * batches / elapsed,
            "cpu_ms_per_image": 1000 * cpu / (batch_size * batches)}


def _precision(args: argparse.Namespace, config: Config) -> Precision:
    try:
        return resolve_precision(getattr(args, "precision", None) or config.model.precision)
    except PrecisionError as e:
        raise UsageError(str(e)) from None


def _run(args: argparse.Namespace, config: Config) -> int:
    if args.model_action == "bench":
        if args.batch_size < 1 or args.batches < 1:
            raise UsageError("--batch-size and --batches must be >= 1")
        from pipelines.model.resolve import configure_tf_threads
        threads = config.runner.tf_threads if args.threads is None else args.threads
        if threads < 0:
            raise UsageError(f"--threads must be >= 0, got {threads}")
        configure_tf_threads(threads)
    spec = _resolve(args, config)
    if args.model_action == "bench":
        precision = _precision(args, config)
        from pipelines.model.precision import apply_precision
        apply_precision(precision.value)
        result = benchmark(spec, args.batch_size, args.batches)
        if args.json:
            status = onednn_status()
            print(json.dumps({"model_id": spec.model_id, "input_size": spec.input_size,
                              "batch_size": args.batch_size, "batches": args.batches,
                              "tf_threads": threads, "onednn": status.enabled,
                              "precision": precision.value, **result},
                             sort_keys=True))
            return 0
        print(f"{spec.model_id}: {result['images_per_s']:.1f} images/s "
              f"(batch {args.batch_size} x {args.batches}, {spec.input_size}px, "
              f"tf threads {threads or 'default'}; {result['cpu_ms_per_image']:.1f} CPU ms/image; "
              f"load + warm-up {result['load_and_warmup_s']:.1f}s; "
              f"oneDNN {onednn_status().describe()}; precision {precision.describe()})")
        return 0
    if args.model_action == "info":
        precision = _precision(args, config)
        if args.json:
            status = onednn_status()
            print(json.dumps({**spec.to_dict(), "onednn": {"enabled": status.enabled,
                                                          "reason": status.reason},
                              "precision": {"value": precision.value,
                                            "setting": precision.setting,
                                            "reason": precision.reason}},
                             indent=2, sort_keys=True))
        else:
            print(f"handle:      {spec.handle}")
            print(f"model id:    {spec.model_id}")
            print(f"path:        {spec.path}")
            print(f"fingerprint: {spec.fingerprint}")
            print(f"dim:         {spec.dim or 'unknown until loaded'}")
            print(f"input size:  {spec.input_size}")
            print(f"normalise:   (x - {spec.mean:g}) / {spec.std:g} on 0..255 RGB")
            print(f"oneDNN:      {onednn_status().describe()}")
            print(f"precision:   {precision.describe()}")
        return 0
    if spec.path.startswith(("http://", "https://")) or not os.path.isdir(spec.path):
        raise UsageError(f"{spec.handle} is not a local SavedModel directory; nothing to export")
    n = export_saved_model(spec.path, args.out)
    if args.json:
        print(json.dumps({"handle": spec.handle, "model_id": spec.model_id,
                          "fingerprint": spec.fingerprint, "files": n, "out": args.out},
                         sort_keys=True))
        return 0
    print(f"exported {spec.handle} ({spec.model_id}, {n} files) to {args.out}")
    print(f"use it with model.handle: {args.out}")
    return 0


COMMANDS = {
    "model": Command(help="convert / inspect / export / benchmark the embedding model "
                          "(builtin: EfficientNet-Lite0/1/2)", add_arguments=_add_arguments, run=_run),
}
