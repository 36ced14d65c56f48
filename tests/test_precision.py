"""model.precision (issue 20): fp32 | bf16 | auto, resolved once, part of the embedding
fingerprint and of the snapshot's model record, applied the same wherever the model runs.

The CPU's flags are forced with CATALOG_SEARCH_CPU_FLAGS (and oneDNN with
TF_ENABLE_ONEDNN_OPTS) so these run on any CPU: they check the bookkeeping -- what is
picked, recorded, reused and refused. Whether bf16 vectors are close to fp32 on a CPU
that really has AVX512_BF16 is tests/test_builtin_model.py::test_bf16_embeddings_stay_close_to_fp32.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

import image_factory as f
from pipelines.core.config import ConfigError, load_config
from pipelines.model import precision as P
from pipelines.model.onednn import OneDnnStatus


@pytest.fixture()
def onednn_on(monkeypatch):
    monkeypatch.setattr(P, "onednn_status", lambda: OneDnnStatus(True, "forced in a test"))


def test_auto_picks_fp32_on_a_cpu_without_the_features(monkeypatch, onednn_on):
    monkeypatch.setenv(P.CPU_FLAGS_ENV, "fpu sse2 avx avx2 fma avx512f avx512_vnni")
    got = P.resolve_precision("auto")
    assert got.value == "fp32" and "no AVX512_BF16 / AMX" in got.reason
    assert P.resolve_precision("fp32").value == "fp32"
    with pytest.raises(P.PrecisionError, match="bf16 cannot run here"):
        P.resolve_precision("bf16")


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_auto_picks_bf16_where_the_cpu_has_it(monkeypatch, onednn_on, flag):
    monkeypatch.setenv(P.CPU_FLAGS_ENV, f"avx2 avx512f {flag}")
    got = P.resolve_precision("auto")
    assert got.value == "bf16" and flag in got.reason
    assert P.resolve_precision("bf16").value == "bf16"


def test_auto_picks_fp32_with_onednn_off(monkeypatch):
    monkeypatch.setenv(P.CPU_FLAGS_ENV, "avx512_bf16")
    monkeypatch.setattr(P, "onednn_status",
                        lambda: OneDnnStatus(False, "TF_ENABLE_ONEDNN_OPTS=0"))
    got = P.resolve_precision("auto")
    assert got.value == "fp32" and "oneDNN is off" in got.reason
    with pytest.raises(P.PrecisionError, match="oneDNN is off"):
        P.resolve_precision("bf16")


def test_config_key_is_validated():
    assert load_config().model.precision == "fp32"
    with pytest.raises(ConfigError, match="model.precision"):
        load_config(overrides={"model": {"precision": "fp16"}})


def test_one_precision_per_process(monkeypatch, onednn_on):
    P.apply_precision("fp32")  # what every other test in this process runs with
    monkeypatch.setenv(P.CPU_FLAGS_ENV, "avx512_bf16")
    with pytest.raises(P.PrecisionError, match="already runs the model in fp32"):
        P.apply_precision("bf16")
    P.apply_precision("fp32")  # the same again is fine
    assert P.applied_precision() == "fp32"


def test_fingerprints_differ_for_bf16_and_fp32(embed_config):
    from pipelines.embed.job import embedding_fingerprint
    from pipelines.model.resolve import resolve_model
    spec = resolve_model(embed_config.model.handle, embed_config.model.resolved_cache_dir())
    fp32 = embedding_fingerprint(spec, embed_config, "fp32")
    assert fp32 == embedding_fingerprint(spec, embed_config)  # snapshots of before: reusable
    assert embedding_fingerprint(spec, embed_config, "bf16") != fp32


def test_serving_refuses_an_index_of_the_other_precision(embed_config):
    """A query must be embedded as the catalog was: an index recorded bf16 cannot be served
    by a process that runs fp32 (or by a CPU without bf16)."""
    from pipelines.model.resolve import resolve_model
    from serving.embedder import IndexLoadError, QueryEmbedder
    P.apply_precision("fp32")
    spec = resolve_model(embed_config.model.handle, embed_config.model.resolved_cache_dir())
    record = dict(spec.to_dict(), precision="bf16")
    with pytest.raises(IndexLoadError, match="model precision of the index"):
        QueryEmbedder(record, embed_config)
    assert QueryEmbedder(dict(record, precision="fp32"), embed_config).precision == "fp32"
    assert QueryEmbedder(spec.to_dict(), embed_config).precision == "fp32"  # older manifests


_BF16_RUN = textwrap.dedent("""
    import json, sys
    from pipelines.core.config import load_config
    from pipelines.embed.job import EmbedError, run_embed
    model, cache, manifest, out, previous = sys.argv[1:6]
    cfg = load_config(overrides={
        "model": {"handle": model, "cache_dir": cache, "batch_size": 8, "precision": "auto"},
        "runner": {"direct_running_mode": "in_memory", "direct_num_workers": 1}})
    try:
        run_embed([manifest], out, cfg, run_id="merge", previous=previous,
                  merge_previous=True)
        merge = "merged"
    except EmbedError as e:
        merge = str(e)
    s = run_embed([manifest], out, cfg, run_id="bf16", previous=previous)
    print(json.dumps({"merge": merge, "reused": s.reused, "embedded": s.embedded,
                      "snapshot": s.snapshot, "fingerprint": s.embedding_fingerprint,
                      "precision": s.model["precision"]}))
