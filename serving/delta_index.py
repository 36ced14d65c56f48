"""An index version plus its delta log, served as one index (`DeltaIndex`).

The base `LoadedIndex` (the immutable version: ScaNN shards, rows, BM25 text index) is
loaded once; its deltas (pipelines/index/deltas.py) and the takedown list are applied on
top in memory, which costs in proportion to the deltas, not to the version, so a new
delta or a takedown is served within one poll (or at once after POST /v1/reload or
POST /v1/admin/delete) without reloading a shard.

Row space: rows 0..N-1 are the version's global rows, rows N..N+M-1 the upserted delta
rows in log order. A *masked* row is one that a delete, a later upsert of the same
image_id or a takedown removed. Every query path reaches rows only through the
`LoadedIndex` methods this class overrides, so a masked row is never returned:
- `search`: the base ScaNN search asks for n + the number of masked base rows (at most
  FIRST_OVERFETCH) and drops the masked rows; a query that got more masked rows back than
  that is asked again for n + all of them (so thousands of takedowns do not widen every
  search); the live delta rows are searched exactly (numpy dot products) while they
  are fewer than `serving.delta_scann_min_rows`, and from there by a ScaNN searcher built
  over them in memory (serving.delta_segment: exact float32 scores, no docids, nothing
  written; rows masked after its build are dropped like the base's;
  rows added after it are searched exactly until they reach the threshold themselves);
  the lists are merged by score. A single query searches every part in the calling
  thread; a batch runs the segment on the shard pool beside the base. `exact=True`
  searches every live delta row exactly;
- `product_rows` / `image_rows` / `has_image` leave masked rows out (similar products,
  text hits and fusion candidates come from them);
- the text index is the version's BM25 index plus a small BM25 index over the products
  that only the deltas hold (their scores are on the delta products' own statistics
  until the next full build folds them in; serving/delta_text.py).

Which rows the deltas and takedowns mask is worked out from the ids alone
(serving/delta_rows.py).

Accounting: `searchable_rows` = base rows + rows added - rows masked.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from pipelines.index.deltas import Delta, oldest_age_s
from pipelines.index.hits import Hit, new_hit, parse_metadata
from pipelines.index.sharded_search import search_exact, shard_pool
from serving.delta_rows import apply_deltas
from serving.delta_segment import DeltaSegment, SegmentParams
from serving.delta_text import delta_text_index
from serving.filter_index import OverlayFilterIndex
from serving.loaded_index import LoadedIndex

#: Over-fetch from the base at most this many rows beyond n for masked base rows (beyond,
#: the caller's next round asks for more: collect_hits grows its fetch x4).
MAX_BASE_OVERFETCH = 4096
#: The first search over-fetches by the masked rows up to this many; more masked rows are
#: searched again, wider, only by the queries that got more than this many of them back.
FIRST_OVERFETCH = 64
_NO_ROWS = np.zeros(0, np.int64)


class DeltaIndex(LoadedIndex):
    """`base` with `deltas` (in seq order) and `takedowns` applied (module docstring)."""

    def __init__(self, base: LoadedIndex, deltas: Sequence[Delta],
                 takedown_image_ids: Iterable[str] = (),
                 takedown_product_ids: Iterable[str] = (),
                 text_fields: Sequence[str] = (), delta_error: str | None = None,
                 segment_params: SegmentParams | None = None,
                 previous: "DeltaIndex | None" = None):
        # Not LoadedIndex.__init__: the base's tables are shared, not rebuilt.
        self.base = base
        self.version = base.version
        self.manifest = base.manifest
        self.shard_ids = base.shard_ids
        self.shards = base.shards
        self.embedder = base.embedder
        self.adapter = base.adapter  # queries are projected as the base's are
        self.dim = base.dim
        self.loaded_at = base.loaded_at
        self.has_views = base.has_views
        self.rows_per_product_hit = base.rows_per_product_hit
        self.deltas = list(deltas)
        self.delta_error = delta_error
        n_base = base.num_vectors
        self.base_rows = n_base
        applied = apply_deltas(base, self.deltas, takedown_image_ids, takedown_product_ids)
        self.ids_deleted, self.takedowns = applied.ids_deleted, applied.takedowns
        image_ids, product_ids = applied.image_ids, applied.product_ids
        views, uris, metadata = applied.views, applied.uris, applied.metadata
        vectors, masked = applied.vectors, applied.masked
        images, products = applied.images, applied.products
        self._image_ids, self._product_ids = image_ids, product_ids
        self._base_image_ids, self._base_product_ids = base.shards.image_ids, \
            base.shards.product_ids
        self._base_hit = base.hit
        self._views, self._uris, self._metadata = views, uris, metadata
        self.delta_vectors = (np.concatenate(vectors).astype(np.float32, copy=False)
                              if vectors else np.zeros((0, self.dim), np.float32))
        self.num_vectors = n_base + len(image_ids)      # the row space (base + delta rows)
        self.rows_added = len(image_ids)
        self.rows_masked = len(masked)
        self.searchable_rows = self.num_vectors - self.rows_masked
        self._masked = np.zeros(self.num_vectors, bool)
        if masked:
            self._masked[np.fromiter(masked, np.int64, len(masked))] = True
        self.masked_base_rows = int(self._masked[:n_base].sum())
        live = np.flatnonzero(~self._masked[n_base:])
        self._live_delta_rows = (live + n_base).astype(np.int64)
        self._live_delta_vectors = np.ascontiguousarray(self.delta_vectors[live])
        self._set_segment(segment_params, previous)
        self._image_rows_over = images
        self._product_rows_over = products
        base_products = base.num_products
        gone = sum(1 for p, r in products.items() if not r and base.product_rows(p))
        new = sum(1 for p, r in products.items() if r and not base.product_rows(p))
        self._num_products = base_products - gone + new
        keys = set(base.filter_keys)
        for text in metadata:
            keys.update(parse_metadata(text))
        self.filter_keys = frozenset(keys)
        # fast filters (serving.filter_index) over live base and delta rows
        self.filter_index = OverlayFilterIndex(base.filter_index, self._masked, n_base,
                                               metadata)
        self.text_index = delta_text_index(base.text_index, product_ids, metadata,
                                           text_fields)

    # -- the ScaNN segment over the delta rows (serving.delta_segment) -------------------

    def _set_segment(self, params: SegmentParams | None, previous: "DeltaIndex | None") -> None:
        """Reuse `previous`'s segment when it still fits, else build one when the live delta
        rows reach params.min_rows; the live rows it does not hold are the exact tail."""
        self.segment: DeltaSegment | None = None
        self._tail_rows, self._tail_vectors = self._live_delta_rows, self._live_delta_vectors
        self._segment_masked = 0
        live = self._live_delta_rows
        if params is None or not params.wants_segment(len(live)) and (
                previous is None or previous.segment is None):
            return
        seg = previous.segment if previous is not None and previous.base is self.base \
            else None
        if seg is not None and seg.params == params and seg.covers_prefix_of(self.deltas):
            covered = self.base_rows + sum(c[2] for c in seg.covers)
            masked_in = int(self._masked[seg.rows].sum())
            if params.wants_segment(int((live >= covered).sum())) or \
                    masked_in * 2 > seg.num_rows:
                seg = None  # the tail outgrew the threshold, or half the segment is gone
        else:
            seg = None
        if seg is None and params.wants_segment(len(live)):
            covers = tuple((d.seq, d.path, d.rows.num_rows) for d in self.deltas)
            seg = DeltaSegment(self._live_delta_vectors, live, covers, params)
        if seg is None:
            return
        covered = self.base_rows + sum(c[2] for c in seg.covers)
        tail = live >= covered
        self.segment = seg
        self._tail_rows = live[tail]
        self._tail_vectors = np.ascontiguousarray(self._live_delta_vectors[tail])
        self._segment_masked = int(self._masked[seg.rows].sum())

    def _search_segment(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The segment's top-n per query, rows masked since its build dropped."""
        seg = self.segment
        assert seg is not None
        width = min(n + min(self._segment_masked, MAX_BASE_OVERFETCH), seg.num_rows)
        scores = np.full((len(queries), width), -np.inf, np.float32)
        rows = np.full((len(queries), width), -1, np.int64)
        for i, q in enumerate(queries):
            s, r = self._segment_top(q, n)
            scores[i, :len(s)], rows[i, :len(r)] = s, r
        return scores, rows

    def _segment_top(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """One query's top-n live rows of the segment (1-D, best first): asked for n + the
        rows masked since its build (at most FIRST_OVERFETCH), and again for n + all of
        them (at most MAX_BASE_OVERFETCH) only when more came back than that covered."""
        seg = self.segment
        assert seg is not None
        masked_in = self._segment_masked
        first = min(masked_in, FIRST_OVERFETCH)
        s, r = seg.search(query, n + first)
        if masked_in:
            live = ~self._masked[r]
            if len(live) - int(live.sum()) > first and masked_in > first:
                s, r = seg.search(query, n + min(masked_in, MAX_BASE_OVERFETCH))
                live = ~self._masked[r]
            s, r = s[live], r[live]
        return s, r

    def _base_top(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The base's top-n per query with masked rows dropped (-inf / -1 in their slots):
        asked for n + the masked base rows (at most FIRST_OVERFETCH), and the queries that
        got more masked rows back than that covered asked again for n + all of them (at most
        MAX_BASE_OVERFETCH). Up to FIRST_OVERFETCH masked rows, one search that always
        covers them; a takedown list of thousands of rows does not widen every search."""
        masked = self.masked_base_rows
        first = min(masked, FIRST_OVERFETCH)
        s, r = self.base.search(queries, min(self.base_rows, n + first))
        if not masked:
            return s, r
        dead = (r >= 0) & self._masked[np.clip(r, 0, None)]
        redo = np.flatnonzero(dead.sum(axis=1) > first) if masked > first else _NO_ROWS
        if redo.size:
            wide = min(self.base_rows, n + min(masked, MAX_BASE_OVERFETCH))
            s2, r2 = self.base.search(queries[redo], wide)
            pad = s2.shape[1] - s.shape[1]
            s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
            r = np.pad(r, ((0, 0), (0, pad)), constant_values=-1)
            s[redo], r[redo] = s2, r2
            dead = (r >= 0) & self._masked[np.clip(r, 0, None)]
        if dead.any():
            s = np.where(dead, -np.inf, s).astype(np.float32)
            r = np.where(dead, -1, r)
        return s, r

    # -- rows -> catalog (masked rows never come out) -------------------------------------

    @property
    def num_products(self) -> int:
        return self._num_products

    def _is_delta(self, row: int) -> bool:
        return row >= self.base_rows

    def metadata(self, row: int) -> dict[str, Any]:
        row = int(row)
        if row < self.base_rows:
            return self.base.metadata(row)
        return parse_metadata(self._metadata[row - self.base_rows])

    # product_id / image_id / hit run per scanned row of every query: one comparison and
    # one list lookup for a base row (no int(), no second method call)

    def hit(self, row: int, score: float) -> Hit:
        if row < self.base_rows:
            return self._base_hit(row, score)
        row = int(row)
        j = row - self.base_rows
        hit = new_hit(Hit)  # as ShardedSearcher.hit: the fields without Hit's __init__
        hit.__dict__.update(row=row, shard=-1, score=float(score), image_id=self._image_ids[j],
                            product_id=self._product_ids[j], view=self._views[j],
                            image_uri=self._uris[j], metadata=parse_metadata(self._metadata[j]),
                            visual_score=None, text_score=None)
        return hit

    def product_id(self, row: int) -> str:
        return (self._base_product_ids[row] if row < self.base_rows
                else self._product_ids[row - self.base_rows])

    def image_id(self, row: int) -> str:
        return (self._base_image_ids[row] if row < self.base_rows
                else self._image_ids[row - self.base_rows])

    def image_rows(self, image_id: str) -> list[int]:
        rows = self._image_rows_over.get(image_id)
        return list(rows) if rows is not None else self.base.image_rows(image_id)

    def product_rows(self, product_id: str) -> list[int]:
        rows = self._product_rows_over.get(product_id)
        return list(rows) if rows is not None else self.base.product_rows(product_id)

    def has_image(self, image_id: str) -> bool:
        return bool(self.image_rows(image_id))

    def image_uri(self, image_id: str) -> str | None:
        rows = self.image_rows(image_id)
        if not rows:
            return None
        row = rows[0]
        return (self.base.shards.image_uris[row] if row < self.base_rows
                else self._uris[row - self.base_rows])

    def is_masked(self, row: int) -> bool:
        return bool(self._masked[int(row)])

    def vectors_of(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((rows.size, self.dim), np.float32)
        in_base = rows < self.base_rows
        if in_base.any():
            out[in_base] = self.base.vectors_of(rows[in_base])
        if (~in_base).any():
            out[~in_base] = self.delta_vectors[rows[~in_base] - self.base_rows]
        return out

    def learn_rows_per_product_hit(self, observed: float) -> None:
        self.rows_per_product_hit = 0.9 * self.rows_per_product_hit + 0.1 * observed

    # -- the merged search ----------------------------------------------------------------

    def search(self, queries: np.ndarray, n: int, exact: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
        """Base top-n (masked rows dropped) merged with the live delta rows' top-n (the
        segment's, if any, and the exact tail's)."""
        n = max(1, min(int(n), self.num_vectors))
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[0] == 1 and not exact:
            scores, rows = self._search_one(queries, n)
            return scores[None], rows[None]
        parts_s: list[np.ndarray] = []
        parts_r: list[np.ndarray] = []
        use_segment = self.segment is not None and not exact
        # the segment runs on the shard pool beside the base's shards (ScaNN releases the
        # GIL); callers of search are never pool threads, so waiting on it cannot deadlock
        pending = shard_pool().submit(self._search_segment, queries, n) if use_segment \
            else None
        if self.base_rows:
            if exact:
                s, r = self.base.search(queries, min(self.base_rows, n + min(
                    self.masked_base_rows, MAX_BASE_OVERFETCH)), exact=True)
                dead = (r >= 0) & self._masked[np.clip(r, 0, None)]
                s = np.where(dead, -np.inf, s).astype(np.float32)
                r = np.where(dead, -1, r)
            else:
                s, r = self._base_top(queries, n)
            parts_s.append(s)
            parts_r.append(r)
        if pending is not None:
            ds, dr = pending.result()
            parts_s.append(ds)
            parts_r.append(dr)
            exact_rows, exact_vectors = self._tail_rows, self._tail_vectors
        else:
            exact_rows, exact_vectors = self._live_delta_rows, self._live_delta_vectors
        if len(exact_rows):
            ds, di = search_exact(exact_vectors, queries, min(n, len(exact_rows)))
            parts_s.append(ds)
            parts_r.append(exact_rows[di])
        scores = np.concatenate(parts_s, axis=1)
        rows = np.concatenate(parts_r, axis=1)
        key = np.where(rows < 0, np.iinfo(np.int64).max, rows)
        order = np.lexsort((key, -scores), axis=1)[:, :n]
        scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
        rows = np.take_along_axis(rows, order, axis=1)
        if scores.shape[1] < n:
            pad = n - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        return scores, rows

    def _search_one(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """One query [1, D]: the same top-n as the batched path, on a lean path: every part
        (base shards, segment, exact tail) searched in the calling thread, one after
        another (a single query's ScaNN calls are too short for the shard pool: on a busy
        machine the hand-off to a pool thread and back costs more than it overlaps, and
        its wait for a core is what showed in p99), dead rows dropped in 1-D, one sort."""
        parts_s: list[np.ndarray] = [np.zeros(0, np.float32)]
        parts_r: list[np.ndarray] = [np.zeros(0, np.int64)]
        if self.base_rows:
            s, r = self._base_top(query, n)
            s, r = s[0], r[0]
            live = r >= 0
            if not live.all():
                s, r = s[live], r[live]
            parts_s.append(s)
            parts_r.append(r)
        tail_rows, tail_vectors = self._live_delta_rows, self._live_delta_vectors
        seg = self.segment
        if seg is not None:
            s, r = self._segment_top(query[0], n)
            parts_s.append(s)
            parts_r.append(r)
            tail_rows, tail_vectors = self._tail_rows, self._tail_vectors
        if len(tail_rows):
            s, i = search_exact(tail_vectors, query, min(n, len(tail_rows)))
            parts_s.append(s[0])
            parts_r.append(tail_rows[i[0]])
        scores, rows = np.concatenate(parts_s), np.concatenate(parts_r)
        order = np.lexsort((rows, -scores))[:n]  # best first; ties to the lower row
        scores, rows = scores[order].astype(np.float32, copy=False), rows[order]
        if len(order) < n:
            scores = np.concatenate([scores, np.full(n - len(order), -np.inf, np.float32)])
            rows = np.concatenate([rows, np.full(n - len(order), -1, np.int64)])
        return scores, rows

    # -- accounting -----------------------------------------------------------------------

    def delta_info(self) -> dict[str, Any]:
        """The deltas applied and the counts that reconcile: base + added - masked."""
        return {"deltas": len(self.deltas),
                "last_seq": self.deltas[-1].seq if self.deltas else 0,
                "base_rows": self.base_rows, "rows_added": self.rows_added,
                "rows_removed": self.rows_masked, "searchable_rows": self.searchable_rows,
                "image_ids_deleted": self.ids_deleted["image_ids"],
                "product_ids_deleted": self.ids_deleted["product_ids"],
                "takedown_image_ids": len(self.takedowns["image_ids"]),
                "takedown_product_ids": len(self.takedowns["product_ids"]),
                "oldest_delta_age_s": oldest_age_s(self.deltas),
                "scann_segment": self.segment.describe() if self.segment else None,
                "exact_delta_rows": int(len(self._tail_rows)),
                "error": self.delta_error}

    def describe(self) -> dict[str, Any]:
        out = self.base.describe()
        out.update(num_vectors=self.searchable_rows, num_products=self.num_products,
                   deltas=self.delta_info())
        if "fields" in out:
            out["fields"] = sorted(self.filter_keys)
        return out
