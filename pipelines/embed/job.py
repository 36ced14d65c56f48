"""The embed job: catalog manifest(s) -> embeddings snapshot, with Beam RunInference.

The graph (pipelines/embed/transforms.py) is drawn once, in docs/ARCHITECTURE.md ("embed").
Every input row is counted once as embedded, reused or dead-lettered (by reason);
summary.json is written last and checks input = embedded + reused + dead-lettered.

This module plans a run, runs the graph and writes the summary; run it with `catalog-search embed --manifest M --out ROOT [--previous SNAPSHOT]`
(pipelines/embed/commands.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np

from pipelines.core import filesystem as fs
from pipelines.core import progress
from pipelines.core.locks import RunLockedError, run_lock
from pipelines.core import stage_timing
from pipelines.embed import small_run, snapshot
from pipelines.embed.summary import SnapshotSummary
from pipelines.core.config import Config
from pipelines.model.features import features_dict, is_plain
from pipelines.model.precision import PrecisionError, apply_precision, resolve_precision
from pipelines.embed.transforms import (CARRIED, COUNTS_FILE, DEAD, DROPPED, EMBEDDED, NAMESPACE,
                                       REPLACED, REUSED, EmbedSettings, build_pipeline)
from pipelines.embed.manifest import ManifestError, check_manifest, expand_manifests
from pipelines.model.resolve import ModelError, ModelSpec, resolve_model
from pipelines.core.runner import make_pipeline
from pipelines.core.errors import BadInputError

log = logging.getLogger(__name__)
FAILED_SUMMARY_FILE = "failed_summary.json"


class EmbedError(BadInputError):
    """The job cannot start (bad manifest, model, previous snapshot) or its counts do not add up."""


class DeadLetterRateError(EmbedError):
    """Too many rows were dead-lettered (or none embedded): the run failed, LATEST stays.

    The snapshot folder keeps its dead letters and `failed_summary.json` for inspection
    but has no summary.json, so no reader treats it as a snapshot.
    """

    def __init__(self, message: str, summary: SnapshotSummary):
        super().__init__(message)
        self.summary = summary


def embedding_fingerprint(spec: ModelSpec, config: Config, precision: str = "fp32") -> str:
    """Changes whenever the vectors for the same bytes would change (`precision`: the
    resolved model.precision, fp32 or bf16)."""
    payload = {"model": spec.fingerprint, "input_size": spec.input_size,
               "resize": config.decode.resize, "views": list(config.augment.views),
               "mode": config.augment.mode, "seed": config.augment.seed}
    if precision != "fp32":  # absent for fp32: snapshots from before the option stay reusable
        payload["precision"] = precision
    if not is_plain(config.features):  # absent when plain: older snapshots stay reusable
        payload["features"] = features_dict(config.features)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _check_previous(previous: str, fingerprint: str, merge_previous: bool) -> bool:
    """True when `previous` was embedded with the same fingerprint (its vectors are reusable)."""
    try:
        summary = snapshot.read_summary(previous)
    except snapshot.SnapshotError as e:
        raise EmbedError(f"--previous: {e}") from e
    same = summary.embedding_fingerprint == fingerprint
    if merge_previous and not same:
        raise EmbedError(f"cannot merge into {previous}: it was embedded with another model or "
                         "view configuration (its vectors would not be comparable)")
    if not same:
        log.warning("previous snapshot %s used another model/view configuration: "
                    "nothing will be reused", previous)
    return same


def summarize(counts: dict[str, int], input_rows: int) -> dict[str, Any]:
    """Counts by outcome; raises EmbedError when they do not reconcile with the input."""
    reasons = {k[len("dead:"):]: v for k, v in counts.items() if k.startswith("dead:")}
    out: dict[str, Any] = {"input_rows": input_rows, EMBEDDED: counts.get(EMBEDDED, 0),
           REUSED: counts.get(REUSED, 0), DEAD: sum(reasons.values()),
           "dead_letter_reasons": dict(sorted(reasons.items())),
           CARRIED: counts.get(CARRIED, 0), DROPPED: counts.get(DROPPED, 0),
           REPLACED: counts.get(REPLACED, 0),
           # how the work split (not outcomes): images fetched, reuse with / without a fetch
           "fetched": counts.get("fetched", 0),
           "reused_without_fetch": counts.get("reused_without_fetch", 0),
           "reused_after_hash": counts.get("reused_after_hash", 0)}
    accounted = out[EMBEDDED] + out[REUSED] + out[DEAD]
    if accounted != input_rows:
        raise EmbedError(f"counts do not reconcile: {input_rows} input rows but "
                         f"{out[EMBEDDED]} embedded + {out[REUSED]} reused + "
                         f"{out[DEAD]} dead-lettered = {accounted}")
    return out


def check_failure_rate(summary: SnapshotSummary, max_fraction: float) -> None:
    """DeadLetterRateError when more than `max_fraction` of the input rows were
    dead-lettered, or when no row was embedded or reused at all."""
    n = summary.input_rows
    dead = summary.dead_lettered
    fraction = dead / n if n else 1.0
    kept = summary.embedded + summary.reused
    if fraction <= max_fraction and kept > 0:
        return
    top = sorted(summary.dead_letter_reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    reasons = ", ".join(f"{reason} {count}" for reason, count in top) or "none"
    what = ("no row was embedded or reused" if kept == 0 else
            f"dead-letter fraction {fraction:.3f} is above the maximum {max_fraction:g}")
    raise DeadLetterRateError(
        f"run failed: {what} ({dead} of {n} input rows dead-lettered; embed."
        f"max_dead_letter_fraction = {max_fraction:g}); top reasons: {reasons}; LATEST "
        "was not moved", summary)


def check_roots(out_root: str, previous: str | None = None) -> None:
    """EmbedError when a root's URI scheme has no filesystem (naming the pip extra)."""
    try:
        fs.check_all_supported([("--out", out_root), ("--previous", previous)])
    except fs.UnsupportedUriError as e:
        raise EmbedError(str(e)) from e


