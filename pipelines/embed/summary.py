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

from pipelines.core.contract import FORMAT_KEY, Bool, Float, Int, Str, check_format, read
from pipelines.core.errors import BadArtifactError

SUMMARY_FORMAT = "catalog-search-embeddings-summary/1"


class SnapshotError(BadArtifactError):
    """A snapshot is missing, incomplete or does not follow the contract (raised by
    pipelines.embed.snapshot, which imports it from here: the summary is the lower module).
    Permanent: a retried step would read the same snapshot."""

    permanent = True


class SummaryError(SnapshotError):
    """summary.json does not follow the snapshot summary contract."""


@dataclass(frozen=True)
class SnapshotSummary:
    """What one embed run did and with which model; input = embedded + reused + dead-lettered."""
    run_id: Str
    input_rows: Int
    embedded: Int
    reused: Int
    dead_lettered: Int
    model: dict[str, Any]           # ModelSpec.to_dict() + features; copied into the index
    model_id: Str                   # when absent: model["model_id"]
    dim: Int
    snapshot: Str | None = None     # the snapshot folder
    embedding_fingerprint: Str | None = None
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    carried_forward: Int = 0
    dropped_from_previous: Int = 0
    replaced_existing: Int = 0
    fetched: Int = 0
    reused_without_fetch: Int = 0
    reused_after_hash: Int = 0
    max_dead_letter_fraction: Float | None = None
    manifests: list[Str] = field(default_factory=list)
    previous_snapshot: Str | None = None
    merge_previous: Bool = False
    features: dict[str, Any] | None = None
    augment: dict[str, Any] = field(default_factory=dict)
    decode: dict[str, Any] = field(default_factory=dict)
    runner: Str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    created_at: Str | None = None
    status: Str | None = None       # "failed" in failed_summary.json only
    failure: Str | None = None
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
        if d.get("model_id") is None:  # older writers: only in the model record
            model = d.get("model")
            d = {k: v for k, v in d.items() if k != "model_id"}
            if isinstance(model, dict) and model.get("model_id"):
                d["model_id"] = model["model_id"]
        summary = read(cls, d, source, SummaryError)
        if not summary.model_id:
            raise SummaryError("required field is missing", source, "model_id")
        return summary
