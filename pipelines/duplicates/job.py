"""`run_duplicates`: the near-duplicate listings job over a published index version.

    summary = run_duplicates(index_root, out_dir, config, threshold=0.97)

The launcher reads the version's manifest only (no vectors, no rows) and plans work
units: (shard, first row, end row) spans of whole `duplicates.block_rows` blocks, at most
about MAX_UNITS of them. The Beam job:

1. FindPairs (workers): each unit's vectors searched, block_rows at a time, against the
   whole version (the worker loads it once through the index reader) with the index's own
   per-shard ScaNN settings; pairs of images of different products at or above
   `duplicates.candidate_threshold` (re-scored exactly from the stored vectors) written to
   part files, one per (pair bucket, unit);
2. VerifyBucket (workers): per pair bucket, one record per image pair (each side may find
   the other), accepted when >= threshold, or confirmed by the pixel check
   (pipelines.duplicates.pairs); the accepted pairs written to the bucket's part file;
3. ExactPairs: the source snapshot's content_sha256 split into hash buckets (part files),
   then per bucket: images of different products with the same bytes are exact duplicates;
4. WriteGroups (one worker): union-find over the accepted pairs -> duplicates.parquet,
   duplicates.csv, report.html and summary.json in `out_dir` (each written atomically).

Between the steps travel only part-file paths and counts (the files are under a
`_work-<run>` folder of `out_dir`, deleted at the end): with the DirectRunner every
element between steps passes through the launcher process, so pairs, hashes and groups
never do, and its memory does not grow with the catalog.

Counts reconcile (checked before anything is written): every image of the version was
searched once, every candidate pair was accepted or rejected, and the table has one row
per image of a group.
"""
from __future__ import annotations

import io
import logging
import math
import time
import uuid
from typing import Any

import apache_beam as beam

from pipelines.core import filesystem as fs
from pipelines.core.config import Config
from pipelines.duplicates.pairs import (DuplicatesSpec, FindPairs, VerifyBucket, exact_bucket,
                                        read_parts, split_hashes)
from pipelines.core.errors import BadInputError

log = logging.getLogger(__name__)

OUTPUT_FILES = ("duplicates.parquet", "duplicates.csv", "report.html", "summary.json")
# Work units (FindPairs) are planned up to about this many (the part files are units x
# buckets); pair / hash buckets: one per BUCKET_VECTORS vectors, within BUCKETS_RANGE.
MAX_UNITS = 64
BUCKET_VECTORS = 16384
BUCKETS_RANGE = (4, 64)


class DuplicatesError(BadInputError):
    """The job cannot run (no published version, bad threshold) or its counts disagree."""


def plan_units(shard_sizes: list[int], block_rows: int) -> list[tuple[int, int, int]]:
    """(shard position, start, end) blocks covering every row of every shard once."""
    return [(s, start, min(n, start + block_rows))
            for s, n in enumerate(shard_sizes) for start in range(0, n, block_rows)]


def unit_rows(num_vectors: int, block_rows: int, max_units: int = MAX_UNITS) -> int:
    """Rows per work unit: whole search blocks, so that about max_units units cover the
    version (fewer part files; each unit still searches block_rows queries a call)."""
    blocks = max(1, math.ceil(num_vectors / (block_rows * max_units)))
    return block_rows * blocks


def plan_buckets(num_vectors: int) -> int:
    lo, hi = BUCKETS_RANGE
    return max(lo, min(hi, math.ceil(num_vectors / BUCKET_VECTORS)))


