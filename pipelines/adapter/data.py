"""Training data of an adapter: a catalog snapshot and labelled photos -> arrays, and the
seeded held-out split.

- **catalog**: every row of the catalog embeddings snapshot (raw model vectors); rows
  sharing a product_id are positives of each other.
- **pairs**: labelled photos (rows of other snapshots, e.g. shopper photos embedded from a
  labelled manifest, or feedback turned into pairs): their product_id names the product
  they show. Pairs of a product the catalog does not hold are dropped (counted): they
  could not be checked against the catalog. A pair whose image_id is also a catalog
  image (the same photo in both) is kept once, as a catalog row.

The split (`split`): a seeded fraction of the products is held out entirely (their catalog
images and pairs), and a seeded fraction of the other products' pairs. Validation queries
are the held-out pairs (searched against the whole catalog) and the held-out products'
catalog images (each against the rest of the catalog, leave-one-out), so the gate sees
both new photos of known products and products the adapter never saw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from pipelines.adapter.artifact import AdapterError, base_model_record
from pipelines.embed import snapshot as snap


@dataclass(frozen=True)
class LabelledVectors:
    vectors: np.ndarray     # float32 [n, dim], L2-normalised model vectors
    products: np.ndarray    # object [n] product_id
    image_ids: np.ndarray   # object [n]

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def take(self, mask: np.ndarray) -> "LabelledVectors":
        return LabelledVectors(self.vectors[mask], self.products[mask], self.image_ids[mask])


@dataclass(frozen=True)
class TrainingData:
    catalog: LabelledVectors
    pairs: LabelledVectors
    model: dict[str, Any]                 # the catalog snapshot's model record
    embedding_fingerprint: str | None
    sources: dict[str, Any]               # what was read, and what was dropped

    @property
    def dim(self) -> int:
        return int(self.catalog.vectors.shape[1])

    @property
    def base_model(self) -> dict[str, Any]:
        return base_model_record(self.model, self.embedding_fingerprint)


def _resolve(path: str, what: str) -> str:
    try:
        if snap.is_complete(path):
            return path
        latest = snap.latest(path)
    except snap.SnapshotError as e:
        raise AdapterError(f"{what} {path}: {e}") from e
    if latest is None:
        raise AdapterError(f"{what} {path} is neither a complete embeddings snapshot nor an "
                           f"embeddings root with a LATEST")
    return latest


def _read(path: str, what: str) -> tuple[LabelledVectors, snap.Snapshot]:
    try:
        s = snap.load(_resolve(path, what))
    except snap.SnapshotError as e:
        raise AdapterError(f"{what} {path}: {e}") from e
    t = s.table
    vectors = s.vectors()
    if len(vectors) and not np.all(np.isfinite(vectors)):
        raise AdapterError(f"{what} {s.path}: vectors contain NaN or infinite values")
    return LabelledVectors(vectors, np.asarray(t.column("product_id").to_pylist(), object),
                           np.asarray(t.column("image_id").to_pylist(), object)), s


def check_same_space(catalog: snap.Snapshot, other: snap.Snapshot, what: str) -> None:
    """AdapterError unless `other` holds vectors of the catalog's model space."""
    a, b = catalog.summary.model, other.summary.model
    if a.get("fingerprint") != b.get("fingerprint") or catalog.dim != other.dim:
        raise AdapterError(f"{what} {other.path}: embedded with {b.get('model_id')} "
                           f"({other.dim}-d), the catalog {catalog.path} with "
                           f"{a.get('model_id')} ({catalog.dim}-d): not the same vector space")
    fa, fb = catalog.summary.embedding_fingerprint, other.summary.embedding_fingerprint
    if fa and fb and fa != fb:
        raise AdapterError(f"{what} {other.path}: embedded with other features/views than the "
                           f"catalog {catalog.path} (embedding fingerprints differ)")


