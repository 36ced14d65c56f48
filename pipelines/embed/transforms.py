"""The embed job's Beam graph: the DoFns and `build_pipeline` (see pipelines/embed/job.py,
which plans a run, runs this graph and writes the summary). The graph, and why reused
vectors stay in Arrow, are drawn once, in docs/ARCHITECTURE.md ("embed").
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.utils.windowed_value import WindowedValue

from pipelines.core import filesystem as fs
from pipelines.core import progress
from pipelines.core import stage_timing
from pipelines.core.config import AugmentConfig, Config, DecodeConfig, FetchConfig
from pipelines.embed import snapshot
from pipelines.embed.change_signal import (SIGNAL_COLUMN, reuse_without_fetch, row_signal,
                                           same_views)
from pipelines.embed.fetch import FetchError, fetch_bytes
from pipelines.embed.inflight import InFlight
from pipelines.embed.manifest import ManifestLimits, read_rows
from pipelines.embed.reuse import CopyReused, ReadPreviousRows, copy_record, output_schema
from pipelines.model.features import preprocess_feature_views
from pipelines.model.image_decode import DecodeError, decode_image
from pipelines.model.inference import EmbeddingModelHandler
from pipelines.model.resolve import ModelSpec

log = logging.getLogger(__name__)
NAMESPACE = "catalog_search_embed"
COUNTS_FILE = "_counts.json"
PROGRESS_EVERY = 200

# Outcome counters; every input row ends in exactly one of the first three.
EMBEDDED, REUSED, DEAD = "embedded", "reused", "dead_lettered"
CARRIED, DROPPED, REPLACED = "carried_forward", "dropped_from_previous", "replaced_existing"


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
    """Per image_id: pick the winning row, fetch, hash, and reuse or send to decode.

    The slow part of each element (its change-signal lookup and its fetch) runs on the
    worker's fetch threads, up to `fetch.concurrency` elements at once (see
    pipelines/embed/inflight.py); each element's outputs are emitted as it finishes,
    within the bundle that read it, in the element's window. concurrency 1: inline."""

    def __init__(self, settings: EmbedSettings):
        self.s = settings
        self._inflight: InFlight | None = None

    def start_bundle(self):
        if self._inflight is not None:  # a failed bundle's calls: never emitted
            self._inflight.discard()
        self._inflight = InFlight(self.s.fetch.concurrency)

    def process(self, element, window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam):
        image_id, groups = element
        current = sorted(groups["current"], key=lambda r: r["order"])
        previous = list(groups["previous"])  # read here: grouped values belong to this thread
        assert self._inflight is not None
        self._inflight.submit(self._resolve, (image_id, current, previous),
                              tag=(window, timestamp))
        yield from self._emit(self._inflight.ready())

    def finish_bundle(self):
        assert self._inflight is not None
        yield from self._emit(self._inflight.drain())

    @staticmethod
    def _emit(results):
        for (window, timestamp), (outputs, counters, ticks, timer) in results:
            stage_timing.record(NAMESPACE, "resolve", timer)
            for name, n in counters:
                Metrics.counter(NAMESPACE, name).inc(n)
            progress.tick(ticks)
            for tag, value in outputs:
                windowed = WindowedValue(value, timestamp, (window,))
                yield windowed if tag is None else beam.pvalue.TaggedOutput(tag, windowed)

    def _resolve(self, args):
        """_resolve_element's results and how long it took (a stage_timing.Timer).
        Runs on a fetch thread: no Beam calls here (metrics are counted where emitted)."""
        timer = stage_timing.Timer()
        outputs, counters, ticks = self._resolve_element(args)
        return outputs, counters, ticks, timer.stop()

    def _resolve_element(self, args
                         ) -> tuple[list[tuple[str | None, Any]], list[tuple[str, int]], int]:
        """One element's outputs as (tag or None, value), Beam counters, progress ticks."""
        image_id, current, previous = args
        out: list[tuple[str | None, Any]] = []
        counters: list[tuple[str, int]] = []
        if not current:
            if previous and self.s.merge_previous:
                out.append(("count", CARRIED))
                out.extend((None, copy_record(p, {})) for p in previous)
            elif previous:
                out.append(("count", DROPPED))
            return out, counters, 0
        winner = current[-1]
        for dup in current[:-1]:
            out.append(("dead", _dead_letter(
                dup, "manifest", "duplicate_image_id",
                f"{dup['source']}: image_id {image_id!r} appears again at {winner['source']}; "
                "the later row wins")))
        if previous and self.s.merge_previous:
            out.append(("count", REPLACED))
        views = self.s.output_view_names()
        signal = row_signal(winner)  # before fetching: a change after it is seen next run
        if self.s.reuse and reuse_without_fetch(signal, previous, views, self.s.verify_content):
            self._reuse(out, counters, winner, previous, signal, "reused_without_fetch")
            return out, counters, len(current)
        out.append(("count", "fetched"))
        try:
            data = fetch_bytes(winner["image_uri"], self.s.fetch)
        except FetchError as e:
            out.append(("dead", _dead_letter(winner, "fetch", e.reason, str(e))))
            return out, counters, len(current)
        counters.append(("bytes_fetched", len(data)))
        sha = hashlib.sha256(data).hexdigest()
        if (self.s.reuse and previous and same_views(previous, views)
                and all(p["content_sha256"] == sha for p in previous)):
            self._reuse(out, counters, winner, previous, signal, "reused_after_hash")
            return out, counters, len(current)
        info = {k: winner[k] for k in ("image_id", "product_id", "image_uri", "source")}
        info["metadata"] = json.dumps(winner["metadata"], sort_keys=True)
        info["content_sha256"] = sha
        info[SIGNAL_COLUMN] = signal
        out.append(("decode", (info, data)))
        return out, counters, len(current)

    @staticmethod
    def _reuse(out: list, counters: list, winner: dict[str, Any],
               previous: list[dict[str, Any]], signal: str | None, how: str) -> None:
        """The previous rows of an unchanged image, with the winning row's catalog fields."""
        counters.append((REUSED, 1))
        out.append(("count", REUSED))
        out.append(("count", how))
        fields = {"product_id": winner["product_id"], "image_uri": winner["image_uri"],
                  "metadata": json.dumps(winner["metadata"], sort_keys=True),
                  SIGNAL_COLUMN: signal}
        out.extend((None, copy_record(p, fields)) for p in previous)


