"""Index artifact: checksums, subset loading, publish/LATEST, retention, concurrent publishers."""
from __future__ import annotations

import dataclasses

import datetime as dt
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

from pipelines.core import filesystem as fs
from pipelines.index import artifact as art
from pipelines.index import reader
from catalog_search.cli import main as cli_main
from pipelines.index.build import run_build_index
from pipelines.index.sharded_search import ShardedSearcher
from index_fixtures import clustered_vectors, make_config, write_snapshot


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
    """An index root with one real published 2-shard version "v0001"."""
    base = tmp_path_factory.mktemp("artifact")
    snap_path = write_snapshot(str(base / "snap"), clustered_vectors(160, 16, seed=21))
    root = str(base / "index")
    run_build_index(snap_path, root, make_config(shards=2), version="v0001")
    return root


def copy_root(built: str, dest: str) -> str:
    shutil.copytree(built, dest)
    return dest


def add_version(root: str, name: str, source: str = "v0001", status: str = "passed") -> None:
    """A new version folder: a byte copy of a real built version, renamed (real files)."""
    shutil.copytree(art.version_dir(root, source), art.version_dir(root, name))
    manifest = art.read_manifest(root, source)
    art.write_manifest(root, name, dataclasses.replace(manifest, version=name, status=status))


def test_corrupted_shard_file_is_detected(built, tmp_path):
    root = copy_root(built, str(tmp_path / "index"))
    path = os.path.join(art.version_dir(root, "v0001"), art.shard_relpath(1, 2), "dataset.npy")
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0xFF  # same size, one flipped byte
    open(path, "wb").write(bytes(data))
    opened = reader.open_index(root)  # sizes match: opening succeeds
    with pytest.raises(art.IndexIntegrityError, match="checksum mismatch.*shard-00001-of-00002"):
        opened.load_shards()
    assert [s.shard for s in opened.load_shards([0])] == [0]  # the good shard still loads
    assert reader.open_index(root, verify=False).load_shards([1])[0].num_vectors > 0

    open(path, "ab").write(b"extra")
    with pytest.raises(art.IndexIntegrityError, match="bytes, manifest says"):
        reader.open_index(root)
    os.unlink(path)
    with pytest.raises(art.IndexIntegrityError, match="is missing"):
        reader.open_index(root)


def test_load_a_subset_of_shards(built):
    opened = reader.open_index(built)
    assert opened.version == "v0001" and opened.num_shards == 2
    one = opened.load_shards([1])
    assert [s.shard for s in one] == [1]
    assert one[0].num_vectors == opened.manifest.shards[1].num_vectors
    assert one[0].vectors().shape == (one[0].num_vectors, 16)
    both = ShardedSearcher(opened.load_shards())
    part = ShardedSearcher(one)
    queries = clustered_vectors(5, 16, seed=22)
    _, rows = part.search(queries, 3)
    assert {part.image_ids[r] for r in rows.ravel()} <= set(both.image_ids)
    with pytest.raises(art.IndexArtifactError, match="cannot load \\[2\\]"):
        opened.load_shards([2])


def test_publish_only_complete_passed_versions(built, tmp_path):
    root = copy_root(built, str(tmp_path / "index"))
    os.makedirs(art.version_dir(root, "v0002"))  # incomplete: no manifest
    with pytest.raises(art.IndexArtifactError, match="incomplete"):
        art.publish_version(root, "v0002")
    add_version(root, "v0003", status="rejected")
    with pytest.raises(art.IndexArtifactError, match="only passed versions publish"):
        art.publish_version(root, "v0003")
    assert art.read_latest(root) == "v0001"
    assert [(v.version, v.state) for v in art.list_versions(root)] == [
        ("v0001", "passed"), ("v0002", "incomplete"), ("v0003", "rejected")]


def test_latest_moves_forward_unless_rollback(built, tmp_path):
    root = copy_root(built, str(tmp_path / "index"))
    add_version(root, "v0002")
    assert art.publish_version(root, "v0002") is True
    assert art.publish_version(root, "v0001") is False  # older: a newer one already won
    assert art.read_latest(root) == "v0002"
    assert art.publish_version(root, "v0001", allow_rollback=True) is True
    assert art.read_latest(root) == "v0001"


def test_retention_keeps_newest_and_never_latest(built, tmp_path):
    root = copy_root(built, str(tmp_path / "index"))
    for name in ("v0002", "v0003", "v0004"):
        add_version(root, name)
    add_version(root, "v0001a", status="rejected")   # older than the kept window
    add_version(root, "v0005", status="rejected")    # newest: stays for inspection
    os.makedirs(art.version_dir(root, "v0006"))      # a build still running
    art.publish_version(root, "v0002", allow_rollback=True)  # LATEST = an old version
    deleted = art.apply_retention(root, keep=2)
    assert sorted(deleted) == ["v0001", "v0001a"]
    assert [v.version for v in art.list_versions(root)] == [
        "v0002", "v0003", "v0004", "v0005", "v0006"]
    assert art.publish_version(root, "v0004", retention=1) is True
    assert [v.version for v in art.list_versions(root)] == ["v0004", "v0005", "v0006"]
    assert reader.open_index(root).version == "v0004"
    with pytest.raises(art.IndexArtifactError, match="at least 1"):
        art.apply_retention(root, keep=0)


