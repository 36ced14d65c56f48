"""One regression test (or more) per defect of issue 24 (numbers as in the issue).

Each failed before its fix (see the commit that names the defect). Real components: the
CLI in subprocesses, Beam on the DirectRunner, real index versions, HTTP on loopback.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from catalog_search.cli import main as cli_main
from pipelines.embed import snapshot
from pipelines.embed.job import EmbedError, run_embed, run_lock_name
from pipelines.embed.sample_catalog import write_catalog
from pipelines.index import artifact as art
from pipelines.index import reader
from pipelines.index.build import run_build_index
from pipelines.index.build_plan import IndexBuildError
from test_index_build import clustered_vectors, make_config, write_snapshot


def _env() -> dict[str, str]:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")


def _cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "catalog_search.cli", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_holder(proc: subprocess.Popen, lock: str, limit_s: float = 120) -> str:
    """The holder line `proc` wrote into `lock`, once it is there (fails if proc exits first)."""
    deadline = time.time() + limit_s
    while time.time() < deadline:
        try:
            with open(lock) as fh:
                text = fh.read()
        except OSError:
            text = ""
        if f"pid {proc.pid} " in text:
            return text
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"the first run ended without taking its run lock {lock}:\n"
                                 f"{out[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no run lock {lock} within {limit_s}s")


@pytest.fixture()
def cli_config(tmp_path, tiny_model) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(f"model: {{handle: {tiny_model}, cache_dir: {tmp_path / 'cache'}, "
                    "batch_size: 4}\nrunner: {direct_running_mode: in_memory, "
                    "direct_num_workers: 1}\nindex: {eval_queries: 50}\n")
    return str(path)


# --------------------------------------------------------------------------- defect 1

@pytest.mark.heavy
def test_defect_1_second_embed_of_a_run_id_is_refused_naming_the_holder(
        tmp_path, cli_config, capsys):
    """Before: both ran; the folder ended with one run's rows while the other reported
    success (or died on _counts.json). Now the second is refused at once, exit 1, with the
    holder's pid, and the first completes with all of its rows."""
    big = write_catalog(str(tmp_path / "big"), num_products=12, images_per_product=3, size=64)
    small = write_catalog(str(tmp_path / "small"), num_products=4, images_per_product=3, size=64)
    out = str(tmp_path / "emb")
    first = _cli(["--config", cli_config, "embed", "--manifest", big, "--out", out,
                  "--run-id", "r1"])
    holder = _wait_for_holder(first, os.path.join(out, run_lock_name("r1")))
    assert "embed" in holder
    started = time.time()
    rc = cli_main(["--config", cli_config, "embed", "--manifest", small, "--out", out,
                   "--run-id", "r1"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert time.time() - started < 30  # refused at once, not after a run
    assert "already running" in err and f"pid {first.pid} " in err, err
    text = first.communicate(timeout=300)[0].decode()
    assert first.returncode == 0, text
    summary = snapshot.read_summary(os.path.join(out, "r1"))
    assert summary.input_rows == 36 and summary.embedded == 36
    assert snapshot.load(os.path.join(out, "r1")).table.num_rows == 36
    assert snapshot.latest_run_id(out) == "r1"
    assert not os.path.exists(os.path.join(out, run_lock_name("r1")))  # released


def test_defect_1_run_lock_is_released_when_its_holder_dies(tmp_path, embed_config):
    """A SIGKILLed holder leaves no stale lock: the kernel drops the flock."""
    out = tmp_path / "emb"
    out.mkdir()
    lock = str(out / run_lock_name("r1"))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pipelines.core.locks import run_lock\n"
        f"with run_lock({str(out)!r}, {run_lock_name('r1')!r}, 'x'):\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, env=_env())
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    manifest = write_catalog(str(tmp_path / "cat"), num_products=2, images_per_product=1,
                             size=64)
    with pytest.raises(EmbedError, match=f"already running: pid {holder.pid} "):
        run_embed([manifest], str(out), embed_config, run_id="r1")
    assert not (out / "r1").exists()
    holder.kill()
    holder.wait()
    assert os.path.exists(lock)  # the dead holder's file is still there, unlocked
    summary = run_embed([manifest], str(out), embed_config, run_id="r1")
    assert summary.embedded == 2


def _snap(tmp_path, n: int = 400) -> str:
    return write_snapshot(str(tmp_path / "snap"), clustered_vectors(n, 16, seed=5))


@pytest.mark.heavy
def test_defect_1_second_build_of_a_version_is_refused_and_the_first_publishes(
        tmp_path, cli_config, capsys):
    """Before: two concurrent `build-index --version v1` both failed, nothing published."""
    snap = _snap(tmp_path, 3000)
    root = str(tmp_path / "index")
    first = _cli(["--config", cli_config, "build-index", "--embeddings", snap,
                  "--index-root", root, "--shards", "2", "--version", "v1"])
    _wait_for_holder(first, os.path.join(root, art.build_lock_name("v1")))
    rc = cli_main(["--config", cli_config, "build-index", "--embeddings", snap,
                   "--index-root", root, "--shards", "2", "--version", "v1"])
    err = capsys.readouterr().err
    assert rc == 1 and "already running" in err and f"pid {first.pid} " in err, err
    text = first.communicate(timeout=300)[0].decode()
    assert first.returncode == 0, text
    assert art.read_latest(root) == "v1"
    reader.open_index(root).load_shards()


# --------------------------------------------------------------------------- defect 2

def _interrupted(root: str, version: str) -> None:
    """What a build killed mid-way leaves: staging and a shard, no manifest.json."""
    vdir = art.version_dir(root, version)
    os.makedirs(os.path.join(vdir, "_build"))
    with open(os.path.join(vdir, "_build", "part-00000.parquet"), "wb") as fh:
        fh.write(b"PAR1 partial")
    os.makedirs(os.path.join(vdir, "shards", art.shard_name(0, 2)))


def test_defect_2_unpublished_incomplete_version_is_replaced_by_its_rerun(tmp_path):
    snap = _snap(tmp_path)
    root = str(tmp_path / "index")
    run_build_index(snap, root, make_config(), version="v1")
    _interrupted(root, "v2")
    manifest = run_build_index(snap, root, make_config(), version="v2")
    assert manifest.version == "v2" and art.read_latest(root) == "v2"
    assert not os.path.exists(os.path.join(art.version_dir(root, "v2"), "_build"))
    reader.open_index(root).load_shards()
    # published versions stay immutable
    with pytest.raises(IndexBuildError, match="already exists.*state is passed"):
        run_build_index(snap, root, make_config(), version="v1")


def test_defect_2_incomplete_version_latest_names_is_never_replaced(tmp_path):
    snap = _snap(tmp_path)
    root = str(tmp_path / "index")
    _interrupted(root, "v1")
    art.write_latest(root, "v1")  # e.g. a hand-edited LATEST: never delete what it names
    with pytest.raises(IndexBuildError, match="LATEST names it"):
        run_build_index(snap, root, make_config(), version="v1")
    assert os.path.exists(os.path.join(art.version_dir(root, "v1"), "_build"))


def test_defect_2_index_info_verify_does_not_count_incomplete_versions_as_ok(
        tmp_path, capsys):
    snap = _snap(tmp_path)
    root = str(tmp_path / "index")
    run_build_index(snap, root, make_config(), version="v1")
    _interrupted(root, "v0")
    rc = cli_main(["index-info", "--index-root", root, "--verify"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "verified: 1 ok, 0 corrupted, 1 incomplete (v0)" in out, out
    assert "an interrupted build, never published" in out
    rc = cli_main(["index-info", "--index-root", root, "--verify", "--json"])
    report = json.loads(capsys.readouterr().out)
    v0 = next(v for v in report["versions"] if v["version"] == "v0")
    assert v0["state"] == "incomplete" and v0["verified"] is False
    assert v0["building"] is False