class DecodeViews(beam.DoFn):
    """(row info, bytes) -> ((image_id, view), uint8 image) per view; row info keyed by id."""

    def __init__(self, settings: EmbedSettings):
        self.s = settings
        self.size = int(settings.model["input_size"])
        self._decoded = 0

    def process(self, element):
        info, data = element
        with stage_timing.timed(NAMESPACE, "decode"):  # not the fused stages downstream
            outputs = list(self._decode(info, data))
        yield from outputs

    def _decode(self, info: dict[str, Any], data: bytes):
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
        with stage_timing.timed(NAMESPACE, "assemble"):
            outputs = list(self._assemble(element))
        yield from outputs

    def _assemble(self, element):
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
            | "ReadRows" >> beam.FlatMapTuple(read_rows, limits=ManifestLimits.of(config))
            | "Spread" >> beam.Reshuffle())
    valid = rows | "Validate" >> beam.ParDo(SplitValid()).with_outputs("dead", main="valid")

    if previous:
        prev = (p
                | "ListPrevious" >> beam.Create(snapshot.embedding_files(previous))
                | "SpreadPrevious" >> beam.Reshuffle()
                | "ReadPrevious" >> beam.ParDo(ReadPreviousRows()))
    else:
        prev = p | "NoPrevious" >> beam.Create([])

    resolved = ({"current": valid.valid, "previous": prev}
                | "JoinPrevious" >> beam.CoGroupByKey()
                | "Resolve" >> beam.ParDo(ResolveImage(settings)).with_outputs(
                    "dead", "decode", "count", main="reused"))
    _ = (resolved.reused
         | "GroupByPreviousFile" >> beam.GroupByKey()
         | "CopyReused" >> beam.ParDo(CopyReused(snapshot_dir, int(settings.model["dim"]))))
    decoded = (resolved.decode
               | "Decode" >> beam.ParDo(DecodeViews(settings)).with_outputs(
                   "dead", "info", main="images"))

    spec = ModelSpec.from_dict(settings.model)
    handler = EmbeddingModelHandler(spec, config.model.resolved_cache_dir(),
                                    config.runner.tf_threads, config.model.batch_size,
                                    precision=settings.model.get("precision", "fp32"))
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

    dead = ((valid.dead, resolved.dead, decoded.dead, assembled.dead)
            | "AllDead" >> beam.Flatten())
    _ = (assembled.rows
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
