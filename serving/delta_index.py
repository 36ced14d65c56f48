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
- `search`: the base ScaNN search over-fetches by the number of masked base rows and
  drops them; the live delta rows are searched exactly (numpy dot products) while they
  are fewer than `serving.delta_scann_min_rows`, and from there by a ScaNN searcher built
  over them in memory (serving.delta_segment: exact float32 scores, no docids, nothing
  written; rows masked after its build are over-fetched and dropped like the base's;
  rows added after it are searched exactly until they reach the threshold themselves);
  the lists are merged by score. `exact=True` searches every live delta row exactly;
- `product_rows` / `image_rows` / `has_image` leave masked rows out (similar products,
  text hits and fusion candidates come from them);
- the text index is the version's BM25 index plus a small BM25 index over the products
  that only the deltas hold (their scores are on the delta products' own statistics
  until the next full build folds them in).

Accounting: `searchable_rows` = base rows + rows added - rows masked.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from pipelines.index.deltas import Delta
from pipelines.index.sharded_search import Hit, parse_metadata, search_exact, shard_pool
from serving.delta_segment import DeltaSegment, SegmentParams
from serving.filter_index import OverlayFilterIndex
from serving.loaded_index import LoadedIndex

#: Over-fetch from the base at most this many rows beyond n for masked base rows (beyond,
#: the caller's next round asks for more: collect_hits grows its fetch x4).
MAX_BASE_OVERFETCH = 4096


