"""pipelines.model.resolve with small real SavedModels: handles, specs, Embedder call conventions.

The builtin EfficientNet-Lite0 is covered by tests/test_builtin_model.py.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from object_store_stand_in import register_prefixed_filesystem

from pipelines.model.resolve import (METADATA_FILE, Embedder, ModelError, ModelSpec, local_model_dir,
                              resolve_model)

tf = pytest.importorskip("tensorflow")

SCHEME = "catalogtestfs"
register_prefixed_filesystem(SCHEME)


def _save_module(module, path: str, meta: dict | None = None, signatures=None) -> str:
    tf.saved_model.save(module, path, signatures=signatures)
    if meta is not None:
        os.makedirs(os.path.join(path, "assets"), exist_ok=True)
        with open(os.path.join(path, "assets", METADATA_FILE), "w") as f:
            json.dump(meta, f)
    return path


class PooledConv(tf.Module):
    """Callable module: conv + ReLU + global average pool, fixed input size."""

    def __init__(self, size: int, channels: int = 8, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.kernel = tf.Variable(rng.normal(0, 0.5, (3, 3, 3, channels)).astype(np.float32))
        self.size = size
        self.__call__ = tf.function(
            self._forward, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])

    def _forward(self, x):
        return tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(x, self.kernel, 1, "SAME")), axis=[1, 2])

    def reference(self, images: np.ndarray, mean: float, std: float) -> np.ndarray:
        y = self._forward(tf.constant((images.astype(np.float32) - mean) / std)).numpy()
        return y / np.linalg.norm(y, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tiny96(tmp_path_factory) -> tuple[str, PooledConv]:
    """A tf.Module SavedModel with its own 96x96 input and no metadata file."""
    module = PooledConv(96)
    path = _save_module(module, str(tmp_path_factory.mktemp("models") / "tiny96"))
    return path, module


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_local_saved_model_with_its_own_input_size(tiny96, tmp_path):
    path, module = tiny96
    spec = resolve_model(path, str(tmp_path / "cache"))
    # no metadata: input size and dim come from the serving signature, Hub normalisation
    assert (spec.input_size, spec.dim, spec.mean, spec.std) == (96, 8, 0.0, 255.0)
    assert spec.model_id == f"tiny96@{spec.fingerprint[:12]}"
    images = _images(4, 96)
    got = Embedder(spec).embed(images)
    assert got.shape == (4, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, module.reference(images, 0.0, 255.0), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    with pytest.raises(ModelError, match="takes 96px inputs"):
        resolve_model(path, str(tmp_path / "cache"), input_size=128)
    with pytest.raises(ValueError, match="expected 96x96 images"):
        Embedder(spec).embed(_images(1, 64))


def test_metadata_sets_preprocessing_and_fingerprint(tmp_path):
    module = PooledConv(32)
    path = _save_module(module, str(tmp_path / "m"),
                        meta={"input_size": 32, "mean": 127.5, "std": 64.0, "dim": 8})
    spec = resolve_model(path, str(tmp_path))
    assert (spec.input_size, spec.mean, spec.std, spec.dim) == (32, 127.5, 64.0, 8)
    images = _images(3, 32)
    np.testing.assert_allclose(Embedder(spec).embed(images),
                               module.reference(images, 127.5, 64.0), atol=1e-5)
    # same content -> same fingerprint; other weights -> another fingerprint
    assert resolve_model(path, str(tmp_path)).fingerprint == spec.fingerprint
    other = _save_module(PooledConv(32, seed=1), str(tmp_path / "other"),
                         meta={"input_size": 32, "mean": 127.5, "std": 64.0, "dim": 8})
    assert resolve_model(other, str(tmp_path)).fingerprint != spec.fingerprint
    # a wrong dim in the metadata is caught at the first batch
    bad = _save_module(PooledConv(32), str(tmp_path / "bad"),
                       meta={"input_size": 32, "mean": 0, "std": 1, "dim": 5})
    with pytest.raises(ModelError, match="returned 8-d embeddings; its spec says dim=5"):
        Embedder(resolve_model(bad, str(tmp_path))).embed(images)


class SignatureOnly(tf.Module):
    """No __call__: only a serving signature with a named input and several outputs."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(np.arange(1, 4, dtype=np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32, name="pixels")])
    def serve(self, pixels):
        mean_rgb = tf.reduce_mean(pixels, axis=[1, 2]) * self.w
        return {"logits": tf.reduce_sum(mean_rgb, axis=1, keepdims=True),
                "embedding": mean_rgb,
                "feature_map": pixels}


def test_signature_only_model_is_called_by_input_name(tmp_path):
    module = SignatureOnly()
    path = _save_module(module, str(tmp_path / "sig"),
                        signatures={"serving_default": module.serve.get_concrete_function()})
    spec = resolve_model(path, str(tmp_path))
    assert (spec.input_size, spec.dim) == (16, 3)   # the "embedding" output's width
    images = _images(2, 16)
    x = images.astype(np.float32) / 255.0
    want = x.mean(axis=(1, 2)) * np.array([1, 2, 3], np.float32)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(Embedder(spec).embed(images), want, atol=1e-5)