def load_training_data(embeddings: str, pairs: Sequence[str] = (),
                       extra_pairs: LabelledVectors | None = None,
                       extra_source: str | None = None) -> TrainingData:
    """The catalog snapshot `embeddings` plus the pair snapshots (and `extra_pairs`, e.g.
    from the feedback log) as arrays; AdapterError for unusable input, naming it."""
    catalog, cat_snap = _read(embeddings, "--embeddings")
    if len(catalog) == 0:
        raise AdapterError(f"--embeddings {cat_snap.path} has no rows")
    known = set(catalog.products.tolist())
    catalog_images = set(catalog.image_ids.tolist())
    parts: list[LabelledVectors] = []
    sources: dict[str, Any] = {"embeddings": cat_snap.path, "catalog_rows": len(catalog),
                               "pairs": []}
    for path in pairs:
        got, s = _read(path, "--pairs")
        check_same_space(cat_snap, s, "--pairs")
        unknown = np.array([p not in known for p in got.products.tolist()], bool)
        dup = np.array([i in catalog_images for i in got.image_ids.tolist()], bool)
        keep = ~unknown & ~dup
        parts.append(got.take(keep))
        sources["pairs"].append({"path": s.path, "rows": len(got), "used": int(keep.sum()),
                                 "unknown_product": int(unknown.sum()),
                                 "also_in_catalog": int((dup & ~unknown).sum())})
    if extra_pairs is not None and len(extra_pairs):
        if extra_pairs.vectors.shape[1] != catalog.vectors.shape[1]:
            raise AdapterError(f"{extra_source or 'feedback'}: {extra_pairs.vectors.shape[1]}-d "
                               f"vectors, the catalog has {catalog.vectors.shape[1]}-d")
        unknown = np.array([p not in known for p in extra_pairs.products.tolist()], bool)
        parts.append(extra_pairs.take(~unknown))
        sources["pairs"].append({"path": extra_source or "feedback", "rows": len(extra_pairs),
                                 "used": int((~unknown).sum()),
                                 "unknown_product": int(unknown.sum())})
    dim = catalog.vectors.shape[1]
    merged = LabelledVectors(
        np.concatenate([p.vectors for p in parts]) if parts else np.zeros((0, dim), np.float32),
        np.concatenate([p.products for p in parts]) if parts else np.zeros(0, object),
        np.concatenate([p.image_ids for p in parts]) if parts else np.zeros(0, object))
    return TrainingData(catalog=catalog, pairs=merged, model=dict(cat_snap.summary.model),
                        embedding_fingerprint=cat_snap.summary.embedding_fingerprint,
                        sources=sources)


@dataclass(frozen=True)
class Split:
    """Which catalog rows and pairs train, and which validate (boolean masks).

    pairs_val / catalog_val_queries are the validation queries: the held-out pairs and
    held-out products' catalog images, or a seeded sample of at most `max_queries` of them
    (`candidate_queries` counts them before the cap). Held-out rows that are not sampled
    still never train."""
    val_products: frozenset[str]
    catalog_train: np.ndarray
    pairs_train: np.ndarray
    pairs_val: np.ndarray
    catalog_val_queries: np.ndarray   # held-out products' catalog rows (leave-one-out)
    candidate_queries: int = 0
    max_queries: int | None = None

    def sizes(self, data: TrainingData) -> dict[str, Any]:
        train_products = set(data.catalog.products[self.catalog_train].tolist())
        return {"train": {"catalog_rows": int(self.catalog_train.sum()),
                          "pairs": int(self.pairs_train.sum()),
                          "products": len(train_products)},
                "validation": {"products_held_out": len(self.val_products),
                               "pairs_held_out": int((~self.pairs_train).sum()),
                               "pair_queries": int(self.pairs_val.sum()),
                               "catalog_queries": int(self.catalog_val_queries.sum()),
                               "candidate_queries": self.candidate_queries,
                               "max_queries": self.max_queries,
                               "gallery_rows": len(data.catalog)}}


def _cap(masks: Sequence[np.ndarray], limit: int | None, rng: np.random.Generator
         ) -> list[np.ndarray]:
    """The masks with at most `limit` True entries in all (a uniform seeded sample)."""
    counts = [int(m.sum()) for m in masks]
    total = sum(counts)
    if limit is None or total <= limit:
        return list(masks)
    chosen = np.zeros(total, bool)
    chosen[rng.choice(total, size=limit, replace=False)] = True
    out, at = [], 0
    for m, c in zip(masks, counts):
        keep = np.zeros(len(m), bool)
        keep[np.flatnonzero(m)[chosen[at:at + c]]] = True
        out.append(keep)
        at += c
    return out


def split(data: TrainingData, val_products: float, val_pairs: float, seed: int,
          max_queries: int | None = None) -> Split:
    """The seeded held-out split (see the module docstring), with at most `max_queries`
    validation queries (a seeded sample; None: all); AdapterError when it leaves no
    training products or no validation queries."""
    rng = np.random.default_rng(seed)
    products = np.array(sorted(set(data.catalog.products.tolist())), object)
    if len(products) < 2:
        raise AdapterError(f"the catalog {data.sources['embeddings']} has {len(products)} "
                           f"product(s); an adapter needs at least 2 (and held-out ones)")
    n_val = min(len(products) - 1, max(1, int(round(val_products * len(products)))))
    held = frozenset(rng.permutation(products)[:n_val].tolist())
    cat_held = np.array([p in held for p in data.catalog.products.tolist()], bool)
    pair_held = np.array([p in held for p in data.pairs.products.tolist()], bool)
    pair_val = pair_held | (rng.random(len(data.pairs)) < val_pairs)
    # held-out products' catalog images are queries only when the product has another image
    counts: dict[str, int] = {}
    for p in data.catalog.products[cat_held].tolist():
        counts[p] = counts.get(p, 0) + 1
    cat_queries = cat_held & np.array([counts.get(p, 0) >= 2
                                       for p in data.catalog.products.tolist()], bool)
    candidates = int(pair_val.sum() + cat_queries.sum())
    pair_q, cat_q = _cap([pair_val, cat_queries], max_queries,
                         np.random.default_rng([seed, 1]))
    out = Split(val_products=held, catalog_train=~cat_held, pairs_train=~pair_val,
                pairs_val=pair_q, catalog_val_queries=cat_q, candidate_queries=candidates,
                max_queries=max_queries)
    if not (out.pairs_val.any() or out.catalog_val_queries.any()):
        raise AdapterError("the held-out split has no validation queries (no pairs held out "
                           "and no held-out product with 2 or more catalog images); add "
                           "--pairs or raise adapter.val_products / adapter.val_pairs")
    return out


