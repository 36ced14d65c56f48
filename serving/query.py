"""Answering one query on one `LoadedIndex` (the version serving when it arrived).

Checks of the arguments (k, text, text weight, vector, filters), the visual top-k
(`collect_hits`: over-fetch images, filter, collapse to products), and the query kinds
CatalogSearcher offers: by photo, by vector, by text, "more like this"; with text, the
visual and BM25 scores are fused (serving.fusion).
"""
from __future__ import annotations

import dataclasses
import reprlib
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pipelines.core.config import Config
from pipelines.index.sharded_search import Hit
from serving.crowding import Crowding, check_crowding
from serving.errors import QueryError
from serving.filter_index import EXACT_MAX_ROWS, exact_ranking, matching_rows
from serving.filters import hit_matches, validate_filters
from serving.fusion import fused_hits, product_title, text_hits
from serving.loaded_index import LoadedIndex
from serving.results import SearchResults, capped_hits


def check_k(k: Any, config: Config) -> int:
    """k or the default; QueryError unless 1 <= k <= serving.max_k."""
    if k is None:
        return config.serving.default_k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise QueryError("bad_k", f"k must be an integer, got {k!r}")
    if not 1 <= int(k) <= config.serving.max_k:
        raise QueryError("bad_k", f"k must be between 1 and {config.serving.max_k}, got {k}")
    return int(k)


def check_text(text: Any, config: Config) -> str | None:
    """None, or query text of 1 to fusion.max_text_chars characters; QueryError if not."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise QueryError("bad_text", f"text must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise QueryError("bad_text", "text is empty")
    limit = config.fusion.max_text_chars
    if len(text) > limit:
        raise QueryError("bad_text", f"text has {len(text)} characters; the limit is {limit}")
    return text


def check_weight(weight: Any, default: float) -> float:
    """A text weight in [0, 1] (default when None); QueryError if not."""
    if weight is None:
        return default
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not 0.0 <= float(weight) <= 1.0:
        raise QueryError("bad_text_weight", f"text_weight must be a number in [0, 1], "
                                            f"got {weight!r}")
    return float(weight)


def check_vector(vector: Sequence[float] | np.ndarray, dim: int) -> np.ndarray:
    """A finite, non-zero vector of the index's dimension, L2-normalised."""
    try:
        with np.errstate(over="ignore"):  # too large for float32 -> inf -> refused below
            v = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError, OverflowError) as e:
        raise QueryError("bad_vector", f"vector must be a list of finite numbers: "
                                       f"{reprlib.repr(str(e))}") from e
    if v.ndim != 1 or v.shape[0] != dim:
        raise QueryError("bad_vector", f"vector must have {dim} numbers, got shape "
                                       f"{list(v.shape)}")
    with np.errstate(over="ignore", invalid="ignore"):
        squared = float(v @ v)
    if 0.0 < squared < np.inf:  # finite and not all zeros: one dot product checks both
        return v / np.float32(np.sqrt(squared))
    if not np.all(np.isfinite(v)):
        raise QueryError("bad_vector", "vector has NaN or infinite values")
    if not np.any(v):
        raise QueryError("bad_vector", "vector is all zeros")
    return normalise(v)


def normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def plan_crowding(idx: LoadedIndex, config: Config, group_by: Any, max_per_group: Any,
                  collapse: bool) -> tuple[bool, Crowding | None]:
    """(collapse, crowding) of a query: crowding by product_id replaces the collapse."""
    crowding = check_crowding(group_by, max_per_group, idx.filter_keys, config.serving.max_k)
    if crowding is not None and crowding.replaces_collapse:
        collapse = False
    return collapse, crowding


