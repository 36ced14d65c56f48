"""The embed job: catalog manifest(s) -> embeddings snapshot, with Beam RunInference.

    manifests ─ read rows ─ validate ─┐
    previous snapshot (optional) ─────┴─ CoGroupByKey(image_id)
        ─ resolve: duplicates → dead letter; unchanged change signal (manifest
                   updated_at/etag/size, else file size + mtime) + same model/view config
                   → reuse previous vectors without fetching (pipelines.embed.change_signal);
                   otherwise fetch bytes; sha256; unchanged bytes → reuse
        ─ decode + preprocess + augmentation views (pipelines.model.image_decode)
        ─ RunInference(KeyedModelHandler(EmbeddingModelHandler)) with exception handling
        ─ CoGroupByKey(image_id) with row info and failures → one row per image (views
          averaged) or one per view → embeddings-*.parquet; failures → dead_letter-*.jsonl
    every input row is counted once as embedded, reused or dead-lettered (by reason);
    summary.json is written last and checks input = embedded + reused + dead-lettered.

Run it with `catalog-search embed --manifest M --out ROOT [--previous SNAPSHOT]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from pipelines.core import filesystem as fs
from pipelines.core import progress
from pipelines.embed import snapshot
from pipelines.embed.change_signal import SIGNAL_COLUMN, row_signal, unchanged
from pipelines.core.command import Command, UsageError, check_uri_arg
from pipelines.core.config import AugmentConfig, Config, DecodeConfig, FetchConfig
from pipelines.embed.fetch import FetchError, fetch_bytes
from pipelines.model.features import features_dict, is_plain, preprocess_feature_views
from pipelines.model.image_decode import DecodeError, decode_image
from pipelines.model.inference import EmbeddingModelHandler
from pipelines.embed.manifest import ManifestError, check_manifest, expand_manifests, read_rows
from pipelines.model.resolve import ModelError, ModelSpec, resolve_model
from pipelines.core.names import InvalidNameError, check_segment
from pipelines.core.runner import make_pipeline

log = logging.getLogger(__name__)
NAMESPACE = "catalog_search_embed"
COUNTS_FILE = "_counts.json"
PERMANENT_FAILURE_EXIT_CODE = 3  # as pipelines.orchestration.steps: a retry cannot fix it
PROGRESS_EVERY = 200

# Outcome counters; every input row ends in exactly one of the first three.
EMBEDDED, REUSED, DEAD = "embedded", "reused", "dead_lettered"
CARRIED, DROPPED, REPLACED = "carried_forward", "dropped_from_previous", "replaced_existing"


FAILED_SUMMARY_FILE = "failed_summary.json"


class EmbedError(ValueError):
    """The job cannot start (bad manifest, model, previous snapshot) or its counts do not add up."""


class DeadLetterRateError(EmbedError):
    """Too many rows were dead-lettered (or none embedded): the run failed, LATEST stays.

    The snapshot folder keeps its dead letters and `failed_summary.json` for inspection
    but has no summary.json, so no reader treats it as a snapshot.
    """

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


@dataclasses.dataclass(frozen=True)
class EmbedSettings:
    """What the workers need (picklable, no TensorFlow objects)."""
    model: dict[str, Any]
    fetch: FetchConfig
    decode: DecodeConfig
    augment: AugmentConfig
    features: dict[str, Any]  # pipelines.model.features settings (scales, flip)
    fingerprint: str        # model + preprocessing + views: equal => a vector can be reused
    reuse: bool             # the previous snapshot was made with the same fingerprint
    merge_previous: bool    # keep previous rows whose image_id is not in the manifests
    verify_content: bool = False  # fetch + hash every image even when its signal is unchanged

    @property
    def views(self) -> tuple[str, ...]:
        return self.augment.views

    def output_view_names(self) -> list[str]:
        if self.augment.mode == "separate" or len(self.views) == 1:
            return list(self.views)
        return ["mean(" + "+".join(self.views) + ")"]


def embedding_fingerprint(spec: ModelSpec, config: Config) -> str:
    """Changes whenever the vectors for the same bytes would change."""
    payload = {"model": spec.fingerprint, "input_size": spec.input_size,
               "resize": config.decode.resize, "views": list(config.augment.views),
               "mode": config.augment.mode, "seed": config.augment.seed}
    if not is_plain(config.features):  # absent when plain: older snapshots stay reusable
        payload["features"] = features_dict(config.features)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _dead_letter(row: dict[str, Any], stage: str, error: str, message: str) -> dict[str, Any]:
    return {"image_id": row.get("image_id", ""), "product_id": row.get("product_id", ""),
            "image_uri": row.get("image_uri", ""), "stage": stage, "error": error,
            "message": message, "source": row.get("source", "")}


class SplitValid(beam.DoFn):
    """Rows with a manifest error go to the dead letter; others are keyed by image_id."""

    def process(self, row: dict[str, Any]):
        Metrics.counter(NAMESPACE, "input_rows").inc()
        if row["error"]:
            reason, message = row["error"]
            progress.tick()
            yield beam.pvalue.TaggedOutput("dead", _dead_letter(row, "manifest", reason, message))
        else:
            yield row["image_id"], row


class ResolveImage(beam.DoFn):
    """Per image_id: pick the winning row, fetch, hash, and reuse or send to decode."""

    def __init__(self, settings: EmbedSettings):
        self.s = settings

    def process(self, element):
        image_id, groups = element
        current = sorted(groups["current"], key=lambda r: r["order"])
        previous = list(groups["previous"])
        if not current:
            if previous and self.s.merge_previous:
                yield beam.pvalue.TaggedOutput("count", CARRIED)
                yield from ({SIGNAL_COLUMN: None, **p} for p in previous)
            elif previous:
                yield beam.pvalue.TaggedOutput("count", DROPPED)
            return
        progress.tick(len(current))  # fused with decode + inference: leads them by a batch
        winner = current[-1]
        for dup in current[:-1]:
            yield beam.pvalue.TaggedOutput("dead", _dead_letter(
                dup, "manifest", "duplicate_image_id",
                f"{dup['source']}: image_id {image_id!r} appears again at {winner['source']}; "
                "the later row wins"))
        if previous and self.s.merge_previous:
            yield beam.pvalue.TaggedOutput("count", REPLACED)
        same_views = sorted(p["view"] for p in previous) == sorted(self.s.output_view_names())
        signal = row_signal(winner)  # before fetching: a change after it is seen next run
        if (self.s.reuse and same_views and not self.s.verify_content
                and unchanged(signal, previous)):
            yield from self._reuse(winner, previous, signal, "reused_without_fetch")
            return
        try:
            yield beam.pvalue.TaggedOutput("count", "fetched")
            data = fetch_bytes(winner["image_uri"], self.s.fetch)
        except FetchError as e:
            yield beam.pvalue.TaggedOutput("dead", _dead_letter(winner, "fetch", e.reason, str(e)))
            return
        Metrics.counter(NAMESPACE, "bytes_fetched").inc(len(data))
        sha = hashlib.sha256(data).hexdigest()
        if (self.s.reuse and previous and same_views
                and all(p["content_sha256"] == sha for p in previous)):
            yield from self._reuse(winner, previous, signal, "reused_after_hash")
            return
        info = {k: winner[k] for k in ("image_id", "product_id", "image_uri", "source")}
        info["metadata"] = json.dumps(winner["metadata"], sort_keys=True)
        info["content_sha256"] = sha
        info[SIGNAL_COLUMN] = signal
        yield beam.pvalue.TaggedOutput("decode", (info, data))

    def _reuse(self, winner: dict[str, Any], previous: list[dict[str, Any]],
               signal: str | None, how: str):
        """The previous rows of an unchanged image, with the winning row's catalog fields."""
        Metrics.counter(NAMESPACE, REUSED).inc()
        yield beam.pvalue.TaggedOutput("count", REUSED)
        yield beam.pvalue.TaggedOutput("count", how)
        for p in previous:
            yield dict(p, product_id=winner["product_id"], image_uri=winner["image_uri"],
                       metadata=json.dumps(winner["metadata"], sort_keys=True),
                       **{SIGNAL_COLUMN: signal})


