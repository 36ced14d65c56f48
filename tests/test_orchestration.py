"""The DAGs' task logic without Airflow: params -> plan (incl. runner options), refusals,
previous-snapshot choice, step launching in a subprocess, count reconciliation."""
from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime, timezone

import pytest

from pipelines.orchestration import errors as orch_errors
from pipelines.orchestration import handoff
from pipelines.orchestration import launcher
from pipelines.orchestration import plan as orch_plan
from pipelines.orchestration import steps
from pipelines.embed import snapshot
from pipelines.embed.summary import SnapshotSummary
from pipelines.index.manifest import IndexManifest
from pipelines.embed.sample_catalog import write_catalog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATE = datetime(2025, 3, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> str:
    return write_catalog(str(tmp_path_factory.mktemp("catalog")), num_products=3,
                         images_per_product=1, size=64, seed=0)


def _params(tmp_path, catalog, **changes) -> dict:
    params = orch_plan.default_params(orch_plan.REFRESH)
    params.update(manifests=[catalog], embeddings_root=str(tmp_path / "emb"),
                  index_root=str(tmp_path / "idx"))
    params.update(changes)
    return params


def test_plan_maps_params_onto_config(tmp_path, catalog):
    plan = orch_plan.validate_params(_params(tmp_path, catalog, shards=3, recall_threshold=0.8,
                                        retention=2, model_handle="builtin:efficientnet_lite0",
                                        config_overrides={"index": {"eval_queries": 7}}),
                                orch_plan.REFRESH, DATE)
    assert plan.run_id == "20250301T000000Z-refresh"
    assert plan.input_rows == 3 and plan.manifests == (catalog,)
    config = orch_plan.RunPlan.from_dict(json.loads(json.dumps(plan.to_dict()))).config()
    assert (config.index.shards, config.index.recall_threshold, config.index.retention,
            config.index.eval_queries) == (3, 0.8, 2, 7)
    assert config.runner.name == "DirectRunner"
    assert plan.beam_options["direct_running_mode"] == "multi_processing"
    assert plan.beam_options["direct_num_workers"] == 2


def test_dataflow_options_assembled_from_config_file_and_params(tmp_path, catalog):
    plan = orch_plan.validate_params(_params(
        tmp_path, catalog, config_file=os.path.join(REPO, "configs", "dataflow.yaml"),
        runner_options={"project": "shop-prod", "max_num_workers": 8,
                        "temp_location": "gs://shop-ml/tmp",
                        "staging_location": "gs://shop-ml/staging",
                        "sdk_container_image": "registry.shop/cs/beam-worker:0.1.0"}),
        orch_plan.REFRESH, DATE)
    opts = plan.beam_options
    assert opts["runner"] == "DataflowRunner"
    assert opts["project"] == "shop-prod"             # the param wins over the file
    assert opts["max_num_workers"] == 8
    assert opts["region"] == "us-central1"            # kept from configs/dataflow.yaml
    assert opts["temp_location"] == "gs://shop-ml/tmp"
    assert opts["sdk_container_image"] == "registry.shop/cs/beam-worker:0.1.0"
    assert opts["experiments"] == ["use_runner_v2"]
    assert opts["job_name"] == "catalog-refresh-20250301t000000z-refresh"
    assert "direct_num_workers" not in opts


def test_flink_options_and_runner_param(tmp_path, catalog):
    flink = os.path.join(REPO, "configs", "flink.yaml")
    with pytest.raises(orch_errors.OrchestrationError, match="environment_config: .*example value"):
        orch_plan.validate_params(_params(tmp_path, catalog, config_file=flink), orch_plan.REFRESH, DATE)
    plan = orch_plan.validate_params(_params(
        tmp_path, catalog, config_file=flink,
        runner_options={"environment_config": "registry.shop/cs/beam-worker:0.1.0"}),
        orch_plan.REFRESH, DATE)
    assert plan.beam_options["runner"] == "FlinkRunner"
    assert plan.beam_options["flink_master"] == "flink-jobmanager:8081"
    assert plan.beam_options["parallelism"] == 16
    with pytest.raises(orch_errors.OrchestrationError, match="flink_master"):
        orch_plan.validate_params(_params(tmp_path, catalog, runner="FlinkRunner"), orch_plan.REFRESH, DATE)
    with pytest.raises(orch_errors.OrchestrationError, match="project"):
        orch_plan.validate_params(_params(tmp_path, catalog, runner="DataflowRunner"),
                             orch_plan.REFRESH, DATE)


@pytest.mark.parametrize("changes, message", [
    ({"manifests": "a.csv"}, "must be a list of URIs"),
    ({"manifests": []}, "non-empty list"),
    ({"manifests": ["/nonexistent/manifest.csv"]}, "does not exist"),
    ({"manifest": ["x"]}, "unknown param"),
    ({"shards": 0}, "index.shards"),
    ({"shards": "2"}, "param shards must be an integer"),
    ({"recall_threshold": 1.5}, "index.recall_threshold"),
    ({"config_overrides": {"index": {"nope": 1}}}, "unknown config key index.nope"),
    ({"model_handle": "/no/such/model"}, "no saved_model.pb"),
    ({"index_root": ""}, "param index_root"),
])
def test_malformed_params_are_refused_with_the_reason(tmp_path, catalog, changes, message):
    with pytest.raises(orch_errors.OrchestrationError, match=message):
        orch_plan.validate_params(_params(tmp_path, catalog, **changes), orch_plan.REFRESH, DATE)


def test_empty_drop_and_backfill_without_snapshot_are_refused(tmp_path, catalog):
    empty = tmp_path / "empty.csv"
    empty.write_text("product_id,image_id,image_uri\n")
    with pytest.raises(orch_errors.OrchestrationError, match="catalog drop .* holds no rows"):
        orch_plan.validate_params(_params(tmp_path, catalog, manifests=[str(empty)]),
                             orch_plan.BACKFILL, DATE)
    with pytest.raises(orch_errors.OrchestrationError, match="run catalog_refresh first"):
        orch_plan.validate_params(_params(tmp_path, catalog), orch_plan.BACKFILL, DATE)


def test_older_date_than_published_is_refused(tmp_path, catalog):
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "LATEST").write_text("20250302T000000Z-refresh.r02\n")
    with pytest.raises(orch_errors.OrchestrationError, match="move LATEST backwards"):
        orch_plan.validate_params(_params(tmp_path, catalog), orch_plan.REFRESH, DATE)
    # the same date (a re-run) is fine, even when a revision of it is published
    later = datetime(2025, 3, 2, tzinfo=timezone.utc)
    assert orch_plan.validate_params(_params(tmp_path, catalog), orch_plan.REFRESH, later).run_id == \
        "20250302T000000Z-refresh"