def collect_hits(idx: LoadedIndex, vector: np.ndarray, k: int,
                 filters: Mapping[str, frozenset[str]] | None = None, collapse: bool = True,
                 exclude_rows: Iterable[int] = (), exclude_product: str | None = None,
                 exact: bool = False,
                 neighbours: tuple[np.ndarray, np.ndarray] | None = None,
                 crowding: Crowding | None = None) -> list[Hit]:
    """Top-k hits for one normalised query vector: over-fetch images, filter, collapse.

    Asks the index for more neighbours (x4 each round) until k hits survive filtering and
    product collapsing, or the whole index has been asked for. `neighbours` (scores [n],
    rows [n]) from an earlier batched search, if given, are used for the first round.
    `crowding` caps the hits per group (serving.crowding) as the ranking is walked.
    """
    excluded = set(int(r) for r in exclude_rows)
    extra = len(excluded) + (len(idx.product_rows(exclude_product)) if exclude_product else 0)
    needs_more = collapse or bool(filters) or extra > 0 or idx.has_views or bool(crowding)
    # Collapsing to products needs about k x (rows scanned per distinct product) rows;
    # that ratio is learned from earlier queries, so one search round is usually enough.
    first = int(k * idx.rows_per_product_hit * 1.25) if collapse else 4 * k
    # Filters (serving.filter_index): the rows that can pass them, when their keys are
    # indexed; few: rank all of them exactly; many: over-fetch by 1 / selectivity, and
    # rank them exactly if approximate rounds still leave fewer than k hits.
    allowed = matching_rows(idx, filters) if filters else None
    complete = False  # the ranking walked holds every row that can pass the filters
    if allowed is not None:
        if exact or len(allowed) <= EXACT_MAX_ROWS:
            neighbours, complete = exact_ranking(idx, vector, allowed), True
        else:
            first = int(first * idx.num_vectors / len(allowed))
    fetch = min(idx.num_vectors, (max(first, 32) if needs_more else k) + extra)
    rounds = 0
    while True:
        rounds += 1
        if neighbours is not None:
            scores, rows = neighbours[0][None], neighbours[1][None]
            fetch, neighbours = max(1, scores.shape[1]), None
        else:
            scores, rows = idx.search(vector[None], fetch, exact=exact)
        hits: list[Hit] = []
        seen: set[str] = set()
        crowd = crowding.counter() if crowding is not None else None
        product_id_of, image_id_of, make_hit = idx.product_id, idx.image_id, idx.hit
        for scanned, (score, row) in enumerate(zip(scores[0].tolist(), rows[0].tolist()), 1):
            if row < 0 or row in excluded:
                continue
            product_id = product_id_of(row)
            if exclude_product is not None and product_id == exclude_product:
                continue
            key = product_id if collapse else image_id_of(row)  # views of one image: once
            if key in seen:
                continue
            hit = make_hit(row, score)
            if filters and not hit_matches(hit, filters):
                continue
            if crowd is not None and not crowd.admit(hit):
                continue
            seen.add(key)
            hits.append(hit)
            if len(hits) == k:
                if collapse and not filters and crowd is None:
                    idx.learn_rows_per_product_hit(scanned / k)
                return hits
        if complete:
            return hits
        if allowed is not None and (rounds >= 2 or fetch >= idx.num_vectors):
            neighbours, complete = exact_ranking(idx, vector, allowed), True
            continue
        if fetch >= idx.num_vectors:
            return hits
        fetch = min(idx.num_vectors, fetch * 4)


def search_text(idx: LoadedIndex, config: Config, text: str, k: int | None = None,
                filters: Mapping[str, Any] | None = None,
                collapse: bool = True, group_by: Any = None,
                max_per_group: Any = None) -> SearchResults:
    """Products whose metadata text matches `text` (BM25); only matching products."""
    k = check_k(k, config)
    parsed = validate_filters(filters, idx.filter_keys)
    collapse, crowding = plan_crowding(idx, config, group_by, max_per_group, collapse)
    query = check_text(text, config)
    if query is None:
        raise QueryError("bad_text", "text is required")
    _check_text_index(idx)
    t0 = time.perf_counter()
    hits = text_hits(idx, query, k, parsed, collapse, crowding)
    hits = capped_hits(hits, config.serving.max_metadata_chars)
    return SearchResults(version=idx.version, k=k, collapsed=collapse, hits=hits,
                         timings_ms={"text_ms": (time.perf_counter() - t0) * 1e3},
                         crowding=crowding.to_dict() if crowding else None)


