"""Typed configuration: configs/default.yaml, deep-merged with an override file and flags.

Every stage reads its settings from one `Config`. Unknown keys, wrong types and
out-of-range values fail fast with a `ConfigError` that names the key.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml
from pipelines.core.errors import BadInputError

# configs/default.yaml, shipped inside the package (pipelines/configs/default.yaml is a
# symlink to it that setuptools packages as a file) so a wheel install has the same defaults.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"

AUGMENT_VIEWS = ("original", "hflip", "crop", "rotate", "jitter")
#: model.precision values (pipelines/model/precision.py says what each does).
MODEL_PRECISIONS = ("fp32", "bf16", "auto")
# index.reorder_dtype: how ScaNN stores the vectors it reorders with.
REORDER_DTYPES = ("float32", "int8", "bfloat16")


class ConfigError(BadInputError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class ModelConfig:
    handle: str = "builtin:efficientnet_lite0"
    input_size: int | None = None
    cache_dir: str | None = None
    batch_size: int = 32
    precision: str = "fp32"

    def validate(self) -> None:
        _require(bool(self.handle), "model.handle", "must not be empty")
        _require(self.precision in MODEL_PRECISIONS, "model.precision",
                 f"must be one of {', '.join(MODEL_PRECISIONS)}, got {self.precision!r}")
        _require(self.input_size is None or 32 <= self.input_size <= 1024,
                 "model.input_size", "must be null or between 32 and 1024")
        _require(1 <= self.batch_size <= 4096, "model.batch_size", "must be between 1 and 4096")

    def resolved_cache_dir(self) -> str:
        return (self.cache_dir or os.environ.get("CATALOG_SEARCH_CACHE")
                or os.path.join(os.path.expanduser("~"), ".cache", "catalog-search"))


@dataclass(frozen=True)
class FetchConfig:
    timeout_s: float = 20.0
    retries: int = 2
    backoff_s: float = 0.5
    max_bytes: int = 20_000_000
    deadline_s: float = 60.0
    concurrency: int = 16
    per_host_concurrency: int = 16

    def validate(self) -> None:
        _require(1 <= self.concurrency <= 256, "fetch.concurrency", "must be between 1 and 256")
        _require(1 <= self.per_host_concurrency <= 256, "fetch.per_host_concurrency",
                 "must be between 1 and 256")
        _require(self.timeout_s > 0, "fetch.timeout_s", "must be > 0")
        _require(self.deadline_s > 0, "fetch.deadline_s", "must be > 0")
        _require(0 <= self.retries <= 10, "fetch.retries", "must be between 0 and 10")
        _require(self.backoff_s >= 0, "fetch.backoff_s", "must be >= 0")
        _require(self.max_bytes > 0, "fetch.max_bytes", "must be > 0")


@dataclass(frozen=True)
class DecodeConfig:
    max_pixels: int = 40_000_000
    resize: str = "center_crop"

    def validate(self) -> None:
        _require(self.max_pixels > 0, "decode.max_pixels", "must be > 0")
        _require(self.resize in ("center_crop", "pad"), "decode.resize",
                 f"must be 'center_crop' or 'pad', got {self.resize!r}")


@dataclass(frozen=True)
class AugmentConfig:
    views: tuple[str, ...] = ("original",)
    mode: str = "mean"
    seed: int = 0

    def validate(self) -> None:
        _require(len(self.views) > 0, "augment.views", "must name at least one view")
        for v in self.views:
            _require(v in AUGMENT_VIEWS, "augment.views",
                     f"unknown view {v!r}; choose from {', '.join(AUGMENT_VIEWS)}")
        _require(len(set(self.views)) == len(self.views), "augment.views", "has duplicates")
        _require(self.mode in ("mean", "separate"), "augment.mode",
                 f"must be 'mean' or 'separate', got {self.mode!r}")


@dataclass(frozen=True)
class EmbedConfig:
    max_dead_letter_fraction: float = 0.5
    # What one manifest row may decode to (pipelines.embed.manifest.ManifestLimits): a
    # larger field / row is dead-lettered manifest/too_large (this also caps the metadata
    # an index carries per row).
    max_cell_bytes: int = 65_536
    max_row_bytes: int = 262_144

    def validate(self) -> None:
        _require(0 <= self.max_dead_letter_fraction <= 1, "embed.max_dead_letter_fraction",
                 f"must be in [0, 1], got {self.max_dead_letter_fraction!r}")
        _require(self.max_cell_bytes >= 1024, "embed.max_cell_bytes", "must be >= 1024")
        _require(self.max_row_bytes >= self.max_cell_bytes, "embed.max_row_bytes",
                 "must be >= embed.max_cell_bytes")


@dataclass(frozen=True)
class FeaturesConfig:
    """How one image becomes one vector (see pipelines/model/features.py); part of the fingerprint.

    scales: zoom levels averaged per view (1.0 = the plain center crop; s > 1 = the image
            resized s times larger, center-cropped at the model's size); flip: also embed the
            horizontal mirror and average. Serving applies the same to queries (from the
            index manifest); query_scales (null = scales) zooms query photos differently
            from catalog images (shelf photos vs packshots).
    """
    # Neutral defaults: the plain center crop. The grocery grid's zoom (scales
    # [1.3], query_scales [1.6]) helps shelf photos of small goods and hurts full-frame
    # garment photos (docs/EVALUATION.md, "Feature defaults"), so it is an option, not a default.
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    query_scales: tuple[float, ...] | None = None

    def validate(self) -> None:
        _require(1 <= len(self.scales) <= 4, "features.scales", "must list 1 to 4 scales")
        for s in self.scales:
            _require(1.0 <= s <= 2.0, "features.scales", f"each scale must be in [1, 2], got {s}")
        _require(len(set(self.scales)) == len(self.scales), "features.scales", "has duplicates")
        _require(isinstance(self.flip, bool), "features.flip", "must be true or false")
        if self.query_scales is not None:
            _require(1 <= len(self.query_scales) <= 4, "features.query_scales",
                     "must be null or list 1 to 4 scales")
            for s in self.query_scales:
                _require(1.0 <= s <= 2.0, "features.query_scales",
                         f"each scale must be in [1, 2], got {s}")


@dataclass(frozen=True)
class FusionConfig:
    """Image + text search (serving/fusion.py, serving/text_search.py).

    text_fields: metadata fields (and product_id) whose text is indexed with BM25 at load;
    text_weight: weight of the min-max-normalised text score in a photo + text query
    (1 - text_weight for the visual score); candidates: products taken from each of the
    visual and the text ranking before fusing; similar_text_weight: the same for "similar
    products" (title similarity); max_text_chars: longer query text is refused (400).
    """
    text_fields: tuple[str, ...] = ("title", "category", "description", "product_id")
    text_weight: float = 0.4
    similar_text_weight: float = 0.0
    candidates: int = 100
    max_text_chars: int = 500

    def validate(self) -> None:
        _require(len(self.text_fields) > 0, "fusion.text_fields", "must name at least one field")
        _require(0.0 <= self.text_weight <= 1.0, "fusion.text_weight", "must be in [0, 1]")
        _require(0.0 <= self.similar_text_weight <= 1.0, "fusion.similar_text_weight",
                 "must be in [0, 1]")
        _require(1 <= self.candidates <= 10_000, "fusion.candidates",
                 "must be between 1 and 10000")
        _require(1 <= self.max_text_chars <= 10_000, "fusion.max_text_chars",
                 "must be between 1 and 10000")


@dataclass(frozen=True)
class RunnerConfig:
    name: str = "DirectRunner"
    direct_num_workers: int = 2
    direct_running_mode: str = "multi_processing"
    tf_threads: int = 1
    direct_small_run_rows: int = 1000
    options: Mapping[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _require(bool(self.name), "runner.name", "must not be empty")
        _require(self.direct_num_workers >= 1, "runner.direct_num_workers", "must be >= 1")
        _require(self.direct_running_mode in ("in_memory", "multi_threading", "multi_processing"),
                 "runner.direct_running_mode",
                 "must be in_memory, multi_threading or multi_processing")
        _require(self.tf_threads >= 0, "runner.tf_threads", "must be >= 0 (0 = TensorFlow default)")
        _require(self.direct_small_run_rows >= 0, "runner.direct_small_run_rows",
                 "must be >= 0 (0 = always start the configured workers)")

    @property
    def is_direct(self) -> bool:
        return self.name in ("DirectRunner", "direct", "FnApiRunner")


@dataclass(frozen=True)
class IndexConfig:
    shards: int = 1
    num_neighbors: int = 10
    brute_force_below: int = 20_000
    leaves_to_search_fraction: float = 0.1
    reorder_multiplier: int = 10
    anisotropic_threshold: float = 0.2
    dimensions_per_block: int = 2
    eval_queries: int = 500
    eval_seed: int = 0
    recall_threshold: float = 0.95
    retention: int = 5
    tune_recall_target: float | None = 0.98
    training_threads: int = 0
    # An adapter folder (catalog-search train-adapter): the index holds adapter(raw) vectors.
    adapter: str | None = None
    # ScaNN builder options; recorded per shard in the index manifest.
    leaves_per_sqrt_n: float = 4.0       # num_leaves = this x sqrt(total vectors), over shards
    projection_dim: int | None = 256     # PCA to this many dims for partitioning + hashing
    soar_lambda: float | None = 1.5      # SOAR spilled assignments (dot product)
    reorder_dtype: str = "float32"       # float32 | int8 | bfloat16 (exact-score reordering)
    # catalog_backfill: a drop is published as a delta (pipelines/index/deltas.py) while
    # the version's delta rows stay at most this many with it; above, a full build runs.
    # 0 = always a full build.
    delta_max_rows: int = 20_000
    # Shards: hash (sha256(image_id) mod N) or partition (nearest k-means centroid, routed).
    shard_assignment: str = "hash"
    routing_partitions_per_shard: int = 4
    routing_sample: int = 20_000
    routing_min_coverage: float = 0.99

    def validate(self) -> None:
        _require(self.adapter is None or bool(str(self.adapter).strip()), "index.adapter",
                 "must be null or an adapter folder")
        _require(1 <= self.shards <= 4096, "index.shards", "must be between 1 and 4096")
        _require(self.num_neighbors >= 1, "index.num_neighbors", "must be >= 1")
        _require(self.brute_force_below >= 0, "index.brute_force_below", "must be >= 0")
        _require(0 < self.leaves_to_search_fraction <= 1, "index.leaves_to_search_fraction",
                 "must be in (0, 1]")
        _require(self.reorder_multiplier >= 1, "index.reorder_multiplier", "must be >= 1")
        _require(self.dimensions_per_block >= 1, "index.dimensions_per_block", "must be >= 1")
        _require(self.eval_queries >= 1, "index.eval_queries", "must be >= 1")
        _require(0 <= self.recall_threshold <= 1, "index.recall_threshold", "must be in [0, 1]")
        _require(self.retention >= 1, "index.retention", "must be >= 1")
        _require(self.tune_recall_target is None or 0 < self.tune_recall_target <= 1,
                 "index.tune_recall_target", "must be null or in (0, 1]")
        _require(self.training_threads >= 0, "index.training_threads",
                 "must be >= 0 (0 = ScaNN default)")
        _require(0 < self.leaves_per_sqrt_n <= 64, "index.leaves_per_sqrt_n",
                 "must be in (0, 64]")
        _require(self.projection_dim is None or self.projection_dim >= 1,
                 "index.projection_dim", "must be null or >= 1")
        _require(self.soar_lambda is None or self.soar_lambda > 0, "index.soar_lambda",
                 "must be null or > 0")
        _require(self.reorder_dtype in REORDER_DTYPES, "index.reorder_dtype",
                 f"must be one of {', '.join(REORDER_DTYPES)}")
        _require(self.delta_max_rows >= 0, "index.delta_max_rows", "must be >= 0")
        _require(self.shard_assignment in ("hash", "partition"), "index.shard_assignment",
                 "must be hash or partition")
        _require(1 <= self.routing_partitions_per_shard <= 256,
                 "index.routing_partitions_per_shard", "must be between 1 and 256")
        _require(self.routing_sample >= 1, "index.routing_sample", "must be >= 1")
        _require(0 < self.routing_min_coverage <= 1, "index.routing_min_coverage",
                 "must be in (0, 1]")


@dataclass(frozen=True)
class AdapterConfig:
    """Trained embedding adapter (pipelines/adapter, `catalog-search train-adapter`).

    A linear projection of the frozen model vectors to `dim` dimensions (L2-normalised;
    `hidden` > 0 adds a ReLU hidden layer beside it),
    trained with a supervised-contrastive loss (temperature) on batches of
    products_per_batch products x samples_per_product images/pairs; a seeded held-out
    split (val_products of the products, val_pairs of the remaining pairs) gates it: the
    adapter is written only when its validation recall@1 exceeds the identity's by more
    than min_gain, measured on at most val_max_queries of the held-out queries (a seeded
    sample). enabled: the catalog_refresh DAG runs its train_adapter task.
    """
    enabled: bool = False
    dim: int = 256
    epochs: int = 60
    learning_rate: float = 3e-4
    temperature: float = 0.1
    products_per_batch: int = 32
    samples_per_product: int = 8
    val_products: float = 0.1
    val_pairs: float = 0.1
    min_gain: float = 0.0
    seed: int = 0
    # 0: linear; > 0: a ReLU hidden layer of this width beside the linear map (an option).
    hidden: int = 0
    # Validation queries: at most this many (a seeded sample), so the gate's exact search
    # costs O(val_max_queries x N), not O(N^2). The initialisation: on at most init_sample rows.
    val_max_queries: int = 5000
    init_sample: int = 100_000
    # The catalog_refresh DAG's train_adapter task: the adapter folder (null: `adapter`
    # beside the index root), labelled-photo snapshots used as pairs, the feedback log.
    dir: str | None = None
    pairs: tuple[str, ...] = ()
    feedback: str | None = None

    def validate(self) -> None:
        _require(isinstance(self.enabled, bool), "adapter.enabled", "must be true or false")
        for key in ("dir", "feedback"):
            value = getattr(self, key)
            _require(value is None or bool(value.strip()), f"adapter.{key}",
                     "must be null or a non-empty path")
        _require(all(p and p.strip() for p in self.pairs), "adapter.pairs",
                 "must list non-empty snapshot paths")
        _require(1 <= self.dim <= 8192, "adapter.dim", "must be between 1 and 8192")
        _require(1 <= self.epochs <= 10_000, "adapter.epochs", "must be between 1 and 10000")
        _require(0 < self.learning_rate <= 1, "adapter.learning_rate", "must be in (0, 1]")
        _require(0 < self.temperature <= 10, "adapter.temperature", "must be in (0, 10]")
        _require(self.products_per_batch >= 2, "adapter.products_per_batch", "must be >= 2")
        _require(self.samples_per_product >= 2, "adapter.samples_per_product", "must be >= 2")
        _require(0 < self.val_products < 1, "adapter.val_products", "must be in (0, 1)")
        _require(0 <= self.val_pairs < 1, "adapter.val_pairs", "must be in [0, 1)")
        _require(0 <= self.min_gain < 1, "adapter.min_gain", "must be in [0, 1)")
        _require(0 <= self.hidden <= 8192, "adapter.hidden", "must be between 0 and 8192")
        _require(self.val_max_queries >= 1, "adapter.val_max_queries", "must be >= 1")
        _require(self.init_sample >= 1, "adapter.init_sample", "must be >= 1")


@dataclass(frozen=True)
class ServingConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_upload_bytes: int = 10_000_000
    reload_interval_s: float = 5.0
    default_k: int = 10
    max_k: int = 100
    # Query uploads: pixels one decode may hold (after JPEG draft), far below decode.max_pixels.
    max_query_pixels: int = 16_000_000
    # Decode+embed slots; requests beyond them wait in a bounded queue, then get 503.
    max_concurrent_queries: int = 4
    max_queued_queries: int = 32
    queue_timeout_s: float = 10.0
    # JSON bodies (and `filters` JSON): size and nesting limits checked before parsing.
    max_json_bytes: int = 1_000_000
    max_json_depth: int = 8
    # Model handles an index manifest may name besides model.handle and builtin:* models.
    allowed_model_handles: tuple[str, ...] = ()
    # Catalog image reads of GET /v1/images/{id}: the deadline of one read.
    image_read_timeout_s: float = 5.0
    # Answers: a metadata text longer than this is cut (ends in "…").
    max_metadata_chars: int = 4096
    # HTTP request heads (serving.http_limits): bytes of the request line + headers, and
    # seconds a connection may take to send them.
    max_header_bytes: int = 16384
    header_timeout_s: float = 10.0
    # POST /v1/feedback (serving.feedback): the local folder of the feedback log (null: off,
    # search answers carry no query_id), its file size cap and rotated files kept, and how
    # many recent queries' model-space vectors are kept in memory for it (LRU).
    feedback_root: str | None = None
    feedback_max_bytes: int = 16_777_216
    feedback_max_files: int = 8
    feedback_recent_queries: int = 4096
    # Delta rows (serving.delta_index): searched exactly while fewer than this many are live;
    # from there by a ScaNN searcher built over them in memory (serving.delta_segment),
    # searching this fraction of its tree leaves and reordering n x the multiplier AH
    # candidates with exact float32 scores. 0 = always exact.
    delta_scann_min_rows: int = 2000
    delta_scann_leaves_fraction: float = 0.1
    delta_scann_reorder_multiplier: int = 4

    def validate(self) -> None:
        _require(self.delta_scann_min_rows >= 0, "serving.delta_scann_min_rows", "must be >= 0")
        _require(0 < self.delta_scann_leaves_fraction <= 1,
                 "serving.delta_scann_leaves_fraction", "must be in (0, 1]")
        _require(self.delta_scann_reorder_multiplier >= 1,
                 "serving.delta_scann_reorder_multiplier", "must be >= 1")
        _require(self.feedback_root is None or bool(self.feedback_root.strip()),
                 "serving.feedback_root", "must be null or a folder")
        _require(self.feedback_max_bytes >= 1024, "serving.feedback_max_bytes", "must be >= 1024")
        _require(self.feedback_max_files >= 1, "serving.feedback_max_files", "must be >= 1")
        _require(self.feedback_recent_queries >= 1, "serving.feedback_recent_queries",
                 "must be >= 1")
        _require(0 <= self.port <= 65535, "serving.port", "must be between 0 and 65535")
        _require(self.image_read_timeout_s > 0, "serving.image_read_timeout_s", "must be > 0")
        _require(self.max_metadata_chars >= 16, "serving.max_metadata_chars", "must be >= 16")
        _require(self.max_header_bytes >= 1024, "serving.max_header_bytes", "must be >= 1024")
        _require(self.header_timeout_s > 0, "serving.header_timeout_s", "must be > 0")
        _require(self.max_upload_bytes > 0, "serving.max_upload_bytes", "must be > 0")
        _require(self.reload_interval_s > 0, "serving.reload_interval_s", "must be > 0")
        _require(1 <= self.default_k <= self.max_k, "serving.default_k", "must be in [1, max_k]")
        _require(self.max_query_pixels > 0, "serving.max_query_pixels", "must be > 0")
        _require(self.max_concurrent_queries >= 1, "serving.max_concurrent_queries",
                 "must be >= 1")
        _require(self.max_queued_queries >= 0, "serving.max_queued_queries", "must be >= 0")
        _require(self.queue_timeout_s >= 0, "serving.queue_timeout_s", "must be >= 0")
        _require(self.max_json_bytes >= 1024, "serving.max_json_bytes", "must be >= 1024")
        _require(2 <= self.max_json_depth <= 64, "serving.max_json_depth",
                 "must be between 2 and 64")
        for handle in self.allowed_model_handles:
            _require(bool(handle and handle.strip()), "serving.allowed_model_handles",
                     "must not contain empty handles")


@dataclass(frozen=True)
class DuplicatesConfig:
    """`catalog-search duplicates` (pipelines/duplicates/): near-duplicate images across
    products of a published index version.

    A pair of images of different products is a near duplicate when their (index-space)
    cosine similarity is >= `threshold`, or >= `candidate_threshold` and their small
    grayscale signatures correlate >= `pixel_threshold` (null: no pixel check). Exact
    byte duplicates (same content_sha256) are always reported. `in_refresh`: the
    catalog_refresh DAG runs the job on each new version (its figures on the Asset event).
    """
    threshold: float = 0.97
    candidate_threshold: float = 0.80
    pixel_threshold: float | None = 0.93
    neighbours: int = 20
    block_rows: int = 2048
    report_groups: int = 200
    report_images_per_group: int = 12
    in_refresh: bool = False

    def validate(self) -> None:
        _require(isinstance(self.in_refresh, bool), "duplicates.in_refresh",
                 "must be true or false")
        _require(0 < self.threshold <= 1, "duplicates.threshold", "must be in (0, 1]")
        _require(0 < self.candidate_threshold <= self.threshold,
                 "duplicates.candidate_threshold", "must be in (0, threshold]")
        _require(self.pixel_threshold is None or 0 < self.pixel_threshold <= 1,
                 "duplicates.pixel_threshold", "must be null or in (0, 1]")
        _require(1 <= self.neighbours <= 1000, "duplicates.neighbours",
                 "must be between 1 and 1000")
        _require(self.block_rows >= 1, "duplicates.block_rows", "must be >= 1")
        _require(self.report_groups >= 0, "duplicates.report_groups", "must be >= 0")
        _require(self.report_images_per_group >= 2, "duplicates.report_images_per_group",
                 "must be >= 2")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    duplicates: DuplicatesConfig = field(default_factory=DuplicatesConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def replace(self, **sections: Mapping[str, Any]) -> "Config":
        """A copy with some keys of some sections changed, e.g. replace(index={"shards": 4})."""
        return from_dict(_deep_merge(self.to_dict(), sections))


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key}: {message}")


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None:
            if type(None) in args:
                return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(key, value, non_none[0])
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key}: expected an integer, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list, got {value!r}")
        return tuple(_coerce(key, v, args[0]) for v in value)
    if origin in (Mapping, dict) or annotation is Mapping:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a Config from nested plain data (as read from YAML)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config must be a mapping of sections, got {type(data).__name__}")
    hints = typing.get_type_hints(Config)
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in hints:
            raise ConfigError(f"unknown config section {name!r}; known: {', '.join(hints)}")
        cls = hints[name]
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"config section {name}: expected a mapping, got {value!r}")
        field_hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, v in value.items():
            if key not in field_hints:
                raise ConfigError(
                    f"unknown config key {name}.{key}; known: {', '.join(field_hints)}")
            kwargs[key] = _coerce(f"{name}.{key}", v, field_hints[key])
        sections[name] = cls(**kwargs)
    return Config(**sections).validate()


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file (local path or any Beam FileSystems URI)."""
    p = str(path)
    try:
        if "://" in p:
            from apache_beam.io.filesystems import FileSystems
            with FileSystems.open(p) as f:
                text = f.read().decode("utf-8")
        else:
            text = Path(p).read_text(encoding="utf-8")
    except (OSError, IOError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections")
    return data


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """configs/default.yaml, deep-merged with the file at `path` and then `overrides`."""
    data = read_yaml(DEFAULT_CONFIG_PATH)
    if path is not None:
        data = _deep_merge(data, read_yaml(path))
    if overrides:
        data = _deep_merge(data, overrides)
    return from_dict(data)
