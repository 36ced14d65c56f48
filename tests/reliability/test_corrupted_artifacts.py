"""Corrupt each file kind of a real index version: the load is refused with a clear
reason, by the library loader (pipelines.index.reader.open_index) and by the serving
searcher's reload, and the previous good version stays the one loaded.

The index is real: two tree-AH shards (ScaNN tree + asymmetric hashing + reordering,
so every ScaNN file kind exists) built by the build_index Beam job.
"""
from __future__ import annotations

import dataclasses

import json
import os
import shutil
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.index import artifact as art
from pipelines.index import reader
from pipelines.index.build import run_build_index
from serving.searcher import CatalogSearcher
from index_fixtures import clustered_vectors, make_config, write_snapshot

GOOD, BAD = "v0001", "v0002"


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory) -> str:
    """Index root: v0001 and v0002 (same content), both passed, LATEST = v0001."""
    base = tmp_path_factory.mktemp("corrupt")
    snap = write_snapshot(str(base / "snap"), clustered_vectors(640, 16, seed=11))
    root = str(base / "index")
    config = make_config(shards=2, brute_force_below=0, tune_recall_target=None,
                         recall_threshold=0.5)
    run_build_index(snap, root, config, version=BAD)
    shutil.copytree(art.version_dir(root, BAD), art.version_dir(root, GOOD))
    manifest = art.read_manifest(root, BAD)
    art.write_manifest(root, GOOD, dataclasses.replace(manifest, version=GOOD))
    art.write_latest(root, GOOD)
    assert {e.kind for e in manifest.shards} == {"scann_tree_ah"}
    return root


def _shard_dir(root: str, shard: int = 1) -> str:
    return os.path.join(art.version_dir(root, BAD), "shards", art.shard_name(shard, 2))


def _rechecksum(root: str) -> None:
    manifest = art.read_manifest(root, BAD)
    shards = [dataclasses.replace(entry, files=[art.ShardFile(**f) for f in art.local_dir_checksums(
        os.path.join(art.version_dir(root, BAD), entry.path))]) for entry in manifest.shards]
    art.write_manifest(root, BAD, dataclasses.replace(manifest, shards=shards))


def _flip(path: str) -> None:
    with open(path, "r+b") as fh:
        fh.seek(max(0, os.path.getsize(path) // 2))
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _edit_manifest(fn: Callable[[dict], None]) -> Callable[[str], None]:
    def apply(root: str) -> None:
        path = os.path.join(art.version_dir(root, BAD), "manifest.json")
        with open(path) as fh:
            manifest = json.load(fh)
        fn(manifest)
        with open(path, "w") as fh:
            json.dump(manifest, fh)
    return apply


def _zero_vectors(root: str) -> None:
    path = os.path.join(_shard_dir(root), "dataset.npy")
    np.save(path, np.zeros_like(np.load(path)))
    _rechecksum(root)


def _scale_vectors(root: str) -> None:
    path = os.path.join(_shard_dir(root), "dataset.npy")
    np.save(path, np.load(path) * 0.5)
    _rechecksum(root)


def _fewer_rows(root: str) -> None:
    path = os.path.join(_shard_dir(root), "rows.parquet")
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 3), path)
    _rechecksum(root)


def _garbage_scann_config(root: str) -> None:
    with open(os.path.join(_shard_dir(root), "scann_config.pb"), "wb") as fh:
        fh.write(b"\x08\x96\x01 not a scann config \xff\xff")
    _rechecksum(root)


def _shard_files(root_hint: str) -> list[str]:
    return sorted(os.listdir(_shard_dir(root_hint)))


