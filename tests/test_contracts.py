"""The typed contracts between stages: the embeddings snapshot summary, the index manifest
(with its shard entries) and the orchestration's RunPlan. Each round-trips through JSON,
refuses a missing or unknown format and a missing or renamed field with an error naming
the field and the file, and parses the files the real pipeline writes."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from datetime import datetime, timezone

import pytest

from pipelines.core import filesystem as fs
from pipelines.embed import snapshot
from pipelines.embed.job import run_embed
from pipelines.embed.sample_catalog import write_catalog
from pipelines.embed.summary import SUMMARY_FORMAT, SnapshotSummary, SummaryError
from pipelines.index import artifact as art
from pipelines.index import reader
from pipelines.index.commands import info_report
from pipelines.index.build import run_build_index
from pipelines.index.manifest import (FORMAT, IndexArtifactError, IndexIntegrityError,
                                      IndexManifest, ManifestFormatError, ShardEntry)
from pipelines.orchestration.errors import OrchestrationError
from pipelines.orchestration.plan import (PLAN_FORMAT, REFRESH, PlanFormatError, RunPlan,
                                          validate_params)


@pytest.fixture(scope="module")
def pipeline_files(tiny_model, tmp_path_factory) -> dict[str, str]:
    """A tiny real embed + build-index run (in-process DirectRunner): the files it wrote."""
    from pipelines.core.config import load_config
    root = tmp_path_factory.mktemp("contracts")
    config = load_config(overrides={
        "model": {"handle": tiny_model, "cache_dir": str(root / "cache"), "batch_size": 8},
        "runner": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
        "index": {"shards": 2, "eval_queries": 6, "recall_threshold": 0.5}})
    catalog = write_catalog(str(root / "catalog"), num_products=4, images_per_product=2,
                            size=64, seed=3)
    summary = run_embed([catalog], str(root / "emb"), config, run_id="r1")
    manifest = run_build_index(summary.snapshot, str(root / "index"), config, version="v1")
    assert isinstance(summary, SnapshotSummary) and isinstance(manifest, IndexManifest)
    return {"catalog": catalog, "snapshot": summary.snapshot,
            "summary": fs.join(summary.snapshot, snapshot.SUMMARY_FILE),
            "index_root": str(root / "index"),
            "manifest": art.manifest_uri(str(root / "index"), "v1")}


def _json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- the real files

def test_the_pipeline_writes_files_that_parse_into_the_contracts(pipeline_files):
    raw_summary = _json(pipeline_files["summary"])
    assert raw_summary["format"] == SUMMARY_FORMAT
    summary = snapshot.read_summary(pipeline_files["snapshot"])
    assert (summary.input_rows, summary.embedded, summary.reused, summary.dead_lettered) == \
        (8, 8, 0, 0)
    assert summary.model_id == summary.model["model_id"] and summary.dim == 48
    assert summary.snapshot == pipeline_files["snapshot"] and summary.output_views == ["original"]

    raw_manifest = _json(pipeline_files["manifest"])
    assert raw_manifest["format"] == FORMAT
    manifest = art.read_manifest(pipeline_files["index_root"], "v1")
    assert manifest.passed and manifest.num_vectors == 8 and manifest.num_shards == 2
    assert sum(s.num_vectors for s in manifest.shards) == 8
    assert all(f.sha256 and f.bytes > 0 for s in manifest.shards for f in s.files)
    assert manifest.model_id == summary.model_id and manifest.recall(1) is not None
    assert manifest.source_snapshot["run_id"] == "r1"


def test_round_trips_keep_every_key_the_pipeline_writes(pipeline_files):
    raw_summary = _json(pipeline_files["summary"])
    summary = SnapshotSummary.from_dict(raw_summary, pipeline_files["summary"])
    assert json.loads(json.dumps(summary.to_dict(), default=str)) == raw_summary
    assert SnapshotSummary.from_dict(summary.to_dict()) == summary

    raw_manifest = _json(pipeline_files["manifest"])
    manifest = IndexManifest.from_dict(raw_manifest, pipeline_files["manifest"])
    assert json.loads(json.dumps(manifest.to_dict())) == raw_manifest
    assert IndexManifest.from_dict(manifest.to_dict()) == manifest


def test_keys_of_a_newer_writer_are_kept(pipeline_files):
    raw = dict(_json(pipeline_files["manifest"]), future_field={"x": 1})
    raw["shards"][0]["future_shard_field"] = 7
    manifest = IndexManifest.from_dict(raw)
    assert manifest.extra == {"future_field": {"x": 1}}
    assert manifest.shards[0].extra == {"future_shard_field": 7}
    assert manifest.to_dict() == raw


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("change, field", [
    (lambda d: d.pop("embedded"), "embedded"),
    (lambda d: d.update(embeded=d.pop("embedded")), "embedded"),      # renamed
    (lambda d: d.pop("run_id"), "run_id"),
    (lambda d: d.update(dim="48"), "dim"),                            # wrong type
    (lambda d: d.update(model=None), "model"),
])
def test_summary_missing_or_renamed_field_names_the_field_and_the_file(pipeline_files, change,
                                                                        field):
    raw = _json(pipeline_files["summary"])
    change(raw)
    with pytest.raises(SummaryError, match=f"{pipeline_files['summary']}: field '{field}'") as e:
        SnapshotSummary.from_dict(raw, pipeline_files["summary"])
    assert e.value.field == field and e.value.source == pipeline_files["summary"]
    assert isinstance(e.value, snapshot.SnapshotError) and isinstance(e.value, ValueError)


def test_summary_format_version(pipeline_files, tmp_path):
    raw = _json(pipeline_files["summary"])
    with pytest.raises(SummaryError, match="field 'format': unknown format "
                                           "'catalog-search-embeddings-summary/2'"):
        SnapshotSummary.from_dict(dict(raw, format="catalog-search-embeddings-summary/2"), "s")
    legacy = {k: v for k, v in raw.items() if k != "format"}
    with pytest.raises(SummaryError, match="field 'format': missing"):
        SnapshotSummary.from_dict(legacy, "s")
    # a summary.json written before the format key existed is read as version 1
    old = tmp_path / "old"
    old.mkdir()
    (old / snapshot.SUMMARY_FILE).write_text(json.dumps(legacy))
    assert snapshot.read_summary(str(old)).to_dict() == raw
    # and an unknown version on disk is refused by the reader, naming the file
    (old / snapshot.SUMMARY_FILE).write_text(json.dumps(dict(raw, format="other/1")))
    with pytest.raises(snapshot.SnapshotError, match=f"{old / snapshot.SUMMARY_FILE}: field "
                                                     "'format'"):
        snapshot.read_summary(str(old))


@pytest.mark.parametrize("change, field, where", [
    (lambda d: d.pop("num_vectors"), "num_vectors", ""),
    (lambda d: d.update(dims=d.pop("dim")), "dim", ""),                 # renamed
    (lambda d: d.update(status=1), "status", ""),
    (lambda d: d["shards"][1].pop("kind"), "kind", " shards[1]"),
    (lambda d: d["shards"][0].update(file=d["shards"][0].pop("files")), "files", " shards[0]"),
    (lambda d: d["shards"][0]["files"][0].pop("sha256"), "sha256", " shards[0] files[0]"),
])
def test_manifest_missing_or_renamed_field_names_the_field_and_the_file(pipeline_files, change,
                                                                         field, where):
    raw = _json(pipeline_files["manifest"])
    change(raw)
    with pytest.raises(ManifestFormatError,
                       match=re.escape(f"{pipeline_files['manifest']}{where}: field '{field}'")):
        IndexManifest.from_dict(raw, pipeline_files["manifest"])


def test_manifest_format_version_is_required(pipeline_files):
    raw = _json(pipeline_files["manifest"])
    for bad in (dict(raw, format="catalog-search-index/4"),
                {k: v for k, v in raw.items() if k != "format"}, [raw], None):
        with pytest.raises(ManifestFormatError, match="not an index manifest of format "
                                                      "catalog-search-index/1 or "
                                                      "catalog-search-index/2") as e:
            IndexManifest.from_dict(bad, "m.json")
        assert isinstance(e.value, IndexIntegrityError) and e.value.field == "format"


def test_a_version_1_manifest_reads_and_keeps_its_format(pipeline_files):
    raw = _json(pipeline_files["manifest"])
    assert raw["format"] == FORMAT == "catalog-search-index/2"
    old = IndexManifest.from_dict(dict(raw, format="catalog-search-index/1"), "m.json")
    assert old.format == "catalog-search-index/1"
    assert old.to_dict()["format"] == "catalog-search-index/1"
    assert IndexManifest.from_dict(raw, "m.json").format == FORMAT


def test_a_malformed_manifest_on_disk_is_refused_by_the_reader(pipeline_files, tmp_path):
    import shutil
    root = shutil.copytree(pipeline_files["index_root"], str(tmp_path / "index"))
    path = art.manifest_uri(root, "v1")
    raw = _json(path)
    raw["shards"][0]["num_vectors"] = "3"
    fs.write_json(path, raw)
    with pytest.raises(IndexArtifactError, match=f"{path} shards\\[0\\]: field 'num_vectors': "
                                                 "expected int"):
        reader.open_index(root)
    assert art.version_state(root, "v1") == art.STATUS_INCOMPLETE
    assert info_report(root)["versions"][0]["state"] == "corrupted"


def test_shard_entry_round_trip_and_search_budget():
    entry = ShardEntry.from_dict({"shard": 0, "path": "shards/shard-00000-of-00001",
                                  "num_vectors": 3, "kind": "scann_tree_ah",
                                  "files": [{"name": "rows.parquet", "sha256": "ab", "bytes": 9}],
                                  "search": {"leaves_to_search": 4, "reorder_multiplier": 2},
                                  "num_leaves": 9}, "s")
    assert (entry.leaves_to_search, entry.reorder_multiplier, entry.num_leaves) == (4, 2, 9)
    assert ShardEntry.from_dict(entry.to_dict(), "s") == entry


# --------------------------------------------------------------------------- RunPlan

def _plan() -> RunPlan:
    return RunPlan(kind=REFRESH, run_id="20250301T000000Z-refresh", manifests=("m.csv",),
                   embeddings_root="e", index_root="i", config_file=None,
                   config_overrides={"index": {"shards": 2}}, input_rows=3,
                   beam_options={"runner": "DirectRunner"})


def test_run_plan_round_trips_through_json():
    plan = _plan()
    payload = json.loads(json.dumps(plan.to_dict()))
    assert payload["format"] == PLAN_FORMAT
    assert RunPlan.from_dict(payload) == plan


def test_validated_plan_round_trips(tmp_path):
    catalog = write_catalog(str(tmp_path / "cat"), num_products=2, images_per_product=1,
                            size=32, seed=0)
    plan = validate_params({"manifests": [catalog], "embeddings_root": str(tmp_path / "e"),
                            "index_root": str(tmp_path / "i")}, REFRESH,
                           datetime(2025, 3, 1, tzinfo=timezone.utc))
    assert RunPlan.from_dict(json.loads(json.dumps(plan.to_dict(), default=str))) == plan


@pytest.mark.parametrize("change, field", [
    (lambda d: d.pop("index_root"), "index_root"),
    (lambda d: d.update(embedding_root=d.pop("embeddings_root")), "embeddings_root"),
    (lambda d: d.update(manifests="m.csv"), "manifests"),
    (lambda d: d.update(kind="nightly"), "kind"),
    (lambda d: d.update(input_rows="3"), "input_rows"),
    (lambda d: d.pop("format"), "format"),
    (lambda d: d.update(format="catalog-search-run-plan/0"), "format"),
])
def test_malformed_run_plan_is_an_orchestration_error_naming_the_field(change, field):
    payload = _plan().to_dict()
    change(payload)
    with pytest.raises(PlanFormatError, match=f"the XCom plan: field '{field}'") as e:
        RunPlan.from_dict(payload, "the XCom plan")
    assert isinstance(e.value, OrchestrationError) and e.value.permanent
    assert e.value.source == "the XCom plan" and e.value.field == field


def test_a_run_plan_with_an_unsafe_run_id_is_refused_first():
    payload = dict(_plan().to_dict(), run_id="../x")
    payload.pop("format")
    with pytest.raises(OrchestrationError, match="run plan run_id"):
        RunPlan.from_dict(payload)


def test_build_index_step_payload_with_a_bad_summary_is_permanent(tmp_path):
    """The step subprocess parses the embed summary of its payload once; a malformed one is
    a permanent failure (exit 3) naming the field."""
    from pipelines.orchestration import launcher
    payload = {"plan": _plan().to_dict(),
               "embed_summary": {"format": SUMMARY_FORMAT, "run_id": "r"}}
    inp, out = tmp_path / "in.json", tmp_path / "out.json"
    inp.write_text(json.dumps(payload))
    rc = launcher.main([launcher.BUILD_INDEX_STEP, "--input", str(inp), "--output", str(out)])
    result = _json(str(out))
    assert rc == launcher.PERMANENT_EXIT_CODE and result["ok"] is False
    assert "build_index payload embed_summary: field 'input_rows'" in result["error"]


def test_publish_results_parses_each_xcom_once_and_names_a_bad_field(pipeline_files):
    from pipelines.orchestration import steps
    summary = _json(pipeline_files["summary"])
    manifest = _json(pipeline_files["manifest"])
    plan = dataclasses.replace(_plan(), index_root=pipeline_files["index_root"],
                               run_id="r1").to_dict()
    art.write_latest(pipeline_files["index_root"], "v1")
    extra = steps.publish_results(plan, summary, manifest)
    assert extra["version"] == "v1" and extra["num_vectors"] == 8 and extra["num_shards"] == 2
    assert os.path.basename(extra["snapshot"]) == "r1"
    with pytest.raises(OrchestrationError, match="the build_index task's result: field "
                                                 "'num_vectors'"):
        steps.publish_results(plan, summary, {k: v for k, v in manifest.items()
                                              if k != "num_vectors"})
