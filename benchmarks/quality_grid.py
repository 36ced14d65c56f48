"""Retrieval-quality grid on the Grocery Store Dataset: model x features x fusion, one table.

    python benchmarks/quality_grid.py DATASET_DIR --work out/quality-grid \\
        [--rows lite0,lite0-fuse-cat-0.3,...] [--results benchmarks/results/quality_grid.json]

Per feature row (a model + pipelines.model.features / augment settings) it runs the real CLI:
`catalog-search embed` of the iconic + train catalog (once), `embed` of the packshots-only
catalog with `--previous` pointing at that snapshot (the 81 packshots are reused, not
embedded again), `build-index` for each, and `evaluate` on the 2,485 test photos for
each setting, with `--vector-cache` so the query photos are embedded once per feature row.
Fusion rows reuse a feature row's indexes and cached query vectors and only add
`--text-from FIELD --text-weight W`. Every finished row is appended to the results JSON at
once (a long grid can be stopped and resumed: finished rows are skipped), and
WORK/grid.html shows all rows side by side, each linking to its evaluation reports.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# name -> config override (YAML-able) for feature rows; fusion rows name their base row.
FEATURE_ROWS: dict[str, dict[str, Any]] = {
    "lite0": {"model": {"handle": "builtin:efficientnet_lite0"}},
    "lite0-flip": {"model": {"handle": "builtin:efficientnet_lite0"},
                   "features": {"flip": True}},
    "lite0-scales-1-1.3": {"model": {"handle": "builtin:efficientnet_lite0"},
                           "features": {"scales": [1.0, 1.3]}},
    "lite0-scale-1.3": {"model": {"handle": "builtin:efficientnet_lite0"},
                        "features": {"scales": [1.3]}},
    "lite0-scale-1.5": {"model": {"handle": "builtin:efficientnet_lite0"},
                        "features": {"scales": [1.5]}},
    "lite1-scale-1.3": {"model": {"handle": "builtin:efficientnet_lite1"},
                        "features": {"scales": [1.3]}},
    "lite0-query-scale-1.3": {"model": {"handle": "builtin:efficientnet_lite0"},
                              "features": {"query_scales": [1.3]}},
    "lite0-query-scales-1-1.3": {"model": {"handle": "builtin:efficientnet_lite0"},
                                 "features": {"query_scales": [1.0, 1.3]}},
    "lite0-query-scale-1.5": {"model": {"handle": "builtin:efficientnet_lite0"},
                              "features": {"query_scales": [1.5]}},
    "lite0-scale-1.3-query-1.6": {"model": {"handle": "builtin:efficientnet_lite0"},
                                  "features": {"scales": [1.3], "query_scales": [1.6]}},
    "lite1-query-scale-1.3": {"model": {"handle": "builtin:efficientnet_lite1"},
                              "features": {"query_scales": [1.3]}},
    "lite1-scale-1.3-query-1.6": {"model": {"handle": "builtin:efficientnet_lite1"},
                                  "features": {"scales": [1.3], "query_scales": [1.6]}},
    "lite1-query-scale-1.5": {"model": {"handle": "builtin:efficientnet_lite1"},
                              "features": {"query_scales": [1.5]}},
    "lite0-pad": {"model": {"handle": "builtin:efficientnet_lite0"},
                  "decode": {"resize": "pad"}},
    "lite0-views-separate": {"model": {"handle": "builtin:efficientnet_lite0"},
                             "augment": {"views": ["original", "hflip", "crop", "rotate",
                                                   "jitter"], "mode": "separate"}},
    "lite1": {"model": {"handle": "builtin:efficientnet_lite1"}},
    "lite1-flip": {"model": {"handle": "builtin:efficientnet_lite1"},
                   "features": {"flip": True}},
    "lite2": {"model": {"handle": "builtin:efficientnet_lite2"}},
}
BASE_FEATURES: dict[str, Any] = {"scales": [1.0], "flip": False, "query_scales": None}
BASE_AUGMENT: dict[str, Any] = {"views": ["original"], "mode": "mean"}
# Rows whose catalog-side cost only fits the packshots-only setting on this machine.
PACKSHOTS_ONLY = {"lite0-views-separate"}
FUSION_ROWS: dict[str, tuple[str, str, float]] = {
    "lite0+text(category) w=0.3": ("lite0", "category", 0.3),
    "lite0+text(category) w=0.5": ("lite0", "category", 0.5),
    "lite0+text(title) w=0.5": ("lite0", "title", 0.5),
    "lite0+text(category) w=0.2": ("lite0", "category", 0.2),
    "lite0+text(category) w=0.4": ("lite0", "category", 0.4),
    "lite0-scale-1.3-query-1.6+text(category) w=0.4": ("lite0-scale-1.3-query-1.6", "category",
                                                        0.4),
}
SETTINGS = ("full", "iconic")  # iconic + train catalog; packshots only


def _yaml(data: dict[str, Any]) -> str:
    import yaml
    return yaml.safe_dump(data, sort_keys=True)


def _run(cmd: list[str], log_path: str) -> float:
    """Run one CLI step, appending its output to log_path; returns seconds; raises on failure."""
    started = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"step failed ({proc.returncode}): {' '.join(cmd)}; see {log_path}")
    return time.time() - started


def _index_bytes(index_root: str) -> int:
    from pipelines.index import artifact as art
    version = art.read_latest(index_root)
    if version is None:
        raise SystemExit(f"{index_root}: nothing published")
    manifest = art.read_manifest(index_root, version)
    return sum(f.bytes for shard in manifest.shards for f in shard.files)


def _metrics(report_path: str) -> dict[str, Any]:
    with open(report_path, encoding="utf-8") as f:
        r = json.load(f)
    return {"index": r["overall"]["index"], "exact": r["overall"]["exact"],
            "queries": r["queries"], "skipped": len(r["skipped"]),
            "num_vectors": r["num_vectors"],
            "search_ms_per_query": r.get("search_ms_per_query"),
            "report": os.path.relpath(report_path.replace(".json", ".html"), ROOT)}


def feature_row(name: str, work: str, manifests: dict[str, str], queries: str,
                cs: list[str]) -> dict[str, Any]:
    """Embed, build and evaluate one feature row in both settings."""
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "config.yaml")
    # Every row pins the settings it does not vary to the pre-grid values, so a row
    # means the same whatever configs/default.yaml says today.
    override = {"features": dict(BASE_FEATURES), "augment": dict(BASE_AUGMENT),
                "decode": {"resize": "center_crop"}}
    for section, values in FEATURE_ROWS[name].items():
        override[section] = {**override.get(section, {}), **values}
    override["index"] = {"shards": 1}
    with open(cfg, "w", encoding="utf-8") as f:
        f.write(_yaml(override))
    log = os.path.join(d, "log.txt")
    base = cs + ["--config", cfg]
    out: dict[str, Any] = {"row": name, "kind": "features", "config": FEATURE_ROWS[name],
                           "settings": {}}
    settings = ("iconic",) if name in PACKSHOTS_ONLY else SETTINGS
    for setting in settings:
        emb = os.path.join(d, f"emb-{setting}")
        cmd = base + ["embed", "--manifest", manifests[setting], "--out", emb,
                      "--run-id", setting]
        if setting == "iconic" and "full" in settings:
            cmd += ["--previous", os.path.join(d, "emb-full", "full")]
        embed_s = _run(cmd, log)
        from pipelines.embed import snapshot
        summary = snapshot.read_summary(os.path.join(emb, setting))
        index_root = os.path.join(d, f"index-{setting}")
        shards = "2" if setting == "full" else "1"
        build_s = _run(base + ["build-index", "--embeddings", os.path.join(emb, setting),
                               "--index-root", index_root, "--shards", shards], log)
        eval_dir = os.path.join(d, f"eval-{setting}")
        eval_s = _run(base + ["evaluate", "--index-root", index_root, "--queries", queries,
                              "--out", eval_dir, "--examples", "20",
                              "--vector-cache", os.path.join(d, "vector-cache")], log)
        out["settings"][setting] = {
            **_metrics(os.path.join(eval_dir, "report.json")),
            "embedded": summary.embedded, "reused": summary.reused,
            "embed_images_per_s": summary.timings["embedded_per_s"],
            "embed_s": round(embed_s, 1), "build_s": round(build_s, 1),
            "evaluate_s": round(eval_s, 1), "index_bytes": _index_bytes(index_root),
            "embedding_fingerprint": summary.embedding_fingerprint,
            "model_id": summary.model_id}
    return out


def fusion_row(name: str, work: str, queries: str, cs: list[str]) -> dict[str, Any]:
    """Evaluate photo + text queries on a feature row's indexes (no embedding)."""
    base_row, field, weight = FUSION_ROWS[name]
    d = os.path.join(work, base_row)
    slug = f"fuse-{field}-{weight}"
    cfg = os.path.join(d, "config.yaml")
    log = os.path.join(d, "log.txt")
    out: dict[str, Any] = {"row": name, "kind": "fusion", "base": base_row,
                           "text_from": field, "text_weight": weight, "settings": {}}
    for setting in SETTINGS:
        index_root = os.path.join(d, f"index-{setting}")
        eval_dir = os.path.join(d, f"eval-{setting}-{slug}")
        eval_s = _run(cs + ["--config", cfg, "evaluate", "--index-root", index_root,
                            "--queries", queries, "--out", eval_dir, "--examples", "20",
                            "--vector-cache", os.path.join(d, "vector-cache"),
                            "--text-from", field, "--text-weight", str(weight)], log)
        out["settings"][setting] = {**_metrics(os.path.join(eval_dir, "report.json")),
                                    "evaluate_s": round(eval_s, 1),
                                    "index_bytes": _index_bytes(index_root)}
    return out