def test_ambiguous_signature_is_a_clear_error(tmp_path):
    class TwoOutputs(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")])
        def serve(self, x):
            return {"a": tf.reduce_mean(x, [1, 2]), "b": tf.reduce_max(x, [1, 2])}

    module = TwoOutputs()
    path = _save_module(module, str(tmp_path / "two"),
                        signatures={"serving_default": module.serve.get_concrete_function()})
    spec = resolve_model(path, str(tmp_path))
    with pytest.raises(ModelError, match=r"returns \['a', 'b'\]"):
        Embedder(spec)


def test_keras_export_and_feature_map_output(tmp_path):
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((24, 24, 3)), keras.layers.Conv2D(6, 3)])  # 4-D out
    path = str(tmp_path / "keras_export")
    model.export(path, verbose=False)
    spec = resolve_model(path, str(tmp_path))
    assert spec.input_size == 24 and spec.dim == 0   # 4-D output: width unknown up front
    images = _images(3, 24)
    feature_map = model.predict(images.astype(np.float32) / 255.0, verbose=0)
    want = feature_map.mean(axis=(1, 2))
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(Embedder(spec).embed(images), want, atol=1e-5)


def test_remote_saved_model_via_beam_filesystems(tiny96, tmp_path, monkeypatch):
    from pipelines.core import filesystem
    from pipelines.model.commands import export_saved_model
    path, module = tiny96
    import tempfile
    os.makedirs(tmp_path / "tmp")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where copies go
    remote = f"{SCHEME}://{tmp_path}/bucket/tiny96"
    assert export_saved_model(path, remote) == len(filesystem.match(remote + "/**"))
    local_spec = resolve_model(path, str(tmp_path))
    spec = resolve_model(remote, str(tmp_path))
    assert spec.path == remote
    assert spec.fingerprint == local_spec.fingerprint   # same bytes -> same model identity
    copy = local_model_dir(spec)
    assert copy.startswith(str(tmp_path / "tmp"))
    images = _images(2, 96)
    np.testing.assert_allclose(Embedder(spec).embed(images),
                               module.reference(images, 0.0, 255.0), atol=1e-5)
    # a model that changed after it was resolved is refused, not silently used
    changed = resolve_model(remote, str(tmp_path))
    filesystem.write_bytes(f"{remote}/assets/extra.txt", b"new file")
    import shutil
    shutil.rmtree(copy)
    with pytest.raises(ModelError, match="changed since it was resolved"):
        local_model_dir(changed)


def test_bad_handles(tmp_path):
    with pytest.raises(ModelError, match="unknown builtin model 'builtin:resnet'"):
        resolve_model("builtin:resnet", str(tmp_path))
    with pytest.raises(ModelError, match="no saved_model.pb"):
        resolve_model(str(tmp_path / "missing"), str(tmp_path))
    broken = tmp_path / "broken"
    (broken / "assets").mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"x")
    (broken / "assets" / METADATA_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="is not valid JSON"):
        resolve_model(str(broken), str(tmp_path))


def test_spec_roundtrip():
    spec = ModelSpec(handle="builtin:efficientnet_lite0", path="/c/m", input_size=224,
                     mean=127.0, std=128.0, dim=1280, fingerprint="ab" * 32)
    d = spec.to_dict()
    assert d["model_id"] == "efficientnet_lite0@" + "ab" * 6
    assert d["preprocessing"] == {"input_size": 224, "mean": 127.0, "std": 128.0,
                                  "color": "RGB", "dtype_in": "uint8"}
    assert ModelSpec.from_dict(json.loads(json.dumps(d))) == spec


# ------------------------------------------------------------- oneDNN status (model info)

def test_onednn_status_follows_the_env_var_and_the_cpu_flags(monkeypatch):
    import platform

    from pipelines.model import onednn
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert onednn.onednn_status(ask_tensorflow=False) == onednn.OneDnnStatus(
        False, "TF_ENABLE_ONEDNN_OPTS=0")
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    forced = onednn.onednn_status(ask_tensorflow=False)
    assert forced.enabled == x86 and forced.reason.startswith("TF_ENABLE_ONEDNN_OPTS=1")
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    monkeypatch.setattr(onednn, "proc_cpu_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})
    vnni = onednn.onednn_status(ask_tensorflow=False)
    assert vnni.enabled == x86 and "avx512_vnni" in vnni.reason
    monkeypatch.setattr(onednn, "proc_cpu_flags", lambda: {"avx2", "avx512f"})
    plain = onednn.onednn_status(ask_tensorflow=False)
    assert not plain.enabled and "no AVX512_VNNI" in plain.reason
    assert plain.describe().startswith("off (")


@pytest.mark.heavy  # three fresh TensorFlow processes
def test_onednn_status_agrees_with_tensorflow_in_a_fresh_process():
    """Our reading of the env var and CPU flags matches TensorFlow's own IsMklEnabled."""
    import subprocess
    import sys
    code = ("from pipelines.model.onednn import onednn_status, _tensorflow_says;"
            "print(onednn_status(ask_tensorflow=False).enabled, _tensorflow_says())")
    for value in (None, "0", "1"):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        env.pop("TF_ENABLE_ONEDNN_OPTS", None)
        if value is not None:
            env["TF_ENABLE_ONEDNN_OPTS"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120, check=True).stdout.split()
        assert out[0] == out[1], (value, out)
