"""Beam RunInference ModelHandler for our embedding models.

Beam's TFModelHandler* load with tf.keras.models.load_model, which cannot load a
plain SavedModel under Keras 3; this handler loads through pipelines.model.resolve.Embedder
(tf.saved_model.load / hub.load) and lets RunInference do what it is good at:
batching (BatchElements), one model per worker process (shared.Shared), metrics.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from pipelines.core import stage_timing
from pipelines.model.features import embed_variants
from pipelines.model.precision import apply_precision
from pipelines.model.resolve import (Embedder, ModelSpec, check_same_model, configure_tf_threads,
                                     resolve_model)

log = logging.getLogger(__name__)

#: Model cache of a worker image (set by docker/worker.Dockerfile, where the builtin model
#: is converted at build time); also the default cache everywhere (ModelConfig).
WORKER_CACHE_ENV = "CATALOG_SEARCH_CACHE"
#: The embed job's metrics namespace (pipelines.embed.transforms.NAMESPACE).
METRICS_NAMESPACE = "catalog_search_embed"


class _LazyEmbedder:
    """Loads the model on the first batch: a worker that only reuses vectors never loads it."""

    def __init__(self, load: Callable[[], Embedder]) -> None:
        self._load = load
        self._embedder: Embedder | None = None

    def embed(self, images: np.ndarray) -> np.ndarray:
        if self._embedder is None:
            with stage_timing.timed(METRICS_NAMESPACE, "load_model"):
                self._embedder = self._load()
        return self._embedder.embed(images)


class EmbeddingModelHandler(ModelHandler[np.ndarray, PredictionResult, _LazyEmbedder]):
    """uint8 [S,S,3] images in, L2-normalised float32 [dim] embeddings out."""

    def __init__(self, spec: ModelSpec, cache_dir: str, tf_threads: int, batch_size: int,
                 precision: str = "fp32"):
        # Full batches only (the last of a bundle may be short): Beam's adaptive sizing
        # (min 1) ran batches of 2.4 images on average in a 600-image run (model time per
        # image ~2x batch 32's; docs/BENCHMARKS.md, "where the pipeline loses time").
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._spec = spec.to_dict()
        self._precision = precision  # resolved by the launcher: every worker runs the same
        self._cache_dir = cache_dir
        self._tf_threads = tf_threads

    def load_model(self) -> _LazyEmbedder:
        return _LazyEmbedder(self._load_embedder)

    def _load_embedder(self) -> Embedder:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        configure_tf_threads(self._tf_threads)
        # process-global, before the graph is built; refused on a CPU that cannot run it
        apply_precision(self._precision)
        spec = ModelSpec.from_dict(self._spec)
        is_url = spec.path.startswith(("http://", "https://"))
        if not is_url and not os.path.isdir(spec.path):
            # A cluster worker: the launcher's cache path does not exist here, so resolve
            # (and for builtin models, convert) locally and insist on the same fingerprint.
            # The worker image's baked cache ($CATALOG_SEARCH_CACHE, docker/worker.Dockerfile)
            # comes first: the launcher's cache_dir is a path on another machine.
            cache_dir = os.environ.get(WORKER_CACHE_ENV) or self._cache_dir
            local = resolve_model(spec.handle, cache_dir,
                                  spec.input_size if not spec.handle.startswith("builtin:")
                                  else None)
            spec = check_same_model(local, spec, "on this worker", "the job expects")
        log.info("loading model %s from %s (%s)", spec.model_id, spec.path, self._precision)
        return Embedder(spec)

    def run_inference(self, batch: Sequence[np.ndarray], model: _LazyEmbedder,
                      inference_args: Optional[dict[str, Any]] = None
                      ) -> Iterable[PredictionResult]:
        # [N,S,S,3], or [N,V,S,S,3] when an image has feature variants (averaged)
        with stage_timing.timed(METRICS_NAMESPACE, "embed", size=len(batch)):
            vectors = embed_variants(model.embed, np.stack(batch))
        # The example (a whole image) is not carried on: only the vector is needed.
        return [PredictionResult(None, v, self._spec["fingerprint"][:12]) for v in vectors]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE
