"""`run_duplicates`: the near-duplicate listings job over a published index version.

    summary = run_duplicates(index_root, out_dir, config, threshold=0.97)

The launcher reads the version's manifest only (no vectors, no rows) and plans work
units: (shard, first row, end row) blocks of `duplicates.block_rows`. The Beam job:

1. FindPairs (workers): each block's vectors searched against the whole version (the
   worker loads it once through the index reader), neighbours re-scored exactly; pairs of
   images of different products at or above `duplicates.candidate_threshold`;
2. MergePairs: one record per image pair (each side may find the other); VerifyPairs:
   accepted when >= threshold, or confirmed by the pixel check (pipelines.duplicates.pairs);
3. ExactPairs: the source snapshot's content_sha256 grouped: images of different products
   with the same bytes are exact duplicates;
4. WriteGroups (one worker): union-find over the accepted pairs -> duplicates.parquet,
   duplicates.csv, report.html and summary.json in `out_dir` (each written atomically).

Counts reconcile (checked before anything is written): every image of the version was
searched once, every candidate pair was accepted or rejected, and the table has one row
per image of a group.
"""
from __future__ import annotations

import io
import logging
import time
from typing import Any

import apache_beam as beam

from pipelines.core import filesystem as fs
from pipelines.core.config import Config
from pipelines.duplicates.pairs import (DuplicatesSpec, FindPairs, VerifyPairs, exact_pairs,
                                        merge_pair, read_hashes)

log = logging.getLogger(__name__)

OUTPUT_FILES = ("duplicates.parquet", "duplicates.csv", "report.html", "summary.json")


class DuplicatesError(RuntimeError):
    """The job cannot run (no published version, bad threshold) or its counts disagree."""


def plan_units(shard_sizes: list[int], block_rows: int) -> list[tuple[int, int, int]]:
    """(shard position, start, end) blocks covering every row of every shard once."""
    return [(s, start, min(n, start + block_rows))
            for s, n in enumerate(shard_sizes) for start in range(0, n, block_rows)]


def make_spec(index_root: str, out_dir: str, config: Config, threshold: float | None = None,
              version: str | None = None) -> tuple[DuplicatesSpec, list[tuple[int, int, int]],
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
        candidate_threshold=min(dc.candidate_threshold, threshold),
        pixel_threshold=dc.pixel_threshold, neighbours=dc.neighbours, query_view=query_view,
        max_image_bytes=config.fetch.max_bytes, max_pixels=config.decode.max_pixels,
        report_groups=dc.report_groups, report_images_per_group=dc.report_images_per_group,
        snapshot=snapshot or None)
    units = plan_units([s.num_vectors for s in manifest.shards], dc.block_rows)
    facts = {"num_vectors": manifest.num_vectors, "num_images": manifest.num_images,
             "shards": manifest.num_shards}
    return spec, units, facts


def run_duplicates(index_root: str, out_dir: str, config: Config,
                   threshold: float | None = None, version: str | None = None
                   ) -> dict[str, Any]:
    """Run the job; returns summary.json's content (also written to `out_dir`)."""
    from pipelines.core.runner import make_pipeline
    started = time.time()
    spec, units, facts = make_spec(index_root, out_dir, config, threshold, version)
    log.info("duplicates: version %s, %d vectors in %d blocks, threshold %.3f", spec.version,
             facts["num_vectors"], len(units), spec.threshold)
    from pipelines.embed import snapshot as snap
    hash_files = snap.embedding_files(spec.snapshot) if spec.snapshot else []
    with make_pipeline(config, "duplicates") as p:
        found = (p
                 | "Blocks" >> beam.Create(units)
                 | "SpreadBlocks" >> beam.Reshuffle()
                 | "FindPairs" >> beam.ParDo(_StepDoFn(FindPairs, spec)).with_outputs(
                     "pair", "scanned"))
        scanned = found.scanned | "SumScanned" >> beam.CombineGlobally(sum)
        candidates = (found.pair
                      | "MergePairs" >> beam.CombinePerKey(merge_pair)
                      | "SpreadPairs" >> beam.Reshuffle())
        checked = candidates | "VerifyPairs" >> beam.ParDo(
            _StepDoFn(VerifyPairs, spec)).with_outputs("accepted", "rejected", "no_pixels")
        exact = (p
                 | "HashFiles" >> beam.Create(hash_files)
                 | "ReadHashes" >> beam.FlatMap(read_hashes)
                 | "GroupHashes" >> beam.GroupByKey()
                 | "ExactPairs" >> beam.FlatMapTuple(exact_pairs))
        counts = {
            "candidates": candidates | "CountCandidates" >> beam.combiners.Count.Globally(),
            "rejected": checked.rejected | "CountRejected" >> beam.CombineGlobally(sum),
            "no_pixels": checked.no_pixels | "CountNoPixels" >> beam.CombineGlobally(sum),
            "scanned": scanned}
        near = checked.accepted | "ListNear" >> beam.combiners.ToList()
        exact_list = exact | "ListExact" >> beam.combiners.ToList()
        _ = (p
             | "One" >> beam.Create([None])
             | "WriteGroups" >> beam.Map(
                 _write_groups_element, spec, facts, started,
                 beam.pvalue.AsSingleton(near), beam.pvalue.AsSingleton(exact_list),
                 *[beam.pvalue.AsSingleton(c) for c in counts.values()]))
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
                          near: list[dict[str, Any]], exact: list[dict[str, Any]],
                          candidates: int, rejected: int, no_pixels: int, scanned: int) -> None:
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
