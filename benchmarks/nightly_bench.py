"""Full embed run vs a nightly re-run with 1% of the images changed (change signals on).

    .venv/bin/python benchmarks/nightly_bench.py --catalog out/grocery/catalog.csv \
        --alternates out/grocery/queries.csv --changed-fraction 0.01 --views original,hflip \
        --workdir /tmp/nightly --out benchmarks/results/nightly_bench.json

1. full run: every row of --catalog embedded (builtin model, DirectRunner 2 workers);
2. nightly run with --previous: the same manifest except that --changed-fraction of the
   rows point at another photo (taken from --alternates) -- new bytes, a new change signal;
3. the same nightly manifest with --verify-content (today's fetch-and-hash-everything).
Reports wall time, fetches and outcome counts of each, and the ratios to the full run.
The full run's snapshot (views kept separate) is what benchmarks/fitted_vectors.py fits.
--rows N repeats the catalog under distinct image_ids up to N rows (a larger catalog
reusing the same files: e.g. --rows 20000 for the issue's >= 20,000-row run).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.core.config import load_config  # noqa: E402
from pipelines.embed.job import run_embed  # noqa: E402


def _rows(path: str) -> tuple[list[dict[str, str]], list[str]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r), list(r.fieldnames or [])


def _write(path: str, rows: list[dict[str, str]], fields: list[str]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--alternates", required=True, help="manifest whose images replace changed rows")
    ap.add_argument("--rows", type=int, help="repeat the catalog to this many rows")
    ap.add_argument("--changed-fraction", type=float, default=0.01)
    ap.add_argument("--views", default="original")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/nightly")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows, fields = _rows(args.catalog)
    if args.rows:
        base = rows
        rows = [dict(base[i % len(base)], image_id=f"{base[i % len(base)]['image_id']}#{i // len(base)}")
                for i in range(args.rows)]
    alternates = [r["image_uri"] for r in _rows(args.alternates)[0]]
    os.makedirs(args.workdir, exist_ok=True)
    config = load_config(overrides={
        "augment": {"views": args.views.split(","), "mode": "separate"},
        "runner": {"direct_running_mode": "multi_processing", "direct_num_workers": args.workers}})
    out_root = os.path.join(args.workdir, "emb")
    full_manifest = _write(os.path.join(args.workdir, "full.csv"), rows, fields)
    rng = random.Random(0)
    changed_idx = sorted(rng.sample(range(len(rows)), max(1, round(args.changed_fraction * len(rows)))))
    nightly = [dict(r) for r in rows]
    for j, i in enumerate(changed_idx):
        nightly[i]["image_uri"] = alternates[j % len(alternates)]
    nightly_manifest = _write(os.path.join(args.workdir, "nightly.csv"), nightly, fields)

    def timed(name: str, manifest: str, **kw) -> dict:
        t = time.time()
        s = run_embed([manifest], out_root, config, run_id=name, **kw)
        wall = time.time() - t
        keys = ("input_rows", "embedded", "reused", "dead_lettered", "fetched",
                "reused_without_fetch", "reused_after_hash")
        rec = {"wall_seconds": round(wall, 2), **{k: getattr(s, k) for k in keys},
               "pipeline_seconds": s.timings["pipeline_s"], "snapshot": s.snapshot}
        print(name, json.dumps(rec), flush=True)
        return rec

    full = timed("full", full_manifest)
    signal = timed("nightly-signal", nightly_manifest, previous=full["snapshot"])
    verify = timed("nightly-verify", nightly_manifest, previous=full["snapshot"],
                   verify_content=True)
    result = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "cpus": os.cpu_count(), "rows": len(rows), "changed": len(changed_idx),
              "views": args.views.split(","), "full": full, "nightly_signal": signal,
              "nightly_verify_content": verify,
              "ratios": {"nightly_signal_vs_full": round(signal["wall_seconds"] / full["wall_seconds"], 3),
                         "nightly_verify_vs_full": round(verify["wall_seconds"] / full["wall_seconds"], 3)},
              "full_images_per_s": round(full["embedded"] / full["wall_seconds"], 2)}
    print(json.dumps(result["ratios"]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
