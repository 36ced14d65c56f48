"""The sections of the typed configuration (pipelines/core/config.py): one pydantic dataclass
per section of configs/default.yaml.

Each field's annotation and `Field(...)` constraints are its validation: pydantic checks them
when a section is built (from YAML through `config.from_dict`, or directly), and
`config.from_dict` turns a failure into a `ConfigError` naming the key. Types are strict
(no "32" for an int, no true for a number); an int is accepted where a float is expected;
YAML lists become tuples. Unknown keys are refused (extra="forbid").
"""
from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Any, Literal, Mapping, NoReturn, get_args

from pydantic import AfterValidator, ConfigDict, Field, Strict, field_validator, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

#: model.precision values (pipelines/model/precision.py says what each does).
Precision = Literal["fp32", "bf16", "auto"]
MODEL_PRECISIONS: tuple[str, ...] = get_args(Precision)
AUGMENT_VIEWS = ("original", "hflip", "crop", "rotate", "jitter")

#: Every section (and Config) refuses unknown keys.
SECTION = ConfigDict(extra="forbid")


def fail(message: str, key: str | None = None) -> NoReturn:
    """Refuse a value; `key`: the field named, when a check of the whole section fails."""
    raise PydanticCustomError("config", message, {"key": key} if key else None)


def _non_blank(value: str) -> str:
    if not value.strip():
        fail("must not be empty")
    return value


def _unique(values: tuple[Any, ...]) -> tuple[Any, ...]:
    if len(set(values)) != len(values):
        fail("has duplicates")
    return values


def _view(value: str) -> str:
    if value not in AUGMENT_VIEWS:
        fail(f"unknown view {value!r}; choose from {', '.join(AUGMENT_VIEWS)}")
    return value


Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]     # strict still takes an int
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Text = Annotated[str, Strict(), AfterValidator(_non_blank)]   # a non-blank string
Fraction = Annotated[float, Strict(), Field(ge=0.0, le=1.0)]
Scales = Annotated[tuple[Annotated[float, Strict(), Field(ge=1.0, le=2.0)], ...],
                   Field(min_length=1, max_length=4), AfterValidator(_unique)]


@dataclass(frozen=True, config=SECTION)
class ModelConfig:
    handle: Text = "builtin:efficientnet_lite0"
    input_size: Annotated[Int, Field(ge=32, le=1024)] | None = None
    cache_dir: Str | None = None
    batch_size: Annotated[Int, Field(ge=1, le=4096)] = 32
    precision: Precision = "fp32"

    def resolved_cache_dir(self) -> str:
        return (self.cache_dir or os.environ.get("CATALOG_SEARCH_CACHE")
                or os.path.join(os.path.expanduser("~"), ".cache", "catalog-search"))


@dataclass(frozen=True, config=SECTION)
class FetchConfig:
    timeout_s: Annotated[Float, Field(gt=0)] = 20.0
    retries: Annotated[Int, Field(ge=0, le=10)] = 2
    backoff_s: Annotated[Float, Field(ge=0)] = 0.5
    max_bytes: Annotated[Int, Field(gt=0)] = 20_000_000
    deadline_s: Annotated[Float, Field(gt=0)] = 60.0
    concurrency: Annotated[Int, Field(ge=1, le=256)] = 64
    per_host_concurrency: Annotated[Int, Field(ge=1, le=256)] = 64


@dataclass(frozen=True, config=SECTION)
class DecodeConfig:
    max_pixels: Annotated[Int, Field(gt=0)] = 40_000_000
    resize: Literal["center_crop", "pad"] = "center_crop"


@dataclass(frozen=True, config=SECTION)
class AugmentConfig:
    views: Annotated[tuple[Annotated[str, Strict(), AfterValidator(_view)], ...],
                     Field(min_length=1), AfterValidator(_unique)] = ("original",)
    mode: Literal["mean", "separate"] = "mean"
    seed: Int = 0


