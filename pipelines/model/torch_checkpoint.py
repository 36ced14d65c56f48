"""Read PyTorch state-dict checkpoints into numpy arrays without torch and without running code.

`torch.load` unpickles arbitrary objects, so a checkpoint file can execute code. This reader
uses a restricted unpickler that resolves only the handful of globals a plain state dict
needs (an OrderedDict, the tensor-rebuild helpers, the `torch.*Storage` dtype markers) and
refuses everything else with a `CheckpointError` naming the forbidden global.

Two on-disk formats are understood:

* legacy (torch < 1.6, `_use_new_zipfile_serialization=False`): five consecutive pickles
  (magic number, protocol version, sys info, the state dict with persistent storage ids,
  the list of storage keys) followed by each storage's raw bytes, every one prefixed by its
  element count as an 8-byte little-endian integer;
* zip (torch >= 1.6): `<archive>/data.pkl` plus one raw file `<archive>/data/<key>` per storage.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from pipelines.core.errors import BadArtifactError

logger = logging.getLogger(__name__)

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch storage class name -> numpy dtype of its elements (little-endian on disk).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    # bfloat16 has no numpy dtype: kept as its raw 16-bit pattern, widened on materialising.
    "BFloat16Storage": np.dtype("<u2"),
}


class CheckpointError(BadArtifactError):
    """A checkpoint file is malformed, truncated, or asks for something a state dict never needs."""


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for a `torch.*Storage` class: only its name and element dtype matter."""
    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclass(frozen=True, slots=True)
class _StorageRef:
    """A (view of a) storage named by a persistent id; bytes are attached after unpickling."""
    key: str
    storage_type: _StorageType
    numel: int
    view_offset: int = 0   # legacy storage views: element offset into the root storage


@dataclass(frozen=True, slots=True)
class _PendingTensor:
    """A tensor whose storage bytes have not been read yet (`_rebuild_tensor_v2` arguments)."""
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> _PendingTensor:
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(f"_rebuild_tensor_v2: expected a storage, got {type(storage).__name__}")
    try:
        size_t = tuple(int(s) for s in size)
        stride_t = tuple(int(s) for s in stride)
        offset = int(storage_offset)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"_rebuild_tensor_v2: bad size/stride/offset ({e})") from None
    if len(size_t) != len(stride_t) or offset < 0 or any(s < 0 for s in size_t + stride_t):
        raise CheckpointError(f"_rebuild_tensor_v2: inconsistent size {size_t} / stride "
                              f"{stride_t} / offset {offset}")
    return _PendingTensor(storage, offset, size_t, stride_t)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       *state: Any) -> Any:
    if not isinstance(data, _PendingTensor):
        raise CheckpointError(f"_rebuild_parameter: expected a tensor, got {type(data).__name__}")
    return data


def _ordered_dict(*args: Any) -> OrderedDict:
    return OrderedDict(*args)


# (module, name) -> the harmless object the restricted unpickler hands out for it.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_ALLOWED_GLOBALS` and torch storage persistent ids."""

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file, encoding="utf-8")
        self.source = source
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.source}: refusing to load global {module}.{name}: a plain PyTorch "
                f"state dict only needs collections.OrderedDict, torch._utils._rebuild_tensor_v2"
                f" / _rebuild_parameter and torch.*Storage") from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            kind = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
            raise CheckpointError(f"{self.source}: unsupported persistent id {kind!r} (only "
                                  f"tensor storages are supported; whole pickled modules are not)")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], pid[4]
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{self.source}: malformed storage id for key {key!r}")
        root = self.storages.get(key)
        if root is None:
            root = _StorageRef(key, storage_type, numel)
            self.storages[key] = root
        elif root.storage_type != storage_type or root.numel != numel:
            raise CheckpointError(f"{self.source}: storage {key!r} declared twice with "
                                  f"different type or size")
        if view is None:
            return root
        try:
            _view_key, view_offset, view_numel = view
            view_offset, view_numel = int(view_offset), int(view_numel)
        except (TypeError, ValueError):
            raise CheckpointError(f"{self.source}: malformed storage view of {key!r}") from None
        if view_offset < 0 or view_numel < 0 or view_offset + view_numel > numel:
            raise CheckpointError(f"{self.source}: storage view of {key!r} out of bounds")
        return _StorageRef(key, storage_type, view_numel, view_offset)


def _materialise(name: str, t: _PendingTensor, data: dict[str, np.ndarray],
                 source: str) -> np.ndarray:
    root = data.get(t.storage.key)
    if root is None:
        raise CheckpointError(f"{source}: tensor {name!r} uses storage {t.storage.key!r} "
                              f"whose bytes are missing")
    flat = root[t.storage.view_offset:t.storage.view_offset + t.storage.numel]
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) if all(t.size) else -1
    if last >= flat.size or (0 in t.size and t.offset > flat.size):
        raise CheckpointError(f"{source}: tensor {name!r} (offset {t.offset}, size {t.size}, "
                              f"stride {t.stride}) reaches past its storage of "
                              f"{flat.size} elements")
    if 0 in t.size:
        arr = np.zeros(t.size, dtype=flat.dtype)
    else:
        itemsize = flat.dtype.itemsize
        arr = np.lib.stride_tricks.as_strided(
            flat[t.offset:], shape=t.size, strides=tuple(s * itemsize for s in t.stride),
            writeable=False).copy()
    if t.storage.storage_type.name == "BFloat16Storage":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr  # a fresh C-contiguous copy (ascontiguousarray would turn 0-d into 1-d)