def render_html(results: list[dict[str, Any]], bench: dict[str, float] | None = None) -> str:
    """All grid rows side by side: per setting, recall@1/5/10 and mAP@10 (index / exact)."""
    metrics = ("recall@1", "recall@5", "recall@10", "mAP@10")
    head = "".join(f"<th colspan='{len(metrics) + 2}'>{s}</th>" for s in
                   ("iconic + train catalog", "packshots only"))
    sub = "".join("".join(f"<th>{m}</th>" for m in metrics)
                  + "<th>images per CPU-s (model)</th><th>report</th>"
                  for _ in SETTINGS)
    body = []
    for r in results:
        cells = []
        for s in SETTINGS:
            m = r["settings"].get(s)
            if m is None:
                cells.append(f"<td colspan='{len(metrics) + 2}'>not run</td>")
                continue
            cells += [f"<td>{m['index'][k]:.3f}<br><small>{m['exact'][k]:.3f}</small></td>"
                      for k in metrics]
            ips = model_images_per_s(r, results, bench or {})
            cells.append(f"<td>{ips:.0f}</td>" if ips else "<td>—</td>")
            cells.append(f"<td><a href='../../{html.escape(m['report'])}'>html</a></td>")
        body.append(f"<tr><th>{html.escape(r['row'])}</th>{''.join(cells)}</tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Quality grid</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:1.5rem}table{border-collapse:"
            "collapse;font-size:.85rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;"
            "text-align:right}</style></head><body><h1>Grocery quality grid</h1>"
            "<p>Each cell: published index, exact search below.</p>"
            f"<table><tr><th></th>{head}</tr><tr><th>row</th>{sub}</tr>{''.join(body)}"
            "</table></body></html>")


