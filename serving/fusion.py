"""Image + text ranking: photo + text queries, text-only queries, fused "similar products".

Fusion (documented in docs/EVALUATION.md, weight in `fusion.text_weight`):

1. candidates = the visual top images (enough for `fusion.candidates` products) ∪ the
   images of the text top `fusion.candidates` products (BM25 score > 0; at most
   `MAX_ROWS_PER_TEXT_PRODUCT` images each, scored visually by exact dot product);
2. every candidate image gets its visual score (cosine) and its product's BM25 score;
3. each is min-max normalised over the candidates (a constant column becomes 0);
4. fused = (1 - w) * visual' + w * text'; images are ranked by it and collapsed to
   products (best image per product) or listed per image, as plain visual search does.

With w = 0 the order is the visual one; with no query token found in the catalog the
text column is constant (0) and the order is again the visual one. Text-only queries rank
products by BM25 and return each product's first image.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np

from pipelines.index.sharded_search import Hit
from serving.filters import hit_matches

if TYPE_CHECKING:
    from serving.crowding import Crowding
    from serving.loaded_index import LoadedIndex

# A product found by text contributes at most this many of its images as candidates.
MAX_ROWS_PER_TEXT_PRODUCT = 64
# Visual candidate images fetched at most (the whole index when it is smaller).
MAX_VISUAL_CANDIDATES = 20_000


def _min_max(x: np.ndarray) -> np.ndarray:
    if x.size == 0:
        return x
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def _accept(idx: "LoadedIndex", row: int, filters: Mapping[str, frozenset[str]] | None,
            excluded: set[int], exclude_product: str | None) -> Hit | None:
    if row in excluded:
        return None
    pid = idx.product_id(row)
    if exclude_product is not None and pid == exclude_product:
        return None
    hit = idx.hit(row, 0.0)
    if filters and not hit_matches(hit, filters):
        return None
    return hit


def _ranked_hits(idx: "LoadedIndex", rows: np.ndarray, fused: np.ndarray,
                 visual: np.ndarray | None, text: np.ndarray | None, k: int,
                 filters: Mapping[str, frozenset[str]] | None, collapse: bool,
                 excluded: set[int], exclude_product: str | None,
                 crowding: "Crowding | None" = None) -> list[Hit]:
    from dataclasses import replace
    order = np.argsort(-fused, kind="stable")
    hits: list[Hit] = []
    seen: set[str] = set()
    crowd = crowding.counter() if crowding is not None else None
    for i in order.tolist():
        row = int(rows[i])
        key = idx.product_id(row) if collapse else idx.image_id(row)
        if key in seen:
            continue
        hit = _accept(idx, row, filters, excluded, exclude_product)
        if hit is None or (crowd is not None and not crowd.admit(hit)):
            continue
        seen.add(key)
        hits.append(replace(hit, score=float(fused[i]),
                            visual_score=None if visual is None else float(visual[i]),
                            text_score=None if text is None else float(text[i])))
        if len(hits) == k:
            break
    return hits


def text_hits(idx: "LoadedIndex", text: str, k: int,
              filters: Mapping[str, frozenset[str]] | None = None,
              collapse: bool = True, crowding: "Crowding | None" = None) -> list[Hit]:
    """Products (or their images) ranked by BM25 of `text`; only products that match."""
    ti = idx.text_index
    assert ti is not None
    scores = ti.scores(text)
    matched = np.flatnonzero(scores > 0)
    matched = matched[np.argsort(-scores[matched], kind="stable")]
    rows, values = [], []
    for p in matched.tolist():
        product_rows = idx.product_rows(ti.product_ids[p])
        for row in (product_rows[:1] if collapse else product_rows):
            rows.append(row)
            values.append(scores[p])
    if not rows:
        return []
    value_arr = np.asarray(values, np.float32)
    return _ranked_hits(idx, np.asarray(rows), value_arr, None, value_arr, k, filters,
                        collapse, set(), None, crowding)


def fused_hits(idx: "LoadedIndex", vector: np.ndarray, text: str, k: int, weight: float,
               candidates: int, filters: Mapping[str, frozenset[str]] | None = None,
               collapse: bool = True, exclude_rows: Iterable[int] = (),
               exclude_product: str | None = None, exact: bool = False,
               neighbours: tuple[np.ndarray, np.ndarray] | None = None,
               crowding: "Crowding | None" = None) -> list[Hit]:
    """Images ranked by (1-w)·visual' + w·text' over the candidate union (module docstring).

    `crowding` caps the hits per group (serving.crowding) within the candidates.
    """
    ti = idx.text_index
    assert ti is not None
    excluded = set(int(r) for r in exclude_rows)
    want = min(idx.num_vectors, MAX_VISUAL_CANDIDATES,
               max(candidates, int(np.ceil(candidates * idx.rows_per_product_hit)))
               + len(excluded))
    if neighbours is not None and neighbours[1].shape[0] >= want:
        v_scores, v_rows = neighbours[0][:want], neighbours[1][:want]
    else:
        s, r = idx.search(vector[None], want, exact=exact)
        v_scores, v_rows = s[0], r[0]
    keep = v_rows >= 0
    rows = [int(r) for r in v_rows[keep].tolist()]
    visual = [float(s) for s in v_scores[keep].tolist()]
    text_scores = ti.scores(text)
    matched = np.flatnonzero(text_scores > 0)
    top_text = matched[np.argsort(-text_scores[matched], kind="stable")][:candidates]
    have = set(rows)
    extra: list[int] = []
    for p in top_text.tolist():
        extra += [r for r in idx.product_rows(ti.product_ids[p])[:MAX_ROWS_PER_TEXT_PRODUCT]
                  if r not in have]
    if extra:
        rows += extra
        visual += (idx.vectors_of(extra) @ vector).astype(np.float32).tolist()
    row_arr = np.asarray(rows, dtype=np.int64)
    visual_arr = np.asarray(visual, np.float32)
    positions = ti.row_product[row_arr] if ti.row_product is not None else np.asarray(
        [ti.position(idx.product_id(r)) for r in rows], dtype=np.int64)
    text_arr = text_scores[positions] if len(positions) else np.zeros(0, np.float32)
    fused = (1.0 - weight) * _min_max(visual_arr) + weight * _min_max(text_arr)
    return _ranked_hits(idx, row_arr, fused, visual_arr, text_arr, k, filters, collapse,
                        excluded, exclude_product, crowding)


def product_title(idx: "LoadedIndex", product_id: str) -> str:
    """The text a "similar products" query uses for a product: its title (else its id)."""
    rows = idx.product_rows(product_id)
    if rows:
        title = idx.metadata(rows[0]).get("title")
        if isinstance(title, str) and title.strip():
            return title
    return product_id