def test_retention_spares_an_older_build_still_writing_until_it_goes_quiet(built, tmp_path):
    """A build that started before a newer version was published has the older name: its
    folder is incomplete while it writes shards, and retention must not delete it then."""
    root = copy_root(built, str(tmp_path / "index"))
    os.makedirs(os.path.join(art.version_dir(root, "v0001b"), "shards"))  # writing shards
    for name in ("v0002", "v0003"):
        add_version(root, name)
    assert art.publish_version(root, "v0003", retention=1) is True
    assert [v.version for v in art.list_versions(root)] == ["v0001b", "v0003"]
    stale = time.time() - art.INCOMPLETE_GRACE_S - 60  # a crashed build, quiet for long
    for dirpath, _dirs, _files in os.walk(art.version_dir(root, "v0001b")):
        os.utime(dirpath, (stale, stale))
    assert art.apply_retention(root, keep=1) == ["v0001b"]
    assert [v.version for v in art.list_versions(root)] == ["v0003"]


@pytest.mark.heavy
def test_retention_through_builds(tmp_path):
    root = str(tmp_path / "index")
    snap_path = write_snapshot(str(tmp_path / "snap"), clustered_vectors(60, 8, seed=23))
    names = [run_build_index(snap_path, root, make_config(retention=2)).version
             for _ in range(3)]
    assert names == sorted(names)  # names sort by creation time
    assert [v.version for v in art.list_versions(root)] == names[1:]
    assert art.read_latest(root) == names[2]


def test_concurrent_publishers_never_expose_an_incomplete_version(built, tmp_path):
    root = copy_root(built, str(tmp_path / "index"))
    template = str(tmp_path / "template")  # v0001 itself gets pruned by retention
    shutil.copytree(art.version_dir(root, "v0001"), template)
    template_manifest = art.read_manifest(root, "v0001")
    errors: list[str] = []
    stop = threading.Event()

    def publisher(prefix: str) -> None:
        try:
            for i in range(15):
                name = f"v1{i:03d}{prefix}"
                # write the shards first, the manifest last, then publish (as build does)
                shutil.copytree(os.path.join(template, "shards"),
                                os.path.join(art.version_dir(root, name), "shards"))
                art.write_manifest(root, name, dataclasses.replace(template_manifest, version=name))
                art.publish_version(root, name, retention=2)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(f"publisher {prefix}: {e!r}")

    def watcher() -> None:
        while not stop.is_set():
            latest = art.read_latest(root)
            try:
                manifest = art.read_manifest(root, latest)
                assert manifest.status == "passed"
            except Exception as e:
                # retention may delete a version after we read LATEST; only an incomplete
                # version that LATEST still names is an error
                if art.read_latest(root) == latest:
                    errors.append(f"LATEST={latest}: {e!r}")

    threads = [threading.Thread(target=publisher, args=(p,)) for p in "ab"]
    reading = threading.Thread(target=watcher)
    reading.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    reading.join()
    assert errors == []
    assert art.read_latest(root) == "v1014b"  # the newest name wins, whatever the timing
    assert reader.open_index(root).load_shards()[0].num_vectors > 0


def test_version_names_sort_by_time_and_are_checked():
    t0 = dt.datetime(2026, 11, 22, 4, 35, 12, 5000, tzinfo=dt.timezone.utc)
    a = art.new_version_name("x", now=t0)
    b = art.new_version_name("x", now=t0 + dt.timedelta(milliseconds=1))
    c = art.new_version_name("x", now=t0 + dt.timedelta(seconds=3600))
    assert a.startswith("20261122T043512.005Z-") and a < b < c
    assert art.check_version_name(a) == a
    for bad in ("", "../x", "a/b", ".hidden", "x" * 200):
        with pytest.raises(art.IndexArtifactError, match="invalid index version name"):
            art.check_version_name(bad)


def test_open_without_latest_names_the_problem(tmp_path):
    with pytest.raises(art.IndexArtifactError, match="no published index"):
        reader.open_index(str(tmp_path))
    assert art.read_latest(str(tmp_path)) is None
    assert art.list_versions(str(tmp_path)) == []


def test_index_info_reports_versions(built, tmp_path, capsys):
    root = copy_root(built, str(tmp_path / "index"))
    add_version(root, "v0002", status="rejected")
    assert cli_main(["index-info", "--index-root", root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["latest"] == "v0001"
    assert [(v["version"], v["state"], v["latest"]) for v in info["versions"]] == [
        ("v0001", "passed", True), ("v0002", "rejected", False)]
    assert info["versions"][0]["recall"]["recall@10"] == 1.0
    assert info["versions"][0]["num_vectors"] == 160 and info["versions"][0]["num_shards"] == 2
    manifest = art.read_manifest(root, "v0001")
    on_disk = fs.read_json(art.manifest_uri(root, "v0001"))
    for key in ("format", "version", "status", "model", "dim", "distance", "num_vectors",
                "shards", "scann", "evaluation", "source_snapshot", "created_at"):
        assert key in on_disk
    assert fs.exists(fs.join(root, art.LATEST_FILE))
    assert np.isclose(manifest.recall(1), 1.0)