def _cases(two_versions: str) -> dict[str, tuple[Callable[[str], None], str]]:
    """kind -> (corrupt(root), a substring the refusal reason must contain)."""
    cases: dict[str, tuple[Callable[[str], None], str]] = {}
    for name in _shard_files(two_versions):
        cases[f"flipped_byte:{name}"] = (
            lambda root, n=name: _flip(os.path.join(_shard_dir(root), n)), "checksum mismatch")
        cases[f"deleted:{name}"] = (
            lambda root, n=name: os.unlink(os.path.join(_shard_dir(root), n)), "missing")
        cases[f"truncated:{name}"] = (
            lambda root, n=name: os.truncate(os.path.join(_shard_dir(root), n), 7), "bytes")
    cases.update({
        "manifest_truncated": (lambda root: os.truncate(
            os.path.join(art.version_dir(root, BAD), "manifest.json"), 40), "incomplete|JSON"),
        "manifest_deleted": (lambda root: os.unlink(
            os.path.join(art.version_dir(root, BAD), "manifest.json")), "incomplete"),
        "manifest_not_json": (lambda root: open(os.path.join(
            art.version_dir(root, BAD), "manifest.json"), "wb").write(b"\x00\xff garbage"),
            "JSON|incomplete"),
        "manifest_wrong_version": (_edit_manifest(lambda m: m.update(version=GOOD)),
                                   "names version"),
        "manifest_wrong_format": (_edit_manifest(lambda m: m.update(format="other/9")),
                                  "not an index manifest"),
        "manifest_status_rejected": (_edit_manifest(lambda m: m.update(status="rejected")),
                                     "not servable"),
        "manifest_path_traversal": (_edit_manifest(
            lambda m: m["shards"][1].update(path="../v0001/shards/shard-00001-of-00002")),
            "has path"),
        "manifest_file_name_traversal": (_edit_manifest(
            lambda m: m["shards"][1]["files"][0].update(name="../../../../etc/passwd")),
            "invalid file entry"),
        "manifest_num_vectors": (_edit_manifest(lambda m: m.update(num_vectors=1)),
                                 "num_vectors"),
        "manifest_shard_row_count": (_edit_manifest(lambda m: (
            m["shards"][1].update(num_vectors=m["shards"][1]["num_vectors"] + 1),
            m.update(num_vectors=m["num_vectors"] + 1))), "manifest says"),
        "manifest_dim": (_edit_manifest(lambda m: m.update(dim=32)), "manifest says"),
        "manifest_shards_missing": (_edit_manifest(lambda m: m.pop("shards")), "shard table"),
        "zeroed_vectors_rechecksummed": (_zero_vectors, "not unit length"),
        "scaled_vectors_rechecksummed": (_scale_vectors, "not unit length"),
        "rows_parquet_fewer_rows_rechecksummed": (_fewer_rows, "rows"),
        "scann_config_garbage_rechecksummed": (_garbage_scann_config, ""),
        "version_folder_deleted": (lambda root: shutil.rmtree(art.version_dir(root, BAD)),
                                   "incomplete"),
    })
    return cases


def test_every_corruption_is_refused_and_the_good_version_keeps_serving(two_versions, tmp_path):
    import re
    cases = _cases(two_versions)
    assert len(cases) >= 25
    failures = []
    for n, (kind, (corrupt, reason)) in enumerate(sorted(cases.items())):
        root = shutil.copytree(two_versions, str(tmp_path / f"r{n}"))
        searcher = CatalogSearcher(root, config=make_config(), load_embedder=False)
        assert searcher.reload().status == "loaded" and searcher.version == GOOD
        corrupt(root)
        art.write_latest(root, BAD)
        # the library loader refuses
        try:
            reader.open_index(root).load_shards()
            failures.append((kind, "open_index accepted it"))
        except Exception as e:  # noqa: BLE001 - any refusal, checked for its reason below
            if not isinstance(e, art.IndexArtifactError) and reason:
                failures.append((kind, f"refused with {type(e).__name__}: {e}"))
            elif reason and not re.search(reason, str(e)):
                failures.append((kind, f"reason {str(e)!r} lacks {reason!r}"))
        # the serving searcher refuses the reload and keeps the good version
        outcome = searcher.reload()
        if outcome.status != "refused" or searcher.version != GOOD:
            failures.append((kind, f"reload {outcome.status}, serving {searcher.version}"))
        shutil.rmtree(root)
    assert not failures, failures


@pytest.mark.parametrize("garbage", [b"", b"\xff\xfe\x00\x01", b"../v0001", b"v" * 5000,
                                     b"no-such-version\n"])
def test_garbage_latest_is_refused_and_the_good_version_keeps_serving(two_versions, tmp_path,
                                                                        garbage):
    root = shutil.copytree(two_versions, str(tmp_path / "index"))
    searcher = CatalogSearcher(root, config=make_config(), load_embedder=False)
    assert searcher.reload().status == "loaded"
    with open(os.path.join(root, "LATEST"), "wb") as fh:
        fh.write(garbage)
    outcome = searcher.reload()
    assert outcome.status in ("refused", "unchanged") and searcher.version == GOOD
    if garbage:
        with pytest.raises(art.IndexArtifactError):
            reader.open_index(root)


def test_index_info_verify_reports_the_corrupted_version(two_versions, tmp_path, capsys):
    from catalog_search.cli import main as cli_main
    root = shutil.copytree(two_versions, str(tmp_path / "index"))
    _zero_vectors(root)
    assert cli_main(["index-info", "--index-root", root, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "corrupted" in out and "not unit length" in out and "1 ok, 1 corrupted" in out