""")


@pytest.mark.heavy
def test_bf16_and_fp32_snapshots_never_mix(embed_config, tiny_model, tmp_path):
    """An fp32 snapshot, then `auto` on a CPU that (forced) has AVX512_BF16, in a process of
    its own: bf16 is recorded, nothing of the fp32 snapshot is reused, a merge into it is
    refused; and back in fp32 nothing of the bf16 snapshot is reused."""
    from pipelines.embed import snapshot
    from pipelines.embed.job import run_embed
    img = tmp_path / "img"
    img.mkdir()
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["product_id", "image_id", "image_uri"])
        w.writeheader()
        for i in range(3):
            (img / f"{i}.jpg").write_bytes(f.jpeg_bytes(color=(80 * i, 60, 90)))
            w.writerow({"product_id": f"P{i}", "image_id": f"i{i}", "image_uri": f"img/{i}.jpg"})
    manifest, out = str(tmp_path / "m.csv"), str(tmp_path / "emb")
    s1 = run_embed([manifest], out, embed_config, run_id="fp32")
    assert s1.model["precision"] == "fp32"

    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="3",
               **{P.CPU_FLAGS_ENV: "avx2 avx512f avx512_bf16"})
    proc = subprocess.run([sys.executable, "-c", _BF16_RUN, tiny_model,
                           embed_config.model.resolved_cache_dir(), manifest, out, s1.snapshot],
                          env=env, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert child["precision"] == "bf16" and child["fingerprint"] != s1.embedding_fingerprint
    assert child["reused"] == 0 and child["embedded"] == 3
    assert "cannot merge" in child["merge"]
    assert snapshot.read_summary(child["snapshot"]).model["precision"] == "bf16"

    s3 = run_embed([manifest], out, embed_config, run_id="fp32-again",
                   previous=child["snapshot"])
    assert s3.reused == 0 and s3.embedded == 3
    assert s3.embedding_fingerprint == s1.embedding_fingerprint


_NOISE = ("auto_mixed_precision", "absl::InitializeLog")


@pytest.mark.slow  # two CLI processes that import TensorFlow
@pytest.mark.skipif(not P.bf16_support()[0], reason="the bf16 rewrite needs AVX512_BF16 / AMX")
def test_embed_cli_in_bf16_does_not_print_the_rewrite_log(tiny_model, tmp_path):
    """`catalog-search embed` with model.precision bf16: stderr holds none of the grappler's
    native 'Converted N/M nodes to bfloat16' lines (apply_precision lowers absl's log
    level); with TF_CPP_MIN_LOG_LEVEL=0 they are there, so the check is not vacuous."""
    from pipelines.embed.sample_catalog import write_catalog
    manifest = write_catalog(str(tmp_path / "cat"), num_products=2, images_per_product=2,
                             size=96)
    config = tmp_path / "bf16.yaml"
    config.write_text(json.dumps({
        "model": {"handle": tiny_model, "cache_dir": str(tmp_path / "cache"), "batch_size": 8,
                  "precision": "bf16"},
        "runner": {"direct_running_mode": "in_memory", "direct_num_workers": 1}}))

    def embed(run_id: str, **env_extra: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        env.update(env_extra)
        proc = subprocess.run([sys.executable, "-m", "catalog_search", "--config", str(config),
                               "embed", "--manifest", manifest, "--out", str(tmp_path / "emb"),
                               "--run-id", run_id], env=env, text=True, capture_output=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    quiet = embed("quiet")
    assert not [line for line in quiet.splitlines() if any(n in line for n in _NOISE)], quiet
    loud = embed("loud", TF_CPP_MIN_LOG_LEVEL="0")
    assert "auto_mixed_precision" in loud