def make_spec(index_root: str, out_dir: str, config: Config, threshold: float | None = None,
              version: str | None = None, buckets: int | None = None,
              max_units: int = MAX_UNITS) -> tuple[DuplicatesSpec, list[tuple[int, int, int]],
                                                   dict[str, Any]]:
    """The job's spec, work units and a few manifest figures, from the manifest alone."""
    from pipelines.index.artifact import IndexArtifactError, read_latest, read_manifest
    dc = config.duplicates
    threshold = dc.threshold if threshold is None else float(threshold)
    if not 0 < threshold <= 1:
        raise DuplicatesError(f"threshold must be in (0, 1], got {threshold}")
    try:
        name = version or read_latest(index_root)
        if name is None:
            raise DuplicatesError(f"no published index version under {index_root} "
                                  f"(LATEST is missing)")
        manifest = read_manifest(index_root, name)
    except IndexArtifactError as e:
        raise DuplicatesError(f"cannot read the index under {index_root}: {e}") from e
    if not manifest.passed:
        raise DuplicatesError(f"index version {name} has status {manifest.status!r}")
    views = list(manifest.views or [])
    query_view = None
    if len(views) > 1:  # separate views: search each image once, by its first view
        query_view = "original" if "original" in views else sorted(views)[0]
    snapshot = manifest.source_snapshot.get("path")
    if snapshot and not fs.exists(snapshot):
        log.warning("duplicates: the source snapshot %s is gone: exact (byte) duplicates "
                    "are not checked", snapshot)
        snapshot = None
    spec = DuplicatesSpec(
        index_root=index_root, version=name, out_dir=out_dir, threshold=threshold,
        # without the pixel check a pair below `threshold` is always rejected: it is not
        # gathered as a candidate at all (at 1M: 4.2M pairs written, shuffled, rejected)
        candidate_threshold=(threshold if dc.pixel_threshold is None
                             else min(dc.candidate_threshold, threshold)),
        pixel_threshold=dc.pixel_threshold, neighbours=dc.neighbours, query_view=query_view,
        max_image_bytes=config.fetch.max_bytes, max_pixels=config.decode.max_pixels,
        report_groups=dc.report_groups, report_images_per_group=dc.report_images_per_group,
        snapshot=snapshot or None,
        work_dir=fs.join(out_dir, f"_work-{uuid.uuid4().hex[:12]}"),
        buckets=buckets or plan_buckets(manifest.num_vectors), block_rows=dc.block_rows,
        leaves_fraction=dc.leaves_fraction)
    units = plan_units([s.num_vectors for s in manifest.shards],
                       unit_rows(manifest.num_vectors, dc.block_rows, max_units))
    facts = {"num_vectors": manifest.num_vectors, "num_images": manifest.num_images,
             "shards": manifest.num_shards}
    return spec, units, facts


def run_duplicates(index_root: str, out_dir: str, config: Config,
                   threshold: float | None = None, version: str | None = None,
                   buckets: int | None = None, max_units: int = MAX_UNITS) -> dict[str, Any]:
    """Run the job; returns summary.json's content (also written to `out_dir`).
    `buckets` / `max_units`: the job's partitioning (default: from the version's size)."""
    from pipelines.core.runner import make_pipeline
    started = time.time()
    spec, units, facts = make_spec(index_root, out_dir, config, threshold, version, buckets,
                                   max_units)
    log.info("duplicates: version %s, %d vectors in %d units, %d buckets, threshold %.3f",
             spec.version, facts["num_vectors"], len(units), spec.buckets, spec.threshold)
    from pipelines.embed import snapshot as snap
    hash_files = snap.embedding_files(spec.snapshot) if spec.snapshot else []
    from pipelines.core import progress
    try:
        with progress.report_progress("duplicates", len(units), "units",
                                      enabled=config.runner.is_direct), \
                make_pipeline(config, "duplicates") as p:
            found = (p
                     | "Units" >> beam.Create(units)
                     | "SpreadUnits" >> beam.Reshuffle()
                     | "FindPairs" >> beam.ParDo(_StepDoFn(FindPairs, spec)).with_outputs(
                         "part", "scanned"))
            scanned = found.scanned | "SumScanned" >> beam.CombineGlobally(sum)
            checked = (found.part
                       | "GroupParts" >> beam.GroupByKey()
                       | "VerifyBuckets" >> beam.ParDo(_StepDoFn(VerifyBucket, spec)).with_outputs(
                           "accepted_part", "candidates", "rejected", "no_pixels"))
            exact = (p
                     | "HashFiles" >> beam.Create(list(enumerate(hash_files)))
                     | "SplitHashes" >> beam.FlatMap(split_hashes, spec)
                     | "GroupHashes" >> beam.GroupByKey()
                     | "ExactPairs" >> beam.FlatMap(exact_bucket, spec))
            counts = {
                "candidates": checked.candidates | "SumCandidates" >> beam.CombineGlobally(sum),
                "rejected": checked.rejected | "SumRejected" >> beam.CombineGlobally(sum),
                "no_pixels": checked.no_pixels | "SumNoPixels" >> beam.CombineGlobally(sum),
                "scanned": scanned}
            _ = (p
                 | "One" >> beam.Create([None])
                 | "WriteGroups" >> beam.Map(
                     _write_groups_element, spec, facts, started,
                     beam.pvalue.AsList(checked.accepted_part), beam.pvalue.AsList(exact),
                     *[beam.pvalue.AsSingleton(c) for c in counts.values()]))
    finally:
        fs.delete_tree(spec.work_dir)
    summary = fs.read_json(fs.join(out_dir, "summary.json"))
    if summary.get("started_at") != started:
        raise DuplicatesError(f"the job finished but {out_dir}/summary.json is not this run's")
    return summary


