"""The labelled queries of an evaluation (serving/evaluate.py): each usable row of the query
manifest with its photo's vector in model space, embedded with the index's own model and
preprocessing, or read from the query vector cache (`catalog-search evaluate --vector-cache
DIR`: one .npz per query file, model, feature variants and precision, so evaluating another
index of the same model does not embed the photos again); the rows skipped, with why."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.core import filesystem as fs
from pipelines.core import progress
from pipelines.core.config import Config

log = logging.getLogger(__name__)


def vector_cache_file(cache_dir: str, queries: str, model: dict[str, Any]) -> str:
    """Query vectors depend on the query file, the model and the feature variants only."""
    from pipelines.model.features import features_dict
    if "://" not in queries:
        queries = os.path.abspath(queries)  # one cache entry however the path is spelled
    parts = {"queries": queries, "model": model.get("fingerprint"),
             "features": features_dict(model.get("features"))}
    if (model.get("precision") or "fp32") != "fp32":  # fp32: the cache names of before
        parts["precision"] = model["precision"]
    key = json.dumps(parts, sort_keys=True)
    return fs.join(cache_dir, f"queries-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz")


def load_vector_cache(path: str) -> dict[str, np.ndarray]:
    """image_uri -> vector of a cache file ({} when there is none, or an older layout)."""
    if not fs.exists(path):
        return {}
    with np.load(io.BytesIO(fs.read_bytes(path)), allow_pickle=False) as z:
        if "image_uris" not in z.files:  # an older cache layout: embed again
            return {}
        return {str(uri): vec for uri, vec in zip(z["image_uris"].tolist(), z["vectors"])}


def save_vector_cache(path: str, image_uris: list[str], vectors: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, image_uris=np.asarray(image_uris, dtype=str), vectors=vectors)
    fs.write_bytes(path, buf.getvalue())


@dataclass
class QueryVectors:
    """The labelled query rows an evaluation uses, their vectors in model space (what the
    vector cache keeps), and the rows skipped with why."""
    rows: list[dict[str, Any]]
    vectors: np.ndarray  # float32, one per row of `rows`
    skipped: list[dict[str, str]]
    total: int  # rows in the query manifest (usable + skipped)
    from_cache: int = 0
    embed_s: float = 0.0

    @property
    def embedded(self) -> int:
        return len(self.rows) - self.from_cache


@dataclass
class _Batches:
    """Query photos embedded config.model.batch_size at a time; vector_of[i]: query i's."""
    embedder: Any
    size: int
    vector_of: dict[int, np.ndarray] = field(default_factory=dict)
    pending: list[tuple[int, np.ndarray]] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, i: int, pixels: np.ndarray) -> None:
        self.pending.append((i, pixels))
        if len(self.pending) >= self.size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        t0 = time.perf_counter()
        out = self.embedder.embed_arrays(np.stack([p for _, p in self.pending]))
        self.seconds += time.perf_counter() - t0
        for (i, _), vec in zip(self.pending, out):
            self.vector_of[i] = vec
        progress.tick(len(self.pending))
        self.pending.clear()


def _skipped(row: dict[str, Any], reason: str, message: str) -> dict[str, str]:
    return {"source": row.get("source", ""), "reason": reason, "message": message}


def _skip_reason(row: dict[str, Any], idx: Any) -> dict[str, str] | None:
    """Why a labelled query row cannot be evaluated (dead-lettered by the manifest reader,
    or its product is not in the index), or None."""
    if row.get("error"):
        reason, message = row["error"]
        return _skipped(row, reason, message)
    if not idx.product_rows(row["product_id"]):
        return _skipped(row, "product_not_indexed",
                        f"product {row['product_id']!r} has no image in index "
                        f"version {idx.version}")
    return None


def _pixels(row: dict[str, Any], embedder: Any, max_bytes: int) -> np.ndarray | dict[str, str]:
    """The row's photo decoded and preprocessed for the model, or why it is skipped."""
    from serving.errors import QueryError
    try:
        data = fs.read_bytes(row["image_uri"], max_bytes=max_bytes)
        pixels: np.ndarray = embedder.preprocess(data)
        return pixels
    except QueryError as e:
        return _skipped(row, e.reason, str(e))
    except Exception as e:  # unreadable file, too large
        return _skipped(row, "unreadable", f"{row['image_uri']}: {e}")


def embed_queries(rows: list[dict[str, Any]], idx: Any, config: Config,
                  cached: dict[str, np.ndarray]) -> QueryVectors:
    """The vector of each usable row: from `cached` (image_uri -> vector) or embedded with
    the index's own model and preprocessing. Progress lines like embed's: each row counts
    once it is embedded, cached or skipped."""
    assert idx.embedder is not None
    batches = _Batches(idx.embedder, config.model.batch_size)
    usable: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    from_cache = 0
    with progress.report_progress("evaluate", len(rows), "queries"):
        for row in rows:
            skip = _skip_reason(row, idx)
            if skip is None and row["image_uri"] in cached:
                batches.vector_of[len(usable)] = cached[row["image_uri"]]
                from_cache += 1
                usable.append(row)
                progress.tick()
                continue
            pixels = skip if skip is not None else \
                _pixels(row, idx.embedder, config.fetch.max_bytes)
            if isinstance(pixels, dict):
                skipped.append(pixels)
                progress.tick()
                continue
            usable.append(row)
            batches.add(len(usable) - 1, pixels)
        batches.flush()
    vectors = np.stack([batches.vector_of[i] for i in range(len(usable))]).astype(np.float32) \
        if usable else np.zeros((0, 0), np.float32)
    return QueryVectors(usable, vectors, skipped, len(rows), from_cache, batches.seconds)


def query_vectors(queries: str, idx: Any, config: Config,
                  vector_cache: str | None = None) -> QueryVectors:
    """The labelled queries of the file `queries`, embedded or read from the vector cache
    folder `vector_cache` (updated when some were embedded)."""
    from pipelines.embed.manifest import read_rows
    rows = list(read_rows(0, queries))
    cache_file = vector_cache_file(vector_cache, queries, idx.manifest.model) \
        if vector_cache else None
    q = embed_queries(rows, idx, config, load_vector_cache(cache_file) if cache_file else {})
    if not q.rows:
        return q
    log.info("evaluate: %d queries (%d skipped), %d vectors from the cache, %d embedded in "
             "%.1fs", len(q.rows), len(q.skipped), q.from_cache, q.embedded, q.embed_s)
    if cache_file and q.embedded:
        save_vector_cache(cache_file, [r["image_uri"] for r in q.rows], q.vectors)
    return q
