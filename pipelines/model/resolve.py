"""Embedding models behind one interface: a handle in, L2-normalised float32 vectors out.

A handle is `builtin:efficientnet_lite0` (or `_lite1`, `_lite2`: ImageNet weights converted by
our code into a SavedModel cached locally on first use), a SavedModel directory (local, or an object
store URI such as gs://bucket/model, e.g. from `catalog-search model export`), or a TF Hub
URL (hub.load; works wherever the URL is reachable or cached via TFHUB_CACHE_DIR).

`resolve_model` is cheap and runs in the launcher (it fixes the fingerprint, input
size and preprocessing recorded in snapshots and index manifests); `Embedder` loads
the graph and runs in each worker process, and in serving.

Preprocessing contract: images arrive as uint8 [N, S, S, 3] RGB (see
pipelines.model.image_decode); the embedder computes (x - mean) / std in float32 and
calls the model; the output is L2-normalised.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from pipelines.core.checksums import update_from_file
from pipelines.core.errors import BadInputError

BUILTIN_PREFIX = "builtin:"
# Written into every SavedModel we produce (and read back for local directories).
METADATA_FILE = "catalog_search_model.json"
# TF Hub image models take float inputs in [0, 1].
HUB_MEAN, HUB_STD = 0.0, 255.0


class ModelError(BadInputError):
    """A model handle cannot be resolved or loaded."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything a stage needs to know about a model, without loading TensorFlow graphs."""
    handle: str          # as configured
    path: str            # what to load: a local SavedModel directory or a TF Hub URL
    input_size: int      # square side in pixels
    mean: float          # preprocessing: (x - mean) / std on 0..255 RGB
    std: float
    dim: int             # embedding size (0 = not known until the model is loaded)
    fingerprint: str     # sha256: changes whenever the embeddings would change

    @property
    def name(self) -> str:
        if self.handle.startswith(BUILTIN_PREFIX):
            return self.handle[len(BUILTIN_PREFIX):]
        return os.path.basename(self.handle.rstrip("/")) or "model"

    @property
    def model_id(self) -> str:
        return f"{self.name}@{self.fingerprint[:12]}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_id"] = self.model_id
        d["preprocessing"] = {"input_size": self.input_size, "mean": self.mean, "std": self.std,
                              "color": "RGB", "dtype_in": "uint8"}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def resolve_model(handle: str, cache_dir: str, input_size: int | None = None) -> ModelSpec:
    """Turn a handle into a ModelSpec; converts the builtin model into the cache if needed.

    Local or object-store SavedModel directories take their input size, normalisation and
    dim from assets/catalog_search_model.json when present, else from the static shapes
    of their `serving_default` signature (input size 224 and dim 0 when those are dynamic).
    """
    if handle.startswith(BUILTIN_PREFIX):
        name = handle[len(BUILTIN_PREFIX):]
        from pipelines.model.efficientnet_lite import ensure_saved_model
        from pipelines.model.lite_layers import VARIANTS
        if name not in VARIANTS:
            raise ModelError(f"unknown builtin model {handle!r}; available: "
                             + ", ".join(BUILTIN_PREFIX + m for m in sorted(VARIANTS)))
        path = ensure_saved_model(cache_dir, name)
        meta = _read_metadata(path)
        assert meta is not None  # required=True raises instead of returning None
        if input_size is not None and input_size != meta["input_size"]:
            raise ModelError(f"{handle} takes {meta['input_size']}px inputs; "
                             f"model.input_size={input_size} is not supported")
        return ModelSpec(handle=handle, path=path, input_size=int(meta["input_size"]),
                         mean=float(meta["mean"]), std=float(meta["std"]),
                         dim=int(meta["dim"]), fingerprint=meta["fingerprint"])
    if handle.startswith(("http://", "https://")):
        size = input_size or 224
        fp = hashlib.sha256(f"{handle}|{size}".encode()).hexdigest()
        return ModelSpec(handle=handle, path=handle, input_size=size, mean=HUB_MEAN, std=HUB_STD,
                         dim=0, fingerprint=fp)
    if _is_remote(handle):
        path = handle.rstrip("/")
    else:
        from pipelines.core import filesystem
        path = os.path.abspath(os.path.expanduser(filesystem.normalize(handle)))
    if not _saved_model_exists(path):
        raise ModelError(f"model handle {handle!r} is neither a builtin:NAME, an http(s) TF Hub "
                         f"URL, nor a SavedModel directory (no saved_model.pb in {path})")
    meta = _read_metadata(path, required=False) or {}
    _refuse_stale_conversion(handle, meta)
    sig_size, sig_dim = (None, 0) if "input_size" in meta and "dim" in meta \
        else _signature_shapes(path)
    meta_size = meta.get("input_size") or sig_size
    if input_size is not None and meta_size is not None and input_size != int(meta_size):
        raise ModelError(f"{handle} takes {meta_size}px inputs (fixed in its signature or "
                         f"metadata); model.input_size={input_size} is not supported")
    size = input_size or int(meta_size or 224)
    mean = float(meta.get("mean", HUB_MEAN))
    std = float(meta.get("std", HUB_STD))
    fp = hashlib.sha256(f"{_hash_dir(path)}|{size}|{mean}|{std}".encode()).hexdigest()
    return ModelSpec(handle=handle, path=path, input_size=size, mean=mean, std=std,
                     dim=int(meta.get("dim", sig_dim) or 0), fingerprint=fp)