def run_embed(manifests: Sequence[str], out_root: str, config: Config,
              run_id: str | None = None, previous: str | None = None,
              merge_previous: bool = False, verify_content: bool = False) -> SnapshotSummary:
    """Run the embed job; returns the summary (also written to <out_root>/<run_id>/summary.json).

    previous: a snapshot path to reuse unchanged vectors from (None: embed everything).
    merge_previous: keep previous rows whose image_id is not in `manifests` (backfill).
    verify_content: fetch and hash every image even when its change signal is unchanged
    (audits); see pipelines.embed.change_signal for when a vector is reused without a fetch.
    Re-running with the same run_id replaces that snapshot and nothing else; the run_id
    is checked (pipelines.core.names) before anything is deleted or written.
    Two runs of one run_id under one local root never overlap: the second is refused at
    once (EmbedError naming the holder; pipelines.core.locks.run_lock).
    Raises EmbedError (nothing touched) for bad input, DeadLetterRateError when more than
    config.embed.max_dead_letter_fraction of the rows are dead-lettered (LATEST stays).
    """
    started = time.time()
    run_id = default_run_id() if run_id is None else run_id
    try:
        snapshot.check_run_id(run_id, "run_id")
    except snapshot.SnapshotError as e:
        raise EmbedError(str(e)) from e
    check_roots(out_root, previous)
    out_root = fs.normalize(out_root)
    previous = fs.normalize(previous) if previous else previous
    # Bad input is refused before the run lock creates anything under --out.
    try:
        uris = expand_manifests(list(manifests))
        input_rows = sum(check_manifest(u) for u in uris)
    except ManifestError as e:
        raise EmbedError(str(e)) from e
    if input_rows == 0:
        raise EmbedError("the manifest(s) hold no rows: " + ", ".join(uris))
    if merge_previous and not previous:
        raise EmbedError("merge_previous needs a previous snapshot")
    try:
        with run_lock(out_root, run_lock_name(run_id),
                      f"embed --run-id {run_id} (--out {out_root})"):
            return _run_embed_locked(uris, input_rows, out_root, config, run_id, previous,
                                     merge_previous, verify_content, started)
    except RunLockedError as e:
        raise EmbedError(str(e)) from e


def run_lock_name(run_id: str) -> str:
    """The run lock of an embed run under its embeddings root (pipelines.core.locks.run_lock):
    held from before the snapshot folder is replaced until LATEST is moved."""
    return f".embed-{run_id}.lock"


