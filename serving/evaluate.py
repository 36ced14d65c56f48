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
into the output folder. The query rows and their vectors (embedded, or from the vector
cache): serving/evaluate_queries.py; the metrics: serving/evaluate_metrics.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.core import filesystem as fs
from pipelines.core.command import Command, UsageError
from pipelines.core.config import Config
from pipelines.core.errors import BadInputError
from serving.evaluate_metrics import KS, MAP_DEPTH, METRIC_NAMES, mean_metrics, query_metrics
from serving.evaluate_queries import QueryVectors, query_vectors
from serving.evaluate_report import EXAMPLE_RESULTS, render_html

log = logging.getLogger(__name__)

MODES = ("index", "exact")
WITHOUT_ADAPTER = "without_adapter"
# Neighbours fetched per query in the batched first pass.
SEARCH_DEPTH = 1000
# Queries per batched search call.
SEARCH_BATCH = 256


class EvaluateError(BadInputError):
    """An evaluation cannot run on this index and these queries (no usable query, ...)."""


# --------------------------------------------------------------------------- search, metrics

def query_text(row: dict[str, Any], field: str) -> str:
    """The text a labelled query row contributes in a photo + text evaluation."""
    value = row.get(field) if field in ("product_id", "image_id") else \
        row["metadata"].get(field)
    return str(value).replace("-", " ").strip() if value is not None else ""


@dataclass(frozen=True)
class Fusion:
    """Photo + text queries: the query-manifest field used as text, and the fusion's
    weight and candidates (serving.fusion); text_from None: photo only."""
    text_from: str | None
    weight: float
    candidates: int

    def report(self) -> dict[str, Any]:
        on = self.text_from is not None
        return {"text_from": self.text_from, "text_weight": self.weight if on else None,
                "candidates": self.candidates if on else None}


Neighbours = tuple[np.ndarray, np.ndarray]  # (rows, scores) per query


def _first_pass(idx: Any, vectors: np.ndarray, search_s: dict[str, float]
                ) -> dict[str, Neighbours]:
    """Batched neighbour lists per mode (index-space vectors), deep enough for the top-10
    products in most cases (collect_hits asks for more, one query at a time, when not)."""
    depth = min(idx.num_vectors, SEARCH_DEPTH)
    neighbours: dict[str, Neighbours] = {}
    for mode in MODES:
        t0 = time.perf_counter()
        parts = [idx.search(vectors[i:i + SEARCH_BATCH], depth, exact=mode == "exact")
                 for i in range(0, len(vectors), SEARCH_BATCH)]
        neighbours[mode] = (np.concatenate([p[0] for p in parts]),
                            np.concatenate([p[1] for p in parts]))
        search_s[mode] += time.perf_counter() - t0
    return neighbours


def _hits(idx: Any, vector: np.ndarray, text: str, exact: bool, first: Neighbours,
          fusion: Fusion) -> tuple[list[Any], list[Any]]:
    """A query's top products (collapsed, max(KS)) and top images (MAP_DEPTH)."""
    from serving.query import collect_hits
    out = []
    for k, collapse in ((max(KS), True), (MAP_DEPTH, False)):
        if text:
            from serving.fusion import fused_hits
            out.append(fused_hits(idx, vector, text, k, fusion.weight, fusion.candidates,
                                  collapse=collapse, exact=exact, neighbours=first))
        else:
            out.append(collect_hits(idx, vector, k, collapse=collapse, exact=exact,
                                    neighbours=first))
    return out[0], out[1]


def _score_queries(idx: Any, rows: list[dict[str, Any]], vectors: np.ndarray,
                   fusion: Fusion, search_s: dict[str, float]) -> list[dict[str, Any]]:
    """Each query's metrics per mode (index-space `vectors`), and its top results by the
    published index (the HTML page's examples)."""
    neighbours = _first_pass(idx, vectors, search_s)
    per_query: list[dict[str, Any]] = []
    for qi, (row, vector) in enumerate(zip(rows, vectors)):
        pid = row["product_id"]
        entry: dict[str, Any] = {"product_id": pid, "image_uri": row["image_uri"],
                                 "category": str(row["metadata"].get("category", "")),
                                 "source": row.get("source", "")}
        # images, not rows: with augment.mode=separate an image has several rows (views)
        num_relevant = len({idx.image_id(r) for r in idx.product_rows(pid)})
        text = query_text(row, fusion.text_from) if fusion.text_from else ""
        for mode in MODES:
            t0 = time.perf_counter()
            first = (neighbours[mode][0][qi], neighbours[mode][1][qi])
            by_product, by_image = _hits(idx, vector, text, mode == "exact", first, fusion)
            search_s[mode] += time.perf_counter() - t0
            entry[mode] = query_metrics(pid, [h.product_id for h in by_product],
                                        [h.product_id for h in by_image], num_relevant)
            if mode == "index":
                entry["results"] = [{"product_id": h.product_id, "image_id": h.image_id,
                                     "score": round(h.score, 4), "hit": h.product_id == pid}
                                    for h in by_product[:EXAMPLE_RESULTS]]
        per_query.append(entry)
    return per_query


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
    for start in range(0, len(raw), SEARCH_BATCH):
        scores = raw[start:start + SEARCH_BATCH] @ gallery.T
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


