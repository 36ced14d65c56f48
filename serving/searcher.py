"""Search the published catalog index: "which catalog products look like this photo?".

    searcher = CatalogSearcher.open(index_root, config=config)     # LATEST, all shards
    results = searcher.search_image(photo_bytes, k=10, filters={"category": "dairy"})
    results = searcher.search_vector(vector, k=10)
    results = searcher.similar_to(product_id="P0003", k=10)        # "more like this"

A `CatalogSearcher` holds one `LoadedIndex` (an immutable, fully loaded index version:
its shards, its row table and the query embedder built from the version's own model,
with the same decode/preprocess code as the embed pipeline). `reload()` loads a new
version beside the serving one, verifies it and swaps one reference; a request keeps
the `LoadedIndex` it started with, so in-flight requests finish on the old version.
A version that fails to load or verify is refused with a logged reason and the old one
keeps serving. `IndexWatcher` calls `reload()` whenever LATEST changes.

Results are collapsed to products by default (best-scoring image per product) and can
be filtered on metadata (`{"category": "dairy"}`, a value or a list of accepted values;
`product_id` and `image_id` are filterable too).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import reprlib
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pipelines.core.config import Config, load_config
from pipelines.index.manifest import IndexManifest

log = logging.getLogger(__name__)

# Rows examined to learn which metadata keys exist (for validating filter keys).
_METADATA_KEY_SAMPLE = 20_000
# Self-recall probe run on every version before it may serve.
_VERIFY_PROBES = 8
_MAX_FILTER_KEYS = 16
_MAX_FILTER_VALUES = 100


class QueryError(ValueError):
    """A query cannot be answered as asked; `reason` is a short machine-readable cause.

    Reasons: bad_k, bad_filter, bad_vector, unknown_product, unknown_image, too_large,
    and the decode reasons of pipelines.model.image_decode.DecodeError (not_an_image, empty,
    truncated, corrupt, too_many_pixels).
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class IndexLoadError(RuntimeError):
    """An index version cannot be loaded or fails verification."""


class NotReadyError(RuntimeError):
    """No index version is loaded yet."""


@dataclass(frozen=True)
class SearchHit:
    """One result: a catalog image (the best one of its product when collapsed)."""
    product_id: str
    image_id: str
    score: float
    metadata: dict[str, Any]
    image_uri: str | None = None
    visual_score: float | None = None  # image + text queries: the parts of the fused score
    text_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("visual_score", "text_score"):
            if d[key] is None:
                del d[key]
        return d


@dataclass(frozen=True)
class SearchResults:
    """The answer to one query."""
    version: str
    k: int
    collapsed: bool
    hits: list[SearchHit]
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "k": self.k, "collapsed": self.collapsed,
                "results": [h.to_dict() for h in self.hits], "timings_ms": self.timings_ms}


@dataclass(frozen=True)
class ReloadOutcome:
    """What `CatalogSearcher.reload` did: loaded, unchanged or refused (with the reason)."""
    status: str
    version: str | None
    serving_version: str | None
    reason: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- query embedder

def _normalise_handle(handle: str) -> str:
    """A model handle in a comparable form: local paths absolute and resolved."""
    handle = handle.strip()
    if handle.startswith("builtin:"):
        return handle
    from pipelines.core import filesystem as fs
    if not fs.is_local(handle):
        return handle.rstrip("/")
    return os.path.realpath(os.path.abspath(os.path.expanduser(fs.normalize(handle))))


def check_model_allowed(handle: Any, config: Config) -> str:
    """The manifest's model handle if serving may load it; IndexLoadError naming why not.

    An index artifact is data: the model it names is only loaded when the operator
    trusts it: a builtin:NAME model (our own code and the packaged weights), the
    operator's `model.handle`, or a handle listed in `serving.allowed_model_handles`.
    Anything else (a URL or directory only the manifest names) is refused unloaded.
    """
    if not isinstance(handle, str) or not handle.strip():
        raise IndexLoadError(f"the index manifest names no usable model handle ({handle!r})")
    if handle.startswith("builtin:"):
        return handle
    allowed = {_normalise_handle(h) for h in (config.model.handle,
                                              *config.serving.allowed_model_handles)}
    if _normalise_handle(handle) in allowed:
        return handle
    raise IndexLoadError(
        f"model handle {reprlib.repr(handle)} named by the index manifest is not trusted by "
        f"this server: serving loads only builtin:* models, model.handle "
        f"({config.model.handle!r}) and serving.allowed_model_handles; add the handle to "
        f"serving.allowed_model_handles (or --allow-model) if the operator trusts it")