def check_same_model(found: ModelSpec, recorded: ModelSpec, where: str, recorded_by: str
                     ) -> ModelSpec:
    """`found` (the recorded model's handle resolved `where`) when it has the fingerprint
    `recorded` holds, else ModelError: its vectors would not match the recorded ones.
    `recorded_by` names who recorded it ("the job expects", "the index was built with")."""
    if found.fingerprint != recorded.fingerprint:
        raise ModelError(f"model {recorded.handle!r} resolves to fingerprint "
                         f"{found.fingerprint[:12]} {where}, but {recorded_by} "
                         f"{recorded.fingerprint[:12]}")
    return found


# Builtin conversions older than this abort inside TensorFlow where oneDNN is on (see
# pipelines/model/efficientnet_lite.py): an exported copy of one must be exported again.
MIN_CONVERTER_VERSION = 3


def _refuse_stale_conversion(handle: str, meta: dict[str, Any]) -> None:
    version = meta.get("converter_version")
    if isinstance(version, int) and version < MIN_CONVERTER_VERSION:
        raise ModelError(
            f"{handle} holds {meta.get('name', 'a builtin model')} from converter version "
            f"{version}, whose graph aborts TensorFlow on CPUs where oneDNN is on; export it "
            f"again with `catalog-search model export --handle builtin:"
            f"{meta.get('name', 'efficientnet_lite0')} --out DIR`")


def _is_remote(path: str) -> bool:
    from pipelines.core import filesystem
    return not filesystem.is_local(path)


def _saved_model_exists(path: str) -> bool:
    if _is_remote(path):
        from pipelines.core import filesystem
        return filesystem.exists(path + "/saved_model.pb")
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def _list_files(path: str) -> list[str]:
    """Relative paths ("/"-separated, sorted) of every file under a local or remote dir."""
    if _is_remote(path):
        from pipelines.core import filesystem
        prefix = path.rstrip("/") + "/"
        return sorted(uri[len(prefix):] for uri in filesystem.match(prefix + "**"))
    rels = []
    for root, _dirs, files in os.walk(path):
        rels += [os.path.relpath(os.path.join(root, n), path).replace(os.sep, "/") for n in files]
    return sorted(rels)