def forward_passes(config: dict[str, Any]) -> int:
    """Model calls per catalog image a feature row's settings cost (queries: see the doc)."""
    features = config.get("features", {})
    views = config.get("augment", {}).get("views", ["original"])
    return (len(features.get("scales", [1.0])) * (2 if features.get("flip") else 1)
            * len(views))


def model_images_per_s(row: dict[str, Any], rows: list[dict[str, Any]],
                       bench: dict[str, float]) -> float | None:
    """Images per CPU-second of the model (`model bench` CPU ms per image x forward passes)."""
    base = row if row["kind"] == "features" else next(
        (r for r in rows if r["row"] == row["base"]), None)
    if base is None:
        return None
    handle = base["config"]["model"]["handle"]
    ms = bench.get(handle)
    return 1000.0 / (ms * forward_passes(base["config"])) if ms else None


def read_bench(path: str) -> dict[str, float]:
    """handle -> lowest CPU ms per image from `model bench --json` lines (empty if absent)."""
    bench: dict[str, float] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                b = json.loads(line)
                handle = "builtin:" + b["model_id"].split("@")[0]
                bench[handle] = min(bench.get(handle, 1e9), b["cpu_ms_per_image"])
    return bench


def markdown_table(results: list[dict[str, Any]], bench: dict[str, float]) -> str:
    """The docs/EVALUATION.md table: one line per row and setting (published index)."""
    names = {"full": "iconic + train", "iconic": "packshots only"}
    lines = ["| row | catalog | recall@1 | recall@5 | recall@10 | mAP@10 | exact recall@1 | "
             "images per CPU-s (model) | index size | search ms/query |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for setting in SETTINGS:
        for r in results:
            m = r["settings"].get(setting)
            if m is None:
                continue
            ips = model_images_per_s(r, results, bench)
            size = m.get("index_bytes")
            lines.append(
                f"| {r['row']} | {names[setting]} ({m['num_vectors']:,} vectors) | "
                + " | ".join(f"{m['index'][k]:.3f}" for k in ("recall@1", "recall@5",
                                                               "recall@10", "mAP@10"))
                + f" | {m['exact']['recall@1']:.3f} | "
                + (f"{ips:.0f}" if ips else "—")
                + f" | {size / 1e6:.1f} MB | {m['search_ms_per_query']['index']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset", help="the Grocery Store Dataset's dataset/ folder")
    p.add_argument("--work", default="out/quality-grid")
    p.add_argument("--rows", help="comma-separated row names (default: all, in order)")
    p.add_argument("--results", default=os.path.join(HERE, "results", "quality_grid.json"))
    p.add_argument("--render", nargs="+", metavar="RESULTS_JSON",
                   help="only combine these results files: WORK/grid.html + a Markdown table")
    p.add_argument("--bench", default=os.path.join(HERE, "results", "model_bench_lite012.jsonl"),
                   help="`catalog-search model bench --json` lines (CPU ms per image by model)")
    args = p.parse_args(argv)
    if args.render:
        rows: list[dict[str, Any]] = []
        for path in args.render:
            with open(path, encoding="utf-8") as f:
                rows += json.load(f)["rows"]
        bench = read_bench(args.bench)
        with open(os.path.join(args.work, "grid.html"), "w", encoding="utf-8") as f:
            f.write(render_html(rows, bench))
        print(markdown_table(rows, bench))
        return 0
    from grocery_manifests import write_manifests
    names = list(FEATURE_ROWS) + list(FUSION_ROWS)
    chosen = args.rows.split(",") if args.rows else names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {names}")
    work = os.path.abspath(args.work)
    full_cat, queries = write_manifests(args.dataset, os.path.join(work, "grocery"))
    iconic_cat, _ = write_manifests(args.dataset, os.path.join(work, "grocery-iconic"),
                                    include_train=False)
    manifests = {"full": full_cat, "iconic": iconic_cat}
    cs = [sys.executable, "-m", "catalog_search.cli"]  # = catalog-search, from this checkout
    results: list[dict[str, Any]] = []
    if os.path.exists(args.results):
        with open(args.results, encoding="utf-8") as f:
            results = json.load(f)["rows"]
    for name in chosen:
        if any(r["row"] == name for r in results):
            print(f"{name}: done already", flush=True)
            continue
        started = time.time()
        row = (feature_row(name, work, manifests, queries, cs) if name in FEATURE_ROWS
               else fusion_row(name, work, queries, cs))
        row["seconds"] = round(time.time() - started, 1)
        results.append(row)
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        with open(args.results, "w", encoding="utf-8") as f:
            json.dump({"dataset": "grocery-store (Klasson et al.)", "rows": results}, f,
                      indent=1)
        with open(os.path.join(work, "grid.html"), "w", encoding="utf-8") as f:
            f.write(render_html(results, read_bench(args.bench)))
        summary = {s: round(m["index"]["recall@1"], 3) for s, m in row["settings"].items()}
        print(f"{name}: recall@1 {summary} ({row['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
