"""The cluster path: the worker image definition, placeholder and dependency checks.

Dataflow and Flink cannot be reached from here; what is checked is everything up to the
submission: the Dockerfile against setup.py and the installed Beam, the model the image
bakes where the worker's handler looks, and the one-line refusals.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.core.config import ConfigError, load_config
from pipelines.core.runner import REPO_ROOT, check_runner_dependencies, pipeline_options

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "worker.Dockerfile"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _setup_requirements() -> list[str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PIPELINES":
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no PIPELINES list")


def _req_name(req: str) -> str:
    return re.split(r"[<>=~!\[ ]", req, maxsplit=1)[0].lower()


def test_dockerfile_base_image_is_the_installed_beam():
    import apache_beam
    from packaging.specifiers import SpecifierSet
    base = [args for word, args in _dockerfile_instructions() if word == "FROM"]
    assert base == [f"apache/beam_python3.11_sdk:{apache_beam.__version__}"]
    beam_req = next(r for r in _setup_requirements() if _req_name(r) == "apache-beam")
    assert apache_beam.__version__ in SpecifierSet(beam_req[len("apache-beam"):])


def test_dockerfile_installs_exactly_setup_py_requirements():
    installs = []
    for word, args in _dockerfile_instructions():
        if word == "RUN" and args.startswith("pip install"):
            installs.extend(a for a in shlex.split(args.split("&&")[0])
                            if not a.startswith("-") and a not in ("pip", "install", "."))
    expected = {r for r in _setup_requirements() if _req_name(r) != "apache-beam"}
    assert set(installs) == expected  # apache-beam comes with the base image


@pytest.mark.heavy
def test_the_model_is_baked_where_the_worker_handler_looks(tmp_path, monkeypatch):
    from pipelines.model.inference import WORKER_CACHE_ENV, EmbeddingModelHandler
    from pipelines.model.resolve import ModelSpec, resolve_model
    env = dict(a.split("=", 1) for word, args in _dockerfile_instructions() if word == "ENV"
               for a in shlex.split(args))
    assert env[WORKER_CACHE_ENV] == "/opt/catalog-search/models"
    bake = [args for word, args in _dockerfile_instructions()
            if word == "RUN" and args.startswith("catalog-search model")]
    assert len(bake) == 1
    # the image's build step, with the image's cache path mapped into tmp_path
    baked = tmp_path / "opt-models"
    r = subprocess.run([sys.executable, "-m", "catalog_search.cli", *shlex.split(bake[0])[1:]],
                       env=dict(os.environ, **{WORKER_CACHE_ENV: str(baked)}),
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    before = sorted(p.name for p in baked.iterdir())
    assert before
    # A worker: the launcher's cache path does not exist there; its env names the image's.
    launcher = resolve_model("builtin:efficientnet_lite0", str(baked), None)
    spec = ModelSpec.from_dict({**launcher.to_dict(), "path": "/launcher/home/.cache/model"})
    monkeypatch.setenv(WORKER_CACHE_ENV, str(baked))
    handler = EmbeddingModelHandler(spec, "/launcher/home/.cache", tf_threads=1, batch_size=2)
    embedder = handler._load_embedder()
    assert embedder.spec.path.startswith(str(baked))
    assert sorted(p.name for p in baked.iterdir()) == before  # loaded, nothing converted
    vec = embedder.embed(np.zeros((1, spec.input_size, spec.input_size, 3), np.uint8))
    assert vec.shape == (1, launcher.dim)


@pytest.mark.parametrize("config_file,key", [("dataflow.yaml", "project"),
                                             ("flink.yaml", "environment_config")])
def test_shipped_example_values_are_refused(config_file, key):
    with pytest.raises(ConfigError, match=rf"runner.options.{key}: .*example value"):
        pipeline_options(load_config(REPO / "configs" / config_file), "j")


def test_relative_setup_file_is_resolved_against_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides={"runner": {"name": "FlinkRunner", "options": {
        "flink_master": "jm:8081", "setup_file": "setup.py"}}})
    opts = pipeline_options(cfg, "j").get_all_options()
    assert opts["setup_file"] == os.path.join(REPO_ROOT, "setup.py")
    cfg = load_config(overrides={"runner": {"name": "FlinkRunner", "options": {
        "flink_master": "jm:8081", "setup_file": "nowhere/setup.py"}}})
    with pytest.raises(ConfigError, match="runner.options.setup_file: .* does not exist"):
        pipeline_options(cfg, "j")


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module.split(".")[0]) is not None and \
        importlib.util.find_spec(module) is not None


@pytest.mark.skipif(_has("apitools"), reason="apache-beam[gcp] is installed here")
def test_dataflow_config_without_the_gcp_extra_fails_with_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "catalog_search.cli", "--config", "configs/dataflow.yaml", "embed",
         "--manifest", "gs://shop-catalog/catalog/*.parquet", "--out", "gs://shop-ml/emb"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "pip install 'apache-beam[gcp]==" in lines[0]
    assert "DataflowRunner" in lines[0]
    with pytest.raises(ConfigError, match=r"s3:// paths .*apache-beam\[aws\]"):
        check_runner_dependencies(load_config(), ["s3://bucket/catalog.csv"])