class DeltaTextIndex:
    """The version's BM25 text index, extended with the products only deltas hold."""

    def __init__(self, base: Any, extra: Any, delta_row_positions: np.ndarray):
        self.base = base
        self.extra = extra  # serving.text_search.TextIndex over delta-only products, or None
        self.product_ids = list(base.product_ids) + (list(extra.product_ids) if extra else [])
        self._offset = len(base.product_ids)
        self.build_seconds = base.build_seconds + (extra.build_seconds if extra else 0.0)
        base_rows = base.row_product if base.row_product is not None else np.zeros(0, np.int64)
        self.row_product = np.concatenate([base_rows, delta_row_positions]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.product_ids)

    def tokens(self, text: str) -> list[str]:
        toks = self.base.tokens(text)
        if self.extra is not None:
            toks += [t for t in self.extra.tokens(text) if t not in toks]
        return toks

    def scores(self, text: str) -> np.ndarray:
        base = self.base.scores(text)
        if self.extra is None:
            return base
        return np.concatenate([base, self.extra.scores(text)])

    def position(self, product_id: str) -> int | None:
        pos = self.base.position(product_id)
        if pos is None and self.extra is not None:
            extra = self.extra.position(product_id)
            return None if extra is None else self._offset + extra
        return pos


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
        image_ids: list[str] = []
        product_ids: list[str] = []
        views: list[str] = []
        uris: list[str] = []
        metadata: list[str] = []
        vectors: list[np.ndarray] = []
        masked: set[int] = set()
        # Live rows of every image / product a delta touched (others: the base's own lists).
        images: dict[str, list[int]] = {}
        products: dict[str, list[int]] = {}

        def rows_of_image(img: str) -> list[int]:
            if img not in images:
                images[img] = list(base.image_rows(img))
            return images[img]

        def rows_of_product(pid: str) -> list[int]:
            if pid not in products:
                products[pid] = list(base.product_rows(pid))
            return products[pid]

        def product_of(row: int) -> str:
            return base.product_id(row) if row < n_base else product_ids[row - n_base]

        def image_of(row: int) -> str:
            return base.image_id(row) if row < n_base else image_ids[row - n_base]

        def drop(rows: list[int]) -> None:
            for row in list(rows):
                if row in masked:
                    continue
                masked.add(row)
                img_rows = rows_of_image(image_of(row))
                if row in img_rows:
                    img_rows.remove(row)
                prod_rows = rows_of_product(product_of(row))
                if row in prod_rows:
                    prod_rows.remove(row)

        self.ids_deleted = {"image_ids": 0, "product_ids": 0}
        for delta in self.deltas:
            for img in delta.delete_image_ids:
                drop(rows_of_image(img))
            for pid in delta.delete_product_ids:
                drop(rows_of_product(pid))
            self.ids_deleted["image_ids"] += len(delta.delete_image_ids)
            self.ids_deleted["product_ids"] += len(delta.delete_product_ids)
            if not delta.rows.num_rows:
                continue
            d_images = delta.rows.column("image_id").to_pylist()
            for img in dict.fromkeys(d_images):  # an upsert replaces every row of the image
                drop(rows_of_image(img))
            start = n_base + len(image_ids)
            d_products = delta.rows.column("product_id").to_pylist()
            image_ids += d_images
            product_ids += d_products
            views += delta.rows.column("view").to_pylist()
            uris += delta.rows.column("image_uri").to_pylist()
            metadata += delta.rows.column("metadata").to_pylist()
            vectors.append(delta.vectors)
            for j, (img, pid) in enumerate(zip(d_images, d_products)):
                rows_of_image(img).append(start + j)
                rows_of_product(pid).append(start + j)
        self.takedowns = {"image_ids": sorted(set(takedown_image_ids)),
                          "product_ids": sorted(set(takedown_product_ids))}
        for img in self.takedowns["image_ids"]:
            drop(rows_of_image(img))
        for pid in self.takedowns["product_ids"]:
            drop(rows_of_product(pid))

        self._image_ids, self._product_ids = image_ids, product_ids
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
        self.text_index = self._text_index(text_fields)

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
        fetch = n + min(self._segment_masked, MAX_BASE_OVERFETCH)
        width = min(fetch, seg.num_rows)
        scores = np.full((len(queries), width), -np.inf, np.float32)
        rows = np.full((len(queries), width), -1, np.int64)
        for i, q in enumerate(queries):
            s, r = seg.search(q, fetch)
            scores[i, :len(s)], rows[i, :len(r)] = s, r
        if self._segment_masked:
            dead = (rows >= 0) & self._masked[np.clip(rows, 0, None)]
            scores = np.where(dead, -np.inf, scores).astype(np.float32)
            rows = np.where(dead, -1, rows)
        return scores, rows

    # -- the text index -------------------------------------------------------------------

    def _text_index(self, fields: Sequence[str]) -> Any:
        base_ti = self.base.text_index
        if base_ti is None:
            return None
        if not self.rows_added:
            return base_ti
        new_products = sorted({p for p in self._product_ids if base_ti.position(p) is None})
        extra = None
        if new_products:
            from serving.text_search import TextIndex
            docs: dict[str, list[str]] = {p: [] for p in new_products}
            for pid, text in zip(self._product_ids, self._metadata):
                if pid not in docs:
                    continue
                meta = parse_metadata(text)
                for f in fields:
                    value: Any = pid if f == "product_id" else meta.get(f)
                    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                        s = str(value).strip()
                        if s and s not in docs[pid]:
                            docs[pid].append(s)
            extra = TextIndex(new_products, [" ".join(docs[p]) for p in new_products])
        wrapped = DeltaTextIndex(base_ti, extra, np.zeros(0, np.int64))
        positions = [wrapped.position(p) for p in self._product_ids]
        wrapped.row_product = np.concatenate([wrapped.row_product, np.asarray(
            [-1 if p is None else p for p in positions], np.int64)])
        return wrapped

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

    def hit(self, row: int, score: float) -> Hit:
        row = int(row)
        if row < self.base_rows:
            return self.base.hit(row, score)
        j = row - self.base_rows
        return Hit(row=row, shard=-1, score=float(score), image_id=self._image_ids[j],
                   product_id=self._product_ids[j], view=self._views[j],
                   image_uri=self._uris[j], metadata=parse_metadata(self._metadata[j]))

    def product_id(self, row: int) -> str:
        row = int(row)
        return (self.base.product_id(row) if row < self.base_rows
                else self._product_ids[row - self.base_rows])

    def image_id(self, row: int) -> str:
        row = int(row)
        return (self.base.image_id(row) if row < self.base_rows
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
        parts_s: list[np.ndarray] = []
        parts_r: list[np.ndarray] = []
        use_segment = self.segment is not None and not exact
        # the segment runs on the shard pool beside the base's shards (ScaNN releases the
        # GIL); callers of search are never pool threads, so waiting on it cannot deadlock
        pending = shard_pool().submit(self._search_segment, queries, n) if use_segment \
            else None
        if self.base_rows:
            extra = min(self.masked_base_rows, MAX_BASE_OVERFETCH)
            s, r = self.base.search(queries, min(self.base_rows, n + extra), exact=exact)
            if self.masked_base_rows:
                dead = (r >= 0) & self._masked[np.clip(r, 0, None)]
                s = np.where(dead, -np.inf, s).astype(np.float32)
                r = np.where(dead, -1, r)
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

    # -- accounting -----------------------------------------------------------------------

    def delta_info(self) -> dict[str, Any]:
        """The deltas applied and the counts that reconcile: base + added - masked."""
        import datetime as dt
        ages = []
        now = dt.datetime.now(dt.timezone.utc)
        for d in self.deltas:
            try:
                ages.append((now - dt.datetime.fromisoformat(d.manifest.created_at))
                            .total_seconds())
            except ValueError:
                pass
        return {"deltas": len(self.deltas),
                "last_seq": self.deltas[-1].seq if self.deltas else 0,
                "base_rows": self.base_rows, "rows_added": self.rows_added,
                "rows_removed": self.rows_masked, "searchable_rows": self.searchable_rows,
                "image_ids_deleted": self.ids_deleted["image_ids"],
                "product_ids_deleted": self.ids_deleted["product_ids"],
                "takedown_image_ids": len(self.takedowns["image_ids"]),
                "takedown_product_ids": len(self.takedowns["product_ids"]),
                "oldest_delta_age_s": round(max(ages), 3) if ages else None,
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