def _to_arrays(obj: Any, data: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: top-level object is a {type(obj).__name__}, "
                              f"not a state dict")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # common {"state_dict": ..., "epoch": ...} wrapper
    out: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if isinstance(value, _PendingTensor):
            out[str(name)] = _materialise(str(name), value, data, source)
        else:
            logger.debug("%s: skipping non-tensor entry %r", source, name)
    return out


def _read_exact(f: BinaryIO, n: int, what: str, source: str) -> bytes:
    buf = f.read(n)
    if len(buf) != n:
        raise CheckpointError(f"{source}: file is truncated: expected {n} bytes of {what}, "
                              f"got {len(buf)}")
    return buf


def _load_pickle(f: BinaryIO, what: str, source: str) -> Any:
    try:
        return _RestrictedUnpickler(f, source).load()
    except CheckpointError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, struct.error) as e:
        raise CheckpointError(f"{source}: cannot read the {what} pickle "
                              f"(truncated or not a PyTorch checkpoint): {e}") from None


def _load_legacy(f: BinaryIO, source: str) -> dict[str, np.ndarray]:
    magic = _load_pickle(f, "magic number", source)
    if magic != LEGACY_MAGIC_NUMBER:
        raise CheckpointError(f"{source}: not a PyTorch checkpoint (bad magic number)")
    protocol = _load_pickle(f, "protocol version", source)
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise CheckpointError(f"{source}: unsupported legacy protocol version {protocol!r}")
    sys_info = _load_pickle(f, "sys info", source)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise CheckpointError(f"{source}: big-endian checkpoints are not supported")
    unpickler = _RestrictedUnpickler(f, source)
    try:
        state = unpickler.load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{source}: cannot read the state-dict pickle "
                              f"(truncated or corrupt): {e}") from None
    keys = _load_pickle(f, "storage keys", source)
    if not isinstance(keys, list):
        raise CheckpointError(f"{source}: storage key list is a {type(keys).__name__}")
    remaining = _remaining_bytes(f)
    data: dict[str, np.ndarray] = {}
    for key in map(str, keys):
        ref = unpickler.storages.get(key)
        if ref is None:
            raise CheckpointError(f"{source}: storage {key!r} listed but never referenced")
        (numel,) = struct.unpack("<q", _read_exact(f, 8, f"storage {key!r} header", source))
        remaining -= 8
        nbytes = numel * ref.storage_type.dtype.itemsize
        if numel != ref.numel or nbytes > remaining:
            raise CheckpointError(
                f"{source}: storage {key!r} declares {numel} elements (expected {ref.numel}); "
                f"{remaining} bytes left in the file: truncated or corrupt")
        data[key] = np.frombuffer(_read_exact(f, nbytes, f"storage {key!r}", source),
                                  dtype=ref.storage_type.dtype)
        remaining -= nbytes
    return _to_arrays(state, data, source)


def _remaining_bytes(f: BinaryIO) -> int:
    here = f.tell()
    end = f.seek(0, os.SEEK_END)
    f.seek(here)
    return end - here


def _load_zip(path: str, source: str) -> dict[str, np.ndarray]:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{source}: corrupt zip checkpoint: {e}") from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(f"{source}: zip checkpoint has no single <archive>/data.pkl "
                                  f"(found {pkl or 'none'})")
        prefix = pkl[0][:-len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and zf.read(byteorder).strip() not in (b"little", b""):
            raise CheckpointError(f"{source}: big-endian checkpoints are not supported")
        try:
            unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), source)
            state = unpickler.load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            raise CheckpointError(f"{source}: cannot read {pkl[0]}: {e}") from None
        data: dict[str, np.ndarray] = {}
        for key, ref in unpickler.storages.items():
            member = f"{prefix}data/{key}"
            try:
                raw = zf.read(member)
            except KeyError:
                raise CheckpointError(f"{source}: storage file {member} is missing") from None
            except (zipfile.BadZipFile, OSError) as e:
                raise CheckpointError(f"{source}: cannot read {member}: {e}") from None
            expected = ref.numel * ref.storage_type.dtype.itemsize
            if len(raw) != expected:
                raise CheckpointError(f"{source}: {member} has {len(raw)} bytes, expected "
                                      f"{expected} ({ref.numel} x {ref.storage_type.name})")
            data[key] = np.frombuffer(raw, dtype=ref.storage_type.dtype)
    return _to_arrays(state, data, source)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Tensors of a PyTorch state-dict checkpoint (legacy or zip format) as numpy arrays.

    Non-tensor entries (e.g. nothing but tensors in a plain `model.state_dict()`) are skipped.
    Raises `CheckpointError` for unknown globals, malformed or truncated files.
    """
    source = os.fspath(path)
    if zipfile.is_zipfile(source):
        return _load_zip(source, source)
    with open(source, "rb") as f:
        return _load_legacy(f, source)