def _hash_dir(path: str) -> str:
    """sha256 over the relative paths and contents of every file of a (local or remote) dir."""
    h = hashlib.sha256()
    for rel in _list_files(path):
        h.update(rel.encode())
        if _is_remote(path):
            from pipelines.core import filesystem
            h.update(filesystem.read_bytes(f"{path.rstrip('/')}/{rel}"))
            continue
        update_from_file(h, os.path.join(path, *rel.split("/")))
    return h.hexdigest()


def local_model_dir(spec: ModelSpec) -> str:
    """A local directory holding the spec's SavedModel: remote ones are copied once per machine.

    TensorFlow cannot open every Beam FileSystems scheme, so a SavedModel on an object store
    is downloaded through pipelines.core.filesystem into the temp dir, checked against the spec's
    fingerprint (the model must not change between launch and load), and reused by later
    loads on the same machine.
    """
    if not _is_remote(spec.path):
        return spec.path
    from pipelines.core import filesystem
    root = os.path.join(tempfile.gettempdir(), "catalog-search-models")
    dest = os.path.join(root, spec.fingerprint[:32])
    if os.path.isfile(os.path.join(dest, "saved_model.pb")):
        return dest
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=root)
    try:
        for rel in _list_files(spec.path):
            target = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(filesystem.read_bytes(f"{spec.path}/{rel}"))
        got = hashlib.sha256(f"{_hash_dir(tmp)}|{spec.input_size}|{spec.mean}|{spec.std}"
                             .encode()).hexdigest()
        if got != spec.fingerprint:
            raise ModelError(f"SavedModel at {spec.path} changed since it was resolved "
                             f"(fingerprint {got[:12]}, expected {spec.fingerprint[:12]})")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.isfile(os.path.join(dest, "saved_model.pb")):
                raise
            # another process finished the same download first: use its copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _read_metadata(path: str, required: bool = True) -> dict[str, Any] | None:
    if _is_remote(path):
        from pipelines.core import filesystem
        meta_uri = f"{path}/assets/{METADATA_FILE}"
        if filesystem.exists(meta_uri):
            return filesystem.read_json(meta_uri)
        if required:
            raise ModelError(f"{path} lacks assets/{METADATA_FILE}")
        return None
    meta_path = os.path.join(path, "assets", METADATA_FILE)
    if not os.path.exists(meta_path):
        if required:
            raise ModelError(f"{path} lacks assets/{METADATA_FILE}")
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ModelError(f"{meta_path} is not valid JSON: {e}") from None


def _signature_shapes(path: str) -> tuple[int | None, int]:
    """(square input side, output dim) from the static shapes of `serving_default`, if fixed.

    Reads only saved_model.pb (no variables); (None, 0) where a size is dynamic or unknown.
    """
    from tensorflow.core.protobuf import saved_model_pb2
    if _is_remote(path):
        from pipelines.core import filesystem
        data = filesystem.read_bytes(path + "/saved_model.pb")
    else:
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            data = f.read()
    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise ModelError(f"{path}/saved_model.pb cannot be parsed: {e}") from None
    sig = next((mg.signature_def["serving_default"] for mg in proto.meta_graphs
                if "serving_default" in mg.signature_def), None)
    if sig is None or len(sig.inputs) != 1:
        return None, 0
    in_dims = [d.size for d in next(iter(sig.inputs.values())).tensor_shape.dim]
    size = in_dims[1] if len(in_dims) == 4 and in_dims[1] == in_dims[2] and in_dims[1] > 0 \
        else None
    outputs = dict(sig.outputs)
    out = outputs.get("embedding") or (next(iter(outputs.values())) if len(outputs) == 1 else None)
    out_dims = [d.size for d in out.tensor_shape.dim] if out is not None else []
    dim = out_dims[-1] if len(out_dims) == 2 and out_dims[-1] > 0 else 0
    return size, dim


def configure_tf_threads(threads: int) -> None:
    """Limit TF's thread pools (0 = TF default). Must run before TF executes any op."""
    if threads <= 0:
        return
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TF already initialised in this process: keep its settings


