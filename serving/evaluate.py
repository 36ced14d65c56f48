"""Retrieval quality of a published index on labelled query photos, with an HTML report.

    catalog-search evaluate --index-root IDX --queries LABELLED_MANIFEST --out DIR

A labelled query manifest is a catalog manifest (CSV / JSONL / Parquet: product_id,
image_uri, optional category): a result is a hit when its product_id is the query's.
Every query is embedded with the index's own model and decode/preprocess code, then
searched twice: through the published (approximate, sharded) index and by exact
brute-force search over the same vectors, so the two columns differ only by the index.

Metrics (k = 1, 5, 10):
- recall@k: the query's product is among the top-k products (results collapsed to the
  best image per product; there is one relevant product per query, so this is hit rate);
- precision@1: the top image is of the query's product;
- mAP@10: mean average precision of the top-10 images (uncollapsed), relevant = images
  of the query's product, normalised by min(10, images of that product in the index).
Reported overall, by category and by product. `evaluate()` writes report.json and a
self-contained report.html (thumbnails inlined as data: URIs; serving/evaluate_report.py)
into the output folder.
"""
from __future__ import annotations

import argparse
import json
import io
import logging
import sys
import time
from collections import defaultdict
from typing import Any

import numpy as np

from pipelines.core import filesystem as fs
from pipelines.core import progress
from pipelines.core.command import Command, UsageError
from pipelines.core.config import Config
from serving.evaluate_metrics import KS, MAP_DEPTH, METRIC_NAMES, mean_metrics, query_metrics
from serving.evaluate_report import EXAMPLE_RESULTS, render_html
from pipelines.core.errors import BadInputError

log = logging.getLogger(__name__)

MODES = ("index", "exact")
# Neighbours fetched per query in the batched first pass.
SEARCH_DEPTH = 1000


class EvaluateError(BadInputError):
    """An evaluation cannot run on this index and these queries (no usable query, ...)."""


def _vector_cache_file(cache_dir: str, queries: str, model: dict[str, Any]) -> str:
    """Query vectors depend on the query file, the model and the feature variants only."""
    import hashlib
    import json
    from pipelines.model.features import features_dict
    import os
    if "://" not in queries:
        queries = os.path.abspath(queries)  # one cache entry however the path is spelled
    parts = {"queries": queries, "model": model.get("fingerprint"),
             "features": features_dict(model.get("features"))}
    if (model.get("precision") or "fp32") != "fp32":  # fp32: the cache names of before
        parts["precision"] = model["precision"]
    key = json.dumps(parts, sort_keys=True)
    return fs.join(cache_dir, f"queries-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz")


def _load_vector_cache(path: str) -> dict[str, np.ndarray]:
    if not fs.exists(path):
        return {}
    with np.load(io.BytesIO(fs.read_bytes(path)), allow_pickle=False) as z:
        if "image_uris" not in z.files:  # an older cache layout: embed again
            return {}
        return {str(uri): vec for uri, vec in zip(z["image_uris"].tolist(), z["vectors"])}


def _save_vector_cache(path: str, image_uris: list[str], vectors: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, image_uris=np.asarray(image_uris, dtype=str), vectors=vectors)
    fs.write_bytes(path, buf.getvalue())


def _skip_reason(row: dict[str, Any], idx: Any) -> dict[str, str] | None:
    """Why a labelled query row cannot be evaluated (dead-lettered by the manifest reader,
    or its product is not in the index), or None."""
    if row.get("error"):
        reason, message = row["error"]
        return {"source": row.get("source", ""), "reason": reason, "message": message}
    if not idx.product_rows(row["product_id"]):
        return {"source": row.get("source", ""), "reason": "product_not_indexed",
                "message": f"product {row['product_id']!r} has no image in index "
                           f"version {idx.version}"}
    return None


def query_text(row: dict[str, Any], field: str) -> str:
    """The text a labelled query row contributes in a photo + text evaluation."""
    value = row.get(field) if field in ("product_id", "image_id") else \
        row["metadata"].get(field)
    return str(value).replace("-", " ").strip() if value is not None else ""


WITHOUT_ADAPTER = "without_adapter"


