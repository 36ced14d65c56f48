"""One index version in memory: its `ShardedSearcher` (ScaNN shards + row table), the
query embedder of its model and its BM25 text index. Immutable once built and verified;
shared by concurrent requests (a request keeps the `LoadedIndex` it started with).

Global rows are the ShardedSearcher's; `hit(row, score)` maps one back to the catalog
(the one hit type, pipelines.index.sharded_search.Hit, metadata parsed by its
`parse_metadata`). `verify_loaded` is the check a version passes before it may serve.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from pipelines.index.manifest import IndexManifest
from pipelines.index.sharded_search import Hit, ShardedSearcher, parse_metadata
from serving.embedder import QueryEmbedder
from serving.errors import IndexLoadError
from serving.filter_index import FilterIndex

# Rows examined to learn which metadata keys exist (for validating filter keys).
_METADATA_KEY_SAMPLE = 20_000
# Self-recall probe run on every version before it may serve.
_VERIFY_PROBES = 8


class LoadedIndex:
    """One index version in memory. Immutable once built; shared by concurrent requests."""

    #: The version's adapter (pipelines.adapter.Adapter) when its vectors are adapter(raw).
    adapter: Any = None

    def __init__(self, version: str, manifest: IndexManifest, shard_ids: list[int],
                 shards: ShardedSearcher, embedder: QueryEmbedder | None,
                 adapter: Any = None):
        self.version = version
        self.adapter = adapter
        self.manifest = manifest
        self.shard_ids = shard_ids
        self.shards = shards
        self.embedder = embedder
        self.text_index: Any = None  # serving.text_search.TextIndex, built at load
        self.num_vectors = int(shards.num_vectors)
        self.dim = int(manifest.dim or shards.dim)
        self.loaded_at = time.time()
        images: dict[str, list[int]] = {}
        for i, img in enumerate(shards.image_ids):
            images.setdefault(img, []).append(i)  # several rows when views are separate
        self._image_rows = images
        self.has_views = len(images) < self.num_vectors
        products: dict[str, list[int]] = {}
        for i, pid in enumerate(shards.product_ids):
            products.setdefault(pid, []).append(i)
        self._product_rows = products
        # Starts at the mean images per product; refined by collect_hits as queries run.
        self.rows_per_product_hit = max(1.0, self.num_vectors / max(1, len(products)))
        step = max(1, self.num_vectors // _METADATA_KEY_SAMPLE)
        keys: set[str] = {"product_id", "image_id"}
        for i in range(0, self.num_vectors, step):
            keys.update(self.metadata(i))
        self.filter_keys = frozenset(keys)
        # Per metadata value, its rows (fast filtered search: serving.filter_index).
        self.filter_index = FilterIndex.build(shards.metadata)

    @property
    def num_products(self) -> int:
        return len(self._product_rows)

    @property
    def query_dim(self) -> int:
        """The dimension of a query vector (model space): the adapter's input, else dim."""
        return int(self.adapter.in_dim) if self.adapter is not None else self.dim

    def to_index_space(self, raw: np.ndarray) -> np.ndarray:
        """Model-space query vector(s) -> the index's space (the version's own adapter;
        unchanged without one). Stored vectors (similar products) are already there."""
        if self.adapter is None:
            return raw
        return self.adapter.apply(raw)

    def metadata(self, row: int) -> dict[str, Any]:
        return parse_metadata(self.shards.metadata[row])

    def hit(self, row: int, score: float) -> Hit:
        return self.shards.hit(row, score)

    def learn_rows_per_product_hit(self, observed: float) -> None:
        """Update the running estimate of rows scanned per distinct product in results."""
        self.rows_per_product_hit = 0.9 * self.rows_per_product_hit + 0.1 * observed

    def product_id(self, row: int) -> str:
        return self.shards.product_ids[row]

    def image_id(self, row: int) -> str:
        return self.shards.image_ids[row]

    def has_image(self, image_id: str) -> bool:
        return image_id in self._image_rows

    def image_uri(self, image_id: str) -> str | None:
        rows = self._image_rows.get(image_id)
        return self.shards.image_uris[rows[0]] if rows else None

    def image_rows(self, image_id: str) -> list[int]:
        return self._image_rows.get(image_id, [])

    def product_rows(self, product_id: str) -> list[int]:
        return self._product_rows.get(product_id, [])

    def vectors_of(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.shards.vectors(np.asarray(rows, dtype=np.int64))

    def search(self, queries: np.ndarray, n: int, exact: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
        """float32 [Q,D] -> (scores [Q,n'], global rows [Q,n'], -1 = none), best first."""
        n = max(1, min(int(n), self.num_vectors))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if exact:
            return self.shards.search_exact(queries, n)
        return self.shards.search(queries, n)

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "num_vectors": self.num_vectors,
                "num_products": self.num_products, "dim": self.dim, "shards": self.shard_ids,
                "model_id": self.manifest.model_id, "created_at": self.manifest.created_at,
                "adapter_id": self.adapter.id if self.adapter is not None else None,
                "fields": sorted(self.filter_keys),
                "loaded_at": self.loaded_at}


def verify_loaded(idx: LoadedIndex) -> None:
    """Refuse a version that would serve wrong answers; raises IndexLoadError with why."""
    manifest = idx.manifest
    if idx.num_vectors == 0:
        raise IndexLoadError(f"version {idx.version}: the loaded shards hold no vectors")
    shards = manifest.shards
    expected = sum(shards[s].num_vectors for s in idx.shard_ids if s < len(shards))
    if expected and expected != idx.num_vectors:
        raise IndexLoadError(f"version {idx.version}: manifest says shards {idx.shard_ids} hold "
                             f"{expected} vectors, loaded {idx.num_vectors}")
    if idx.adapter is not None and idx.adapter.out_dim != idx.dim:
        raise IndexLoadError(f"version {idx.version}: adapter {idx.adapter.id} gives "
                             f"{idx.adapter.out_dim}-d vectors, the index holds {idx.dim}-d")
    if (idx.embedder is not None and idx.embedder.spec.dim
            and idx.embedder.spec.dim != idx.query_dim):
        raise IndexLoadError(f"version {idx.version}: model {idx.embedder.spec.model_id} gives "
                             f"{idx.embedder.spec.dim}-d vectors, the index "
                             + (f"adapter takes {idx.query_dim}-d" if idx.adapter is not None
                                else f"holds {idx.dim}-d"))
    rng = np.random.default_rng(0)
    probes = rng.choice(idx.num_vectors, size=min(_VERIFY_PROBES, idx.num_vectors),
                        replace=False)
    vectors = idx.vectors_of(probes)
    if vectors.shape != (len(probes), idx.dim) or not np.all(np.isfinite(vectors)):
        raise IndexLoadError(f"version {idx.version}: stored vectors are malformed "
                             f"(shape {vectors.shape}, expected [{len(probes)}, {idx.dim}])")
    scores, rows = idx.search(vectors, min(10, idx.num_vectors))
    found = 0
    for probe, vec, row_scores, row_ids in zip(probes, vectors, scores, rows):
        # A probe is found when its own row, or a row with an identical score (a duplicate
        # image), comes back in its top 10.
        own = float(vec @ vec)
        if int(probe) in set(int(r) for r in row_ids) or np.any(np.abs(row_scores - own) < 1e-4):
            found += 1
    if found < len(probes) * 0.75:
        raise IndexLoadError(f"version {idx.version}: self-search found only {found} of "
                             f"{len(probes)} probe vectors in their own top 10")
    if idx.embedder is not None:
        # One forward pass so the first request does not pay for graph tracing.
        size = idx.embedder.spec.input_size
        probe_vec = idx.to_index_space(
            idx.embedder.embed_arrays(np.full((1, size, size, 3), 128, np.uint8)))
        if probe_vec.shape[1] != idx.dim:
            raise IndexLoadError(f"version {idx.version}: model gives {probe_vec.shape[1]}-d "
                                 f"vectors, the index holds {idx.dim}-d")