# --------------------------------------------------------------------------- the report

def _grouped(per_query: list[dict[str, Any]], key: str,
             modes: list[str]) -> dict[str, dict[str, Any]]:
    """Mean metrics per value of `key` (category, product_id), sorted by that value."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for q in per_query:
        groups[q[key] or "(none)"].append(q)
    return {name: {"queries": len(qs), **{m: mean_metrics(q[m] for q in qs) for m in modes}}
            for name, qs in sorted(groups.items())}


def _report(index_root: str, queries: str, idx: Any, q: QueryVectors,
            per_query: list[dict[str, Any]], without: dict[str, Any] | None, fusion: Fusion,
            started: float, search_s: dict[str, float]) -> dict[str, Any]:
    """The report dict (report.json) of one evaluation."""
    modes = list(MODES) + ([WITHOUT_ADAPTER] if without is not None else [])
    return {
        "index_root": index_root,
        "version": idx.version,
        "model_id": idx.manifest.model_id,
        "num_vectors": idx.num_vectors,
        "num_products": idx.num_products,
        "queries_file": queries,
        "queries": len(per_query),
        "skipped": q.skipped,
        "overall": {m: mean_metrics(p[m] for p in per_query) for m in modes},
        "adapter": ({"id": idx.adapter.id, "dim": idx.dim, "model_dim": idx.query_dim,
                     WITHOUT_ADAPTER: without}
                    if idx.adapter is not None else None),
        "by_category": _grouped(per_query, "category", modes),
        "by_product": _grouped(per_query, "product_id", modes),
        "index_evaluation": idx.manifest.evaluation,
        "features": idx.manifest.model.get("features"),
        "fusion": fusion.report(),
        "queries_from_cache": q.from_cache,
        "timings_s": {"total": round(time.perf_counter() - started, 2),
                      "embed": round(q.embed_s, 2),
                      **{f"search_{m}": round(s, 3) for m, s in search_s.items()}},
        "search_ms_per_query": {m: round(s * 1e3 / len(per_query), 3)
                                for m, s in search_s.items()},
        "per_query": per_query,
    }


def _write_report(report: dict[str, Any], idx: Any, out_dir: str, max_examples: int) -> None:
    fs.write_json(fs.join(out_dir, "report.json"), report)
    fs.write_bytes(fs.join(out_dir, "report.html"),
                   render_html(report, idx, max_examples).encode("utf-8"))
    log.info("evaluate: %d queries, recall@1 %.3f (exact %.3f), report in %s",
             report["queries"], report["overall"]["index"]["recall@1"],
             report["overall"]["exact"]["recall@1"], out_dir)


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
    from serving.searcher import CatalogSearcher
    started = time.perf_counter()
    idx = CatalogSearcher.open(index_root, version=version, config=config).current
    q = query_vectors(queries, idx, config, vector_cache)
    if not q.rows:
        raise EvaluateError(f"{queries}: no usable query (of {q.total} rows; "
                            f"{len(q.skipped)} skipped, first: {q.skipped[:1]})")
    fusion = Fusion(text_from, text_weight if text_weight is not None
                    else config.fusion.text_weight, config.fusion.candidates)
    if text_from is not None and idx.text_index is None:
        raise EvaluateError("text fusion needs the index's text index (serving.text_search)")
    search_s = {m: 0.0 for m in MODES}
    # the version's adapter, if it has one, maps the model-space vectors to index space
    per_query = _score_queries(idx, q.rows, idx.to_index_space(q.vectors), fusion, search_s)
    without = None
    if idx.adapter is not None:  # the same queries on the raw vectors of the source snapshot
        t0 = time.perf_counter()
        without = _without_adapter(idx, q.rows, q.vectors, per_query)
        search_s[WITHOUT_ADAPTER] = time.perf_counter() - t0
    report = _report(index_root, queries, idx, q, per_query, without, fusion, started,
                     search_s)
    _write_report(report, idx, out_dir, max_examples)
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