class DecodeViews(beam.DoFn):
    """(row info, bytes) -> ((image_id, view), uint8 image) per view; row info keyed by id."""

    def __init__(self, settings: EmbedSettings):
        self.s = settings
        self.size = int(settings.model["input_size"])
        self._decoded = 0

    def process(self, element):
        info, data = element
        try:
            img = decode_image(data, max_pixels=self.s.decode.max_pixels, target_size=self.size,
                               max_bytes=self.s.fetch.max_bytes)
            views = preprocess_feature_views(img, self.s.views, size=self.size,
                                             resize=self.s.decode.resize,
                                             image_id=info["image_id"],
                                             seed=self.s.augment.seed,
                                             features=self.s.features)
        except DecodeError as e:
            Metrics.counter(NAMESPACE, "decode_errors").inc()
            yield beam.pvalue.TaggedOutput("dead", _dead_letter(info, "decode", e.reason, str(e)))
            return
        except Exception as e:  # a Pillow bug on hostile input must not kill the job
            yield beam.pvalue.TaggedOutput("dead", _dead_letter(
                info, "decode", "decoder_crash", f"{type(e).__name__}: {e}"))
            return
        Metrics.counter(NAMESPACE, "decoded").inc()
        self._decoded += 1
        if self._decoded % PROGRESS_EVERY == 0:
            log.debug("worker %d: %d images decoded", os.getpid(), self._decoded)
        yield beam.pvalue.TaggedOutput("info", (info["image_id"], info))
        for view, array in views:
            yield (info["image_id"], view), array