def _fake_snapshot(root, run_id):
    path = snapshot.snapshot_path(str(root), run_id)
    os.makedirs(path)
    with open(os.path.join(path, snapshot.SUMMARY_FILE), "w") as f:
        json.dump({"run_id": run_id, "dim": 4}, f)
    return path


def test_previous_snapshot_skips_the_run_being_replaced(tmp_path):
    root = tmp_path / "emb"
    assert orch_plan.previous_snapshot(str(root), "20250301T000000Z-refresh") is None
    a = _fake_snapshot(root, "20250301T000000Z-refresh")
    b = _fake_snapshot(root, "20250302T000000Z-backfill")
    os.makedirs(root / "20250303T000000Z-refresh")           # incomplete: ignored
    snapshot.mark_latest(str(root), "20250302T000000Z-backfill")
    assert orch_plan.previous_snapshot(str(root), "20250303T000000Z-refresh") == b
    # re-running the date LATEST names: build on the one before it
    assert orch_plan.previous_snapshot(str(root), "20250302T000000Z-backfill") == a


def test_previous_snapshot_after_a_failed_rerun_of_the_latest_date(tmp_path, caplog):
    """A re-run of the date LATEST names deletes that snapshot first; when the re-run fails,
    LATEST names a folder without a summary. The next date builds on the newest complete
    snapshot before it (and says so) instead of failing every later refresh."""
    root = tmp_path / "emb"
    a = _fake_snapshot(root, "20250301T000000Z-refresh")
    _fake_snapshot(root, "20250302T000000Z-refresh")
    snapshot.mark_latest(str(root), "20250302T000000Z-refresh")
    os.remove(os.path.join(snapshot.snapshot_path(str(root), "20250302T000000Z-refresh"),
                           snapshot.SUMMARY_FILE))            # the failed re-run's leftovers
    with pytest.raises(snapshot.SnapshotError, match="not a complete snapshot"):
        snapshot.latest(str(root))                            # what the next run used to hit
    with caplog.at_level("WARNING"):
        assert orch_plan.previous_snapshot(str(root), "20250303T000000Z-refresh") == a
    assert "not a complete snapshot" in caplog.text


