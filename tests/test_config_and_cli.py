"""Typed config loading, runner options, and the catalog-search CLI's argument errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.core.config import Config, ConfigError, DEFAULT_CONFIG_PATH, load_config, read_yaml
from pipelines.core.runner import pipeline_options

REPO = Path(__file__).resolve().parent.parent


def test_default_yaml_matches_the_dataclass_defaults():
    # Code that builds a Config() directly (tests, library callers) gets the same defaults.
    assert load_config().to_dict() == Config().to_dict()


def test_packaged_defaults_are_configs_default_yaml():
    # The package reads its own copy (what a wheel install has); the documented file is
    # configs/default.yaml. The copy is a symlink, so they cannot drift unless it is replaced.
    assert DEFAULT_CONFIG_PATH.parent.parent == REPO / "pipelines"
    assert DEFAULT_CONFIG_PATH.read_bytes() == (REPO / "configs" / "default.yaml").read_bytes()
    assert read_yaml(DEFAULT_CONFIG_PATH) == read_yaml(REPO / "configs" / "default.yaml") != {}


@pytest.mark.parametrize("override,message", [
    ({"modle": {}}, "unknown config section 'modle'"),
    ({"model": {"batchsize": 3}}, "unknown config key model.batchsize"),
    ({"model": {"batch_size": "32"}}, "model.batch_size: expected an integer"),
    ({"index": {"recall_threshold": 1.5}}, "index.recall_threshold"),
    ({"augment": {"views": ["original", "sepia"]}}, "unknown view 'sepia'"),
    ({"runner": {"direct_running_mode": "threads"}}, "runner.direct_running_mode"),
])
def test_bad_config_fails_fast_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=override)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    # a refused key names the file (or the overrides) that set it
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("index:\n  shards: 0\n  shrads: 2\n")
    with pytest.raises(ConfigError, match=rf"config key index\.shards: must be >= 1, got 0 "
                                          rf"\(set in {wrong}\)") as e:
        load_config(wrong)
    assert f"unknown config key index.shrads (set in {wrong})" in str(e.value)
    with pytest.raises(ConfigError, match=r"index\.shards: .*\(set in the overrides\)"):
        load_config(wrong, {"index": {"shards": -1, "shrads": None}})


def test_direct_runner_options():
    opts = pipeline_options(load_config(), "catalog-embed-x").get_all_options()
    assert opts["direct_running_mode"] == "multi_processing"
    assert opts["direct_num_workers"] == 2
    assert opts["runner"] is None  # the FnApiRunner engine is chosen in make_pipeline


def test_dataflow_and_flink_option_files_assemble():
    # the shipped files hold example values (refused, tests/test_worker_image.py): set ours
    def with_options(name, **options):  # runner.options is replaced as a whole by a merge
        path = REPO / "configs" / name
        merged = {**read_yaml(path)["runner"]["options"], **options}
        return load_config(path, {"runner": {"options": merged}})

    df = with_options("dataflow.yaml", **{
        "project": "shop-prod", "temp_location": "gs://shop-ml/tmp",
        "staging_location": "gs://shop-ml/staging",
        "sdk_container_image": "us-docker.pkg.dev/shop-prod/cs/beam-worker:0.1.0"})
    opts = pipeline_options(df, "catalog-embed-20261122").get_all_options()
    assert opts["runner"] == "DataflowRunner"
    assert opts["project"] == "shop-prod" and opts["region"] == "us-central1"
    assert opts["temp_location"].startswith("gs://")
    assert opts["experiments"] == ["use_runner_v2"]
    assert opts["sdk_container_image"] == "us-docker.pkg.dev/shop-prod/cs/beam-worker:0.1.0"
    assert opts["setup_file"] is None  # the image has the package
    assert opts["direct_running_mode"] == "in_memory"  # Beam's default: not set by us
    fl = with_options("flink.yaml", environment_config="registry.shop/cs/beam-worker:0.1.0")
    fopts = pipeline_options(fl, "j").get_all_options()
    assert fopts["runner"] == "FlinkRunner" and fopts["flink_master"] == "flink-jobmanager:8081"
    assert fopts["parallelism"] == 16
    assert fopts["environment_type"] == "DOCKER"
    assert fopts["environment_config"] == "registry.shop/cs/beam-worker:0.1.0"


def test_cluster_runner_without_required_options_fails_fast():
    cfg = load_config(overrides={"runner": {"name": "DataflowRunner"}})
    with pytest.raises(ConfigError, match="project, region, temp_location"):
        pipeline_options(cfg, "j")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "catalog_search.cli", *args], capture_output=True,
                          text=True, cwd=cwd or REPO, timeout=120)


def test_cli_help_lists_every_command():
    r = _cli("--help")
    assert r.returncode in (0, 2)
    for cmd in ("embed", "build-index", "index-info", "query", "serve", "evaluate"):
        assert cmd in r.stdout


@pytest.mark.heavy
def _main(capsys, *args: str) -> tuple[int, str]:
    """catalog_search.cli.main in this process (argument errors exit through argparse)."""
    from catalog_search.cli import main
    try:
        rc = main(list(args))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    return rc, capsys.readouterr().err


def test_cli_embed_argument_errors(tmp_path, monkeypatch, capsys):
    # in-process: the errors are the CLI's, not the process's (test_cli_help_lists_every_command
    # and tests/test_first_run.py run the real `python -m catalog_search.cli`)
    monkeypatch.chdir(tmp_path)
    rc, err = _main(capsys, "embed", "--out", str(tmp_path))
    assert rc == 2 and "--manifest" in err
    rc, err = _main(capsys, "embed", "--manifest", str(tmp_path / "none.csv"),
                    "--out", str(tmp_path / "o"))
    assert rc == 1 and "does not exist" in err
    rc, err = _main(capsys, "embed", "--manifest", "x.csv", "--out", "o", "--workers", "0")
    assert rc == 2 and "--workers" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("fetch: {timeout_s: -1}\n")
    rc, err = _main(capsys, "--config", str(bad), "embed", "--manifest", "x.csv", "--out", "o")
    assert rc == 2 and "fetch.timeout_s" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written


@pytest.mark.heavy
def test_cli_embed_prints_a_reconciled_summary(tiny_model, tmp_path):
    from pipelines.embed.sample_catalog import write_catalog
    manifest = write_catalog(str(tmp_path / "cat"), num_products=2, images_per_product=2, size=96)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{handle: {tiny_model}, cache_dir: {tmp_path / 'cache'}}}\n"
                   "runner: {direct_running_mode: in_memory}\n")
    r = _cli("embed", "--config", str(cfg), "--manifest", manifest, "--out", str(tmp_path / "e"),
             "--run-id", "r1")
    assert r.returncode == 0, r.stderr
    assert "input rows   4" in r.stdout and "check        4 = 4 + 0 + 0  ok" in r.stdout
    r = _cli("embed", "--config", str(cfg), "--manifest", manifest, "--out", str(tmp_path / "e"),
             "--run-id", "r2", "--previous", "latest")
    assert r.returncode == 0, r.stderr
    assert "reused     4" in r.stdout
