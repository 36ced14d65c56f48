"""ScaNN builder options (issue 18): PCA projection, SOAR, leaves x sqrt(N), int8 / bfloat16
reordering. Each builds, serializes, reloads and returns the hits it returned before
serializing; a build records them in the manifest, keeps float32 stored vectors the loader
reads, passes the gate; an index built before these options (format 1) still loads."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from pipelines.core.config import ConfigError
from pipelines.index import artifact as art
from pipelines.index import reader
from pipelines.index.build import IndexBuildError, run_build_index
from pipelines.index.build_plan import BuildParams
from pipelines.index.build_shard import (VECTORS_FILE, builder_options, leaves_for,
                                         make_tree_ah_builder)
from pipelines.index.manifest import FORMAT_V1
from pipelines.index.sharded_search import ShardedSearcher, search_exact
from index_fixtures import clustered_vectors, exact_ids, make_config, write_snapshot

DIM = 64


def _params(**options) -> BuildParams:
    base = dict(num_neighbors=10, brute_force_below=0, leaves_to_search_fraction=0.2,
                reorder_multiplier=10, anisotropic_threshold=0.2, dimensions_per_block=2,
                tune_recall_target=None, training_threads=1)
    return BuildParams(**{**base, **options})


OPTIONS = {
    "pca": dict(projection_dim=16),
    "soar": dict(soar_lambda=1.5),
    "leaves_4_sqrt_n": dict(leaves_per_sqrt_n=4.0),
    "int8": dict(reorder_dtype="int8"),
    "bfloat16": dict(reorder_dtype="bfloat16"),
    "all": dict(projection_dim=16, soar_lambda=1.5, leaves_per_sqrt_n=4.0,
                reorder_dtype="int8"),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_option_builds_serializes_reloads_with_the_same_hits(name, tmp_path):
    from scann.scann_ops.py import scann_ops_pybind

    vectors = clustered_vectors(2000, DIM, seed=5)
    queries = clustered_vectors(30, DIM, seed=6)
    p = _params(**OPTIONS[name])
    options = builder_options(p, DIM)
    num_leaves = leaves_for(len(vectors), len(vectors), p.leaves_per_sqrt_n)
    assert num_leaves == round(p.leaves_per_sqrt_n * 2000 ** 0.5)
    leaves = max(1, num_leaves // 5)
    searcher = make_tree_ah_builder(scann_ops_pybind, vectors, 10, num_leaves, leaves, 100,
                                    options).build()
    before_idx, before_dist = searcher.search_batched(queries, 10, 100, leaves)
    searcher.serialize(str(tmp_path), relative_path=True)
    files = set(os.listdir(tmp_path))
    if p.soar_lambda:
        assert "hashed_dataset_soar.npy" in files
    if p.reorder_dtype == "int8":
        assert "int8_dataset.npy" in files and "dataset.npy" not in files
    if p.reorder_dtype == "bfloat16":
        assert "bfloat16_dataset.npy" in files and "dataset.npy" not in files
    loaded = scann_ops_pybind.load_searcher(str(tmp_path), assets_backcompat_shim=False)
    after_idx, after_dist = loaded.search_batched(queries, 10, 100, leaves)
    np.testing.assert_array_equal(np.asarray(after_idx), np.asarray(before_idx))
    np.testing.assert_allclose(np.asarray(after_dist), np.asarray(before_dist), atol=1e-6)
    # and it is a working index: most of the exact top-10 is found
    _, exact = search_exact(vectors, queries, 10)
    found = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(np.asarray(after_idx), exact)])
    assert found >= 0.8, f"{name}: recall@10 {found:.3f}"


def test_projection_applies_only_above_its_dimension():
    p = _params(projection_dim=256)
    assert p.projection_for(1280) == 256
    assert p.projection_for(256) is None  # e.g. 256-d adapted vectors: no PCA
    assert p.projection_for(64) is None
    assert builder_options(p, 256)["projection_dim"] is None


def test_an_int8_pca_soar_build_records_its_options_and_keeps_float32_vectors(tmp_path):
    vectors = clustered_vectors(3000, DIM, seed=7)
    snap_path = write_snapshot(str(tmp_path / "snap"), vectors)
    root = str(tmp_path / "index")
    config = make_config(shards=2, brute_force_below=0, projection_dim=16, soar_lambda=1.5,
                         leaves_per_sqrt_n=4.0, reorder_dtype="int8")
    manifest = run_build_index(snap_path, root, config)
    assert manifest.evaluation["passed"] and manifest.evaluation["recall@10"] >= 0.95
    assert manifest.scann["reorder"]["dtype"] == "int8"
    raw = json.load(open(art.manifest_uri(root, manifest.version)))
    for entry, raw_entry in zip(manifest.shards, raw["shards"]):
        assert entry.kind == "scann_tree_ah"
        assert entry.options == raw_entry["options"]
        assert entry.options["projection_dim"] == 16 and entry.options["soar_lambda"] == 1.5
        assert entry.options["reorder_dtype"] == "int8"
        assert entry.num_leaves == round(entry.num_vectors * 4 / 3000 ** 0.5)
        names = {f.name for f in entry.files}
        assert entry.vectors_file == VECTORS_FILE == raw_entry["vectors_file"]
        assert {VECTORS_FILE, "int8_dataset.npy", "hashed_dataset_soar.npy"} <= names
        assert "dataset.npy" not in names
    shards = reader.open_index(root).load_shards()
    searcher = ShardedSearcher(shards)
    # the loader's stored vectors are the snapshot's float32 vectors, row for row
    by_id = {f"img{i:06d}": v for i, v in enumerate(vectors)}
    stored = searcher.vectors(np.arange(searcher.num_vectors))
    want = np.stack([by_id[i] for i in searcher.image_ids])
    np.testing.assert_array_equal(stored, want)
    # exact search over the stored vectors is exact
    queries = clustered_vectors(20, DIM, seed=8)
    _, rows = searcher.search_exact(queries, 10)
    _, want_ids = exact_ids(snap_path, queries, 10)
    assert [[searcher.image_ids[r] for r in row] for row in rows] == want_ids
    # vectors.npy is checksummed: altering it is detected
    path = os.path.join(art.version_dir(root, manifest.version), manifest.shards[0].path,
                        VECTORS_FILE)
    np.save(path, np.load(path) * 0.5)
    with pytest.raises(art.IndexIntegrityError, match="checksum mismatch"):
        reader.open_index(root).load_shards()


def test_an_index_of_format_1_still_loads(tmp_path):
    vectors = clustered_vectors(600, 32, seed=9)
    snap_path = write_snapshot(str(tmp_path / "snap"), vectors)
    root = str(tmp_path / "index")
    manifest = run_build_index(snap_path, root, make_config(brute_force_below=0,
                                                            tune_recall_target=None))
    before = ShardedSearcher(reader.open_index(root).load_shards())
    queries = clustered_vectors(10, 32, seed=10)
    want = before.search(queries, 10)
    # what a version-1 writer wrote: no vectors_file, no options, format 1
    old = dataclasses.replace(
        manifest, format=FORMAT_V1,
        shards=[dataclasses.replace(s, vectors_file=None, options=None) for s in manifest.shards])
    art.write_manifest(root, manifest.version, old)
    raw = json.load(open(art.manifest_uri(root, manifest.version)))
    assert raw["format"] == FORMAT_V1 and "vectors_file" not in raw["shards"][0]
    opened = reader.open_index(root)
    assert opened.manifest.format == FORMAT_V1
    shards = opened.load_shards()
    assert shards[0].vectors_file == "dataset.npy"
    got = ShardedSearcher(shards).search(queries, 10)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(ShardedSearcher(shards).vectors([0, 5]),
                                  before.vectors([0, 5]))


def test_bad_option_values_fail_fast_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="index.reorder_dtype"):
        make_config(reorder_dtype="int4")
    with pytest.raises(ConfigError, match="index.leaves_per_sqrt_n"):
        make_config(leaves_per_sqrt_n=0)
    with pytest.raises(ConfigError, match="index.projection_dim"):
        make_config(projection_dim=0)
    snap_path = write_snapshot(str(tmp_path / "snap"), clustered_vectors(300, 32, seed=11))
    root = str(tmp_path / "index")
    with pytest.raises(IndexBuildError, match="dimensions_per_block=8 exceeds "
                                              "index.projection_dim=4"):
        run_build_index(snap_path, root, make_config(projection_dim=4, dimensions_per_block=8))
    assert not os.path.exists(root) or not os.listdir(root)
    shutil.rmtree(root, ignore_errors=True)


def test_a_shared_projection_build_projects_once_and_returns_exact_scored_hits(tmp_path):
    from pipelines.index.manifest import FORMAT_V3
    from pipelines.index.projection import PROJECTION_FILE, SHARED

    vectors = clustered_vectors(3000, DIM, seed=12)
    snap_path = write_snapshot(str(tmp_path / "snap"), vectors)
    root = str(tmp_path / "index")
    config = make_config(shards=2, brute_force_below=0, projection_dim=16, soar_lambda=1.5,
                         leaves_per_sqrt_n=4.0, shared_projection=True)
    manifest = run_build_index(snap_path, root, config)
    assert manifest.evaluation["passed"] and manifest.evaluation["recall@10"] >= 0.95
    assert manifest.format == FORMAT_V3
    sums = set()
    for entry in manifest.shards:
        assert entry.kind == "scann_tree_ah" and entry.options["projection"] == SHARED
        assert entry.options["projection_dim"] == 16
        names = {f.name: f.sha256 for f in entry.files}
        assert PROJECTION_FILE in names and entry.vectors_file == VECTORS_FILE
        sums.add(names[PROJECTION_FILE])
    assert len(sums) == 1  # one projection, a copy per shard
    shards = reader.open_index(root).load_shards()
    assert shards[0].projection is shards[1].projection  # one array: projected once
    assert shards[0].projection.shape == (16, DIM)
    searcher = ShardedSearcher(shards)
    noise = np.random.default_rng(13).normal(0, 0.05, (40, DIM))
    queries = (vectors[::75] + noise).astype(np.float32)  # near the catalog's vectors
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores, rows = searcher.search(queries, 10)
    # scores are exact dot products of the returned rows
    exact = np.einsum("qd,qkd->qk", queries, searcher.vectors(rows.reshape(-1)).reshape(
        40, 10, DIM))
    np.testing.assert_allclose(scores, exact, atol=1e-5)
    _, want = searcher.search_exact(queries, 10)
    found = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, want)])
    assert found >= 0.9, found
    # the single-query path returns the batched hits; a reload the same hits again
    for q, srow, rrow in zip(queries, scores, rows):
        s1, r1 = searcher.search(q[None], 10)
        np.testing.assert_array_equal(r1[0], rrow)
        np.testing.assert_allclose(s1[0], srow, atol=1e-6)
    again = ShardedSearcher(reader.open_index(root).load_shards()).search(queries, 10)
    np.testing.assert_array_equal(again[1], rows)
    # the projection is checksummed: altering it is detected
    path = os.path.join(art.version_dir(root, manifest.version), manifest.shards[0].path,
                        PROJECTION_FILE)
    np.save(path, np.load(path) * 0.5)
    with pytest.raises(art.IndexIntegrityError, match="checksum mismatch"):
        reader.open_index(root).load_shards()


def test_a_projected_query_does_not_depend_on_its_batch():
    # a float32 matmul rounds one row (gemv) differently from many (gemm); a last-bit
    # change in a projected query can swap the candidate at the edge of the reorder pool,
    # so the single-query path would not return the batched hits (seen in CI)
    from pipelines.index.projection import project_queries
    rng = np.random.default_rng(14)
    for n, dim, out in ((40, 64, 16), (33, 1280, 256)):
        queries = rng.standard_normal((n, dim)).astype(np.float32)
        matrix = rng.standard_normal((out, dim)).astype(np.float32)
        batch = project_queries(queries, matrix)
        assert batch.dtype == np.float32 and batch.flags.c_contiguous
        for i in range(n):
            np.testing.assert_array_equal(project_queries(queries[i:i + 1], matrix)[0],
                                          batch[i])


def test_int8_reorder_keeps_scanns_own_projection():
    p = _params(projection_dim=16, shared_projection=True)
    assert p.shared_projection_for(DIM) == 16
    assert dataclasses.replace(p, reorder_dtype="int8").shared_projection_for(DIM) is None
    assert p.shared_projection_for(16) is None