def test_run_id_sorts_in_time_and_rejects_unknown_kinds():
    a = orch_plan.run_id_for(orch_plan.REFRESH, datetime(2025, 3, 1, 23, 0, tzinfo=timezone.utc))
    b = orch_plan.run_id_for(orch_plan.BACKFILL, datetime(2025, 3, 2, 1, 0))
    assert a < b and b == "20250302T010000Z-backfill"
    with pytest.raises(ValueError, match="unknown run kind"):
        orch_plan.run_id_for("nightly", DATE)
    assert orch_plan.run_id_of_version("20250302T010000Z-backfill.r03") == b


def test_launch_step_permanent_failure_carries_the_reason(tmp_path, catalog):
    plan = orch_plan.validate_params(_params(tmp_path, catalog), orch_plan.REFRESH, DATE)
    os.remove(catalog)  # the manifest vanished between validation and the Beam job
    lines = []
    try:
        with pytest.raises(orch_errors.PermanentStepError, match="does not exist"):
            launcher.launch_step(launcher.EMBED_STEP, {"plan": plan.to_dict()}, echo=lines.append)
    finally:
        write_catalog(os.path.dirname(catalog), num_products=3, images_per_product=1, size=64,
                      seed=0)
    assert any("embed failed (EmbedError)" in line for line in lines)


def test_launch_step_crash_is_a_retryable_error(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'worker lost' >&2\nexit 137\n")
    fake_python.chmod(0o755)
    with pytest.raises(orch_errors.StepError, match="exited with status 137(.|\n)*worker lost"):
        launcher.launch_step(launcher.EMBED_STEP, {"plan": {}}, python=str(fake_python),
                         echo=lambda line: None)


def test_reconcile_detects_counts_that_do_not_add_up(tmp_path):
    import pyarrow as pa
    path = _fake_snapshot(tmp_path / "emb", "r1")
    table = pa.table({"image_id": ["a", "b"], "product_id": ["p", "p"], "image_uri": ["u", "v"],
                      "content_sha256": ["x", "y"], "model_id": ["m", "m"],
                      "view": ["original"] * 2,
                      "embedding": pa.FixedSizeListArray.from_arrays(
                          pa.array([0.5] * 8, pa.float32()), 4),
                      "metadata": ["{}", "{}"]}, schema=snapshot.embeddings_schema(4))
    snapshot.write_table(path, table)
    summary = SnapshotSummary(snapshot=path, run_id="r1", input_rows=3, embedded=2, reused=0,
                              dead_lettered=1, model={"model_id": "m"}, model_id="m", dim=4)

    def index(num_vectors: int) -> IndexManifest:
        return IndexManifest(version="v", status="passed", model={"model_id": "m"}, dim=4,
                             num_vectors=num_vectors, shards=[])

    assert steps.reconcile(summary, index(2))["rows"] == 2
    with pytest.raises(orch_errors.PermanentStepError, match="holds 3 vectors"):
        steps.reconcile(summary, index(3))
    with pytest.raises(orch_errors.PermanentStepError, match="expected 3 images"):
        steps.reconcile(dataclasses.replace(summary, reused=1, input_rows=4), index(2))


def test_hand_off_records_when_no_service_and_fails_when_unreachable(tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "LATEST").write_text("20250301T000000Z-refresh\n")
    record = handoff.hand_off(None, "", str(idx))
    assert record["version"] == "20250301T000000Z-refresh" and record["notified"] is False
    with pytest.raises(orch_errors.StepError, match="cannot reach the search service"):
        handoff.hand_off({"version": "v2"}, "http://127.0.0.1:9", str(idx), timeout_s=5)
    with pytest.raises(orch_errors.OrchestrationError, match="no index version"):
        handoff.hand_off(None, "", str(tmp_path / "nothing"))


@pytest.mark.heavy
def test_rerun_never_deletes_the_published_version_whose_manifest_broke(tmp_path, catalog):
    """A re-run of a date replaces a rejected or incomplete version of an earlier attempt,
    but not the one LATEST names: its manifest no longer reading makes it look incomplete,
    and deleting it would leave LATEST naming a missing folder. The run builds `.r02`."""
    plan = orch_plan.validate_params(_params(tmp_path, catalog, shards=1, retention=5),
                                     orch_plan.REFRESH, DATE)
    summary = steps.embed_step(plan)
    first = steps.build_index_step(plan, summary)
    idx = tmp_path / "idx"
    assert (idx / "LATEST").read_text().strip() == first.version == plan.run_id
    manifest = idx / "versions" / first.version / "manifest.json"
    manifest.write_text("{ not json")                     # the served version's manifest broke
    second = steps.build_index_step(plan, summary)
    assert second.version == plan.run_id + ".r02" and second.passed
    assert manifest.read_text() == "{ not json"          # kept for the operator
    assert (idx / "LATEST").read_text().strip() == second.version