def search_image(idx: LoadedIndex, config: Config, data: bytes, k: int | None = None,
                 filters: Mapping[str, Any] | None = None,
                 collapse: bool = True, text: str | None = None,
                 text_weight: float | None = None, group_by: Any = None,
                 max_per_group: Any = None) -> SearchResults:
    """Products that look like the photo `data` (JPEG/PNG/... bytes).

    With `text`, visual and text (BM25) scores are fused (serving.fusion), weighted by
    `text_weight` (default fusion.text_weight). `group_by` / `max_per_group`: crowding
    (serving.crowding).
    """
    k = check_k(k, config)
    parsed = validate_filters(filters, idx.filter_keys)
    collapse, crowding = plan_crowding(idx, config, group_by, max_per_group, collapse)
    query_text = check_text(text, config)
    weight = check_weight(text_weight, config.fusion.text_weight)
    limit = config.serving.max_upload_bytes
    if len(data) > limit:
        raise QueryError("too_large", f"image is {len(data)} bytes; the limit is {limit}")
    if idx.embedder is None:
        raise QueryError("no_model", "this searcher was opened without a query model")
    t0 = time.perf_counter()
    pixels = idx.embedder.preprocess(data)
    t1 = time.perf_counter()
    raw = idx.embedder.embed_arrays(pixels[None])[0]
    vector = idx.to_index_space(raw)
    t2 = time.perf_counter()
    if query_text is not None:
        results = run_fused(config, idx, vector, query_text, weight, k, parsed, collapse, (),
                            crowding=crowding)
    else:
        results = run_visual(idx, vector, k, parsed, collapse, exclude_rows=(),
                             max_metadata_chars=config.serving.max_metadata_chars,
                             crowding=crowding)
    results.timings_ms.update(decode_ms=(t1 - t0) * 1e3, embed_ms=(t2 - t1) * 1e3)
    return with_model_vector(results, idx, raw)


def search_vector(idx: LoadedIndex, config: Config, vector: Sequence[float] | np.ndarray,
                  k: int | None = None, filters: Mapping[str, Any] | None = None,
                  collapse: bool = True, text: str | None = None,
                  text_weight: float | None = None, group_by: Any = None,
                  max_per_group: Any = None) -> SearchResults:
    """Products nearest to an embedding (normalised here; dimension must match).

    With `text`, fused with the text score as in `search_image`; crowding as there.
    """
    k = check_k(k, config)
    parsed = validate_filters(filters, idx.filter_keys)
    collapse, crowding = plan_crowding(idx, config, group_by, max_per_group, collapse)
    query_text = check_text(text, config)
    weight = check_weight(text_weight, config.fusion.text_weight)
    raw = check_vector(vector, idx.query_dim)
    vector_ = idx.to_index_space(raw)  # model -> index space
    if query_text is not None:
        results = run_fused(config, idx, vector_, query_text, weight, k, parsed, collapse, (),
                            crowding=crowding)
    else:
        results = run_visual(idx, vector_, k, parsed, collapse, (), crowding=crowding,
                             max_metadata_chars=config.serving.max_metadata_chars)
    return with_model_vector(results, idx, raw)


def with_model_vector(results: SearchResults, idx: LoadedIndex,
                      raw: np.ndarray) -> SearchResults:
    """`results` carrying the query's model-space vector (for POST /v1/feedback)."""
    v = np.asarray(raw, dtype=np.float32).reshape(-1)
    if abs(float(v @ v) - 1.0) > 1e-5:  # check_vector / the embedder normalised it already
        v = normalise(v)
    return dataclasses.replace(
        results, model_vector=v,
        model_id=idx.manifest.model_id,
        adapter_id=idx.adapter.id if idx.adapter is not None else None)


