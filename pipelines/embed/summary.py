"""The embeddings snapshot summary (`<snapshot>/summary.json`): the typed contract between the
embed job (writer) and build_index, the orchestration, merges and benchmarks (readers).

The JSON keys are the ones the embed job always wrote, plus "format"
(`SUMMARY_FORMAT`). Decision on older files: a summary.json without "format" was written
before the key existed, with the same fields, so it is read as version 1 (snapshots on disk
stay usable as a previous snapshot); an unknown format, a missing required field or one of
the wrong type is refused with a `SummaryError` naming the field and the file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipelines.core.contract import FORMAT_KEY, check_format
from pipelines.core.contract import field as read_field
from pipelines.core.errors import BadArtifactError

SUMMARY_FORMAT = "catalog-search-embeddings-summary/1"


class SnapshotError(BadArtifactError):
    """A snapshot is missing, incomplete or does not follow the contract (raised by
    pipelines.embed.snapshot, which imports it from here: the summary is the lower module).
    Permanent: a retried step would read the same snapshot."""

    permanent = True


class SummaryError(SnapshotError):
    """summary.json does not follow the snapshot summary contract."""


_COUNTS = ("input_rows", "embedded", "reused", "dead_lettered")
_OPTIONAL_COUNTS = ("carried_forward", "dropped_from_previous", "replaced_existing", "fetched",
                    "reused_without_fetch", "reused_after_hash")


@dataclass(frozen=True)
class SnapshotSummary:
    """What one embed run did and with which model; input = embedded + reused + dead-lettered."""
    run_id: str
    input_rows: int
    embedded: int
    reused: int
    dead_lettered: int
    model: dict[str, Any]           # ModelSpec.to_dict() + features; copied into the index
    model_id: str
    dim: int
    snapshot: str | None = None     # the snapshot folder
    embedding_fingerprint: str | None = None
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    carried_forward: int = 0
    dropped_from_previous: int = 0
    replaced_existing: int = 0
    fetched: int = 0
    reused_without_fetch: int = 0
    reused_after_hash: int = 0
    max_dead_letter_fraction: float | None = None
    manifests: list[str] = field(default_factory=list)
    previous_snapshot: str | None = None
    merge_previous: bool = False
    features: dict[str, Any] | None = None
    augment: dict[str, Any] = field(default_factory=dict)
    decode: dict[str, Any] = field(default_factory=dict)
    runner: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    status: str | None = None       # "failed" in failed_summary.json only
    failure: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of newer writers, kept as read

    @property
    def output_views(self) -> list[str]:
        """The view names each image has in the snapshot (default: ["original"])."""
        return list(self.augment.get("output_views") or ["original"])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {FORMAT_KEY: SUMMARY_FORMAT}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name in ("status", "failure") and value is None:
                continue
            out[f.name] = value
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_dict(cls, d: Any, source: str = "summary",
                  legacy: bool = False) -> "SnapshotSummary":
        """The summary from its JSON form (`legacy`: accept a file without "format")."""
        check_format(d, SUMMARY_FORMAT, source, legacy=legacy, error=SummaryError)

        def get(name: str, kind: type | tuple[type, ...], default: Any = dataclasses.MISSING,
                nullable: bool = False) -> Any:
            if default is dataclasses.MISSING:
                return read_field(d, name, kind, source, error=SummaryError, nullable=nullable)
            return read_field(d, name, kind, source, default, error=SummaryError,
                              nullable=nullable)

        counts = {name: get(name, int) for name in _COUNTS}
        counts.update({name: get(name, int, 0) for name in _OPTIONAL_COUNTS})
        model = get("model", dict)
        model_id = get("model_id", str, model.get("model_id"), nullable=True)
        if not model_id:
            raise SummaryError("required field is missing", source, "model_id")
        known = {f.name for f in dataclasses.fields(cls)} | {FORMAT_KEY}
        return cls(
            run_id=get("run_id", str), model=dict(model), model_id=model_id,
            dim=get("dim", int),
            snapshot=get("snapshot", str, None, nullable=True),
            embedding_fingerprint=get("embedding_fingerprint", str, None, nullable=True),
            dead_letter_reasons=dict(get("dead_letter_reasons", dict, {})),
            max_dead_letter_fraction=get("max_dead_letter_fraction", (int, float), None,
                                         nullable=True),
            manifests=list(get("manifests", list, [])),
            previous_snapshot=get("previous_snapshot", str, None, nullable=True),
            merge_previous=get("merge_previous", bool, False),
            features=get("features", dict, None, nullable=True),
            augment=dict(get("augment", dict, {})), decode=dict(get("decode", dict, {})),
            runner=get("runner", str, None, nullable=True),
            timings=dict(get("timings", dict, {})),
            created_at=get("created_at", str, None, nullable=True),
            status=get("status", str, None, nullable=True),
            failure=get("failure", str, None, nullable=True),
            extra={k: v for k, v in d.items() if k not in known},
            **counts)