def _signature_caller(fn: Any, handle: str) -> Callable[[Any], Any] | None:
    """Wrap a signature function (keyword inputs, dict outputs) as `x -> embedding`.

    None when the signature is ambiguous: several inputs, or several outputs none of
    which is named "embedding".
    """
    _args, kwargs = fn.structured_input_signature
    outputs = fn.structured_outputs
    if len(kwargs) != 1 or not isinstance(outputs, dict) or not outputs:
        return None
    (input_name, input_spec), = kwargs.items()
    if "embedding" in outputs:
        output_name = "embedding"
    elif len(outputs) == 1:
        output_name = next(iter(outputs))
    else:
        return None
    dtype = input_spec.dtype

    def call(x: Any) -> Any:
        import tensorflow as tf
        return fn(**{input_name: tf.cast(x, dtype)})[output_name]

    return call


def _model_caller(obj: Any, handle: str) -> Callable[[Any], Any]:
    """`x -> raw model output` for a loaded SavedModel / TF Hub object."""
    sigs = getattr(obj, "signatures", None) or {}
    if "serving_default" in sigs:
        call = _signature_caller(sigs["serving_default"], handle)
        if call is not None:
            return call
    if callable(obj):
        return obj
    if "serving_default" in sigs:
        fn = sigs["serving_default"]
        raise ModelError(f"{handle}: serving_default takes {sorted(fn.structured_input_signature[1])}"
                         f" and returns {sorted(fn.structured_outputs)}; need one input and one "
                         f"output (or an output named 'embedding'), and the model is not callable")
    raise ModelError(f"{handle}: SavedModel is neither callable nor has a serving_default "
                     f"signature (signatures: {sorted(sigs) or 'none'})")


class Embedder:
    """Loaded model: `embed(uint8 [N,S,S,3]) -> float32 [N,dim]`, L2-normalised.

    Works for our builtin SavedModel, any SavedModel directory (a saved tf.Module,
    Keras `model.export`, ...) and TF Hub handles: it calls the `serving_default`
    signature (by its input name; the "embedding" output or the only one), else the
    callable module. 4-D outputs are average-pooled over space.
    """

    def __init__(self, spec: ModelSpec):
        import tensorflow as tf
        self.spec = spec
        try:
            if spec.path.startswith(("http://", "https://")):
                import tensorflow_hub as hub
                obj = hub.load(spec.path)
            else:
                obj = tf.saved_model.load(local_model_dir(spec))
        except (OSError, ValueError, tf.errors.OpError) as e:
            raise ModelError(f"cannot load model {spec.handle!r} from {spec.path}: {e}") from e
        self._module = obj  # keeps the variables alive
        call = _model_caller(obj, spec.handle)
        mean, std = np.float32(spec.mean), np.float32(spec.std)

        @tf.function(reduce_retracing=True)
        def _embed(images: Any) -> Any:
            x = (tf.cast(images, tf.float32) - mean) / std
            y = call(x)
            if isinstance(y, dict):
                y = y["embedding"] if "embedding" in y else next(iter(y.values()))
            y = tf.cast(y, tf.float32)
            if y.shape.rank == 4:
                y = tf.reduce_mean(y, axis=[1, 2])
            y = tf.reshape(y, [tf.shape(images)[0], -1])
            return tf.math.l2_normalize(y, axis=1)

        self._embed = _embed

    def embed(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised float32 [N, dim] embeddings of uint8 RGB images [N, S, S, 3]."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 [N,H,W,3] images, got shape {images.shape}")
        s = self.spec.input_size
        if images.shape[1:3] != (s, s):
            raise ValueError(f"expected {s}x{s} images for {self.spec.handle}, "
                             f"got {images.shape[1]}x{images.shape[2]}")
        out = self._embed(images).numpy()
        if self.spec.dim and out.shape[1] != self.spec.dim:
            raise ModelError(f"{self.spec.handle} returned {out.shape[1]}-d embeddings; "
                             f"its spec says dim={self.spec.dim}")
        return out