class QueryEmbedder:
    """Photo bytes -> embedding, with the index's model and the pipeline's decode/preprocess."""

    def __init__(self, model: Mapping[str, Any], config: Config):
        from pipelines.model.resolve import (Embedder, ModelError, ModelSpec, check_same_model,
                                             resolve_model)
        if not isinstance(model, Mapping):
            raise IndexLoadError("the index manifest has no model object")
        check_model_allowed(model.get("handle"), config)
        try:
            recorded = ModelSpec.from_dict(dict(model))
        except (KeyError, TypeError) as e:
            raise IndexLoadError(f"the index manifest's model is malformed: {e}") from e
        try:
            spec = resolve_model(recorded.handle, config.model.resolved_cache_dir(),
                                 recorded.input_size)
        except Exception as e:  # ModelError, conversion errors, missing directories
            raise IndexLoadError(f"model {recorded.handle!r} of the index cannot be resolved "
                                 f"here: {e}") from e
        try:
            check_same_model(spec, recorded, "here", "the index was built with")
        except ModelError as e:
            raise IndexLoadError(f"{e}: query embeddings would not match the catalog's") from e
        self.spec = spec
        self.config = config
        # Feature variants (zoom levels, flip) the catalog was embedded with: from the index
        # manifest, never from the serving config, so queries get exactly the same treatment.
        from pipelines.model.features import features_dict
        self.features = features_dict(model.get("features"))
        self._embedder = Embedder(spec)

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    def preprocess(self, data: bytes) -> np.ndarray:
        """Query bytes -> uint8 [S,S,3] (or the zoom variants); raises QueryError with the
        decode reason.

        Uploads get the tighter limits: serving.max_query_pixels decoded pixels and the
        common photo formats only (pipelines.model.image_decode.QUERY_FORMATS).
        """
        from pipelines.model.features import load_query_arrays
        from pipelines.model.image_decode import QUERY_FORMATS, DecodeError
        try:
            return load_query_arrays(data, self.spec.input_size, self.config, self.features,
                                     max_decoded_pixels=self.config.serving.max_query_pixels,
                                     formats=QUERY_FORMATS)
        except DecodeError as e:
            raise QueryError(e.reason, f"image cannot be used: {e}") from e

    def embed_arrays(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,S,S,3] (or [N,V,S,S,3]: feature variants) -> float32 [N,dim], normalised."""
        from pipelines.model.features import embed_variants
        return embed_variants(self._embedder.embed, images)

    def embed_bytes(self, data: bytes) -> np.ndarray:
        """One photo -> float32 [dim]."""
        return self.embed_arrays(self.preprocess(data)[None])[0]


# --------------------------------------------------------------------------- loaded index

class LoadedIndex:
    """One index version in memory. Immutable once built; shared by concurrent requests."""

    def __init__(self, version: str, manifest: IndexManifest, shard_ids: list[int],
                 backend: "_ShardBackend", embedder: QueryEmbedder | None):
        self.version = version
        self.manifest = manifest
        self.shard_ids = shard_ids
        self.embedder = embedder
        self.text_index: Any = None  # serving.text_search.TextIndex, built by CatalogSearcher
        self._backend = backend
        self.num_vectors = backend.num_rows
        self.dim = int(manifest.dim or backend.dim)
        self.loaded_at = time.time()
        images: dict[str, list[int]] = {}
        for i, img in enumerate(backend.image_ids):
            images.setdefault(img, []).append(i)  # several rows when views are separate
        self._image_rows = images
        self.has_views = len(images) < backend.num_rows
        products: dict[str, list[int]] = {}
        for i, pid in enumerate(backend.product_ids):
            products.setdefault(pid, []).append(i)
        self._product_rows = products
        # Starts at the mean images per product; refined by collect_hits as queries run.
        self.rows_per_product_hit = max(1.0, backend.num_rows / max(1, len(products)))
        step = max(1, self.num_vectors // _METADATA_KEY_SAMPLE)
        keys: set[str] = {"product_id", "image_id"}
        for i in range(0, self.num_vectors, step):
            keys.update(self.metadata(i))
        self.filter_keys = frozenset(keys)

    @property
    def num_products(self) -> int:
        return len(self._product_rows)

    def metadata(self, row: int) -> dict[str, Any]:
        text = self._backend.metadata[row]
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def hit(self, row: int, score: float) -> SearchHit:
        b = self._backend
        return SearchHit(product_id=b.product_ids[row], image_id=b.image_ids[row],
                         score=float(score), metadata=self.metadata(row),
                         image_uri=b.image_uris[row] if b.image_uris is not None else None)

    def learn_rows_per_product_hit(self, observed: float) -> None:
        """Update the running estimate of rows scanned per distinct product in results."""
        self.rows_per_product_hit = 0.9 * self.rows_per_product_hit + 0.1 * observed

    def product_id(self, row: int) -> str:
        return self._backend.product_ids[row]

    def image_id(self, row: int) -> str:
        return self._backend.image_ids[row]

    def has_image(self, image_id: str) -> bool:
        return image_id in self._image_rows

    def image_uri(self, image_id: str) -> str | None:
        rows = self._image_rows.get(image_id)
        if not rows or self._backend.image_uris is None:
            return None
        return self._backend.image_uris[rows[0]]

    def image_rows(self, image_id: str) -> list[int]:
        return self._image_rows.get(image_id, [])

    def product_rows(self, product_id: str) -> list[int]:
        return self._product_rows.get(product_id, [])

    def vectors_of(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._backend.vectors_of(rows)

    def search(self, queries: np.ndarray, n: int, exact: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
        """float32 [Q,D] -> (scores [Q,n'], global rows [Q,n'], -1 = none), best first."""
        n = max(1, min(int(n), self.num_vectors))
        return self._backend.search(np.ascontiguousarray(queries, dtype=np.float32), n, exact)

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "num_vectors": self.num_vectors,
                "num_products": self.num_products, "dim": self.dim, "shards": self.shard_ids,
                "model_id": self.manifest.model_id, "created_at": self.manifest.created_at,
                "loaded_at": self.loaded_at}


class _ShardBackend:
    """Adapter over pipelines.index.artifact / pipelines.index.sharded_search: rows + search."""

    def __init__(self, shards: list[Any]):
        from pipelines.index.sharded_search import ShardedSearcher
        self._searcher = ShardedSearcher(shards)
        s = self._searcher
        self.num_rows = int(s.num_vectors)
        self.dim = int(s.dim)
        self.image_ids = s.image_ids
        self.product_ids = s.product_ids
        self.metadata = s.metadata
        self.image_uris = getattr(s, "image_uris", None)

    def search(self, queries: np.ndarray, n: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
        if exact:
            return self._searcher.search_exact(queries, n)
        return self._searcher.search(queries, n)

    def vectors_of(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._searcher.vectors(np.asarray(rows, dtype=np.int64))


# --------------------------------------------------------------------------- filters

def validate_filters(filters: Any, known_keys: Iterable[str] | None = None
                     ) -> dict[str, frozenset[str]]:
    """{"key": value | [values]} -> {"key": accepted values as strings}; QueryError if bad."""
    if filters is None:
        return {}
    if not isinstance(filters, Mapping):
        raise QueryError("bad_filter", f"filters must be an object of key -> value(s), "
                                       f"got {type(filters).__name__}")
    if len(filters) > _MAX_FILTER_KEYS:
        raise QueryError("bad_filter", f"at most {_MAX_FILTER_KEYS} filter keys")
    known = set(known_keys) if known_keys is not None else None
    out: dict[str, frozenset[str]] = {}
    for key, value in filters.items():
        if not isinstance(key, str) or not key:
            raise QueryError("bad_filter", f"filter key {reprlib.repr(key)} must be a non-empty "
                                           f"string")
        if known is not None and key not in known:
            raise QueryError("bad_filter", f"filter key {reprlib.repr(key)} is not a metadata "
                                           f"field of this index; known: "
                                           f"{', '.join(sorted(known))}")
        values = value if isinstance(value, list) else [value]
        if not values or len(values) > _MAX_FILTER_VALUES:
            raise QueryError("bad_filter", f"filter {reprlib.repr(key)} needs 1 to "
                                           f"{_MAX_FILTER_VALUES} values")
        for v in values:
            if isinstance(v, (dict, list)) or v is None:
                raise QueryError("bad_filter", f"filter {reprlib.repr(key)}: values must be "
                                               f"strings, numbers or booleans, got "
                                               f"{reprlib.repr(v)}")
        out[key] = frozenset(_filter_text(v) for v in values)
    return out


def _filter_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _matches(hit_fields: Mapping[str, Any], filters: Mapping[str, frozenset[str]]) -> bool:
    for key, accepted in filters.items():
        value = hit_fields.get(key)
        if value is None or _filter_text(value) not in accepted:
            return False
    return True


# --------------------------------------------------------------------------- searcher

class CatalogSearcher:
    """Serves one index version at a time, from a local or object-store index root."""

    def __init__(self, index_root: str, config: Config | None = None,
                 shard_ids: Sequence[int] | None = None, load_embedder: bool = True):
        self.index_root = index_root
        self.config = config or load_config()
        self.shard_ids = sorted(set(int(s) for s in shard_ids)) if shard_ids else None
        self.load_embedder = load_embedder
        self._current: LoadedIndex | None = None
        self._reload_lock = threading.Lock()
        # version -> (reason, stamp of its files when refused); retried once the stamp changes
        self._refused: dict[str, tuple[str, str]] = {}
        self._embedders: dict[str, QueryEmbedder] = {}
        self.reload_counts = {"loaded": 0, "unchanged": 0, "refused": 0}
        # Object-store shards are copied here (ScaNN loads local files), one folder per
        # version; only the serving and the previous version's copies are kept.
        self._copies_root: str | None = None
        self._copied_versions: list[str] = []

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def open(cls, index_root: str, version: str | None = None,
             shard_ids: Sequence[int] | None = None, config: Config | None = None,
             load_embedder: bool = True) -> "CatalogSearcher":
        """Load LATEST (or `version`) now; raises IndexLoadError when it cannot serve."""
        searcher = cls(index_root, config=config, shard_ids=shard_ids,
                       load_embedder=load_embedder)
        outcome = searcher.reload(version=version)
        if outcome.status != "loaded":
            raise IndexLoadError(outcome.reason or f"no index version to load at {index_root}")
        return searcher

    @property
    def current(self) -> LoadedIndex:
        """The serving version; NotReadyError before the first successful load."""
        idx = self._current
        if idx is None:
            raise NotReadyError(f"no index version loaded from {self.index_root} yet")
        return idx

    @property
    def loaded(self) -> LoadedIndex | None:
        """The serving version, or None before the first successful load."""
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def version(self) -> str | None:
        idx = self._current
        return idx.version if idx is not None else None

    def latest_version(self) -> str | None:
        from pipelines.index.artifact import read_latest
        return read_latest(self.index_root)

    def reload(self, version: str | None = None, force: bool = False) -> ReloadOutcome:
        """Load `version` (default: what LATEST names) if it is not serving; verify; swap.

        Never raises for a bad version: the outcome says "refused" with the reason and the
        serving version is kept. A version refused before is not retried unless its files
        changed since (names, sizes, modification times: a repaired version loads on the
        next check) or `force` is given.
        """
        with self._reload_lock:
            started = time.perf_counter()
            serving = self.version
            try:
                target = version or self.latest_version()
            except Exception as e:
                return self._refuse(None, f"cannot read LATEST under {self.index_root}: {e}",
                                    started, remember=False)
            if target is None:
                return self._refuse(None, f"no published version under {self.index_root} "
                                          f"(LATEST is missing)", started, remember=False)
            if target == serving:
                self.reload_counts["unchanged"] += 1
                return ReloadOutcome("unchanged", target, serving)
            stamp = self._version_stamp(target)
            refused = self._refused.get(target)
            if refused is not None and not force and refused[1] == stamp:
                return ReloadOutcome("refused", target, serving, refused[0])
            try:
                loaded = self._load(target)
            except Exception as e:  # IndexLoadError and anything a broken artifact raises
                self._prune_copies(keep={serving})
                return self._refuse(target, str(e) or type(e).__name__, started, stamp=stamp)
            self._current = loaded  # the swap: one reference assignment
            self._refused.pop(target, None)
            self._prune_copies(keep={target, serving})
            self.reload_counts["loaded"] += 1
            seconds = time.perf_counter() - started
            log.info("serving index version %s (%d vectors, %d products, shards %s) "
                     "after %.2fs; previous: %s", loaded.version, loaded.num_vectors,
                     loaded.num_products, loaded.shard_ids, seconds, serving)
            return ReloadOutcome("loaded", target, target, seconds=seconds)

    def _version_stamp(self, version: str) -> str:
        """A cheap digest of a version folder's files (paths, sizes, mtimes); "" if unlistable.

        Changes when any file of the version is replaced, so a refused version is retried
        after it is repaired, without hashing the shard files on every check.
        """
        from apache_beam.io.filesystems import FileSystems

        from pipelines.core import filesystem as fs
        from pipelines.index.artifact import version_dir
        try:
            folder = version_dir(self.index_root, version)
            found = FileSystems.match([fs.join(folder, "**")])[0].metadata_list
            h = hashlib.sha256()
            for m in sorted(found, key=lambda m: m.path):
                h.update(f"{m.path}|{m.size_in_bytes}|{m.last_updated_in_seconds}\n".encode())
            return h.hexdigest()
        except Exception:  # noqa: BLE001 - a version we cannot list is not retried blindly
            return ""

    def _refuse(self, target: str | None, reason: str, started: float,
                remember: bool = True, stamp: str = "") -> ReloadOutcome:
        self.reload_counts["refused"] += 1
        if target is not None and remember:
            self._refused[target] = (reason, stamp)
        log.error("index version %s refused (still serving %s): %s",
                  target or "(none)", self.version or "nothing", reason)
        return ReloadOutcome("refused", target, self.version, reason,
                             time.perf_counter() - started)

    def _cache_dir(self, version: str) -> str | None:
        """Where a remote version's shard files are copied (None for a local root)."""
        from pipelines.core import filesystem as fs
        if fs.is_local(self.index_root):
            return None
        if self._copies_root is None:
            import tempfile
            self._copies_root = tempfile.mkdtemp(prefix="catalog-serving-")
        if version not in self._copied_versions:
            self._copied_versions.append(version)
        return self._copies_root

    def _prune_copies(self, keep: set[str | None]) -> None:
        if self._copies_root is None:
            return
        import os
        import shutil
        for version in [v for v in self._copied_versions if v not in keep]:
            shutil.rmtree(os.path.join(self._copies_root, version), ignore_errors=True)
            self._copied_versions.remove(version)

    def _embedder_for(self, model: Mapping[str, Any]) -> QueryEmbedder:
        fingerprint = str(model.get("fingerprint", "")) + json.dumps(model.get("features"),
                                                                      sort_keys=True)
        embedder = self._embedders.get(fingerprint)
        if embedder is None:
            embedder = QueryEmbedder(model, self.config)
            self._embedders = {fingerprint: embedder}  # keep only the newest model
        return embedder

    def _load(self, version: str) -> LoadedIndex:
        from pipelines.index.reader import open_index
        try:
            artifact = open_index(self.index_root, version=version, verify=True,
                                  cache_dir=self._cache_dir(version))
        except Exception as e:
            raise IndexLoadError(f"version {version}: cannot open: {e}") from e
        manifest = artifact.manifest
        all_ids = list(range(manifest.num_shards))
        shard_ids = self.shard_ids or all_ids
        unknown = [s for s in shard_ids if s not in all_ids]
        if unknown:
            raise IndexLoadError(f"version {version} has shards {all_ids}; asked for {unknown}")
        shards = artifact.load_shards(shard_ids=shard_ids)
        backend = _ShardBackend(shards)
        embedder = self._embedder_for(manifest.model) if self.load_embedder else None
        loaded = LoadedIndex(version, manifest, shard_ids, backend, embedder)
        verify_loaded(loaded)
        from serving.text_search import build_text_index
        try:
            loaded.text_index = build_text_index(loaded, self.config.fusion.text_fields)
        except ImportError as e:  # bm25s comes with the serving extra; photos still work
            log.warning("text search is off: %s (pip install '.[serving]')", e)
        return loaded

    # -- queries ---------------------------------------------------------------------------

    def check_k(self, k: int | None) -> int:
        """k or the default; QueryError unless 1 <= k <= serving.max_k."""
        if k is None:
            return self.config.serving.default_k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise QueryError("bad_k", f"k must be an integer, got {k!r}")
        if not 1 <= int(k) <= self.config.serving.max_k:
            raise QueryError("bad_k", f"k must be between 1 and {self.config.serving.max_k}, "
                                      f"got {k}")
        return int(k)

    def check_text(self, text: str | None) -> str | None:
        """None, or query text of 1 to fusion.max_text_chars characters; QueryError if not."""
        if text is None:
            return None
        if not isinstance(text, str):
            raise QueryError("bad_text", f"text must be a string, got {type(text).__name__}")
        text = text.strip()
        if not text:
            raise QueryError("bad_text", "text is empty")
        limit = self.config.fusion.max_text_chars
        if len(text) > limit:
            raise QueryError("bad_text", f"text has {len(text)} characters; the limit is {limit}")
        return text

    def search_text(self, text: str, k: int | None = None,
                    filters: Mapping[str, Any] | None = None,
                    collapse: bool = True) -> SearchResults:
        """Products whose metadata text matches `text` (BM25); only matching products."""
        from serving.fusion import text_hits
        idx = self.current
        k = self.check_k(k)
        parsed = validate_filters(filters, idx.filter_keys)
        query = self.check_text(text)
        if query is None:
            raise QueryError("bad_text", "text is required")
        self._check_text_index(idx)
        t0 = time.perf_counter()
        hits = text_hits(idx, query, k, parsed, collapse)
        return SearchResults(version=idx.version, k=k, collapsed=collapse, hits=hits,
                             timings_ms={"text_ms": (time.perf_counter() - t0) * 1e3})

    def search_image(self, data: bytes, k: int | None = None,
                     filters: Mapping[str, Any] | None = None,
                     collapse: bool = True, text: str | None = None,
                     text_weight: float | None = None) -> SearchResults:
        """Products that look like the photo `data` (JPEG/PNG/... bytes).

        With `text`, visual and text (BM25) scores are fused (serving.fusion), weighted by
        `text_weight` (default fusion.text_weight).
        """
        idx = self.current
        k = self.check_k(k)
        parsed = validate_filters(filters, idx.filter_keys)
        query_text = self.check_text(text)
        weight = self.check_weight(text_weight, self.config.fusion.text_weight)
        limit = self.config.serving.max_upload_bytes
        if len(data) > limit:
            raise QueryError("too_large", f"image is {len(data)} bytes; the limit is {limit}")
        if idx.embedder is None:
            raise QueryError("no_model", "this searcher was opened without a query model")
        t0 = time.perf_counter()
        pixels = idx.embedder.preprocess(data)
        t1 = time.perf_counter()
        vector = idx.embedder.embed_arrays(pixels[None])[0]
        t2 = time.perf_counter()
        if query_text is not None:
            results = self._run_fused(idx, vector, query_text, weight, k, parsed, collapse, ())
        else:
            results = self._run(idx, vector, k, parsed, collapse, exclude_rows=())
        results.timings_ms.update(decode_ms=(t1 - t0) * 1e3, embed_ms=(t2 - t1) * 1e3)
        return results

    def search_vector(self, vector: Sequence[float] | np.ndarray, k: int | None = None,
                      filters: Mapping[str, Any] | None = None,
                      collapse: bool = True, text: str | None = None,
                      text_weight: float | None = None) -> SearchResults:
        """Products nearest to an embedding (normalised here; dimension must match).

        With `text`, fused with the text score as in `search_image`.
        """
        idx = self.current
        k = self.check_k(k)
        parsed = validate_filters(filters, idx.filter_keys)
        query_text = self.check_text(text)
        weight = self.check_weight(text_weight, self.config.fusion.text_weight)
        vector_ = self.check_vector(vector, idx.dim)
        if query_text is not None:
            return self._run_fused(idx, vector_, query_text, weight, k, parsed, collapse, ())
        return self._run(idx, vector_, k, parsed, collapse, ())

    def similar_to(self, product_id: str | None = None, image_id: str | None = None,
                   k: int | None = None, filters: Mapping[str, Any] | None = None,
                   collapse: bool = True, text_weight: float | None = None) -> SearchResults:
        """"More like this": products like a catalog product (mean of its images) or image.

        The product (or image) itself is left out of the results. With a text weight > 0
        (`text_weight`, default fusion.similar_text_weight) the product's title similarity
        (BM25 of its title) is fused with the visual score (serving.fusion).
        """
        weight = self.check_weight(text_weight, self.config.fusion.similar_text_weight)
        if (product_id is None) == (image_id is None):
            raise QueryError("bad_query", "give exactly one of product_id or image_id")
        idx = self.current
        k = self.check_k(k)
        parsed = validate_filters(filters, idx.filter_keys)
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
        vector = _normalise(vectors.mean(axis=0))
        if weight > 0:
            from serving.fusion import product_title
            title = product_title(idx, product_id if product_id is not None
                                  else idx.product_id(rows[0]))
            return self._run_fused(idx, vector, title, weight, k, parsed, collapse, rows,
                                   exclude_product)
        return self._run(idx, vector, k, parsed, collapse, exclude_rows=rows,
                         exclude_product=exclude_product)

    @staticmethod
    def check_weight(weight: Any, default: float) -> float:
        """A text weight in [0, 1] (default when None); QueryError if not."""
        if weight is None:
            return default
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not 0.0 <= float(weight) <= 1.0:
            raise QueryError("bad_text_weight", f"text_weight must be a number in [0, 1], "
                                                f"got {weight!r}")
        return float(weight)

    @staticmethod
    def _check_text_index(idx: LoadedIndex) -> None:
        if idx.text_index is None:
            raise QueryError("text_unavailable", "text search is not available on this server "
                                                 "(the bm25s package is not installed)")

    def _run_fused(self, idx: LoadedIndex, vector: np.ndarray, text: str, weight: float,
                   k: int, filters: Mapping[str, frozenset[str]], collapse: bool,
                   exclude_rows: Iterable[int], exclude_product: str | None = None
                   ) -> SearchResults:
        from serving.fusion import fused_hits
        self._check_text_index(idx)
        t0 = time.perf_counter()
        hits = fused_hits(idx, vector, text, k, weight, self.config.fusion.candidates,
                          filters, collapse, exclude_rows, exclude_product)
        return SearchResults(version=idx.version, k=k, collapsed=collapse, hits=hits,
                             timings_ms={"search_ms": (time.perf_counter() - t0) * 1e3})

    @staticmethod
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
        if not np.all(np.isfinite(v)):
            raise QueryError("bad_vector", "vector has NaN or infinite values")
        if not np.any(v):
            raise QueryError("bad_vector", "vector is all zeros")
        return _normalise(v)

    def _run(self, idx: LoadedIndex, vector: np.ndarray, k: int,
             filters: Mapping[str, frozenset[str]], collapse: bool,
             exclude_rows: Iterable[int], exclude_product: str | None = None,
             exact: bool = False) -> SearchResults:
        t0 = time.perf_counter()
        hits = collect_hits(idx, vector, k, filters, collapse, exclude_rows, exclude_product,
                            exact)
        return SearchResults(version=idx.version, k=k, collapsed=collapse, hits=hits,
                             timings_ms={"search_ms": (time.perf_counter() - t0) * 1e3})