class AssembleRows(beam.DoFn):
    """Per image_id: row info + view vectors (+ inference failures) -> snapshot rows."""

    def __init__(self, settings: EmbedSettings):
        self.s = settings

    def process(self, element):
        image_id, groups = element
        info = next(iter(groups["info"]))  # every vector and failure comes from a decoded image
        failures = list(groups["failed"])
        vectors = dict(groups["vector"])
        if failures or set(vectors) != set(self.s.views):
            message = failures[0] if failures else f"views {sorted(vectors)} of {self.s.views}"
            yield beam.pvalue.TaggedOutput("dead", _dead_letter(info, "inference",
                                                                "inference_failed", message))
        else:
            yield from self._rows(image_id, info, vectors)
            Metrics.counter(NAMESPACE, EMBEDDED).inc()
            yield beam.pvalue.TaggedOutput("count", EMBEDDED)

    def _rows(self, image_id: str, info: dict[str, Any], vectors: dict[str, np.ndarray]):
        base = {"image_id": image_id, "product_id": info["product_id"],
                "image_uri": info["image_uri"], "content_sha256": info["content_sha256"],
                "model_id": self.s.model["model_id"], "metadata": info["metadata"],
                SIGNAL_COLUMN: info.get(SIGNAL_COLUMN)}
        if self.s.augment.mode == "separate" or len(self.s.views) == 1:
            for view in self.s.views:
                yield dict(base, view=view, embedding=vectors[view].astype(np.float32).tolist())
        else:
            mean = np.mean([vectors[v] for v in self.s.views], axis=0)
            mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
            yield dict(base, view=self.s.output_view_names()[0],
                       embedding=mean.astype(np.float32).tolist())


def output_schema(dim: int):
    """The snapshot's embeddings schema plus the change signal each row was embedded at."""
    import pyarrow as pa
    return snapshot.embeddings_schema(dim).append(pa.field(SIGNAL_COLUMN, pa.string()))


def _failed_batch_to_ids(failure) -> Iterable[tuple[str, str]]:
    batch, exception = failure
    for key, _ in batch:
        yield key[0], f"{type(exception).__name__}: {exception}"


def _counts_to_json(pairs: list[tuple[str, int]]) -> str:
    return json.dumps(dict(sorted(pairs)))