def recall_at(queries: np.ndarray, query_products: np.ndarray, gallery: np.ndarray,
              gallery_products: np.ndarray, ks: Sequence[int] = (1, 5, 10),
              exclude: np.ndarray | None = None, max_scores: int = 1 << 24
              ) -> dict[str, float]:
    """Product recall@k by exact dot-product search: the query's product is among the
    top-k distinct products (each product scored by its best image). `exclude[i]`: the
    gallery row query i must not match (leave-one-out), -1 for none.

    Memory: no copy of the gallery; queries go in chunks of max_scores / N rows, so the
    score matrix stays at most `max_scores` floats (64 MiB) whatever N."""
    if not len(queries):
        return {f"recall@{k}": 0.0 for k in ks}
    names, inverse = np.unique(gallery_products.astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
    target = np.searchsorted(names, query_products.astype(str))
    target_ok = (target < len(names)) & (names[np.minimum(target, len(names) - 1)]
                                         == query_products.astype(str))
    hits = {k: 0 for k in ks}
    g = np.asarray(gallery, np.float32)
    chunk = max(1, min(4096, max_scores // max(1, len(g))))
    for s in range(0, len(queries), chunk):
        q = np.ascontiguousarray(queries[s:s + chunk], np.float32)
        scores = q @ g.T
        if exclude is not None:
            ex = exclude[s:s + chunk]
            rows = np.flatnonzero(ex >= 0)
            scores[rows, ex[rows]] = -np.inf
        scores = scores[:, order]  # product-grouped columns (a copy of this chunk only)
        per_product = np.maximum.reduceat(scores, starts, axis=1)  # [q, products]
        t = target[s:s + chunk]
        ok = target_ok[s:s + chunk]
        own = per_product[np.arange(len(q)), np.minimum(t, len(names) - 1)]
        rank = (per_product > own[:, None]).sum(axis=1)  # products strictly better
        for k in ks:
            hits[k] += int(((rank < k) & ok & np.isfinite(own)).sum())
    return {f"recall@{k}": round(hits[k] / len(queries), 4) for k in ks}


def validation_figures(data: TrainingData, sp: Split, project: Any | None = None
                       ) -> dict[str, Any]:
    """Validation recall@1/5/10 (pairs and held-out catalog images together, and each) of
    the vectors as they are (project None = identity) or through `project`."""
    def tf(x: np.ndarray) -> np.ndarray:
        return x if project is None else project(x)

    gallery = tf(data.catalog.vectors)
    gp = data.catalog.products
    parts: dict[str, dict[str, float]] = {}
    weights: dict[str, int] = {}
    if sp.pairs_val.any():
        q = tf(data.pairs.vectors[sp.pairs_val])
        parts["pairs"] = recall_at(q, data.pairs.products[sp.pairs_val], gallery, gp)
        weights["pairs"] = int(sp.pairs_val.sum())
    if sp.catalog_val_queries.any():
        rows = np.flatnonzero(sp.catalog_val_queries)
        parts["held_out_products"] = recall_at(gallery[rows], gp[rows], gallery, gp,
                                               exclude=rows)
        weights["held_out_products"] = len(rows)
    total = sum(weights.values())
    overall = {key: round(sum(parts[p][key] * weights[p] for p in parts) / total, 4)
               for key in next(iter(parts.values()))}
    return {**overall, "queries": total, "by_kind": parts}


def product_labels(products: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """int labels [n] and the product names they index."""
    names, inverse = np.unique(products.astype(str), return_inverse=True)
    return inverse.astype(np.int64), names.tolist()


def feedback_pairs_from_records(records: Sequence[Mapping[str, Any]], dim: int
                                ) -> LabelledVectors:
    """Feedback log records ({query_id, product_id, vector}) -> pairs (bad ones skipped)."""
    vecs, prods, ids = [], [], []
    for r in records:
        v = np.asarray(r.get("vector") or [], np.float32)
        if v.shape != (dim,) or not np.all(np.isfinite(v)) or not np.any(v):
            continue
        vecs.append(v / np.linalg.norm(v))
        prods.append(str(r.get("product_id")))
        ids.append(f"feedback-{r.get('query_id')}")
    if not vecs:
        return LabelledVectors(np.zeros((0, dim), np.float32), np.zeros(0, object),
                               np.zeros(0, object))
    return LabelledVectors(np.stack(vecs), np.asarray(prods, object), np.asarray(ids, object))