def collect_hits(idx: LoadedIndex, vector: np.ndarray, k: int,
                 filters: Mapping[str, frozenset[str]] | None = None, collapse: bool = True,
                 exclude_rows: Iterable[int] = (), exclude_product: str | None = None,
                 exact: bool = False,
                 neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> list[SearchHit]:
    """Top-k hits for one normalised query vector: over-fetch images, filter, collapse.

    Asks the index for more neighbours (x4 each round) until k hits survive filtering and
    product collapsing, or the whole index has been asked for. `neighbours` (scores [n],
    rows [n]) from an earlier batched search, if given, are used for the first round.
    """
    excluded = set(int(r) for r in exclude_rows)
    extra = len(excluded) + (len(idx.product_rows(exclude_product)) if exclude_product else 0)
    needs_more = collapse or bool(filters) or extra > 0 or idx.has_views
    # Collapsing to products needs about k x (rows scanned per distinct product) rows;
    # that ratio is learned from earlier queries, so one search round is usually enough.
    first = int(k * idx.rows_per_product_hit * 1.25) if collapse else 4 * k
    fetch = min(idx.num_vectors, (max(first, 32) if needs_more else k) + extra)
    while True:
        if neighbours is not None:
            scores, rows = neighbours[0][None], neighbours[1][None]
            fetch, neighbours = max(1, scores.shape[1]), None
        else:
            scores, rows = idx.search(vector[None], fetch, exact=exact)
        hits: list[SearchHit] = []
        seen: set[str] = set()
        for scanned, (score, row) in enumerate(zip(scores[0].tolist(), rows[0].tolist()), 1):
            if row < 0 or row in excluded:
                continue
            product_id = idx.product_id(row)
            if exclude_product is not None and product_id == exclude_product:
                continue
            key = product_id if collapse else idx.image_id(row)  # views of one image: once
            if key in seen:
                continue
            hit = idx.hit(row, score)
            if filters and not _matches({**hit.metadata, "product_id": hit.product_id,
                                         "image_id": hit.image_id}, filters):
                continue
            seen.add(key)
            hits.append(hit)
            if len(hits) == k:
                if collapse and not filters:
                    idx.learn_rows_per_product_hit(scanned / k)
                return hits
        if fetch >= idx.num_vectors:
            return hits
        fetch = min(idx.num_vectors, fetch * 4)


def _normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


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
    if idx.embedder is not None and idx.embedder.spec.dim and idx.embedder.spec.dim != idx.dim:
        raise IndexLoadError(f"version {idx.version}: model {idx.embedder.spec.model_id} gives "
                             f"{idx.embedder.spec.dim}-d vectors, the index holds {idx.dim}-d")
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
        probe_vec = idx.embedder.embed_arrays(np.full((1, size, size, 3), 128, np.uint8))
        if probe_vec.shape[1] != idx.dim:
            raise IndexLoadError(f"version {idx.version}: model gives {probe_vec.shape[1]}-d "
                                 f"vectors, the index holds {idx.dim}-d")


# --------------------------------------------------------------------------- hot reload

class IndexWatcher:
    """Background thread: every `interval_s`, load what LATEST names if it changed."""

    def __init__(self, searcher: CatalogSearcher, interval_s: float | None = None):
        self.searcher = searcher
        self.interval_s = interval_s or searcher.config.serving.reload_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_outcome: ReloadOutcome | None = None

    def start(self) -> "IndexWatcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="index-watcher",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def check_now(self) -> ReloadOutcome:
        outcome = self.searcher.reload()
        self.last_outcome = outcome
        return outcome

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_now()
            except Exception:  # the watcher must outlive any single bad check
                log.exception("index watcher: reload check failed")