def build_pipeline(p: beam.Pipeline, manifests: Sequence[str], snapshot_dir: str,
                   settings: EmbedSettings, previous: str | None, config: Config) -> None:
    """Add the embed job's transforms to `p` (pure graph construction; nothing runs)."""
    rows = (p
            | "ListManifests" >> beam.Create(list(enumerate(manifests)))
            | "ReadRows" >> beam.FlatMapTuple(read_rows)
            | "Spread" >> beam.Reshuffle())
    valid = rows | "Validate" >> beam.ParDo(SplitValid()).with_outputs("dead", main="valid")

    if previous:
        prev = (p
                | "ReadPrevious" >> beam.io.ReadFromParquet(
                    fs.join(previous, f"{snapshot.EMBEDDINGS_PREFIX}-*.parquet"))
                | "KeyPrevious" >> beam.Map(lambda r: (r["image_id"], r)))
    else:
        prev = p | "NoPrevious" >> beam.Create([])

    resolved = ({"current": valid.valid, "previous": prev}
                | "JoinPrevious" >> beam.CoGroupByKey()
                | "Resolve" >> beam.ParDo(ResolveImage(settings)).with_outputs(
                    "dead", "decode", "count", main="reused"))
    decoded = (resolved.decode
               | "Decode" >> beam.ParDo(DecodeViews(settings)).with_outputs(
                   "dead", "info", main="images"))

    spec = ModelSpec.from_dict(settings.model)
    handler = EmbeddingModelHandler(spec, config.model.resolved_cache_dir(),
                                    config.runner.tf_threads, config.model.batch_size)
    inferred, inference_dlq = (
        decoded.images
        | "Embed" >> RunInference(KeyedModelHandler(handler)).with_exception_handling())
    vectors = inferred | "KeyVectors" >> beam.MapTuple(
        lambda key, result: (key[0], (key[1], np.asarray(result.inference, np.float32))))
    failed = inference_dlq.failed_inferences | "FailedIds" >> beam.FlatMap(_failed_batch_to_ids)
    assembled = ({"info": decoded.info, "vector": vectors, "failed": failed}
                 | "JoinViews" >> beam.CoGroupByKey()
                 | "Assemble" >> beam.ParDo(AssembleRows(settings)).with_outputs(
                     "dead", "count", main="rows"))

    rows_out = (resolved.reused, assembled.rows) | "AllRows" >> beam.Flatten()
    dead = ((valid.dead, resolved.dead, decoded.dead, assembled.dead)
            | "AllDead" >> beam.Flatten())
    _ = (rows_out
         | "WriteEmbeddings" >> beam.io.WriteToParquet(
             fs.join(snapshot_dir, snapshot.EMBEDDINGS_PREFIX),
             output_schema(int(settings.model["dim"])),
             file_name_suffix=".parquet"))
    _ = (dead
         | "DeadLetterJson" >> beam.Map(lambda r: json.dumps(r, sort_keys=True))
         | "WriteDeadLetter" >> beam.io.WriteToText(
             fs.join(snapshot_dir, snapshot.DEAD_LETTER_PREFIX), file_name_suffix=".jsonl"))
    dead_reasons = dead | "DeadReasons" >> beam.Map(lambda r: f"dead:{r['stage']}/{r['error']}")
    counts = ((resolved.count, assembled.count, dead_reasons)
              | "AllOutcomes" >> beam.Flatten()
              | "Count" >> beam.combiners.Count.PerElement()
              | "Gather" >> beam.combiners.ToList()
              | "CountsJson" >> beam.Map(_counts_to_json))
    _ = counts | "WriteCounts" >> beam.Map(
        lambda text: fs.write_bytes(fs.join(snapshot_dir, COUNTS_FILE), text.encode()))


def default_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _check_previous(previous: str, fingerprint: str, merge_previous: bool) -> bool:
    """True when `previous` was embedded with the same fingerprint (its vectors are reusable)."""
    try:
        summary = snapshot.read_summary(previous)
    except snapshot.SnapshotError as e:
        raise EmbedError(f"--previous: {e}") from e
    same = summary.get("embedding_fingerprint") == fingerprint
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