@dataclass(frozen=True, config=SECTION)
class EmbedConfig:
    max_dead_letter_fraction: Fraction = 0.5
    # What one manifest row may decode to (pipelines.embed.manifest.ManifestLimits): a
    # larger field / row is dead-lettered manifest/too_large (this also caps the metadata
    # an index carries per row).
    max_cell_bytes: Annotated[Int, Field(ge=1024)] = 65_536
    max_row_bytes: Int = 262_144

    @model_validator(mode="after")
    def _row_holds_a_cell(self) -> EmbedConfig:
        if self.max_row_bytes < self.max_cell_bytes:
            fail("must be >= embed.max_cell_bytes", "max_row_bytes")
        return self


@dataclass(frozen=True, config=SECTION)
class FeaturesConfig:
    """How one image becomes one vector (see pipelines/model/features.py); part of the fingerprint.

    scales: zoom levels averaged per view (1.0 = the plain center crop; s > 1 = the image
            resized s times larger, center-cropped at the model's size); flip: also embed the
            horizontal mirror and average. Serving applies the same to queries (from the
            index manifest); query_scales (null = scales) zooms query photos differently
            from catalog images (shelf photos vs packshots).
    """
    # Neutral defaults: the plain center crop. The grocery grid's zoom (scales [1.3],
    # query_scales [1.6]) helps shelf photos of small goods and hurts full-frame garment
    # photos (docs/EVALUATION.md, "Feature defaults"), so it is an option, not a default.
    scales: Scales = (1.0,)
    flip: Bool = False
    query_scales: Scales | None = None


@dataclass(frozen=True, config=SECTION)
class FusionConfig:
    """Image + text search (serving/fusion.py, serving/text_search.py).

    text_fields: metadata fields (and product_id) whose text is indexed with BM25 at load;
    text_weight: weight of the min-max-normalised text score in a photo + text query
    (1 - text_weight for the visual score); candidates: products taken from each of the
    visual and the text ranking before fusing; similar_text_weight: the same for "similar
    products" (title similarity); max_text_chars: longer query text is refused (400).
    """
    text_fields: Annotated[tuple[Str, ...], Field(min_length=1)] = (
        "title", "category", "description", "product_id")
    text_weight: Fraction = 0.4
    similar_text_weight: Fraction = 0.0
    candidates: Annotated[Int, Field(ge=1, le=10_000)] = 100
    max_text_chars: Annotated[Int, Field(ge=1, le=10_000)] = 500


@dataclass(frozen=True, config=SECTION)
class RunnerConfig:
    name: Text = "DirectRunner"
    direct_num_workers: Annotated[Int, Field(ge=1)] = 2
    direct_running_mode: Literal["in_memory", "multi_threading", "multi_processing"] = \
        "multi_processing"
    tf_threads: Annotated[Int, Field(ge=0)] = 1  # 0 = TensorFlow's default
    # 0 = always start the configured workers
    direct_small_run_rows: Annotated[Int, Field(ge=0)] = 1000
    # Runner pipeline options, passed through (checked by pipelines.core.runner).
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @field_validator("options", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @property
    def is_direct(self) -> bool:
        return self.name in ("DirectRunner", "direct", "FnApiRunner")


@dataclass(frozen=True, config=SECTION)
class IndexConfig:
    shards: Annotated[Int, Field(ge=1, le=4096)] = 1
    num_neighbors: Annotated[Int, Field(ge=1)] = 10
    brute_force_below: Annotated[Int, Field(ge=0)] = 20_000
    leaves_to_search_fraction: Annotated[Float, Field(gt=0, le=1)] = 0.1
    reorder_multiplier: Annotated[Int, Field(ge=1)] = 10
    anisotropic_threshold: Float = 0.2
    dimensions_per_block: Annotated[Int, Field(ge=1)] = 2
    eval_queries: Annotated[Int, Field(ge=1)] = 500
    eval_seed: Int = 0
    recall_threshold: Fraction = 0.95
    retention: Annotated[Int, Field(ge=1)] = 5
    tune_recall_target: Annotated[Float, Field(gt=0, le=1)] | None = 0.98
    training_threads: Annotated[Int, Field(ge=0)] = 0        # 0 = ScaNN's default
    # An adapter folder (catalog-search train-adapter): the index holds adapter(raw) vectors.
    adapter: Text | None = None
    # ScaNN builder options; recorded per shard in the index manifest.
    # num_leaves = this x sqrt(total vectors), over shards
    leaves_per_sqrt_n: Annotated[Float, Field(gt=0, le=64)] = 4.0
    # PCA to this many dims for partitioning + hashing; SOAR spilled assignments (dot product)
    projection_dim: Annotated[Int, Field(ge=1)] | None = 256
    soar_lambda: Annotated[Float, Field(gt=0)] | None = 1.5
    # How ScaNN stores the vectors it reorders with (exact-score reordering).
    reorder_dtype: Literal["float32", "int8", "bfloat16"] = "float32"
    # One PCA trained by the build for every shard (queries projected once, not per shard;
    # pipelines/index/projection.py); float32 reorder only: int8 / bfloat16 keep ScaNN's.
    shared_projection: Bool = False
    # catalog_backfill: a drop is published as a delta (pipelines/index/deltas.py) while
    # the version's delta rows stay at most this many with it; above, a full build runs.
    # 0 = always a full build.
    delta_max_rows: Annotated[Int, Field(ge=0)] = 20_000
    # Shards: hash (sha256(image_id) mod N) or partition (nearest k-means centroid, routed).
    shard_assignment: Literal["hash", "partition"] = "hash"
    routing_partitions_per_shard: Annotated[Int, Field(ge=1, le=256)] = 4
    routing_sample: Annotated[Int, Field(ge=1)] = 20_000
    routing_min_coverage: Annotated[Float, Field(gt=0, le=1)] = 0.99


@dataclass(frozen=True, config=SECTION)
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
    enabled: Bool = False
    dim: Annotated[Int, Field(ge=1, le=8192)] = 256
    epochs: Annotated[Int, Field(ge=1, le=10_000)] = 60
    learning_rate: Annotated[Float, Field(gt=0, le=1)] = 3e-4
    temperature: Annotated[Float, Field(gt=0, le=10)] = 0.1
    products_per_batch: Annotated[Int, Field(ge=2)] = 32
    samples_per_product: Annotated[Int, Field(ge=2)] = 8
    val_products: Annotated[Float, Field(gt=0, lt=1)] = 0.1
    val_pairs: Annotated[Float, Field(ge=0, lt=1)] = 0.1
    min_gain: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    seed: Int = 0
    # 0: linear; > 0: a ReLU hidden layer of this width beside the linear map (an option).
    hidden: Annotated[Int, Field(ge=0, le=8192)] = 0
    # Validation queries: at most this many (a seeded sample), so the gate's exact search
    # costs O(val_max_queries x N), not O(N^2). The initialisation: on at most init_sample rows.
    val_max_queries: Annotated[Int, Field(ge=1)] = 5000
    init_sample: Annotated[Int, Field(ge=1)] = 100_000
    # After the gate passes: train again, same parameters, on every catalog row and pair
    # (the held-out ones too) and write that adapter; the gate's figures are the split's.
    refit: Bool = False
    # The catalog_refresh DAG's train_adapter task: the adapter folder (null: `adapter`
    # beside the index root), labelled-photo snapshots used as pairs, the feedback log.
    dir: Text | None = None
    pairs: tuple[Text, ...] = ()
    feedback: Text | None = None


@dataclass(frozen=True, config=SECTION)
class ServingConfig:
    host: Str = "127.0.0.1"
    port: Annotated[Int, Field(ge=0, le=65535)] = 8080
    max_upload_bytes: Annotated[Int, Field(gt=0)] = 10_000_000
    reload_interval_s: Annotated[Float, Field(gt=0)] = 5.0
    default_k: Annotated[Int, Field(ge=1)] = 10
    max_k: Int = 100
    # Query uploads: pixels one decode may hold (after JPEG draft), far below decode.max_pixels.
    max_query_pixels: Annotated[Int, Field(gt=0)] = 16_000_000
    # Decode+embed slots; requests beyond them wait in a bounded queue, then get 503.
    max_concurrent_queries: Annotated[Int, Field(ge=1)] = 4
    max_queued_queries: Annotated[Int, Field(ge=0)] = 32
    queue_timeout_s: Annotated[Float, Field(ge=0)] = 10.0
    # JSON bodies (and `filters` JSON): size and nesting limits checked before parsing.
    max_json_bytes: Annotated[Int, Field(ge=1024)] = 1_000_000
    max_json_depth: Annotated[Int, Field(ge=2, le=64)] = 8
    # Model handles an index manifest may name besides model.handle and builtin:* models.
    allowed_model_handles: tuple[Text, ...] = ()
    # Catalog image reads of GET /v1/images/{id}: the deadline of one read.
    image_read_timeout_s: Annotated[Float, Field(gt=0)] = 5.0
    # Answers: a metadata text longer than this is cut (ends in "…").
    max_metadata_chars: Annotated[Int, Field(ge=16)] = 4096
    # HTTP request heads (serving.http_limits): bytes of the request line + headers, and
    # seconds a connection may take to send them.
    max_header_bytes: Annotated[Int, Field(ge=1024)] = 16384
    header_timeout_s: Annotated[Float, Field(gt=0)] = 10.0
    # POST /v1/feedback (serving.feedback): the local folder of the feedback log (null: off,
    # search answers carry no query_id), its file size cap and rotated files kept, and how
    # many recent queries' model-space vectors are kept in memory for it (LRU).
    feedback_root: Text | None = None
    feedback_max_bytes: Annotated[Int, Field(ge=1024)] = 16_777_216
    feedback_max_files: Annotated[Int, Field(ge=1)] = 8
    feedback_recent_queries: Annotated[Int, Field(ge=1)] = 4096
    # Delta rows (serving.delta_index): searched exactly while fewer than this many are live;
    # from there by a ScaNN searcher built over them in memory (serving.delta_segment),
    # searching this fraction of its tree leaves and reordering n x the multiplier AH
    # candidates with exact float32 scores. 0 = always exact.
    delta_scann_min_rows: Annotated[Int, Field(ge=0)] = 2000
    delta_scann_leaves_fraction: Annotated[Float, Field(gt=0, le=1)] = 0.1
    delta_scann_reorder_multiplier: Annotated[Int, Field(ge=1)] = 4

    @model_validator(mode="after")
    def _default_k_within_max_k(self) -> ServingConfig:
        if self.default_k > self.max_k:
            fail("must be in [1, max_k]", "default_k")
        return self


@dataclass(frozen=True, config=SECTION)
class DuplicatesConfig:
    """`catalog-search duplicates` (pipelines/duplicates/): near-duplicate images across
    products of a published index version.

    A pair of images of different products is a near duplicate when their (index-space)
    cosine similarity is >= `threshold`, or >= `candidate_threshold` and their small
    grayscale signatures correlate >= `pixel_threshold` (null: no pixel check). Exact
    byte duplicates (same content_sha256) are always reported. `in_refresh`: the
    catalog_refresh DAG runs the job on each new version (its figures on the Asset event).
    """
    threshold: Annotated[Float, Field(gt=0, le=1)] = 0.97
    candidate_threshold: Annotated[Float, Field(gt=0)] = 0.80
    pixel_threshold: Annotated[Float, Field(gt=0, le=1)] | None = 0.93
    neighbours: Annotated[Int, Field(ge=1, le=1000)] = 20
    leaves_fraction: Annotated[Float, Field(gt=0, le=1)] = 0.5
    block_rows: Annotated[Int, Field(ge=1)] = 2048
    report_groups: Annotated[Int, Field(ge=0)] = 200
    report_images_per_group: Annotated[Int, Field(ge=2)] = 12
    in_refresh: Bool = False

    @model_validator(mode="after")
    def _candidates_below_threshold(self) -> DuplicatesConfig:
        if self.candidate_threshold > self.threshold:
            fail("must be in (0, threshold]", "candidate_threshold")
        return self
