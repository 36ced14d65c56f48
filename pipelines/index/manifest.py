"""The index manifest (`<index_root>/versions/<version>/manifest.json`): the typed contract
between build_index (writer) and the index reader, serving, evaluation, the orchestration
and the benchmarks (readers).

The JSON keys are the ones build_index always wrote; "format" has been in every manifest
since the first one. This code writes `FORMAT` (version 2) and reads `READ_FORMATS`:
version 1 manifests (built before adapters, delta logs and the ScaNN options of
docs/ARCHITECTURE.md "Vector spaces") mean raw model vectors, hash-sharded shards and
ScaNN's own `dataset.npy` as the stored vectors. A manifest without a format, with
another one, or with a required field missing or of the wrong type is refused
(`ManifestFormatError`, an `IndexIntegrityError`, naming the field and the file). Keys
this code does not know (a newer writer's additions) are kept in `extra` and written back
unchanged; a manifest read and written back keeps its own format. A format-2 manifest
may carry `routing` (partition-routed shards, pipelines/index/routing.py); without it the
shards are hash-assigned and every query searches all of them. A reader that predates
`routing` keeps it in `extra` and searches every shard, which returns at least the
routed hits (the full fan-out), so the format number did not change for it.

The consistency of the shard table (shard numbers, paths, file names, sums) is checked
by `pipelines.index.artifact.check_manifest_structure` when a version is opened.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from pipelines.core.contract import FORMAT_KEY, Float, Int, Obj, Str, read
from pipelines.core.errors import BadArtifactError

FORMAT_V1 = "catalog-search-index/1"
FORMAT = "catalog-search-index/2"
#: Format 2 plus shards built on the shared projection (options.projection == "shared",
#: pipelines/index/projection.py): written only by such builds, so that a reader which
#: would feed raw queries to their projected searchers refuses them.
FORMAT_V3 = "catalog-search-index/3"
#: Manifest formats this code reads (an old reader refuses a newer format outright).
READ_FORMATS = (FORMAT_V1, FORMAT, FORMAT_V3)
#: A shard's stored vectors when its entry names no `vectors_file` (ScaNN's float32 copy).
DEFAULT_VECTORS_FILE = "dataset.npy"
STATUS_PASSED = "passed"
STATUS_REJECTED = "rejected"


class IndexArtifactError(BadArtifactError):
    """An index root, version or manifest is missing or does not follow the contract."""


class IndexIntegrityError(IndexArtifactError):
    """A shard file is missing or its sha256 / size differs from the manifest."""


class ManifestFormatError(IndexIntegrityError):
    """manifest.json does not follow the index manifest contract."""


@dataclass(frozen=True)
class ShardFile:
    """One file of a shard folder: its name relative to the folder, sha256 and size."""
    name: Str
    sha256: Str
    bytes: Int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "bytes": self.bytes}

    @classmethod
    def from_dict(cls, d: Any, source: str) -> "ShardFile":
        return read(cls, d, source, ManifestFormatError)


@dataclass(frozen=True)
class ShardEntry:
    """One shard of an index version: where it lies, what it holds, how it is searched."""
    shard: Int
    path: Str                      # shards/shard-XXXXX-of-NNNNN, relative to the version
    num_vectors: Int
    kind: Str                      # scann_tree_ah | scann_brute_force | empty
    files: list[ShardFile]
    search: Obj = field(default_factory=dict)  # leaves_to_search, reorder_multiplier
    num_images: Int | None = None
    num_leaves: Int | None = None
    tuning: dict[str, Any] | None = None
    build_seconds: Float | None = None
    # The shard's stored float32 vectors (a file of `files`; None: ScaNN's dataset.npy,
    # as in version-1 manifests) and the ScaNN builder options it was built with.
    vectors_file: Str | None = None
    options: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stored_vectors(self) -> str:
        """The file (of `files`) holding the shard's float32 index-space vectors."""
        return self.vectors_file or DEFAULT_VECTORS_FILE

    @property
    def leaves_to_search(self) -> int:
        return int(self.search.get("leaves_to_search", -1))

    @property
    def reorder_multiplier(self) -> int:
        return int(self.search.get("reorder_multiplier", 1))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shard": self.shard, "path": self.path,
                               "num_vectors": self.num_vectors, "kind": self.kind,
                               "files": [f.to_dict() for f in self.files],
                               "search": self.search}
        for name in ("num_images", "num_leaves", "tuning", "build_seconds", "vectors_file",
                     "options"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_dict(cls, d: Any, source: str) -> "ShardEntry":
        return read(cls, d, source, ManifestFormatError)


@dataclass(frozen=True)
class IndexManifest:
    """An index version: model, vectors, shards, ScaNN settings, evaluation, provenance."""
    version: Str
    status: Str                    # passed | rejected
    model: dict[str, Any]          # the snapshot's model record (ModelSpec + features)
    dim: Int
    num_vectors: Int
    shards: list[ShardEntry]
    created_at: Str | None = None
    distance: Str = "dot_product"
    num_images: Int | None = None
    num_products: Int | None = None
    views: list[Str] = field(default_factory=list)
    shard_assignment: Str | None = None
    scann: dict[str, Any] = field(default_factory=dict)
    source_snapshot: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    evaluation: Obj = field(default_factory=dict)  # recall@k, threshold, passed
    # Partition-routed shards (pipelines/index/routing.py): centroids file, its sha256 and
    # size, each centroid's shard, the search budget; None: hash sharding.
    routing: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format: Str = FORMAT           # the format it was written in (READ_FORMATS)

    @property
    def model_id(self) -> str | None:
        return self.model.get("model_id")

    @property
    def adapter(self) -> dict[str, Any] | None:
        """The adapter record (pipelines.adapter `Adapter.record()`) when the version's
        vectors are adapter(raw) (format 2 only), else None: index space = model space."""
        record = self.extra.get("adapter")
        return dict(record) if isinstance(record, Mapping) else None

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def passed(self) -> bool:
        return self.status == STATUS_PASSED

    def recall(self, k: int) -> float | None:
        """The gate's measured recall@k (None when not measured)."""
        return self.evaluation.get(f"recall@{k}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            FORMAT_KEY: self.format, "version": self.version, "status": self.status,
            "created_at": self.created_at, "model": self.model, "dim": self.dim,
            "distance": self.distance, "num_vectors": self.num_vectors,
            "num_images": self.num_images, "num_products": self.num_products,
            "views": self.views, "shard_assignment": self.shard_assignment,
            "shards": [s.to_dict() for s in self.shards], "scann": self.scann,
            "source_snapshot": self.source_snapshot, "build": self.build,
            "evaluation": self.evaluation}
        if self.routing is not None:
            out["routing"] = self.routing
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_dict(cls, d: Any, source: str = "index manifest") -> "IndexManifest":
        """The manifest from its JSON form; ManifestFormatError names the field and `source`."""
        if not isinstance(d, Mapping) or d.get(FORMAT_KEY) not in READ_FORMATS:
            found = d.get(FORMAT_KEY) if isinstance(d, Mapping) else type(d).__name__
            raise ManifestFormatError(f"not an index manifest of format "
                                      f"{' or '.join(READ_FORMATS)} (found {found!r})",
                                      source, FORMAT_KEY)
        if not isinstance(d.get("shards"), list) or not d["shards"]:
            raise ManifestFormatError("the manifest has no shard table", source, "shards")
        return read(cls, d, source, ManifestFormatError)
