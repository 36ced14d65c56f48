"""The Airflow DAGs, for real: DagBag import, structure and Params, and dag.test() runs.

Every Airflow run happens in a subprocess (`python -m catalog_search.demo run-dag ...`) with
its own SQLite AIRFLOW_HOME, set before airflow is imported; this pytest process never
imports airflow. The DAG runs use the tiny test SavedModel (tests/tiny_model.py) and
generated catalogs, and launch the real Beam jobs on the DirectRunner.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pipelines.index import artifact as art
from pipelines.embed import snapshot
from pipelines.embed.sample_catalog import write_catalog

pytestmark = pytest.mark.heavy  # real DAG runs: Airflow, Beam jobs, index builds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAG_IDS = {"catalog_refresh", "catalog_backfill", "index_handoff"}
D1, D2, D3 = "2025-03-01T00:00:00+00:00", "2025-03-02T06:00:00+00:00", "2025-03-03T00:00:00+00:00"
RUN_D1, RUN_D2 = "20250301T000000Z-refresh", "20250302T060000Z-backfill"


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO})
    env.pop("AIRFLOW_HOME", None)
    env.update(extra or {})
    return env


DRIVER_SCRIPT = textwrap.dedent("""
    import json, sys, traceback
    from datetime import datetime
    from catalog_search import demo
    demo.use_airflow_home(sys.argv[1])
    print("DRIVER_READY", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            report = demo.run_dag(request["dag_id"], request["conf"],
                                  datetime.fromisoformat(request["logical_date"]))
        except Exception as e:  # Param validation refuses the run conf itself
            traceback.print_exc()
            report = {"dag_id": request["dag_id"], "state": "refused",
                      "error": f"{type(e).__name__}: {e}", "tasks": {}, "asset_events": []}
        print("DAG_RUN_REPORT " + json.dumps(report), flush=True)
""")


class AirflowSession:
    """One interpreter with a SQLite AIRFLOW_HOME that runs DAGs with dag.test() on request.

    Sharing it between runs pays Airflow's start-up once; the pytest process itself never
    imports airflow.
    """

    def __init__(self, home: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER_SCRIPT, home], cwd=REPO,
                                     env=_env(), text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._read_until("DRIVER_READY")

    def _read_until(self, marker: str) -> tuple[str, str]:
        lines = []
        for line in self.proc.stdout:
            if line.startswith(marker):
                return line[len(marker):].strip(), "".join(lines)
            lines.append(line)
        raise AssertionError(f"the Airflow driver exited ({self.proc.wait()}) before "
                             f"{marker}:\n{''.join(lines)[-8000:]}")

    def run(self, dag_id: str, conf: dict, logical_date: str) -> tuple[dict, str]:
        """Run a DAG once; (report, the run's log output)."""
        self.proc.stdin.write(json.dumps({"dag_id": dag_id, "conf": conf,
                                          "logical_date": logical_date}) + "\n")
        self.proc.stdin.flush()
        report, output = self._read_until("DAG_RUN_REPORT ")
        return json.loads(report), output

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def fast(conf: dict) -> dict:
    """The conf with Beam's in-process DirectRunner mode (the first run uses the default,
    multi-processing with 2 workers; later runs save the worker start-up)."""
    overrides = dict(conf.get("config_overrides") or {})
    overrides["runner"] = {"direct_running_mode": "in_memory", "direct_num_workers": 1}
    return {**conf, "config_overrides": overrides}


def _rename_products(src_manifest: str, dst_manifest: str, prefix: str) -> list[dict]:
    """Copy a manifest with product/image ids renamed P... -> <prefix>... (new products)."""
    with open(src_manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["product_id"] = prefix + r["product_id"][1:]
        r["image_id"] = prefix + r["image_id"][1:]
    with open(dst_manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def _tree_state(*roots: str) -> dict[str, str]:
    """{path: sha256 of the content} of every file under the roots."""
    state = {}
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    state[path] = hashlib.sha256(f.read()).hexdigest()
    return state


# ------------------------------------------------------------------ import and structure

STRUCTURE_SCRIPT = textwrap.dedent("""
    import json, socket, sys
    def no_network(self, address, *a, **k):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access while importing DAGs: {address}")
        return real_connect(self, address, *a, **k)
    real_connect = socket.socket.connect
    socket.socket.connect = no_network
    from catalog_search import demo
    demo.use_airflow_home(sys.argv[1])
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=demo.DAGS_FOLDER)
    out = {"errors": bag.import_errors, "dags": {}}
    for dag_id, dag in bag.dags.items():
        out["dags"][dag_id] = {
            "schedule": str(dag.schedule),
            "timetable": type(dag.timetable).__name__,
            "catchup": dag.catchup,
            "params": {k: {"value": "<required>" if type(dag.params.get_param(k).value).__name__
                           == "ArgNotSet" else dag.params.get_param(k).value,
                           "schema": dag.params.get_param(k).schema}
                       for k in dag.params},
            "tasks": {t.task_id: {"downstream": sorted(t.downstream_task_ids),
                                  "retries": t.retries,
                                  "backoff": t.retry_exponential_backoff,
                                  "policy": type(t.retry_policy).__name__,
                                  "outlets": [o.name for o in t.outlets]}
                      for t in dag.tasks},
            "asset_schedule": [a.name for a in getattr(
                getattr(dag.timetable, "asset_condition", None), "objects", [])],
        }
    print("STRUCTURE " + json.dumps(out, default=str))
""")


@pytest.fixture(scope="module")
def structure(tmp_path_factory) -> dict:
    home = str(tmp_path_factory.mktemp("airflow-structure"))
    proc = subprocess.run([sys.executable, "-c", STRUCTURE_SCRIPT, home], capture_output=True,
                          text=True, env=_env(), cwd=REPO, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STRUCTURE ")]
    assert lines, f"DagBag script failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    return json.loads(lines[-1][len("STRUCTURE "):])


def test_dagbag_imports_without_errors_or_network(structure):
    assert structure["errors"] == {}
    assert set(structure["dags"]) == DAG_IDS


def test_run_dags_structure_retries_and_asset(structure):
    for dag_id, embed, extra in (("catalog_refresh", "embed", ["duplicates"]),
                                 ("catalog_backfill", "embed_drop", [])):
        d = structure["dags"][dag_id]
        tasks = d["tasks"]
        train = ["train_adapter"] if dag_id == "catalog_refresh" else []
        assert set(tasks) == {"validate_params", embed, "build_index", "publish", *extra, *train}
        assert tasks["validate_params"]["downstream"] == sorted(
            [embed, "build_index", "publish", *extra, *train])
        assert tasks[embed]["downstream"] == sorted(["build_index", "publish", *train])
        if train:  # the optional adapter is trained between embed and build_index
            assert tasks["train_adapter"]["downstream"] == ["build_index", "publish"]
        assert tasks["build_index"]["downstream"] == sorted(["publish", *extra])
        for name in extra:  # the optional duplicates report runs before publish
            assert tasks[name]["downstream"] == ["publish"]
        assert tasks["publish"]["outlets"] == ["catalog_search_index"]
        for t in tasks.values():
            assert t["retries"] >= 1 and t["backoff"] > 0
            assert t["policy"] == "ExceptionRetryPolicy"
        assert d["catchup"] is False
    assert structure["dags"]["catalog_refresh"]["timetable"] != "NullTimetable"
    assert structure["dags"]["catalog_refresh"]["schedule"] == "@daily"
    assert structure["dags"]["catalog_backfill"]["timetable"] == "NullTimetable"
    handoff = structure["dags"]["index_handoff"]
    assert handoff["asset_schedule"] == ["catalog_search_index"]
    assert set(handoff["tasks"]) == {"notify_search_service"}


def test_params_are_typed(structure):
    refresh = structure["dags"]["catalog_refresh"]["params"]
    backfill = structure["dags"]["catalog_backfill"]["params"]
    expected = {"manifests", "embeddings_root", "index_root", "config_file", "runner",
                "runner_options", "shards", "recall_threshold", "retention", "model_handle",
                "config_overrides", "train_adapter"}
    assert set(refresh) == set(backfill) == expected
    assert refresh["manifests"]["schema"]["type"] == "array"
    assert refresh["manifests"]["schema"]["minItems"] == 1
    assert isinstance(refresh["manifests"]["value"], list)
    assert backfill["manifests"]["value"] == "<required>"  # the drop must be named
    assert refresh["shards"]["schema"] == {"type": ["null", "integer"], "minimum": 1}
    assert refresh["recall_threshold"]["schema"]["maximum"] == 1
    assert refresh["runner_options"]["schema"]["type"] == "object"
    assert refresh["config_file"]["value"] is None and refresh["runner_options"]["value"] == {}
    assert refresh["train_adapter"]["schema"] == {"type": ["null", "boolean"]}
    assert refresh["train_adapter"]["value"] is None


# ------------------------------------------------------------------ full dag.test() runs

@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """Generated catalog + drop, roots and an Airflow home shared by the ordered runs below."""
    root = str(tmp_path_factory.mktemp("dag-runs"))
    manifest = write_catalog(os.path.join(root, "catalog"), num_products=8, images_per_product=2,
                             size=96, seed=1)
    # The drop: 3 new products (renamed ids), plus one row repeating an existing image_id.
    raw_drop = write_catalog(os.path.join(root, "drop-src"), num_products=3, images_per_product=2,
                             size=96, seed=7)
    drop = os.path.join(root, "drop", "manifest.csv")
    os.makedirs(os.path.dirname(drop))
    rows = _rename_products(raw_drop, drop, "D")
    with open(drop, "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow(["P0001", "P0001-0", rows[0]["image_uri"], "replaced image",
                                "snacks"])
    empty_drop = os.path.join(root, "empty.csv")
    with open(empty_drop, "w", encoding="utf-8") as f:
        f.write("product_id,image_id,image_uri\n")
    conf = {
        "manifests": [manifest],
        "embeddings_root": os.path.join(root, "embeddings"),
        "index_root": os.path.join(root, "index"),
        "model_handle": tiny_model,
        "shards": 2,
        "config_overrides": {
            "model": {"cache_dir": os.path.join(root, "cache"), "batch_size": 16},
            "index": {"eval_queries": 20},
        },
    }
    session = AirflowSession(os.path.join(root, "airflow"))
    yield {"root": root, "session": session, "manifest": manifest, "drop": drop,
           "drop_rows": rows, "empty_drop": empty_drop, "conf": conf}
    session.close()


def test_refresh_then_rerun_same_date_changes_nothing_else(world):
    conf, index_root, emb_root = world["conf"], world["conf"]["index_root"], world["conf"]["embeddings_root"]
    report, output = world["session"].run("catalog_refresh", conf, D1)
    assert report["state"] == "success", output[-8000:]
    assert set(report["tasks"].values()) == {"success"}
    assert art.read_latest(index_root) == RUN_D1
    assert snapshot.latest_run_id(emb_root) == RUN_D1
    [extra] = report["asset_events"]
    assert extra["version"] == RUN_D1
    assert extra["input_rows"] == 16 == extra["embedded"] + extra["reused"] + extra["dead_lettered"]
    assert extra["embedded"] == 16 and extra["num_vectors"] == 16 and extra["num_shards"] == 2
    assert "duplicates" not in extra and report["tasks"]["duplicates"] == "success"  # off
    manifest = art.read_manifest(index_root, RUN_D1)
    assert manifest.num_vectors == 16 and manifest.num_products == 8

    before = _tree_state(emb_root, index_root)
    report2, output2 = world["session"].run("catalog_refresh", fast(conf), D1)
    assert report2["state"] == "success", output2[-8000:]
    assert report2["asset_events"][0]["version"] == RUN_D1
    assert "already holds exactly snapshot" in output2
    after = _tree_state(emb_root, index_root)
    own_snapshot = os.path.join(emb_root, RUN_D1) + os.sep
    changed = {p for p in set(before) | set(after)
               if before.get(p) != after.get(p) and not p.startswith(own_snapshot)}
    assert changed == set(), f"a re-run of the same date changed other outputs: {changed}"
    assert art.read_latest(index_root) == RUN_D1
    assert [v.version for v in art.list_versions(index_root)] == [RUN_D1]


def test_backfill_bad_params_are_refused_before_beam(world):
    conf, index_root = world["conf"], world["conf"]["index_root"]
    for manifests, reason in (([os.path.join(world["root"], "missing.csv")], "does not exist"),
                              ([world["empty_drop"]], "holds no rows")):
        report, output = world["session"].run("catalog_backfill",
                                              fast({**conf, "manifests": manifests}), D2)
        assert report["state"] == "failed", output[-6000:]
        assert report["tasks"]["validate_params"] == "failed"
        assert report["tasks"]["embed_drop"] == "upstream_failed"
        assert reason in output
        assert "launching embed" not in output
        assert art.read_latest(index_root) == RUN_D1
    # Malformed by schema: Airflow refuses the run conf itself.
    report, output = world["session"].run("catalog_backfill", {**conf, "manifests": "x.csv"}, D2)
    assert report["state"] in ("refused", "failed"), output[-6000:]
    assert "launching embed" not in output
    assert art.read_latest(index_root) == RUN_D1


def test_backfill_adds_the_drop_and_products_are_found(world, tiny_model):
    conf, index_root, emb_root = world["conf"], world["conf"]["index_root"], world["conf"]["embeddings_root"]
    # index.delta_max_rows 0: the full-build path (test_backfill_publishes_a_delta... below
    # takes the default, a delta)
    full = {**conf, "manifests": [world["drop"]],
            "config_overrides": {**conf["config_overrides"],
                                 "index": {"eval_queries": 20, "delta_max_rows": 0}}}
    report, output = world["session"].run("catalog_backfill", fast(full), D2)
    assert report["state"] == "success", output[-8000:]
    assert report["asset_events"][0]["mode"] == "full"
    assert art.read_latest(index_root) == RUN_D2
    assert snapshot.latest_run_id(emb_root) == RUN_D2
    [extra] = report["asset_events"]
    # drop: 6 new images + 1 repeating P0001-0; 15 of the 16 earlier images carried forward
    assert extra["input_rows"] == 7 and extra["embedded"] == 7
    assert extra["replaced_existing"] == 1 and extra["carried_forward"] == 15
    assert extra["num_vectors"] == 22 == extra["num_images"]
    assert "replaced existing rows (the drop wins)" in output
    manifest = art.read_manifest(index_root, RUN_D2)
    assert manifest.num_products == 11
    assert [v.version for v in art.list_versions(index_root)] == [RUN_D1, RUN_D2]

    from pipelines.core.config import load_config
    from serving.searcher import CatalogSearcher
    config = load_config(overrides={"model": {"handle": tiny_model,
                                              "cache_dir": conf["config_overrides"]["model"]["cache_dir"]}})
    searcher = CatalogSearcher.open(index_root, config=config)
    assert searcher.version == RUN_D2
    found = 0
    for row in world["drop_rows"]:
        with open(row["image_uri"], "rb") as f:
            hits = searcher.search_image(f.read(), k=3).hits
        found += hits[0].product_id == row["product_id"]
    assert found == len(world["drop_rows"]), "backfilled products are not found by their images"


def test_failed_gate_keeps_latest_and_says_why(world):
    conf, index_root = world["conf"], world["conf"]["index_root"]
    # 5 separate views per image -> >= 256 rows in one shard -> a ScaNN tree searched with
    # one leaf and no reordering cannot reach recall 1.0.
    failing = {**conf, "shards": 1, "recall_threshold": 1.0,
               "config_overrides": {**conf["config_overrides"],
                                    "augment": {"views": ["original", "hflip", "crop", "rotate",
                                                          "jitter"], "mode": "separate"},
                                    "index": {"eval_queries": 100, "tune_recall_target": None,
                                              "leaves_to_search_fraction": 0.01,
                                              "reorder_multiplier": 1, "brute_force_below": 0}}}
    catalog = write_catalog(os.path.join(world["root"], "catalog-big"), num_products=26,
                            images_per_product=2, size=64, seed=3)
    report, output = world["session"].run("catalog_refresh",
                                          fast({**failing, "manifests": [catalog]}), D3)
    assert report["state"] == "failed", output[-8000:]
    assert report["tasks"]["build_index"] == "failed"
    assert report["tasks"]["publish"] == "upstream_failed"
    assert report["asset_events"] == []
    assert "RecallGateError" in output and "recall@" in output
    assert "a retry cannot fix it" in output  # the retry policy failed the task at once
    assert art.read_latest(index_root) == RUN_D2


def test_handoff_reloads_the_search_service(world, tiny_model):
    from serving_fixtures import LiveServer

    from pipelines.core.config import load_config
    from serving.app import create_app
    conf, index_root = world["conf"], world["conf"]["index_root"]
    config = load_config(overrides={"model": {"handle": tiny_model,
                                              "cache_dir": conf["config_overrides"]["model"]["cache_dir"]}})
    app = create_app(index_root, config, version=RUN_D1, watch=False)
    with LiveServer(app) as live:
        report, output = world["session"].run(
            "index_handoff", {"serving_url": live.url, "index_root": index_root}, D2)
        assert report["state"] == "success", output[-6000:]
        import httpx
        ready = httpx.get(live.url + "/readyz", timeout=30).json()
    assert ready["version"] == RUN_D2
    assert f"POST {live.url}/v1/reload -> 200" in output


def test_refresh_with_the_duplicates_report(world, tmp_path):
    """duplicates.in_refresh: the refresh runs the duplicates job on its new version (an
    exact copy of one image planted under a new product) and its figures ride on the index
    Asset event; off by default (the runs above carry no duplicates figures)."""
    with open(world["manifest"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows.append({**rows[3], "product_id": "RELISTED", "image_id": "RELISTED-0"})
    manifest = str(tmp_path / "manifest.csv")
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    conf = fast({**world["conf"], "manifests": [manifest],
                 "embeddings_root": str(tmp_path / "embeddings"),
                 "index_root": str(tmp_path / "index")})
    conf["config_overrides"]["duplicates"] = {"in_refresh": True}
    report, output = world["session"].run("catalog_refresh", conf, D1)
    assert report["state"] == "success", output[-8000:]
    assert report["tasks"]["duplicates"] == "success"
    [extra] = report["asset_events"]
    dups = extra["duplicates"]
    assert dups["enabled"] is True and dups["version"] == RUN_D1 and dups["reconciled"]
    assert dups["exact_pairs"] == 1 and dups["groups"] >= 1 and dups["images_in_groups"] >= 2
    out = os.path.join(conf["index_root"], "duplicates", RUN_D1)
    assert dups["report"] == os.path.join(out, "report.html")
    assert {"duplicates.parquet", "duplicates.csv", "report.html", "summary.json"} <= set(
        os.listdir(out))
    with open(os.path.join(out, "duplicates.csv"), newline="", encoding="utf-8") as f:
        exact = {r["image_id"] for r in csv.DictReader(f) if r["match"] == "exact"}
    assert exact == {rows[3]["image_id"], "RELISTED-0"}
    assert art.read_latest(conf["index_root"]) == RUN_D1


D4, D5 = "2025-03-04T06:00:00+00:00", "2025-03-05T00:00:00+00:00"
RUN_D4, RUN_D5 = "20250304T060000Z-backfill", "20250305T000000Z-refresh"


def test_backfill_publishes_a_delta_then_the_refresh_folds_it(world, tiny_model):
    """A drop becomes delta 1 of the LATEST version (no rebuild, LATEST unchanged, found by
    serving), a takedown delta 2; the nightly full build then folds both in: its version
    serves exactly what the version + deltas + takedown list served, starts an empty log,
    and equals a from-scratch embed + build of the same catalog (same takedown list)."""
    from pipelines.core.config import load_config
    from pipelines.embed.job import run_embed
    from pipelines.index import deltas as dl
    from pipelines.index.build import run_build_index
    from pipelines.index.reader import open_index
    from serving.searcher import CatalogSearcher
    conf, index_root = world["conf"], world["conf"]["index_root"]
    raw = write_catalog(os.path.join(world["root"], "drop2-src"), num_products=2,
                        images_per_product=2, size=96, seed=11)
    drop2 = os.path.join(world["root"], "drop2", "manifest.csv")
    os.makedirs(os.path.dirname(drop2))
    rows = _rename_products(raw, drop2, "E")
    with open(drop2, "a", newline="", encoding="utf-8") as f:  # replaces an existing image
        csv.writer(f).writerow(["P0002", "P0002-0", rows[1]["image_uri"], "new look", "snacks"])
    assert art.read_latest(index_root) == RUN_D2
    # the failed-gate run above left a 5-view snapshot as the embeddings LATEST: the drop
    # merges into the snapshot the served version was built from
    snapshot.mark_latest(conf["embeddings_root"], RUN_D2)
    report, output = world["session"].run("catalog_backfill",
                                          fast({**conf, "manifests": [drop2]}), D4)
    assert report["state"] == "success", output[-8000:]
    assert set(report["tasks"].values()) == {"success"}
    [extra] = report["asset_events"]
    assert extra["mode"] == "delta" and extra["version"] == RUN_D2 and extra["delta"] == 1
    assert extra["drop_rows"] == 5 and extra["rows_added"] == 5 and extra["rows_removed"] == 1
    assert extra["searchable_rows"] == 22 + 5 - 1 == extra["num_vectors"]
    assert extra["rows_upserted"] == 5 and extra["image_ids_deleted"] == 0
    assert extra["deltas"] == 1 and extra["oldest_age_s"] >= 0
    assert "published as delta 1 of index version" in output
    assert art.read_latest(index_root) == RUN_D2  # no new version
    assert RUN_D4 not in [v.version for v in art.list_versions(index_root)]
    assert dl.committed_seqs(index_root, RUN_D2) == [1]
    config = load_config(overrides={
        "model": {"handle": tiny_model,
                  "cache_dir": conf["config_overrides"]["model"]["cache_dir"]},
        "runner": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
        "index": {"eval_queries": 20, "shards": 2}})
    searcher = CatalogSearcher.open(index_root, config=config)
    for row in rows:
        with open(row["image_uri"], "rb") as f:
            assert searcher.search_image(f.read(), k=3).hits[0].product_id == row["product_id"]
    # a takedown of one of the drop's products (delta 2 + the takedown list): the refresh
    # must keep it out too
    from pipelines.index.delete import delete_ids
    from pipelines.index.takedowns import read_takedowns
    assert delete_ids(index_root, product_ids=["E0001"])["delta"] == 2
    listed = read_takedowns(index_root)
    served_before = dl.served_rows(index_root, RUN_D2, None, listed.image_ids,
                                   listed.product_ids)["live"]
    assert len(served_before) == 22 + 5 - 1 - 2

    manifests = [world["manifest"], world["drop"], drop2]
    report, output = world["session"].run("catalog_refresh",
                                          fast({**conf, "manifests": manifests}), D5)
    assert report["state"] == "success", output[-8000:]
    assert art.read_latest(index_root) == RUN_D5
    assert dl.committed_seqs(index_root, RUN_D5) == []  # a fresh log
    [extra] = report["asset_events"]
    folded = extra["folded"]
    assert folded["version"] == RUN_D2 and folded["deltas"] == 2 and extra["deltas"] == 0
    assert folded["rows_upserted"] == 5 and folded["product_ids_deleted"] == 1
    assert folded["images_folded"] == 3 and folded["images_not_folded"] == 0  # net of E0001
    assert folded["deleted_still_served"] == 0 and folded["new_log_deltas"] == 0
    got = {}
    for shard in open_index(index_root, RUN_D5).load_shards():
        vecs = shard.vectors()
        for j, r in enumerate(shard.rows.to_pylist()):
            got[(r["image_id"], r["view"])] = (r["product_id"], r["image_uri"], r["metadata"],
                                               np.asarray(vecs[j]))
    assert set(got) == served_before  # what the version + delta served, folded in

    scratch = run_embed(manifests, os.path.join(world["root"], "scratch-emb"), config,
                        run_id="scratch")
    scratch_root = os.path.join(world["root"], "scratch-index")
    os.makedirs(scratch_root)  # the same takedown list
    shutil.copy(os.path.join(index_root, "takedowns.json"), scratch_root)
    run_build_index(scratch.snapshot, scratch_root, config, version="scratch")
    want = {}
    for shard in open_index(scratch_root, "scratch").load_shards():
        vecs = shard.vectors()
        for j, r in enumerate(shard.rows.to_pylist()):
            want[(r["image_id"], r["view"])] = (r["product_id"], r["image_uri"], r["metadata"],
                                                np.asarray(vecs[j]))
    assert set(got) == set(want)
    for key, (pid, uri, meta, vec) in want.items():
        assert got[key][:3] == (pid, uri, meta), key
        np.testing.assert_allclose(got[key][3], vec, atol=1e-5)
