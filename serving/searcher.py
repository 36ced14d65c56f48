"""Search the published catalog index: "which catalog products look like this photo?".

    searcher = CatalogSearcher.open(index_root, config=config)     # LATEST, all shards
    results = searcher.search_image(photo_bytes, k=10, filters={"category": "dairy"})
    results = searcher.search_vector(vector, k=10)
    results = searcher.similar_to(product_id="P0003", k=10)        # "more like this"

A `CatalogSearcher` holds one `LoadedIndex` (serving.loaded_index: an immutable, fully
loaded index version: its `ShardedSearcher` over the ScaNN shards and row table, its BM25
text index and the query embedder built from the version's own model, with the same
decode/preprocess code as the embed pipeline). Two hops reach ScaNN: CatalogSearcher
(version policy, hot swap, query checks) -> LoadedIndex -> its ShardedSearcher's shards.
`reload()` loads a new version beside the serving one, verifies it and swaps one
reference; a request keeps the `LoadedIndex` it started with, so in-flight requests
finish on the old version.
A version that fails to load or verify is refused with a logged reason and the old one
keeps serving. `IndexWatcher` (serving.reload) calls `reload()` whenever LATEST changes.

Results are collapsed to products by default (best-scoring image per product) and can
be filtered on metadata (`{"category": "dairy"}`, a value or a list of accepted values;
`product_id` and `image_id` are filterable too). Crowding (`group_by="brand",
max_per_group=2`: at most two results per brand; serving.crowding) works for every
query kind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np

from pipelines.core.config import Config, load_config
from pipelines.index.sharded_search import ShardedSearcher
from serving import query
from serving.embedder import QueryEmbedder
from serving.errors import IndexLoadError, NotReadyError, QueryError
from serving.loaded_index import LoadedIndex, verify_loaded
from serving.reload import ReloadOutcome
from serving.results import SearchResults

__all__ = ["CatalogSearcher"]

log = logging.getLogger(__name__)


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
        self.reload_counts = {"loaded": 0, "unchanged": 0, "refused": 0, "deltas": 0}
        # The serving version without its deltas, the stamp of the delta log + takedown
        # list applied on top of it, verified deltas by (version, seq), the last takedown
        # list read (kept when the file turns out damaged) and the last delta refusal.
        self._base: LoadedIndex | None = None
        self._delta_stamp: str | None = None
        self._delta_cache: dict[tuple[str, int], Any] = {}
        self._takedowns: Any = None
        self.delta_error: str | None = None
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
                from pipelines.core.latest import absent_reason
                return self._refuse(None, f"no published version under {self.index_root} "
                                          f"({absent_reason(self.index_root)})", started,
                                    remember=False)
            if target == serving:
                applied = self._refresh_deltas(started)
                if applied is not None:
                    return applied
                self.reload_counts["unchanged"] += 1
                return ReloadOutcome("unchanged", target, serving)
            stamp = self._version_stamp(target)
            refused = self._refused.get(target)
            if refused is not None and not force and refused[1] == stamp:
                return ReloadOutcome("refused", target, serving, refused[0])
            try:
                base = self._load(target)
                loaded, delta_stamp = self._with_deltas(base)
            except Exception as e:  # IndexLoadError and anything a broken artifact raises
                self._prune_copies(keep={serving})
                return self._refuse(target, str(e) or type(e).__name__, started, stamp=stamp)
            self._current = loaded  # the swap: one reference assignment
            self._base, self._delta_stamp = base, delta_stamp
            self._delta_cache = {k: v for k, v in self._delta_cache.items() if k[0] == target}
            self._refused.pop(target, None)
            self._prune_copies(keep={target, serving})
            self.reload_counts["loaded"] += 1
            seconds = time.perf_counter() - started
            log.info("serving index version %s (%d vectors, %d products, shards %s) "
                     "after %.2fs; previous: %s", loaded.version, loaded.num_vectors,
                     loaded.num_products, loaded.shard_ids, seconds, serving)
            return ReloadOutcome("loaded", target, target, reason=self.delta_error or "",
                                 seconds=seconds)

    # -- deltas: applied on top of the serving version (serving.delta_index) -------------

    def _log_stamp(self, version: str) -> str:
        from pipelines.index import deltas, takedowns
        return deltas.log_stamp(self.index_root, version) + "|" + takedowns.stamp(
            self.index_root)

    def _with_deltas(self, base: LoadedIndex) -> tuple[LoadedIndex, str]:
        """`base` with its delta log and the takedown list applied (base itself when there
        is neither); a damaged delta stops the log there (`delta_error` names its file)."""
        from pipelines.core import filesystem as fs
        from pipelines.index import deltas, takedowns
        from serving.delta_index import DeltaIndex
        from serving.delta_segment import SegmentParams
        stamp = self._log_stamp(base.version)
        try:
            self._takedowns = takedowns.read_takedowns(self.index_root)
        except takedowns.TakedownError as e:  # keep the last list read
            log.error("%s; keeping the takedown list read before", e)
        listed = self._takedowns or takedowns.Takedowns()
        if not fs.is_local(self.index_root) and not fs.exists(
                deltas.log_dir(self.index_root, base.version)):
            log_ = deltas.DeltaLog(base.version, [])
        else:
            log_ = deltas.read_log(self.index_root, base.version, base.dim, self._delta_cache,
                                   deltas.version_adapter(base.manifest))
        self.delta_error = log_.error
        if not log_.deltas and not listed and log_.error is None:
            return base, stamp
        previous = self._current if isinstance(self._current, DeltaIndex) else None
        return DeltaIndex(base, log_.deltas, listed.image_ids, listed.product_ids,
                          self.config.fusion.text_fields, log_.error,
                          segment_params=SegmentParams.from_config(self.config),
                          previous=previous), stamp

    def _refresh_deltas(self, started: float) -> ReloadOutcome | None:
        """Apply the serving version's new deltas / takedowns (None when none changed)."""
        base = self._base
        if base is None:
            return None
        stamp = self._log_stamp(base.version)
        if stamp == self._delta_stamp:
            return None
        previous_error = self.delta_error
        try:
            loaded, stamp = self._with_deltas(base)
        except Exception as e:  # noqa: BLE001 - the serving state is kept
            self._delta_stamp = stamp
            return self._refuse(None, f"deltas of {base.version}: {e}", started,
                                remember=False)
        self._current = loaded  # the swap
        self._delta_stamp = stamp
        seconds = time.perf_counter() - started
        if self.delta_error is not None and self.delta_error != previous_error:
            self.reload_counts["refused"] += 1
            return ReloadOutcome("refused", base.version, base.version, self.delta_error,
                                 seconds)
        self.reload_counts["deltas"] += 1
        info = getattr(loaded, "delta_info", None)
        log.info("index version %s: deltas applied %s in %.3fs", base.version,
                 info() if info else "(none)", seconds)
        return ReloadOutcome("deltas_applied", base.version, base.version,
                             self.delta_error or "", seconds)

    def apply_deltas_now(self) -> ReloadOutcome:
        """Apply new deltas / takedowns of the serving version at once (after a delete)."""
        with self._reload_lock:
            started = time.perf_counter()
            out = self._refresh_deltas(started)
            return out or ReloadOutcome("unchanged", self.version, self.version)

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
        # model, features and precision: a version embedded otherwise gets its own embedder
        fingerprint = str(model.get("fingerprint", "")) + json.dumps(
            [model.get("features"), model.get("precision") or "fp32"], sort_keys=True)
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
        try:
            adapter = artifact.load_adapter()  # from the artifact only, under its checksums
        except Exception as e:
            raise IndexLoadError(f"version {version}: cannot open: {e}") from e
        shards = ShardedSearcher(artifact.load_shards(shard_ids=shard_ids),
                                 routing=artifact.routing())
        embedder = self._embedder_for(manifest.model) if self.load_embedder else None
        loaded = LoadedIndex(version, manifest, shard_ids, shards, embedder, adapter=adapter)
        verify_loaded(loaded)
        from serving.text_search import build_text_index
        try:
            loaded.text_index = build_text_index(loaded, self.config.fusion.text_fields)
        except ImportError as e:  # bm25s comes with the serving extra; photos still work
            log.warning("text search is off: %s (pip install '.[serving]')", e)
        return loaded

    # -- queries: on the version serving when the query arrives (serving.query) ------------

    def search_text(self, text: str, k: int | None = None,
                    filters: Mapping[str, Any] | None = None,
                    collapse: bool = True, group_by: str | None = None,
                    max_per_group: int | None = None) -> SearchResults:
        """Products whose metadata text matches `text` (BM25); only matching products."""
        return query.search_text(self.current, self.config, text, k, filters, collapse,
                                 group_by, max_per_group)

    def search_image(self, data: bytes, k: int | None = None,
                     filters: Mapping[str, Any] | None = None,
                     collapse: bool = True, text: str | None = None,
                     text_weight: float | None = None, group_by: str | None = None,
                     max_per_group: int | None = None) -> SearchResults:
        """Products that look like the photo `data` (JPEG/PNG/... bytes).

        With `text`, visual and text (BM25) scores are fused (serving.fusion), weighted by
        `text_weight` (default fusion.text_weight). `group_by` + `max_per_group`: at most
        that many results per value of a metadata field (serving.crowding).
        """
        return query.search_image(self.current, self.config, data, k, filters, collapse, text,
                                  text_weight, group_by, max_per_group)

    def search_vector(self, vector: Sequence[float] | np.ndarray, k: int | None = None,
                      filters: Mapping[str, Any] | None = None,
                      collapse: bool = True, text: str | None = None,
                      text_weight: float | None = None, group_by: str | None = None,
                      max_per_group: int | None = None) -> SearchResults:
        """Products nearest to an embedding (normalised here; dimension must match).

        With `text`, fused with the text score as in `search_image`.
        """
        return query.search_vector(self.current, self.config, vector, k, filters, collapse,
                                   text, text_weight, group_by, max_per_group)

    def similar_to(self, product_id: str | None = None, image_id: str | None = None,
                   k: int | None = None, filters: Mapping[str, Any] | None = None,
                   collapse: bool = True, text_weight: float | None = None,
                   group_by: str | None = None,
                   max_per_group: int | None = None) -> SearchResults:
        """"More like this": products like a catalog product (mean of its images) or image.

        The product (or image) itself is left out of the results. With a text weight > 0
        (`text_weight`, default fusion.similar_text_weight) the product's title similarity
        (BM25 of its title) is fused with the visual score (serving.fusion).
        """
        # argument errors come before "not ready"
        query.check_weight(text_weight, self.config.fusion.similar_text_weight)
        if (product_id is None) == (image_id is None):
            raise QueryError("bad_query", "give exactly one of product_id or image_id")
        return query.similar_to(self.current, self.config, product_id, image_id, k, filters,
                                collapse, text_weight, group_by, max_per_group)
