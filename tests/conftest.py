"""Session-wide test set-up: quiet TensorFlow, a tiny real SavedModel, test configs."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from tiny_model import make_tiny_model  # noqa: E402


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
