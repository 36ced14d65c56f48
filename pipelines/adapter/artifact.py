"""The adapter artifact: a trained projection from model space to index space, as data.

    <adapter_dir>/adapter.json   format, id, kind, dims, base model, files (sha256, bytes),
                                 training and validation figures; written last
    <adapter_dir>/weights.npy    float32 [in_dim, out_dim] (numpy .npy, read without pickle)
  kind "mlp" (train-adapter --hidden H) adds, in this order:
    hidden_weights.npy [in_dim, H], hidden_bias.npy [H], output_weights.npy [H, out_dim]

`apply(raw)` = L2-normalise(raw @ weights) for "linear", L2-normalise(raw @ weights +
relu(raw @ hidden_weights + hidden_bias) @ output_weights) for "mlp": model-space vectors
(the snapshot's, a query photo's) to index-space vectors. An adapter is data, never
code: the file list is fixed per kind, arrays are read with `allow_pickle=False`, and every file's sha256 and
size must match adapter.json; the id is a digest of the weights and the base model, so a
tampered adapter.json cannot keep an old id. A damaged adapter, one of another format,
or one that does not fit the vectors it is asked to project (input dimension, base model
fingerprint) is refused with an `AdapterError` naming the file.

An index version that carries an adapter holds a copy of these files under
`versions/<version>/adapter/`, and its manifest records `record()`; serving and the
delta writer load it with `load_adapter(folder, expected=record)` (the ids and checksums
must agree with the index manifest as well).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from pipelines.core import filesystem as fs
from pipelines.core.errors import BadArtifactError

FORMAT = "catalog-search-adapter/1"
MANIFEST_FILE = "adapter.json"
WEIGHTS_FILE = "weights.npy"
KIND_LINEAR = "linear"
KIND_MLP = "mlp"
#: The only files an adapter folder of each kind may list, in order (nothing else is ever
#: read from it), and the array each holds.
KNOWN_FILES = (WEIGHTS_FILE,)
MLP_FILES = (WEIGHTS_FILE, "hidden_weights.npy", "hidden_bias.npy", "output_weights.npy")
FILES_BY_KIND = {KIND_LINEAR: KNOWN_FILES, KIND_MLP: MLP_FILES}
ARRAY_OF_FILE = {WEIGHTS_FILE: "weights", "hidden_weights.npy": "hidden_weights",
                 "hidden_bias.npy": "hidden_bias", "output_weights.npy": "output_weights"}
#: Folder name of the copy an index version carries.
VERSION_ADAPTER_DIR = "adapter"
# |norm - 1| allowed for the base vectors fed to apply (the snapshot contract's tolerance).
_MAX_BYTES = 1 << 30


class AdapterError(BadArtifactError):
    """An adapter is missing, damaged, of another format or does not fit the vectors."""


def base_model_record(model: Mapping[str, Any], embedding_fingerprint: str | None) -> dict:
    """What an adapter records about the vectors it was trained on (a snapshot's model)."""
    return {"model_id": model.get("model_id"), "fingerprint": model.get("fingerprint"),
            "dim": model.get("dim"), "features": model.get("features"),
            "embedding_fingerprint": embedding_fingerprint}


def compute_id(weights: np.ndarray, kind: str, base_model: Mapping[str, Any],
               extra: Mapping[str, np.ndarray] | None = None) -> str:
    """`linear256@<12 hex>` / `mlp256@<12 hex>`: sha256 of the arrays' bytes, the weights'
    shape, kind and base fingerprint (a linear adapter's id hashes its weights alone)."""
    h = hashlib.sha256()
    h.update(json.dumps({"kind": kind, "shape": list(weights.shape),
                         "base": base_model.get("fingerprint")}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(weights, dtype="<f4").tobytes())
    for name in sorted(extra or {}):
        arr = np.ascontiguousarray((extra or {})[name], dtype="<f4")
        h.update(json.dumps({name: list(arr.shape)}).encode())
        h.update(arr.tobytes())
    return f"{kind}{weights.shape[1]}@{h.hexdigest()[:12]}"


@dataclass(frozen=True)
class Adapter:
    """A loaded, verified adapter. `apply` maps model space to index space."""
    id: str
    kind: str
    in_dim: int
    out_dim: int
    weights: np.ndarray = field(repr=False)  # float32 [in_dim, out_dim], read-only
    base_model: dict[str, Any]
    files: list[dict[str, Any]]
    training: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    # kind "mlp": hidden_weights [in_dim, H], hidden_bias [H], output_weights [H, out_dim]
    extra: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def hidden(self) -> int:
        return int(self.extra["hidden_bias"].shape[0]) if self.kind == KIND_MLP else 0

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array, by file name, in the kind's file order."""
        named = {"weights": self.weights, **self.extra}
        return {f: named[ARRAY_OF_FILE[f]] for f in FILES_BY_KIND[self.kind]}

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """float32 [N, in_dim] (or [in_dim]) model-space vectors -> L2-normalised
        [N, out_dim] (or [out_dim]) index-space vectors; AdapterError on a wrong dimension."""
        x = np.asarray(raw, dtype=np.float32)
        single = x.ndim == 1
        if single:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise AdapterError(f"adapter {self.id} takes {self.in_dim}-d model vectors, got "
                               f"shape {list(np.shape(raw))}")
        y = x @ self.weights
        if self.kind == KIND_MLP:
            h = np.maximum(x @ self.extra["hidden_weights"] + self.extra["hidden_bias"], 0.0)
            y = y + h @ self.extra["output_weights"]
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        y = np.divide(y, norms, out=np.zeros_like(y), where=norms > 0).astype(np.float32)
        return y[0] if single else y

    def check_base(self, model: Mapping[str, Any], dim: int | None, what: str) -> None:
        """AdapterError unless the adapter was trained on vectors of `model` (fingerprint)
        and `dim` (the vectors' dimension); `what` names the vectors (e.g. a snapshot)."""
        where = self.path or self.id
        if dim is not None and int(dim) != self.in_dim:
            raise AdapterError(f"adapter {where}/{MANIFEST_FILE}: takes {self.in_dim}-d "
                               f"vectors, but {what} has {dim}-d vectors")
        mine, theirs = self.base_model.get("fingerprint"), model.get("fingerprint")
        if mine and theirs and mine != theirs:
            raise AdapterError(
                f"adapter {where}/{MANIFEST_FILE}: trained on model "
                f"{self.base_model.get('model_id')} (fingerprint {str(mine)[:12]}), but {what} "
                f"was embedded with {model.get('model_id')} (fingerprint {str(theirs)[:12]})")

    def record(self) -> dict[str, Any]:
        """What an index manifest records about the adapter its version carries."""
        return {"id": self.id, "kind": self.kind, "in_dim": self.in_dim,
                "out_dim": self.out_dim, **({"hidden": self.hidden} if self.hidden else {}),
                "path": VERSION_ADAPTER_DIR, "format": FORMAT,
                "files": [dict(f) for f in self.files], "base_model": dict(self.base_model),
                "validation": dict(self.validation)}

    def manifest(self) -> dict[str, Any]:
        return {"format": FORMAT, "id": self.id, "kind": self.kind, "in_dim": self.in_dim,
                "out_dim": self.out_dim, **({"hidden": self.hidden} if self.hidden else {}),
                "normalize": True, "files": self.files,
                "base_model": self.base_model, "training": self.training,
                "validation": self.validation}


def adapter_id(adapter: Adapter | None) -> str | None:
    """The adapter's id, None for no adapter (identity: index space = model space)."""
    return adapter.id if adapter is not None else None


def apply_adapter(adapter: Adapter | None, raw: np.ndarray) -> np.ndarray:
    """Model space -> index space: `adapter.apply(raw)`, or `raw` itself when None."""
    if adapter is None:
        return np.asarray(raw, dtype=np.float32)
    return adapter.apply(raw)


def make_adapter(weights: np.ndarray, base_model: Mapping[str, Any],
                 training: Mapping[str, Any] | None = None,
                 validation: Mapping[str, Any] | None = None,
                 weights_file: tuple[str, int] | None = None,
                 extra: Mapping[str, np.ndarray] | None = None,
                 file_digests: Mapping[str, tuple[str, int]] | None = None) -> Adapter:
    """An (unsaved) adapter from its weights [in_dim, out_dim] (linear) plus, for kind
    "mlp", `extra` = {hidden_weights, hidden_bias, output_weights}. `weights_file` /
    `file_digests`: (sha256, bytes) of the files they were read from (default: as `save`
    writes them)."""
    w = _checked(weights, 2, "weights")
    kind = KIND_MLP if extra else KIND_LINEAR
    arrays: dict[str, np.ndarray] = {"weights": w}
    if extra:
        if set(extra) != {"hidden_weights", "hidden_bias", "output_weights"}:
            raise AdapterError(f"an mlp adapter needs hidden_weights, hidden_bias and "
                               f"output_weights, got {sorted(extra)}")
        w1 = _checked(extra["hidden_weights"], 2, "hidden_weights")
        b1 = _checked(extra["hidden_bias"], 1, "hidden_bias")
        w2 = _checked(extra["output_weights"], 2, "output_weights")
        if w1.shape[0] != w.shape[0] or b1.shape != (w1.shape[1],) \
                or w2.shape != (w1.shape[1], w.shape[1]):
            raise AdapterError(f"mlp adapter arrays do not fit together: weights "
                               f"{list(w.shape)}, hidden_weights {list(w1.shape)}, hidden_bias "
                               f"{list(b1.shape)}, output_weights {list(w2.shape)}")
        arrays.update(hidden_weights=w1, hidden_bias=b1, output_weights=w2)
    digests = dict(file_digests or {})
    if weights_file is not None:
        digests[WEIGHTS_FILE] = weights_file
    files = []
    for name in FILES_BY_KIND[kind]:
        arr = arrays[ARRAY_OF_FILE[name]]
        if name not in digests:
            data = _npy_bytes(arr)
            digests[name] = (hashlib.sha256(data).hexdigest(), len(data))
        files.append({"name": name, "sha256": digests[name][0], "bytes": digests[name][1],
                      "shape": list(arr.shape), "dtype": "float32"})
    base = dict(base_model)
    rest = {k: v for k, v in arrays.items() if k != "weights"}
    return Adapter(id=compute_id(w, kind, base, rest), kind=kind, in_dim=w.shape[0],
                   out_dim=w.shape[1], weights=w, base_model=base, files=files,
                   training=dict(training or {}), validation=dict(validation or {}),
                   extra=rest)


def _checked(a: np.ndarray, ndim: int, name: str) -> np.ndarray:
    w = np.ascontiguousarray(a, dtype=np.float32)
    if w.ndim != ndim or min(w.shape) < 1 or not np.all(np.isfinite(w)):
        raise AdapterError(f"adapter {name} must be a finite {ndim}-d array, got shape "
                           f"{w.shape}")
    w.setflags(write=False)
    return w


def _npy_bytes(w: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(w, dtype="<f4"), allow_pickle=False)
    return buf.getvalue()


def write_files(adapter: Adapter, folder: str) -> None:
    """Write the array files, then adapter.json, into `folder` (any filesystem)."""
    blobs = []
    for entry, (name, arr) in zip(adapter.files, adapter.arrays().items()):
        if adapter.path is not None:  # a loaded adapter: copy its files' own bytes
            data = fs.read_bytes(fs.join(adapter.path, name), max_bytes=_MAX_BYTES)
        else:
            data = _npy_bytes(arr)
        if entry["name"] != name or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise AdapterError(f"adapter {adapter.path or adapter.id}: {name} no longer "
                               f"matches its recorded sha256")
        blobs.append((name, data))
    for name, data in blobs:
        fs.write_bytes(fs.join(folder, name), data)
    fs.write_json(fs.join(folder, MANIFEST_FILE), adapter.manifest(), atomic=True)


def save_adapter(adapter: Adapter, out_dir: str) -> Adapter:
    """Write the adapter to the local folder `out_dir`, replacing what it held only once the
    new files are complete (written beside it, then swapped by renames)."""
    if not fs.is_local(out_dir):
        raise AdapterError(f"adapter folder {out_dir}: only local folders can be written")
    out = os.path.abspath(fs.normalize(out_dir))
    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staging = f"{out}.new-{tag}"
    old = f"{out}.old-{tag}"
    os.makedirs(staging)
    try:
        write_files(adapter, staging)
        load_adapter(staging)  # what was written reads back and verifies
        if os.path.exists(out):
            if os.path.isdir(out) and not os.listdir(out):
                os.rmdir(out)
            else:
                os.rename(out, old)
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return load_adapter(out)


def is_adapter(folder: str) -> bool:
    return fs.exists(fs.join(folder, MANIFEST_FILE))


def _field(d: Mapping[str, Any], name: str, kind: type | tuple[type, ...], source: str) -> Any:
    value = d.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise AdapterError(f"{source}: field {name!r} is missing or not a "
                           f"{getattr(kind, '__name__', kind)} (found {value!r:.60})")
    return value


def load_adapter(folder: str, expected: Mapping[str, Any] | None = None) -> Adapter:
    """Read and verify the adapter in `folder`; AdapterError naming the file otherwise.

    `expected`: the record an index manifest holds for it (`Adapter.record()`): id and
    file checksums must agree too.
    """
    folder = str(folder).rstrip("/") or str(folder)
    source = fs.join(folder, MANIFEST_FILE)
    if not fs.exists(source):
        raise AdapterError(f"{folder} is not an adapter folder (no {MANIFEST_FILE})")
    try:
        meta = json.loads(fs.read_bytes(source, max_bytes=1 << 20).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{source}: not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise AdapterError(f"{source}: not an adapter of format {FORMAT} (found {found!r})")
    kind = _field(meta, "kind", str, source)
    if kind not in FILES_BY_KIND:
        raise AdapterError(f"{source}: unknown adapter kind {kind!r} (this code reads "
                           f"{', '.join(repr(k) for k in FILES_BY_KIND)})")
    in_dim, out_dim = _field(meta, "in_dim", int, source), _field(meta, "out_dim", int, source)
    hidden = _field(meta, "hidden", int, source) if kind == KIND_MLP else 0
    files = _field(meta, "files", list, source)
    names = [f.get("name") if isinstance(f, dict) else None for f in files]
    if names != list(FILES_BY_KIND[kind]):
        raise AdapterError(f"{source}: lists files {names!r}; an adapter holds exactly "
                           f"{list(FILES_BY_KIND[kind])} (kind {kind})")
    shapes = {WEIGHTS_FILE: (in_dim, out_dim), "hidden_weights.npy": (in_dim, hidden),
              "hidden_bias.npy": (hidden,), "output_weights.npy": (hidden, out_dim)}
    arrays: dict[str, np.ndarray] = {}
    digests: dict[str, tuple[str, int]] = {}
    for entry, name in zip(files, names):
        arrays[ARRAY_OF_FILE[name]], digests[name] = _read_array(
            folder, source, entry, name, shapes[name])
    w = arrays.pop("weights")
    base = _field(meta, "base_model", dict, source)
    training, validation = meta.get("training"), meta.get("validation")
    adapter = make_adapter(w, base, training if isinstance(training, dict) else {},
                           validation if isinstance(validation, dict) else {},
                           extra=arrays or None, file_digests=digests)
    if adapter.id != meta.get("id"):
        raise AdapterError(f"{source}: id {meta.get('id')!r} does not match its weights and "
                           f"base model ({adapter.id})")
    if expected is not None:
        want_id = expected.get("id")
        want_files = {f.get("name"): f.get("sha256") for f in expected.get("files") or []
                      if isinstance(f, Mapping)}
        have_files = {f["name"]: f["sha256"] for f in adapter.files}
        if want_id != adapter.id or want_files != have_files:
            raise AdapterError(f"{source}: adapter {adapter.id} does not match the one the "
                               f"index manifest records ({want_id!r})")
    return Adapter(**{**adapter.__dict__, "path": folder})


def _read_array(folder: str, source: str, entry: dict, name: str, shape: tuple[int, ...]
                ) -> tuple[np.ndarray, tuple[str, int]]:
    """One listed .npy file, verified against its entry (size, sha256) and `shape`."""
    uri = fs.join(folder, name)
    if not fs.exists(uri):
        raise AdapterError(f"{uri}: missing (listed in {MANIFEST_FILE})")
    size = _field(entry, "bytes", int, source)
    if not 0 < size <= _MAX_BYTES:
        raise AdapterError(f"{source}: {name} has an invalid size {size!r}")
    try:
        data = fs.read_bytes(uri, max_bytes=size)
    except fs.TooLargeError:
        raise AdapterError(f"{uri}: damaged: larger than the {size} bytes {MANIFEST_FILE} "
                           f"says") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != size or digest != _field(entry, "sha256", str, source):
        raise AdapterError(f"{uri}: damaged: sha256 {digest[:12]} / {len(data)} bytes, "
                           f"{MANIFEST_FILE} says {str(entry.get('sha256'))[:12]} / {size} bytes")
    try:
        w = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise AdapterError(f"{uri}: not a numpy array file: {e}") from e
    if w.dtype != np.dtype("<f4") or w.shape != shape:
        raise AdapterError(f"{uri}: holds {w.dtype} {list(w.shape)}, {MANIFEST_FILE} says "
                           f"float32 {list(shape)}")
    if not np.all(np.isfinite(w)):
        raise AdapterError(f"{uri}: weights contain NaN or infinite values")
    return w, (digest, len(data))


def load_for_version(version_dir: str, record: Mapping[str, Any] | None) -> Adapter | None:
    """The adapter an index version carries (None when its manifest records none).

    `record`: the manifest's "adapter" entry; the copy lies in `<version_dir>/adapter/`.
    """
    if record is None:
        return None
    if not isinstance(record, Mapping) or record.get("path") != VERSION_ADAPTER_DIR:
        raise AdapterError(f"{fs.join(version_dir, 'manifest.json')}: malformed adapter "
                           f"record {record!r:.100}")
    return load_adapter(fs.join(version_dir, VERSION_ADAPTER_DIR), expected=record)


def copy_into_version(adapter: Adapter, version_dir: str) -> str:
    """Write the adapter's files into `<version_dir>/adapter/`; returns that folder."""
    dest = fs.join(version_dir, VERSION_ADAPTER_DIR)
    write_files(adapter, dest)
    return dest