class _StepDoFn(beam.DoFn):
    """A DoFn around a worker step (pipelines.duplicates.pairs) whose process yields
    (tag, value) pairs; the step is built once per DoFn instance (FindPairs loads the
    index version there)."""

    def __init__(self, step_cls: Any, spec: DuplicatesSpec) -> None:
        self._step_cls, self._spec = step_cls, spec
        self._step: Any = None

    def setup(self) -> None:
        self._step = self._step_cls(self._spec)

    def process(self, element: Any) -> Any:
        for tag, value in self._step.process(element):
            yield beam.pvalue.TaggedOutput(tag, value)


def _write_groups_element(_: Any, spec: DuplicatesSpec, facts: dict[str, Any], started: float,
                          near_parts: list[str], exact_parts: list[str],
                          candidates: int, rejected: int, no_pixels: int, scanned: int) -> None:
    near, exact = read_parts(near_parts), read_parts(exact_parts)
    write_groups(spec, facts, started, near, exact, {
        "candidate_pairs": int(candidates), "rejected_pairs": int(rejected),
        "pairs_without_pixels": int(no_pixels), "images_scanned": int(scanned)})


def write_groups(spec: DuplicatesSpec, facts: dict[str, Any], started: float,
                 near: list[dict[str, Any]], exact: list[dict[str, Any]],
                 counts: dict[str, int]) -> dict[str, Any]:
    """WriteGroups (one worker): groups, table, report and summary, counts reconciled."""
    import pyarrow.csv as pacsv

    from pipelines.duplicates.groups import build_groups
    from pipelines.duplicates.report import render_report, thumbnail_data_uri
    uris = {p[side]: p[f"uri_{side}"] for p in [*exact, *near] for side in ("a", "b")}
    table, groups = build_groups([*exact, *near], uris)
    num_images = facts.get("num_images")
    checks = {
        "every image searched once": num_images is None
        or counts["images_scanned"] == num_images,
        "every candidate accepted or rejected":
            counts["candidate_pairs"] == len(near) + counts["rejected_pairs"],
        "one row per image of a group": table.num_rows == sum(len(g["images"]) for g in groups)
        and table.num_rows == len(set(table.column("image_id").to_pylist())),
    }
    summary = {
        "version": spec.version, "index_root": spec.index_root, "started_at": started,
        "threshold": spec.threshold, "candidate_threshold": spec.candidate_threshold,
        "pixel_threshold": spec.pixel_threshold, "neighbours": spec.neighbours,
        "num_vectors": facts["num_vectors"], "num_images": num_images, **counts,
        "near_pairs": len(near), "exact_pairs": len(exact),
        "exact_checked": spec.snapshot is not None,
        "groups": len(groups), "images_in_groups": table.num_rows,
        "products_in_groups": len(set(table.column("product_id").to_pylist())),
        "groups_by_kind": {k: sum(1 for g in groups if g["kind"] == k)
                           for k in ("exact", "near", "mixed")},
        "largest_group": len(groups[0]["images"]) if groups else 0,
        "reconciled": all(checks.values()), "checks": checks,
        "files": list(OUTPUT_FILES)}
    if not summary["reconciled"]:
        raise DuplicatesError(f"duplicates: counts do not reconcile: "
                              f"{[k for k, ok in checks.items() if not ok]}; {counts}")
    out = spec.out_dir
    fs.write_bytes_atomic(fs.join(out, "duplicates.parquet"), fs.parquet_to_bytes(table))
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    fs.write_bytes_atomic(fs.join(out, "duplicates.csv"), buf.getvalue())
    rows = {r["image_id"]: r for r in table.to_pylist()}

    def thumbnail(image_id: str, uri: str) -> str | None:
        if not uri or uri[:8].lower().startswith(("http://", "https://")):
            return None
        try:
            return thumbnail_data_uri(fs.read_bytes(uri, max_bytes=spec.max_image_bytes),
                                      spec.max_pixels)
        except Exception as e:  # noqa: BLE001 - one unreadable image does not fail the report
            log.warning("duplicates report: no thumbnail for %s: %s", image_id, e)
            return None

    summary["seconds"] = round(time.time() - started, 3)
    page = render_report(groups, rows, summary, thumbnail, spec.report_groups,
                         spec.report_images_per_group)
    fs.write_bytes_atomic(fs.join(out, "report.html"), page.encode("utf-8"))
    fs.write_json(fs.join(out, "summary.json"), summary)
    log.info("duplicates: %d groups, %d images, %d near + %d exact pairs -> %s",
             len(groups), table.num_rows, len(near), len(exact), out)
    return summary