def _without_adapter(idx: Any, usable: list[dict[str, Any]], raw: np.ndarray,
                     per_query: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Each query's metrics by exact search over the raw (model-space) vectors of the
    snapshot the version was built from, i.e. the same catalog without the adapter; stored
    in per_query[i]["without_adapter"]. None (logged) when the snapshot cannot be read."""
    from pipelines.embed import snapshot as snap
    path = idx.manifest.source_snapshot.get("path")
    try:
        s = snap.load(str(path))
    except (snap.SnapshotError, OSError, ValueError) as e:
        log.warning("evaluate: no figures without the adapter: source snapshot %s: %s", path, e)
        return None
    gallery = s.vectors()
    if gallery.shape[1] != raw.shape[1]:
        log.warning("evaluate: source snapshot %s has %d-d vectors, queries %d-d: no figures "
                    "without the adapter", path, gallery.shape[1], raw.shape[1])
        return None
    products = np.asarray(s.table.column("product_id").to_pylist(), object)
    images = s.table.column("image_id").to_pylist()
    relevant: dict[str, set[str]] = defaultdict(set)
    for p, i in zip(products.tolist(), images):
        relevant[p].add(i)
    depth = min(len(gallery), SEARCH_DEPTH)
    for start in range(0, len(raw), 256):
        scores = raw[start:start + 256] @ gallery.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
        for j, rows in enumerate(top):
            qi = start + j
            pid = usable[qi]["product_id"]
            ranked = products[rows].tolist()
            collapsed = list(dict.fromkeys(ranked))[:max(KS)]
            per_query[qi][WITHOUT_ADAPTER] = query_metrics(
                pid, collapsed, ranked[:MAP_DEPTH], len(relevant.get(pid, ())))
    return {"snapshot": str(path), "num_vectors": int(len(gallery)), "dim": int(gallery.shape[1]),
            "search": "exact dot product over the snapshot's raw vectors"}


def evaluate(index_root: str, queries: str, out_dir: str, config: Config,
             version: str | None = None, max_examples: int = 40,
             vector_cache: str | None = None, text_from: str | None = None,
             text_weight: float | None = None) -> dict[str, Any]:
    """Evaluate the index LATEST (or `version`) names on a labelled query manifest.

    Writes out_dir/report.json and out_dir/report.html; returns the report dict
    ("overall": {"index": metrics, "exact": metrics}, "by_category", "by_product", ...).
    vector_cache: a folder where query vectors are kept per (queries, model, features), so
    re-evaluating another index of the same model does not embed the photos again.
    text_from: a query-manifest field (e.g. category, title) used as query text, fused with
    the photo (serving.fusion) with `text_weight` (default fusion.text_weight).
    """
    from pipelines.embed.manifest import read_rows
    from serving.query import collect_hits
    from serving.searcher import CatalogSearcher, QueryError

    started = time.perf_counter()
    searcher = CatalogSearcher.open(index_root, version=version, config=config)
    idx = searcher.current
    embedder = idx.embedder
    assert embedder is not None

    rows = list(read_rows(0, queries))
    skipped: list[dict[str, str]] = []
    usable: list[dict[str, Any]] = []
    cache_file = _vector_cache_file(vector_cache, queries, idx.manifest.model) \
        if vector_cache else None
    cached = _load_vector_cache(cache_file) if cache_file else {}
    vector_of: dict[int, np.ndarray] = {}  # usable index -> vector
    from_cache = 0
    pending: list[tuple[int, np.ndarray]] = []  # (usable index, pixels) not embedded yet
    batch = config.model.batch_size
    embed_s = 0.0

    def embed_pending() -> None:
        nonlocal embed_s
        if not pending:
            return
        t0 = time.perf_counter()
        out = embedder.embed_arrays(np.stack([p for _, p in pending]))
        embed_s += time.perf_counter() - t0
        for (i, _), vec in zip(pending, out):
            vector_of[i] = vec
        progress.tick(len(pending))
        pending.clear()

    # progress lines like embed's: each query counts once it is embedded, cached or skipped
    with progress.report_progress("evaluate", len(rows), "queries"):
        for row in rows:
            reason = _skip_reason(row, idx)
            if reason is not None:
                skipped.append(reason)
                progress.tick()
                continue
            if row["image_uri"] in cached:
                vector_of[len(usable)] = cached[row["image_uri"]]
                from_cache += 1
                usable.append(row)
                progress.tick()
                continue
            try:
                data = fs.read_bytes(row["image_uri"], max_bytes=config.fetch.max_bytes)
                pending.append((len(usable), embedder.preprocess(data)))
            except QueryError as e:
                skipped.append({"source": row.get("source", ""), "reason": e.reason,
                                "message": str(e)})
                progress.tick()
                continue
            except Exception as e:  # unreadable file, too large
                skipped.append({"source": row.get("source", ""), "reason": "unreadable",
                                "message": f"{row['image_uri']}: {e}"})
                progress.tick()
                continue
            usable.append(row)
            if len(pending) >= batch:
                embed_pending()
        embed_pending()
    if not usable:
        raise EvaluateError(f"{queries}: no usable query (of {len(rows)} rows; "
                            f"{len(skipped)} skipped, first: {skipped[:1]})")
    embedded = len(usable) - from_cache
    log.info("evaluate: %d queries (%d skipped), %d vectors from the cache, %d embedded in "
             "%.1fs", len(usable), len(skipped), from_cache, embedded, embed_s)
    vectors = np.stack([vector_of[i] for i in range(len(usable))]).astype(np.float32)
    if cache_file and embedded:
        _save_vector_cache(cache_file, [r["image_uri"] for r in usable], vectors)
    weight = text_weight if text_weight is not None else config.fusion.text_weight
    if text_from is not None and idx.text_index is None:
        raise EvaluateError("text fusion needs the index's text index (serving.text_search)")

    raw_vectors = vectors  # model space (what the cache keeps)
    vectors = idx.to_index_space(raw_vectors)  # the version's adapter, if it has one
    # Batched neighbour lists, deep enough for top-10 products in most cases
    # (collect_hits asks for more, one query at a time, when they are not).
    depth = min(idx.num_vectors, SEARCH_DEPTH)
    neighbours: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    search_s = {m: 0.0 for m in MODES}
    for mode in MODES:
        t0 = time.perf_counter()
        parts = [idx.search(vectors[i:i + 256], depth, exact=mode == "exact")
                 for i in range(0, len(vectors), 256)]
        neighbours[mode] = (np.concatenate([p[0] for p in parts]),
                            np.concatenate([p[1] for p in parts]))
        search_s[mode] += time.perf_counter() - t0

    per_query: list[dict[str, Any]] = []
    for qi, (row, vector) in enumerate(zip(usable, vectors)):
        pid = row["product_id"]
        entry: dict[str, Any] = {"product_id": pid, "image_uri": row["image_uri"],
                                 "category": str(row["metadata"].get("category", "")),
                                 "source": row.get("source", "")}
        # images, not rows: with augment.mode=separate an image has several rows (views)
        num_relevant = len({idx.image_id(r) for r in idx.product_rows(pid)})
        for mode in MODES:
            t0 = time.perf_counter()
            first = (neighbours[mode][0][qi], neighbours[mode][1][qi])
            text = query_text(row, text_from) if text_from else ""
            if text:
                from serving.fusion import fused_hits
                by_product = fused_hits(idx, vector, text, max(KS), weight,
                                        config.fusion.candidates, collapse=True,
                                        exact=mode == "exact", neighbours=first)
                by_image = fused_hits(idx, vector, text, MAP_DEPTH, weight,
                                      config.fusion.candidates, collapse=False,
                                      exact=mode == "exact", neighbours=first)
            else:
                by_product = collect_hits(idx, vector, max(KS), collapse=True,
                                          exact=mode == "exact", neighbours=first)
                by_image = collect_hits(idx, vector, MAP_DEPTH, collapse=False,
                                        exact=mode == "exact", neighbours=first)
            search_s[mode] += time.perf_counter() - t0
            entry[mode] = query_metrics(pid, [h.product_id for h in by_product],
                                         [h.product_id for h in by_image], num_relevant)
            if mode == "index":
                entry["results"] = [{"product_id": h.product_id, "image_id": h.image_id,
                                     "score": round(h.score, 4), "hit": h.product_id == pid}
                                    for h in by_product[:EXAMPLE_RESULTS]]
        per_query.append(entry)
    modes = list(MODES)
    without = None
    if idx.adapter is not None:  # the same queries on the raw vectors of the source snapshot
        t0 = time.perf_counter()
        without = _without_adapter(idx, usable, raw_vectors, per_query)
        search_s[WITHOUT_ADAPTER] = time.perf_counter() - t0
        if without is not None:
            modes.append(WITHOUT_ADAPTER)

    def grouped(key: str) -> dict[str, dict[str, Any]]:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for q in per_query:
            groups[q[key] or "(none)"].append(q)
        return {name: {"queries": len(qs), **{m: mean_metrics(q[m] for q in qs) for m in modes}}
                for name, qs in sorted(groups.items())}

    report: dict[str, Any] = {
        "index_root": index_root,
        "version": idx.version,
        "model_id": idx.manifest.model_id,
        "num_vectors": idx.num_vectors,
        "num_products": idx.num_products,
        "queries_file": queries,
        "queries": len(per_query),
        "skipped": skipped,
        "overall": {m: mean_metrics(q[m] for q in per_query) for m in modes},
        "adapter": ({"id": idx.adapter.id, "dim": idx.dim, "model_dim": idx.query_dim,
                     WITHOUT_ADAPTER: without}
                    if idx.adapter is not None else None),
        "by_category": grouped("category"),
        "by_product": grouped("product_id"),
        "index_evaluation": idx.manifest.evaluation,
        "features": idx.manifest.model.get("features"),
        "fusion": {"text_from": text_from, "text_weight": weight if text_from else None,
                   "candidates": config.fusion.candidates if text_from else None},
        "queries_from_cache": from_cache,
        "timings_s": {"total": round(time.perf_counter() - started, 2),
                      "embed": round(embed_s, 2),
                      **{f"search_{m}": round(s, 3) for m, s in search_s.items()}},
        "search_ms_per_query": {m: round(s * 1e3 / len(per_query), 3)
                                for m, s in search_s.items()},
        "per_query": per_query,
    }
    fs.write_json(fs.join(out_dir, "report.json"), report)
    fs.write_bytes(fs.join(out_dir, "report.html"),
                   render_html(report, idx, max_examples).encode("utf-8"))
    log.info("evaluate: %d queries, recall@1 %.3f (exact %.3f), report in %s", len(per_query),
             report["overall"]["index"]["recall@1"], report["overall"]["exact"]["recall@1"],
             out_dir)
    return report


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-root", required=True, help="index root (local path or gs://, s3://)")
    p.add_argument("--queries", required=True,
                   help="labelled query manifest (CSV/JSONL/Parquet: product_id, image_uri, "
                        "optional category)")
    p.add_argument("--out", default="out/evaluation", help="folder for report.html/report.json")
    p.add_argument("--version", help="index version (default: what LATEST names)")
    p.add_argument("--examples", type=int, default=40, help="query rows shown in the HTML")
    p.add_argument("--allow-model", action="append", default=[], metavar="HANDLE",
                   help="trust this model handle if the index names it (repeatable; adds to "
                        "serving.allowed_model_handles)")
    p.add_argument("--json", action="store_true",
                   help="print the overall metrics as one JSON object instead of a table")
    p.add_argument("--vector-cache", metavar="DIR",
                   help="keep query vectors here per (queries, model, features) and reuse them")
    p.add_argument("--text-from", metavar="FIELD",
                   help="photo + text queries: this query-manifest field (e.g. category, "
                        "title) is the query text, fused with the photo")
    p.add_argument("--text-weight", type=float, metavar="W",
                   help="text weight of the fusion, 0..1 (default fusion.text_weight)")


def _run(args: argparse.Namespace, config: Config) -> int:
    from serving.cli_checks import check_index_root, check_output_folder, check_queries_manifest
    from serving.errors import IndexLoadError
    if args.examples < 0:
        raise UsageError("--examples must be >= 0")
    if args.text_weight is not None and not 0.0 <= args.text_weight <= 1.0:
        raise UsageError(f"--text-weight must be in [0, 1], got {args.text_weight}")
    if args.text_weight is not None and not args.text_from:
        raise UsageError("--text-weight needs --text-from")
    if args.text_from is not None and not args.text_from.strip():
        raise UsageError("--text-from must name a query-manifest field")
    check_output_folder("--out", args.out)
    check_output_folder("--vector-cache", args.vector_cache)
    # the queries file is read whole and the index root checked before the index loads
    check_queries_manifest(args.queries)
    check_index_root(args.index_root)
    from serving.cli import with_allowed_models
    config = with_allowed_models(args, config)
    try:
        report = evaluate(args.index_root, args.queries, args.out, config,
                          version=args.version, max_examples=args.examples,
                          vector_cache=args.vector_cache, text_from=args.text_from,
                          text_weight=args.text_weight)
    except IndexLoadError as e:
        print(f"catalog-search evaluate: cannot load the index: {e}", file=sys.stderr)
        return 1
    except EvaluateError as e:
        print(f"catalog-search evaluate: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"version": report["version"], "queries": report["queries"],
                          "skipped": len(report["skipped"]), "overall": report["overall"],
                          "report": fs.join(args.out, "report.html")}, sort_keys=True))
        return 0
    print(f"index version {report['version']}: {report['queries']} queries "
          f"({len(report['skipped'])} skipped), {report['num_vectors']} vectors")
    print(f"{'':<16}" + "".join(f"{m:>13}" for m in METRIC_NAMES))
    for mode in report["overall"]:
        print(f"{mode:<16}" + "".join(f"{report['overall'][mode][m]:>13.3f}"
                                       for m in METRIC_NAMES))
    print(f"report: {fs.join(args.out, 'report.html')}")
    return 0


COMMANDS = {"evaluate": Command(
    help="recall@1/5/10, precision@1, mAP@10 of an index on labelled queries (+ HTML report)",
    add_arguments=_add_arguments, run=_run)}
