"""The adapter artifact: a trained projection from model space to index space, as data.

    <adapter_dir>/adapter.json   format, id, kind, dims, base model, files (sha256, bytes),
                                 training and validation figures; written last
    <adapter_dir>/weights.npy    float32 [in_dim, out_dim] (numpy .npy, read without pickle)

`apply(raw)` = L2-normalise(raw @ weights): model-space vectors (the snapshot's, a query
photo's) to index-space vectors. An adapter is data, never code: the file list is fixed
(`weights.npy`), arrays are read with `allow_pickle=False`, and every file's sha256 and
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

FORMAT = "catalog-search-adapter/1"
MANIFEST_FILE = "adapter.json"
WEIGHTS_FILE = "weights.npy"
KIND_LINEAR = "linear"
#: The only files an adapter folder may list (nothing else is ever read from it).
KNOWN_FILES = (WEIGHTS_FILE,)
#: Folder name of the copy an index version carries.
VERSION_ADAPTER_DIR = "adapter"
# |norm - 1| allowed for the base vectors fed to apply (the snapshot contract's tolerance).
_MAX_BYTES = 1 << 30


class AdapterError(ValueError):
    """An adapter is missing, damaged, of another format or does not fit the vectors."""


def base_model_record(model: Mapping[str, Any], embedding_fingerprint: str | None) -> dict:
    """What an adapter records about the vectors it was trained on (a snapshot's model)."""
    return {"model_id": model.get("model_id"), "fingerprint": model.get("fingerprint"),
            "dim": model.get("dim"), "features": model.get("features"),
            "embedding_fingerprint": embedding_fingerprint}


def compute_id(weights: np.ndarray, kind: str, base_model: Mapping[str, Any]) -> str:
    """`linear256@<12 hex>`: sha256 of the weights' bytes, shape, kind and base fingerprint."""
    h = hashlib.sha256()
    h.update(json.dumps({"kind": kind, "shape": list(weights.shape),
                         "base": base_model.get("fingerprint")}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(weights, dtype="<f4").tobytes())
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
                "out_dim": self.out_dim, "path": VERSION_ADAPTER_DIR, "format": FORMAT,
                "files": [dict(f) for f in self.files], "base_model": dict(self.base_model),
                "validation": dict(self.validation)}

    def manifest(self) -> dict[str, Any]:
        return {"format": FORMAT, "id": self.id, "kind": self.kind, "in_dim": self.in_dim,
                "out_dim": self.out_dim, "normalize": True, "files": self.files,
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
                 weights_file: tuple[str, int] | None = None) -> Adapter:
    """An (unsaved) linear adapter from its weights [in_dim, out_dim]; `weights_file`:
    (sha256, bytes) of the weights.npy it was read from (default: as `save` writes it)."""
    w = np.ascontiguousarray(weights, dtype=np.float32)
    if w.ndim != 2 or min(w.shape) < 1 or not np.all(np.isfinite(w)):
        raise AdapterError(f"adapter weights must be a finite 2-d array, got shape {w.shape}")
    w.setflags(write=False)
    base = dict(base_model)
    if weights_file is None:
        data = _npy_bytes(w)
        weights_file = (hashlib.sha256(data).hexdigest(), len(data))
    files = [{"name": WEIGHTS_FILE, "sha256": weights_file[0], "bytes": weights_file[1],
              "shape": list(w.shape), "dtype": "float32"}]
    return Adapter(id=compute_id(w, KIND_LINEAR, base), kind=KIND_LINEAR, in_dim=w.shape[0],
                   out_dim=w.shape[1], weights=w, base_model=base, files=files,
                   training=dict(training or {}), validation=dict(validation or {}))


def _npy_bytes(w: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(w, dtype="<f4"), allow_pickle=False)
    return buf.getvalue()


def write_files(adapter: Adapter, folder: str) -> None:
    """Write weights.npy, then adapter.json, into `folder` (any filesystem)."""
    if adapter.path is not None:  # a loaded adapter: copy its file's own bytes
        data = fs.read_bytes(fs.join(adapter.path, WEIGHTS_FILE), max_bytes=_MAX_BYTES)
    else:
        data = _npy_bytes(adapter.weights)
    if hashlib.sha256(data).hexdigest() != adapter.files[0]["sha256"]:
        raise AdapterError(f"adapter {adapter.path or adapter.id}: {WEIGHTS_FILE} no longer "
                           f"matches its recorded sha256")
    fs.write_bytes(fs.join(folder, WEIGHTS_FILE), data)
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
    if kind != KIND_LINEAR:
        raise AdapterError(f"{source}: unknown adapter kind {kind!r} (this code reads "
                           f"{KIND_LINEAR!r})")
    in_dim, out_dim = _field(meta, "in_dim", int, source), _field(meta, "out_dim", int, source)
    files = _field(meta, "files", list, source)
    names = [f.get("name") if isinstance(f, dict) else None for f in files]
    if names != list(KNOWN_FILES):
        raise AdapterError(f"{source}: lists files {names!r}; an adapter holds exactly "
                           f"{list(KNOWN_FILES)}")
    entry = files[0]
    uri = fs.join(folder, WEIGHTS_FILE)
    if not fs.exists(uri):
        raise AdapterError(f"{uri}: missing (listed in {MANIFEST_FILE})")
    size = _field(entry, "bytes", int, source)
    if not 0 < size <= _MAX_BYTES:
        raise AdapterError(f"{source}: {WEIGHTS_FILE} has an invalid size {size!r}")
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
    if w.dtype != np.dtype("<f4") or w.shape != (in_dim, out_dim):
        raise AdapterError(f"{uri}: holds {w.dtype} {list(w.shape)}, {MANIFEST_FILE} says "
                           f"float32 [{in_dim}, {out_dim}]")
    if not np.all(np.isfinite(w)):
        raise AdapterError(f"{uri}: weights contain NaN or infinite values")
    base = _field(meta, "base_model", dict, source)
    training, validation = meta.get("training"), meta.get("validation")
    adapter = make_adapter(w, base, training if isinstance(training, dict) else {},
                           validation if isinstance(validation, dict) else {},
                           weights_file=(digest, len(data)))
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
