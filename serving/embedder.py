"""The query embedder of an index version: photo bytes -> embedding with the version's own
model and the embed pipeline's decode/preprocess, loaded only when the operator trusts the
model handle the manifest names (`check_model_allowed`)."""
from __future__ import annotations

import os
import reprlib
from typing import Any, Mapping

import numpy as np

from pipelines.core.config import Config
from serving.errors import IndexLoadError, QueryError


def _normalise_handle(handle: str) -> str:
    """A model handle in a comparable form: local paths absolute and resolved."""
    handle = handle.strip()
    if handle.startswith("builtin:"):
        return handle
    from pipelines.core import filesystem as fs
    if not fs.is_local(handle):
        return handle.rstrip("/")
    return os.path.realpath(os.path.abspath(os.path.expanduser(fs.normalize(handle))))


def check_model_allowed(handle: Any, config: Config) -> str:
    """The manifest's model handle if serving may load it; IndexLoadError naming why not.

    An index artifact is data: the model it names is only loaded when the operator
    trusts it: a builtin:NAME model (our own code and the packaged weights), the
    operator's `model.handle`, or a handle listed in `serving.allowed_model_handles`.
    Anything else (a URL or directory only the manifest names) is refused unloaded.
    """
    if not isinstance(handle, str) or not handle.strip():
        raise IndexLoadError(f"the index manifest names no usable model handle ({handle!r})")
    if handle.startswith("builtin:"):
        return handle
    allowed = {_normalise_handle(h) for h in (config.model.handle,
                                              *config.serving.allowed_model_handles)}
    if _normalise_handle(handle) in allowed:
        return handle
    raise IndexLoadError(
        f"model handle {reprlib.repr(handle)} named by the index manifest is not trusted by "
        f"this server: serving loads only builtin:* models, model.handle "
        f"({config.model.handle!r}) and serving.allowed_model_handles; add the handle to "
        f"serving.allowed_model_handles (or --allow-model) if the operator trusts it")


class QueryEmbedder:
    """Photo bytes -> embedding, with the index's model and the pipeline's decode/preprocess."""

    def __init__(self, model: Mapping[str, Any], config: Config):
        from pipelines.model.resolve import (Embedder, ModelError, ModelSpec, check_same_model,
                                             resolve_model)
        if not isinstance(model, Mapping):
            raise IndexLoadError("the index manifest has no model object")
        check_model_allowed(model.get("handle"), config)
        try:
            recorded = ModelSpec.from_dict(dict(model))
        except (KeyError, TypeError) as e:
            raise IndexLoadError(f"the index manifest's model is malformed: {e}") from e
        try:
            spec = resolve_model(recorded.handle, config.model.resolved_cache_dir(),
                                 recorded.input_size)
        except Exception as e:  # ModelError, conversion errors, missing directories
            raise IndexLoadError(f"model {recorded.handle!r} of the index cannot be resolved "
                                 f"here: {e}") from e
        try:
            check_same_model(spec, recorded, "here", "the index was built with")
        except ModelError as e:
            raise IndexLoadError(f"{e}: query embeddings would not match the catalog's") from e
        self.spec = spec
        self.config = config
        # Feature variants (zoom levels, flip) the catalog was embedded with: from the index
        # manifest, never from the serving config, so queries get exactly the same treatment.
        from pipelines.model.features import features_dict
        self.features = features_dict(model.get("features"))
        # The precision the catalog was embedded in (index manifest; fp32 before the option).
        from pipelines.model.precision import PrecisionError, apply_precision
        self.precision = str(model.get("precision") or "fp32")
        try:
            apply_precision(self.precision)
        except PrecisionError as e:
            raise IndexLoadError(f"model precision of the index: {e}") from e
        self._embedder = Embedder(spec)

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    def preprocess(self, data: bytes) -> np.ndarray:
        """Query bytes -> uint8 [S,S,3] (or the zoom variants); raises QueryError with the
        decode reason.

        Uploads get the tighter limits: serving.max_query_pixels decoded pixels and the
        common photo formats only (pipelines.model.image_decode.QUERY_FORMATS).
        """
        from pipelines.model.features import load_query_arrays
        from pipelines.model.image_decode import QUERY_FORMATS, DecodeError
        try:
            return load_query_arrays(data, self.spec.input_size, self.config, self.features,
                                     max_decoded_pixels=self.config.serving.max_query_pixels,
                                     formats=QUERY_FORMATS)
        except DecodeError as e:
            raise QueryError(e.reason, f"image cannot be used: {e}") from e

    def embed_arrays(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,S,S,3] (or [N,V,S,S,3]: feature variants) -> float32 [N,dim], normalised."""
        from pipelines.model.features import embed_variants
        return embed_variants(self._embedder.embed, images)

    def embed_bytes(self, data: bytes) -> np.ndarray:
        """One photo -> float32 [dim]."""
        return self.embed_arrays(self.preprocess(data)[None])[0]

