"""build_index, step 1 (launcher): plan a build from summary.json and the Parquet footers.

No row data is read here: the checks that need only metadata raise IndexBuildError
before anything is written, and the plan is one Split per (file, row group) plus the
BuildSpec every pipeline step receives. Also the two stable hashes of the build: the
shard of an image and a row's place in the seeded gate/tuning samples.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import filesystem as fs
from pipelines.core.config import Config
from pipelines.embed import snapshot as snap
from pipelines.embed.summary import SnapshotSummary
from pipelines.index import artifact as art
from pipelines.core.errors import BadInputError

log = logging.getLogger(__name__)

BUILD_DIR = "_build"
# Candidate rows per sample drawn inside ReadSplit: this many times the sample size.
SAMPLE_OVERDRAW = 4


class IndexBuildError(BadInputError):
    """The snapshot or the build request is unusable; nothing was published."""


def check_version(version: str) -> str:
    """`version` when it can name a version folder, else IndexBuildError."""
    try:
        return art.check_version_name(version)
    except art.IndexArtifactError as e:
        raise IndexBuildError(str(e)) from e


def shard_for(image_id: str, num_shards: int) -> int:
    """The shard of an image: sha256(image_id) mod num_shards (stable across runs/hosts)."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def sample_key(seed: int, image_id: str, view: str) -> float:
    """A row's place in the seeded deterministic sample: uniform in [0, 1)."""
    digest = hashlib.sha256(f"{seed}\0{image_id}\0{view}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


@dataclass(frozen=True)
class BuildParams:
    """What a worker needs from config.index to build one shard."""
    num_neighbors: int
    brute_force_below: int
    leaves_to_search_fraction: float
    reorder_multiplier: int
    anisotropic_threshold: float
    dimensions_per_block: int
    tune_recall_target: float | None
    training_threads: int
    leaves_per_sqrt_n: float = 1.0
    projection_dim: int | None = None
    soar_lambda: float | None = None
    reorder_dtype: str = "float32"
    shared_projection: bool = False
    shard_assignment: str = "hash"
    routing_partitions_per_shard: int = 4
    routing_sample: int = 20_000
    routing_min_coverage: float = 0.99

    def projection_for(self, dim: int) -> int | None:
        """The PCA dimension a `dim`-d shard is built with (None: no projection, also when
        dim is not larger than projection_dim, e.g. 256-d adapted vectors)."""
        if self.projection_dim is None or dim <= self.projection_dim:
            return None
        return self.projection_dim

    def shared_projection_for(self, dim: int) -> int | None:
        """The dimension of the version's shared projection (pipelines/index/projection.py)
        for `dim`-d vectors, or None: each tree-AH shard uses ScaNN's own PCA (or none).
        Shared only with float32 reordering (int8 / bfloat16 shards keep ScaNN's)."""
        if not self.shared_projection or self.reorder_dtype != "float32":
            return None
        return self.projection_for(dim)

    @classmethod
    def from_config(cls, config: Config) -> "BuildParams":
        ix = config.index
        return cls(num_neighbors=ix.num_neighbors, brute_force_below=ix.brute_force_below,
                   leaves_to_search_fraction=ix.leaves_to_search_fraction,
                   reorder_multiplier=ix.reorder_multiplier,
                   anisotropic_threshold=ix.anisotropic_threshold,
                   dimensions_per_block=ix.dimensions_per_block,
                   tune_recall_target=ix.tune_recall_target,
                   training_threads=ix.training_threads,
                   leaves_per_sqrt_n=ix.leaves_per_sqrt_n, projection_dim=ix.projection_dim,
                   soar_lambda=ix.soar_lambda, reorder_dtype=ix.reorder_dtype,
                   shared_projection=ix.shared_projection,
                   shard_assignment=ix.shard_assignment,
                   routing_partitions_per_shard=ix.routing_partitions_per_shard,
                   routing_sample=ix.routing_sample,
                   routing_min_coverage=ix.routing_min_coverage)


@dataclass(frozen=True)
class Split:
    """One unit of parallel reading: a row group of one embeddings file."""
    index: int
    uri: str
    row_group: int
    first_row: int   # row number (0-based, within the file) of the row group's first row
    num_rows: int


@dataclass(frozen=True)
class BuildSpec:
    """Everything the pipeline's steps need (small; pickled to the workers)."""
    snapshot_path: str
    index_root: str
    version: str
    staging: str
    num_shards: int
    num_rows: int
    dim: int
    model_id: str
    k: int                    # min(num_neighbors, num_rows)
    eval_queries: int
    eval_seed: int
    params: BuildParams
    model: dict[str, Any] | None = None   # summary.json's model (for the gate's reader)
    # The index root's takedown list (pipelines/index/takedowns.py): rows left out.
    takedown_image_ids: frozenset[str] = frozenset()
    takedown_product_ids: frozenset[str] = frozenset()
    # With an adapter: the snapshot's (model-space) dimension, `dim` being the index's, and
    # the adapter copy the version carries (workers project every row through it).
    input_dim: int | None = None
    adapter_dir: str | None = None
    adapter_id: str | None = None

    @property
    def raw_dim(self) -> int:
        """The dimension of the snapshot's vectors (model space)."""
        return self.input_dim or self.dim

    @property
    def sample_fraction(self) -> float:
        return min(1.0, SAMPLE_OVERDRAW * self.eval_queries / max(1, self.num_rows))

    @property
    def partitioned(self) -> bool:
        """Rows go to the shard of their nearest k-means centroid (pipelines/index/routing)."""
        return self.params.shard_assignment == "partition" and self.num_shards > 1

    @property
    def shared_projection_dim(self) -> int | None:
        """The version's shared projection dimension (train it on the routing sample), or
        None (BuildParams.shared_projection_for)."""
        return self.params.shared_projection_for(self.dim)

    @property
    def routing_fraction(self) -> float:
        return min(1.0, SAMPLE_OVERDRAW * self.params.routing_sample / max(1, self.num_rows))

    def routing_uri(self) -> str:
        from pipelines.index.routing import CENTROIDS_FILE
        return fs.join(art.version_dir(self.index_root, self.version), CENTROIDS_FILE)

    def part_uri(self, shard: int, split: int) -> str:
        return fs.join(self.staging, "parts", f"shard-{shard:05d}", f"split-{split:06d}.parquet")

    def products_uri(self, bucket: int, split: int) -> str:
        return fs.join(self.staging, "products", f"bucket-{bucket:05d}",
                       f"split-{split:06d}.parquet")

    def ids_uri(self, bucket: int, split: int) -> str:
        return fs.join(self.staging, "ids", f"bucket-{bucket:05d}", f"split-{split:06d}.parquet")

    def shard_uri(self, shard: int) -> str:
        return fs.join(art.version_dir(self.index_root, self.version),
                       art.shard_relpath(shard, self.num_shards))

    def result_uri(self, shard: int) -> str:
        return fs.join(self.staging, f"result-{shard:05d}.json")

    def gate_uri(self, shard: int) -> str:
        return fs.join(self.staging, f"gate-{shard:05d}.json")

    def stats_uri(self, name: str) -> str:
        return fs.join(self.staging, f"{name}.json")


def resolve_snapshot(embeddings: str) -> str:
    """The snapshot folder itself, or the snapshot an embeddings root's LATEST names."""
    try:
        if snap.is_complete(embeddings):
            return embeddings
        latest = snap.latest(embeddings)
    except snap.SnapshotError as e:
        raise IndexBuildError(f"cannot read embeddings snapshot {embeddings}: {e}") from e
    if latest is None:
        raise IndexBuildError(
            f"{embeddings} is neither a complete embeddings snapshot (no "
            f"{snap.SUMMARY_FILE}) nor an embeddings root with a {snap.LATEST_FILE}")
    return latest


def _embedding_dim(schema: pa.Schema, uri: str) -> int | None:
    """The fixed embedding dimension a file's schema declares (None: variable lists)."""
    missing = [c for c in ("image_id", "product_id", "view", "model_id", "embedding")
               if c not in schema.names]
    if missing:
        raise IndexBuildError(f"{uri}: embeddings file lacks columns {missing}")
    t = schema.field("embedding").type
    if pa.types.is_fixed_size_list(t):
        return int(t.list_size)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return None
    raise IndexBuildError(f"{uri}: embedding column has type {t}, expected a list of float32")


def plan_splits(path: str) -> tuple[list[Split], int | None, int]:
    """(splits, fixed dim or None, total rows) from the Parquet footers only."""
    splits: list[Split] = []
    dims: dict[int, str] = {}
    total = 0
    for uri in snap.embedding_files(path):
        with fs.FileSystems.open(uri) as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
        dim = _embedding_dim(schema, uri)
        if dim is not None:
            dims.setdefault(dim, os.path.basename(uri))
        first = 0
        for rg in range(meta.num_row_groups):
            rows = meta.row_group(rg).num_rows
            if rows:
                splits.append(Split(len(splits), uri, rg, first, rows))
            first += rows
        total += meta.num_rows
    if len(dims) > 1:
        shown = ", ".join(f"{name} has {d}" for d, name in sorted(dims.items()))
        raise IndexBuildError(f"snapshot {path}: mixed embedding dimensions "
                              f"{sorted(dims)} between files: {shown}")
    return splits, (next(iter(dims)) if dims else None), total


def plan_build(embeddings: str, index_root: str, config: Config, version: str | None,
               adapter: Any | None = None) -> tuple[BuildSpec, list[Split], SnapshotSummary]:
    """Check the request against summary.json and the footers; IndexBuildError if bad.

    `adapter` (pipelines.adapter.Adapter): the index holds adapter(raw) vectors; it must
    have been trained on this snapshot's model and dimension."""
    ix = config.index
    path = resolve_snapshot(embeddings)
    try:
        summary = snap.read_summary(path)
    except snap.SnapshotError as e:
        raise IndexBuildError(f"cannot read embeddings snapshot {path}: {e}") from e
    if ix.shards < 1:
        raise IndexBuildError(f"shard count must be >= 1, got {ix.shards}")
    model = summary.model
    if not model.get("model_id"):
        raise IndexBuildError(f"snapshot {path}: {snap.SUMMARY_FILE} has no 'model' with a "
                              f"model_id; cannot record which model the index serves")
    splits, file_dim, n = plan_splits(path)
    if n == 0:
        raise IndexBuildError(f"snapshot {path} has no embedding rows; nothing to index")
    if ix.shards > n:
        raise IndexBuildError(f"{ix.shards} shards requested but snapshot {path} has only "
                              f"{n} vectors; use at most {n} shards")
    dim = file_dim or int(summary.dim or model.get("dim") or 0)
    if dim < 1:
        raise IndexBuildError(f"snapshot {path}: the embedding dimension is unknown (variable "
                              f"length lists and no dim in {snap.SUMMARY_FILE})")
    for where, declared in (("summary.json dim", summary.dim),
                            (f"model {model['model_id']} dim", model.get("dim"))):
        if declared and int(declared) != dim:
            raise IndexBuildError(f"snapshot {path}: embeddings have {dim} dimensions but "
                                  f"{where} is {declared}")
    input_dim = None
    if adapter is not None:
        from pipelines.adapter import AdapterError
        try:
            adapter.check_base(model, dim, f"snapshot {path}")
        except AdapterError as e:
            raise IndexBuildError(str(e)) from e
        input_dim, dim = dim, int(adapter.out_dim)
    if ix.dimensions_per_block > dim:
        raise IndexBuildError(f"index.dimensions_per_block={ix.dimensions_per_block} exceeds the "
                              f"{'index' if adapter is not None else 'embedding'} dimension "
                              f"{dim}")
    projected = BuildParams.from_config(config).projection_for(dim)
    if projected is not None and ix.dimensions_per_block > projected:
        raise IndexBuildError(f"index.dimensions_per_block={ix.dimensions_per_block} exceeds "
                              f"index.projection_dim={projected}")
    run_id = summary.run_id or os.path.basename(path.rstrip("/"))
    if version is None:
        version = art.new_version_name(salt=f"{path}|{run_id}")
    check_version(version)
    vdir = art.version_dir(index_root, version)
    spec = BuildSpec(snapshot_path=path, index_root=index_root, version=version,
                     staging=fs.join(vdir, BUILD_DIR), num_shards=ix.shards, num_rows=n,
                     dim=dim, model_id=str(model["model_id"]), k=min(ix.num_neighbors, n),
                     eval_queries=ix.eval_queries, eval_seed=ix.eval_seed,
                     params=BuildParams.from_config(config), model=dict(model),
                     input_dim=input_dim,
                     adapter_dir=(fs.join(vdir, "adapter") if adapter is not None else None),
                     adapter_id=adapter.id if adapter is not None else None)
    return spec, splits, summary


def claim_version_dir(index_root: str, version: str, locked: bool) -> None:
    """Make sure `versions/<version>/` is free for this build (call it holding the build's
    run lock, `locked`): an empty or absent folder is free; an *incomplete* version (no
    manifest.json: an interrupted build) that LATEST does not name is deleted and rebuilt
    -- it was never published, so nothing can be serving it. On object stores (no lock)
    only one unchanged for art.INCOMPLETE_GRACE_S is, as retention does. Anything else
    (a passed or rejected version, or one LATEST names) raises IndexBuildError: published
    versions are immutable."""
    vdir = art.version_dir(index_root, version)
    if not fs.list_children(vdir):
        return
    complete = fs.exists(art.manifest_uri(index_root, version))
    state = art.version_state(index_root, version) if complete else art.STATUS_INCOMPLETE
    try:
        latest = art.read_latest(index_root)
    except art.IndexArtifactError:
        latest = None
    if not complete and latest != version:
        changed = fs.last_modified(vdir)
        idle = changed is None or time.time() - changed >= art.INCOMPLETE_GRACE_S
        if locked or idle:
            log.warning("index version %s at %s is incomplete (no %s: an interrupted build, "
                        "never published): replacing it", version, vdir, art.MANIFEST_FILE)
            fs.delete_tree(vdir)
            return
        raise IndexBuildError(f"index version {version} at {vdir} is incomplete and changed "
                              f"{time.time() - (changed or 0):.0f}s ago: another build may "
                              "still be writing it; choose another name or retry later")
    why = ("LATEST names it" if latest == version else f"its state is {state}"
           if state != art.STATUS_INCOMPLETE else f"its {art.MANIFEST_FILE} does not read")
    raise IndexBuildError(f"index version {version} already exists at {vdir} ({why}); "
                          "versions are immutable, choose another name")