def similar_to(idx: LoadedIndex, config: Config, product_id: str | None = None,
               image_id: str | None = None, k: int | None = None,
               filters: Mapping[str, Any] | None = None, collapse: bool = True,
               text_weight: float | None = None, group_by: Any = None,
               max_per_group: Any = None) -> SearchResults:
    """"More like this": products like a catalog product (mean of its images) or image.

    The product (or image) itself is left out of the results. With a text weight > 0
    (`text_weight`, default fusion.similar_text_weight) the product's title similarity
    (BM25 of its title) is fused with the visual score (serving.fusion).
    """
    weight = check_weight(text_weight, config.fusion.similar_text_weight)
    if (product_id is None) == (image_id is None):
        raise QueryError("bad_query", "give exactly one of product_id or image_id")
    k = check_k(k, config)
    parsed = validate_filters(filters, idx.filter_keys)
    collapse, crowding = plan_crowding(idx, config, group_by, max_per_group, collapse)
    if product_id is not None:
        rows = idx.product_rows(product_id)
        if not rows:
            raise QueryError("unknown_product",
                             f"product {product_id!r} is not in index version {idx.version}")
        exclude_product = product_id
    else:
        assert image_id is not None  # exactly one of the two was given (checked above)
        rows = idx.image_rows(image_id)
        if not rows:
            raise QueryError("unknown_image",
                             f"image {image_id!r} is not in index version {idx.version}")
        exclude_product = None
    vectors = idx.vectors_of(rows)
    vector = normalise(vectors.mean(axis=0))
    if weight > 0:
        title = product_title(idx, product_id if product_id is not None
                              else idx.product_id(rows[0]))
        title = title[:config.fusion.max_text_chars]  # a 10 MB title is no query text
        return run_fused(config, idx, vector, title, weight, k, parsed, collapse, rows,
                               exclude_product, crowding=crowding)
    return run_visual(idx, vector, k, parsed, collapse, exclude_rows=rows,
                      max_metadata_chars=config.serving.max_metadata_chars,
                     exclude_product=exclude_product, crowding=crowding)


def _check_text_index(idx: LoadedIndex) -> None:
    if idx.text_index is None:
        raise QueryError("text_unavailable", "text search is not available on this server "
                                             "(the bm25s package is not installed)")


def run_fused(config: Config, idx: LoadedIndex, vector: np.ndarray, text: str, weight: float,
               k: int, filters: Mapping[str, frozenset[str]], collapse: bool,
               exclude_rows: Iterable[int], exclude_product: str | None = None,
               crowding: Crowding | None = None) -> SearchResults:
    _check_text_index(idx)
    t0 = time.perf_counter()
    hits = fused_hits(idx, vector, text, k, weight, config.fusion.candidates,
                      filters, collapse, exclude_rows, exclude_product, crowding=crowding)
    hits = capped_hits(hits, config.serving.max_metadata_chars)
    return SearchResults(version=idx.version, k=k, collapsed=collapse, hits=hits,
                         timings_ms={"search_ms": (time.perf_counter() - t0) * 1e3},
                         crowding=crowding.to_dict() if crowding else None)


def run_visual(idx: LoadedIndex, vector: np.ndarray, k: int,
         filters: Mapping[str, frozenset[str]], collapse: bool,
         exclude_rows: Iterable[int], exclude_product: str | None = None,
         exact: bool = False, crowding: Crowding | None = None,
         max_metadata_chars: int = 4096) -> SearchResults:
    t0 = time.perf_counter()
    hits = collect_hits(idx, vector, k, filters, collapse, exclude_rows, exclude_product,
                        exact, crowding=crowding)
    hits = capped_hits(hits, max_metadata_chars)
    return SearchResults(version=idx.version, k=k, collapsed=collapse, hits=hits,
                         timings_ms={"search_ms": (time.perf_counter() - t0) * 1e3},
                         crowding=crowding.to_dict() if crowding else None)