def _run_embed_locked(uris: list[str], input_rows: int, out_root: str, config: Config,
                      run_id: str, previous: str | None, merge_previous: bool,
                      verify_content: bool, started: float) -> SnapshotSummary:
    try:
        snapshot.latest_run_id(out_root)  # a corrupted LATEST: refuse before any work
    except snapshot.SnapshotError as e:
        raise EmbedError(f"--out {out_root}: {e}; fix or remove it first") from e
    try:
        spec = resolve_model(config.model.handle, config.model.resolved_cache_dir(),
                             config.model.input_size)
    except ModelError as e:
        raise EmbedError(f"model: {e}") from e
    try:
        precision = resolve_precision(config.model.precision)
    except PrecisionError as e:
        raise EmbedError(f"model: {e}") from e
    log.info("embed: model precision %s", precision.describe())
    if not spec.dim:  # a TF Hub model without our metadata: ask it once
        from pipelines.model.resolve import Embedder
        apply_precision(precision.value)  # process-global: as the in-process workers will
        dim = Embedder(spec).embed(np.zeros((1, spec.input_size, spec.input_size, 3),
                                            np.uint8)).shape[1]
        spec = dataclasses.replace(spec, dim=int(dim))
    fingerprint = embedding_fingerprint(spec, config, precision.value)
    reuse = _check_previous(previous, fingerprint, merge_previous) if previous else False
    settings = EmbedSettings(model=dict(spec.to_dict(), precision=precision.value),
                             fetch=config.fetch, decode=config.decode,
                             augment=config.augment, features=features_dict(config.features),
                             fingerprint=fingerprint, reuse=reuse,
                             merge_previous=merge_previous, verify_content=verify_content)

    snapshot_dir = snapshot.snapshot_path(out_root, run_id)
    if previous and fs.join(previous, "") == fs.join(snapshot_dir, ""):
        raise EmbedError(f"--previous {previous} is the snapshot this run would replace")
    fs.delete_tree(snapshot_dir)  # idempotent: a re-run replaces only its own outputs
    log.info("embed %s: %d rows from %d manifest(s) -> %s (model %s, previous: %s)",
             run_id, input_rows, len(uris), snapshot_dir, spec.model_id, previous or "none")

    run_config, execution = small_run.choose_config(
        config, uris, previous, reuse, verify_content, settings.output_view_names(), input_rows)
    pipeline = make_pipeline(run_config, f"catalog-embed-{run_id}")
    build_pipeline(pipeline, uris, snapshot_dir, settings, previous, run_config)
    pipeline_started = time.time()
    with progress.report_progress("embed", input_rows, "rows", enabled=config.runner.is_direct):
        result = pipeline.run()
        result.wait_until_finish()
    pipeline_s = time.time() - pipeline_started
    stages = stage_timing.collect(result, NAMESPACE, pipeline_started)

    summary = _summary(config, spec, settings, precision.value, uris, input_rows, run_id,
                       snapshot_dir, previous, merge_previous, started, pipeline_s,
                       dict(execution, stages=stages))
    fs.delete_files([fs.join(snapshot_dir, COUNTS_FILE)])
    try:
        check_failure_rate(summary, config.embed.max_dead_letter_fraction)
    except DeadLetterRateError as e:
        e.summary = dataclasses.replace(summary, status="failed", failure=str(e))
        snapshot.write_summary(snapshot_dir, e.summary, FAILED_SUMMARY_FILE)  # not a snapshot
        log.error("%s", e)
        raise
    snapshot.write_summary(snapshot_dir, summary)  # complete from here on
    if not snapshot.advance_latest(out_root, run_id):
        log.warning("embed %s: complete, but the embeddings LATEST stays at %s, which sorts "
                    "after %r (LATEST only moves forward; run ids sort by time when they "
                    "start with a UTC timestamp, as the default ones do)", run_id,
                    snapshot.latest_run_id(out_root), run_id)
    return summary


def _summary(config: Config, spec: ModelSpec, settings: EmbedSettings, precision: str,
             uris: list[str], input_rows: int, run_id: str, snapshot_dir: str,
             previous: str | None, merge_previous: bool, started: float, pipeline_s: float,
             execution: dict[str, Any]) -> SnapshotSummary:
    """The run's summary from the workers' outcome counts (EmbedError if they do not add up)."""
    counts = fs.read_json(fs.join(snapshot_dir, COUNTS_FILE))
    counted = summarize(counts, input_rows)
    return SnapshotSummary(
        **counted,
        max_dead_letter_fraction=config.embed.max_dead_letter_fraction,
        run_id=run_id, snapshot=snapshot_dir, manifests=uris,
        previous_snapshot=previous, merge_previous=merge_previous,
        # features ride in "model" so the index manifest carries them to serving unchanged
        # so does the resolved precision: serving runs the model as the catalog was embedded
        model=dict(spec.to_dict(), features=features_dict(config.features),
                   precision=precision),
        features=features_dict(config.features),
        model_id=spec.model_id, dim=spec.dim,
        embedding_fingerprint=settings.fingerprint,
        augment={"views": list(config.augment.views), "mode": config.augment.mode,
                 "seed": config.augment.seed, "output_views": settings.output_view_names()},
        decode=dataclasses.asdict(config.decode),
        runner=config.runner.name,
        timings={"total_s": round(time.time() - started, 3),
                 "pipeline_s": round(pipeline_s, 3),
                 "embedded_per_s": round(counted[EMBEDDED] / pipeline_s, 2)
                 if pipeline_s else None, **execution},
        created_at=datetime.now(timezone.utc).isoformat(),
    )