def check_failure_rate(summary: dict[str, Any], max_fraction: float) -> None:
    """DeadLetterRateError when more than `max_fraction` of the input rows were
    dead-lettered, or when no row was embedded or reused at all."""
    n = summary["input_rows"]
    dead = summary[DEAD]
    fraction = dead / n if n else 1.0
    kept = summary[EMBEDDED] + summary[REUSED]
    if fraction <= max_fraction and kept > 0:
        return
    top = sorted(summary["dead_letter_reasons"].items(), key=lambda kv: (-kv[1], kv[0]))[:5]
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
              merge_previous: bool = False, verify_content: bool = False) -> dict[str, Any]:
    """Run the embed job; returns the summary (also written to <out_root>/<run_id>/summary.json).

    previous: a snapshot path to reuse unchanged vectors from (None: embed everything).
    merge_previous: keep previous rows whose image_id is not in `manifests` (backfill).
    verify_content: fetch and hash every image even when its change signal is unchanged
    (audits); see pipelines.embed.change_signal for when a vector is reused without a fetch.
    Re-running with the same run_id replaces that snapshot and nothing else; the run_id
    is checked (pipelines.core.names) before anything is deleted or written.
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
    try:
        snapshot.latest_run_id(out_root)  # a corrupted LATEST: refuse before any work
    except snapshot.SnapshotError as e:
        raise EmbedError(f"--out {out_root}: {e}; fix or remove it first") from e
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
        spec = resolve_model(config.model.handle, config.model.resolved_cache_dir(),
                             config.model.input_size)
    except ModelError as e:
        raise EmbedError(f"model: {e}") from e
    if not spec.dim:  # a TF Hub model without our metadata: ask it once
        from pipelines.model.resolve import Embedder
        dim = Embedder(spec).embed(np.zeros((1, spec.input_size, spec.input_size, 3),
                                            np.uint8)).shape[1]
        spec = dataclasses.replace(spec, dim=int(dim))
    fingerprint = embedding_fingerprint(spec, config)
    reuse = _check_previous(previous, fingerprint, merge_previous) if previous else False
    settings = EmbedSettings(model=spec.to_dict(), fetch=config.fetch, decode=config.decode,
                             augment=config.augment, features=features_dict(config.features),
                             fingerprint=fingerprint, reuse=reuse,
                             merge_previous=merge_previous, verify_content=verify_content)

    snapshot_dir = snapshot.snapshot_path(out_root, run_id)
    if previous and fs.join(previous, "") == fs.join(snapshot_dir, ""):
        raise EmbedError(f"--previous {previous} is the snapshot this run would replace")
    fs.delete_tree(snapshot_dir)  # idempotent: a re-run replaces only its own outputs
    log.info("embed %s: %d rows from %d manifest(s) -> %s (model %s, previous: %s)",
             run_id, input_rows, len(uris), snapshot_dir, spec.model_id, previous or "none")

    pipeline = make_pipeline(config, f"catalog-embed-{run_id}")
    build_pipeline(pipeline, uris, snapshot_dir, settings, previous, config)
    pipeline_started = time.time()
    with progress.report_progress("embed", input_rows, "rows", enabled=config.runner.is_direct):
        result = pipeline.run()
        result.wait_until_finish()
    pipeline_s = time.time() - pipeline_started

    counts = fs.read_json(fs.join(snapshot_dir, COUNTS_FILE))
    summary = summarize(counts, input_rows)
    summary["max_dead_letter_fraction"] = config.embed.max_dead_letter_fraction
    summary.update({
        "run_id": run_id, "snapshot": snapshot_dir, "manifests": uris,
        "previous_snapshot": previous, "merge_previous": merge_previous,
        # features ride in "model" so the index manifest carries them to serving unchanged
        "model": dict(spec.to_dict(), features=features_dict(config.features)),
        "features": features_dict(config.features),
        "model_id": spec.model_id, "dim": spec.dim,
        "embedding_fingerprint": fingerprint,
        "augment": {"views": list(config.augment.views), "mode": config.augment.mode,
                    "seed": config.augment.seed, "output_views": settings.output_view_names()},
        "decode": dataclasses.asdict(config.decode),
        "runner": config.runner.name,
        "timings": {"total_s": round(time.time() - started, 3),
                    "pipeline_s": round(pipeline_s, 3),
                    "embedded_per_s": round(summary[EMBEDDED] / pipeline_s, 2) if pipeline_s else None},
        "created_at": datetime.now(timezone.utc).isoformat(),
    })
    fs.delete_files([fs.join(snapshot_dir, COUNTS_FILE)])
    try:
        check_failure_rate(summary, config.embed.max_dead_letter_fraction)
    except DeadLetterRateError as e:
        summary["status"] = "failed"
        summary["failure"] = str(e)
        fs.write_json(fs.join(snapshot_dir, FAILED_SUMMARY_FILE), summary)  # not a snapshot
        log.error("%s", e)
        raise
    fs.write_json(fs.join(snapshot_dir, snapshot.SUMMARY_FILE), summary)  # complete from here on
    snapshot.advance_latest(out_root, run_id)
    return summary


def format_summary(s: dict[str, Any], ok: bool = True) -> str:
    """The human-readable report of a run (ok=False: a run the failure-rate guard failed)."""
    lines = [
        f"snapshot     {s['snapshot']}",
        f"model        {s['model_id']}  ({s['dim']}-d, views {'+'.join(s['augment']['views'])}"
        f", {s['augment']['mode']})",
        f"input rows   {s['input_rows']}",
        f"  embedded   {s[EMBEDDED]}",
        f"  reused     {s[REUSED]}",
        f"  dead       {s[DEAD]}",
    ]
    for reason, n in s["dead_letter_reasons"].items():
        lines.append(f"    {reason:<28} {n}")
    for key in (CARRIED, REPLACED, DROPPED):
        if s.get(key):
            lines.append(f"{key.replace('_', ' '):<13}{s[key]}")
    t = s["timings"]
    lines.append(f"time         {t['total_s']:.1f}s total, {t['pipeline_s']:.1f}s pipeline"
                 + (f", {t['embedded_per_s']:.1f} embedded images/s" if t["embedded_per_s"] else ""))
    lines.append(f"check        {s['input_rows']} = {s[EMBEDDED]} + {s[REUSED]} + {s[DEAD]}  ok")
    if not ok:
        lines.append(f"status       FAILED: {s.get('failure', 'too many rows dead-lettered')}")
    return "\n".join(lines)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", action="append", required=True, metavar="URI",
                   help="catalog manifest (CSV, JSONL or Parquet; globs allowed); repeatable")
    p.add_argument("--out", required=True, metavar="ROOT",
                   help="embeddings root; the snapshot goes to ROOT/RUN_ID/")
    p.add_argument("--previous", metavar="SNAPSHOT",
                   help="reuse unchanged vectors from this snapshot; 'latest' = ROOT/LATEST")
    p.add_argument("--merge-previous", action="store_true",
                   help="keep previous rows not in the manifest (catalog-drop backfill)")
    p.add_argument("--verify-content", action="store_true",
                   help="fetch and hash every image even when its change signal (manifest "
                        "updated_at/etag/size or file size + mtime) is unchanged")
    p.add_argument("--run-id", help="snapshot name (default: UTC timestamp); letters, digits, "
                                    "'.', '_', '-', starting with a letter or digit")
    p.add_argument("--max-dead-letter-fraction", type=float, metavar="F",
                   help="override embed.max_dead_letter_fraction: a run dead-lettering more "
                        "than this fraction of its rows fails with exit 3, LATEST unchanged")
    p.add_argument("--model", help="override model.handle")
    p.add_argument("--runner", help="override runner.name (e.g. DataflowRunner)")
    p.add_argument("--workers", type=int, help="override runner.direct_num_workers")
    p.add_argument("--json", action="store_true",
                   help="print the run summary (summary.json) as one JSON object")


def _run(args: argparse.Namespace, config: Config) -> int:
    overrides: dict[str, dict[str, Any]] = {}
    if args.model:
        overrides["model"] = {"handle": args.model}
    if args.runner:
        overrides.setdefault("runner", {})["name"] = args.runner
    if args.workers is not None:
        if args.workers < 1:
            raise UsageError("--workers must be >= 1")
        overrides.setdefault("runner", {})["direct_num_workers"] = args.workers
    if args.max_dead_letter_fraction is not None:
        if not 0 <= args.max_dead_letter_fraction <= 1:
            raise UsageError(f"--max-dead-letter-fraction must be in [0, 1], got "
                             f"{args.max_dead_letter_fraction}")
        overrides["embed"] = {"max_dead_letter_fraction": args.max_dead_letter_fraction}
    if overrides:
        config = config.replace(**overrides)
    if args.run_id is not None:
        try:
            check_segment(args.run_id, "--run-id")
        except InvalidNameError as e:
            raise UsageError(str(e)) from e
    roots = [("--out", args.out)]
    if args.previous not in (None, "latest"):
        roots.append(("--previous", args.previous))
    for what, uri in roots:
        check_uri_arg(what, uri)
    previous = args.previous
    try:
        if previous == "latest":
            previous = snapshot.latest(args.out)
            if previous is None:
                log.info("no LATEST snapshot under %s yet: embedding everything", args.out)
        summary = run_embed(args.manifest, args.out, config, run_id=args.run_id,
                            previous=previous, merge_previous=args.merge_previous,
                            verify_content=args.verify_content)
    except DeadLetterRateError as e:
        print(format_summary(e.summary, ok=False))
        print(f"catalog-search embed: {e}", file=sys.stderr)
        return PERMANENT_FAILURE_EXIT_CODE
    except (EmbedError, snapshot.SnapshotError) as e:
        print(f"catalog-search embed: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True, default=str) if args.json
          else format_summary(summary))
    return 0


COMMANDS = {"embed": Command(help="catalog manifest(s) -> embeddings snapshot (Beam RunInference)",
                             add_arguments=_add_arguments, run=_run)}
