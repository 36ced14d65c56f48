"""build_index on real snapshots: real Beam pipelines, real ScaNN indexes, real files."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from pipelines.core import filesystem as fs
from pipelines.index import artifact as art
from pipelines.index import reader
from pipelines.embed import snapshot
from catalog_search.cli import main as cli_main
from pipelines.index.build import IndexBuildError, RecallGateError, run_build_index
from pipelines.index.build_plan import shard_for
from pipelines.index.sharded_search import ShardedSearcher, search_exact

from index_fixtures import (MODEL_ID, clustered_vectors, exact_ids, make_config,
                            snapshot_table, summary_for, write_snapshot)


# --------------------------------------------------------------------------- builds

@pytest.mark.heavy
def test_sharded_brute_force_equals_exact_search(tmp_path):
    vectors = clustered_vectors(420, 32, seed=1)
    snap_path = write_snapshot(str(tmp_path / "snap"), vectors)
    root = str(tmp_path / "index")
    config = make_config(shards=3, runner={"direct_running_mode": "multi_processing",
                                           "direct_num_workers": 2})
    manifest = run_build_index(snap_path, root, config)

    assert art.read_latest(root) == manifest.version
    assert manifest.status == "passed" and manifest.num_vectors == 420
    assert [s.kind for s in manifest.shards] == ["scann_brute_force"] * 3
    assert sum(s.num_vectors for s in manifest.shards) == 420
    assert len(manifest.build["worker_pids"]) == 2  # shards were built in 2 processes
    assert manifest.evaluation["recall@10"] == 1.0
    assert manifest.evaluation["recall@1"] == 1.0
    for s in manifest.shards:
        names = {f.name for f in s.files}
        assert {"rows.parquet", "dataset.npy", "scann_assets.pbtxt"} <= names
        assert all(len(f.sha256) == 64 for f in s.files)

    # the artifact is movable: ScaNN assets use relative paths, no pickled docids
    moved = str(tmp_path / "moved")
    shutil.copytree(root, moved)
    shutil.rmtree(root)
    opened = reader.open_index(moved)
    shards = opened.load_shards()
    for sh in shards:
        assert not os.path.exists(os.path.join(sh.local_dir, "scann_docids.pkl"))
        assert str(tmp_path) not in open(os.path.join(sh.local_dir, "scann_assets.pbtxt")).read()
        assert all(shard_for(i, 3) == sh.shard for i in sh.rows.column("image_id").to_pylist())
    searcher = ShardedSearcher(shards)
    queries = clustered_vectors(40, 32, seed=99)  # new vectors, not in the index
    scores, rows = searcher.search(queries, 10)
    want_scores, want_ids = exact_ids(snap_path, queries, 10)
    assert [[searcher.image_ids[r] for r in row] for row in rows] == want_ids
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    hits = searcher.hits(scores, rows)
    assert hits[0][0].metadata["title"] == f"item {hits[0][0].image_id}"
    assert hits[0][0].product_id.startswith("P")


def test_tree_ah_shards_are_tuned_and_pass_the_gate(tmp_path):
    vectors = clustered_vectors(3000, 64, seed=2)
    snap_path = write_snapshot(str(tmp_path / "snap"), vectors)
    root = str(tmp_path / "index")
    manifest = run_build_index(snap_path, root, make_config(shards=2, brute_force_below=0))
    ev = manifest.evaluation
    assert ev["passed"] and ev["recall@10"] >= 0.95 and ev["threshold"] == 0.95
    for s in manifest.shards:
        assert s.kind == "scann_tree_ah"
        # leaves of sqrt(N) / leaves_per_sqrt_n vectors (configs/default.yaml: 4)
        assert s.num_leaves == round(s.num_vectors / (3000 ** 0.5 / 4))
        assert 1 <= s.search["leaves_to_search"] <= s.num_leaves
        assert s.tuning["shard_recall"] >= 0.98
        assert {"ah_codebook.pb", "hashed_dataset.npy"} <= {f.name for f in s.files}
    searcher = ShardedSearcher(reader.open_index(root).load_shards())
    queries = vectors[:50]
    _, rows = searcher.search(queries, 5)
    # An approximate index tuned to 0.98 recall may miss a vector's own row now and then
    # (ScaNN's multi-threaded training is not bit-for-bit repeatable): at most 2 of 50.
    found = sum(searcher.image_ids[r[0]] == f"img{i:06d}" for i, r in enumerate(rows))
    assert found >= 48, f"only {found} of 50 vectors found themselves at top-1"


def test_gate_rejects_a_poor_config_and_keeps_latest(tmp_path):
    root = str(tmp_path / "index")
    good = write_snapshot(str(tmp_path / "good"), clustered_vectors(300, 64, seed=3))
    first = run_build_index(good, root, make_config()).version

    # uniform vectors: neighbours spread over many leaves; search 1 leaf, no reordering slack
    poor = write_snapshot(str(tmp_path / "poor"), clustered_vectors(3000, 64, seed=4,
                                                                    clusters=0))
    config = make_config(brute_force_below=0, tune_recall_target=None,
                         leaves_to_search_fraction=0.01, reorder_multiplier=1,
                         dimensions_per_block=8)
    with pytest.raises(RecallGateError) as err:
        run_build_index(poor, root, config, version="v-poor")
    e = err.value
    assert e.measured < 0.95 and e.threshold == 0.95
    assert f"{e.measured:.4f}" in str(e) and "0.9500" in str(e) and "recall@10" in str(e)
    assert art.read_latest(root) == first
    assert reader.open_index(root).version == first
    states = {v.version: v.state for v in art.list_versions(root)}
    assert states == {first: "passed", "v-poor": "rejected"}
    rejected_dir = art.version_dir(root, "v-poor")
    assert "below the recall threshold" in fs.read_text(fs.join(rejected_dir, art.REJECTED_FILE))
    manifest = art.read_manifest(root, "v-poor")
    assert manifest.evaluation["passed"] is False
    assert manifest.evaluation["recall@10"] == pytest.approx(e.measured)
    with pytest.raises(art.IndexArtifactError, match="not servable"):
        reader.open_index(root, "v-poor")
    # still there for inspection
    inspected = reader.open_index(root, "v-poor", allow_unpublished=True).load_shards()
    assert inspected[0].num_vectors == 3000
    with pytest.raises(art.IndexArtifactError, match="only passed versions publish"):
        art.publish_version(root, "v-poor")


@pytest.mark.heavy
def test_crash_between_version_and_latest_keeps_previous_version(tmp_path, monkeypatch):
    root = str(tmp_path / "index")
    snap_path = write_snapshot(str(tmp_path / "snap"), clustered_vectors(200, 16, seed=5))
    first = run_build_index(snap_path, root, make_config(), version="v0001").version

    def crash(index_root: str, version: str) -> None:
        raise KeyboardInterrupt("simulated crash before LATEST is written")

    monkeypatch.setattr(art, "write_latest", crash)
    with pytest.raises(KeyboardInterrupt):
        run_build_index(snap_path, root, make_config(), version="v0002")
    monkeypatch.undo()
    assert art.read_latest(root) == first
    assert reader.open_index(root).version == "v0001"
    assert {v.version: v.is_latest for v in art.list_versions(root)} == {
        "v0001": True, "v0002": False}


def test_views_are_separate_rows_of_one_image(tmp_path):
    base = clustered_vectors(100, 16, seed=6)
    views = clustered_vectors(100, 16, seed=7)
    vectors = np.concatenate([base, views])
    ids = [f"img{i:06d}" for i in range(100)] * 2
    view_names = ["original"] * 100 + ["hflip"] * 100
    snap_path = write_snapshot(str(tmp_path / "snap"), vectors, ids, view_names)
    root = str(tmp_path / "index")
    manifest = run_build_index(snap_path, root, make_config(shards=2))
    assert manifest.num_vectors == 200 and manifest.num_images == 100
    assert manifest.views == ["hflip", "original"]
    searcher = ShardedSearcher(reader.open_index(root).load_shards())
    _, rows = searcher.search(views[:5], 1)
    assert [(searcher.image_ids[r[0]], searcher.views[r[0]]) for r in rows] == [
        (f"img{i:06d}", "hflip") for i in range(5)]


def test_empty_shard_is_recorded_and_skipped(tmp_path):
    # ids chosen so that shard 3 of 4 receives none of them
    ids = [f"img{i:06d}" for i in range(200) if shard_for(f"img{i:06d}", 4) != 3][:12]
    vectors = clustered_vectors(12, 8, seed=8)
    snap_path = write_snapshot(str(tmp_path / "snap"), vectors, ids)
    root = str(tmp_path / "index")
    manifest = run_build_index(snap_path, root, make_config(shards=4))
    empty = manifest.shards[3]
    assert empty.kind == "empty" and empty.num_vectors == 0
    assert [f.name for f in empty.files] == ["rows.parquet"]
    searcher = ShardedSearcher(reader.open_index(root).load_shards())
    scores, rows = searcher.search(vectors, 20)  # k larger than the index: k' = 12
    assert rows.shape == (12, 12) and (rows >= 0).all()
    assert [searcher.image_ids[r[0]] for r in rows] == ids


def test_existing_version_name_is_refused(tmp_path):
    root = str(tmp_path / "index")
    snap_path = write_snapshot(str(tmp_path / "snap"), clustered_vectors(50, 8, seed=9))
    run_build_index(snap_path, root, make_config(), version="v1")
    with pytest.raises(IndexBuildError, match="already exists"):
        run_build_index(snap_path, root, make_config(), version="v1")
    with pytest.raises(IndexBuildError, match="invalid index version name"):
        run_build_index(snap_path, root, make_config(), version="../escape")


# --------------------------------------------------------------------------- bad input

def _bad_snapshot(kind: str, path: str) -> tuple[str, int]:
    """A snapshot with one kind of defect; returns (path, shards to ask for)."""
    v = clustered_vectors(20, 8, seed=10)
    if kind == "empty":
        write_snapshot(path, v, table=snapshot.embeddings_schema(8).empty_table())
        snapshot.write_summary(path, summary_for("r", 0, 8))
    elif kind == "mixed_dimensions":
        write_snapshot(path, v[:10])
        snapshot.write_table(path, snapshot_table(clustered_vectors(10, 12, seed=11),
                                                  [f"img9{i:05d}" for i in range(10)]),
                             name="embeddings-00001-of-00002.parquet")
    elif kind == "nan":
        v[7, 3] = np.nan
        write_snapshot(path, v)
    elif kind == "zero":
        v[4] = 0.0
        write_snapshot(path, v)
    elif kind == "not_normalised":
        v[2] *= 3.0
        write_snapshot(path, v)
    elif kind == "duplicate":
        ids = [f"img{i:06d}" for i in range(20)]
        ids[5] = ids[6]
        write_snapshot(path, v, ids)
    elif kind == "too_many_shards":
        write_snapshot(path, v)
        return path, 21
    elif kind == "mixed_models":
        table = snapshot_table(v)
        models = [MODEL_ID] * 19 + ["other@1"]
        table = table.set_column(table.schema.get_field_index("model_id"), "model_id",
                                 pa.array(models))
        write_snapshot(path, v, table=table)
    elif kind == "missing_product_id":
        table = snapshot_table(v)
        pids = table.column("product_id").to_pylist()
        pids[3] = None
        table = table.set_column(1, "product_id", pa.array(pids, pa.string()))
        write_snapshot(path, v, table=table)
    return path, 2


@pytest.mark.parametrize("kind,message", [
    ("empty", "has no embedding rows"),
    ("mixed_dimensions", "mixed embedding dimensions"),
    ("nan", "1 vectors contain NaN or infinite values, e.g. image_id 'img000007'"),
    ("zero", "1 zero vectors .* image_id 'img000004'"),
    ("not_normalised", "not L2-normalised.*img000002 \\(norm 3.0000\\)"),
    ("duplicate", "1 duplicate \\(image_id, view\\) pairs, e.g. \\('img000006', 'original'\\)"),
    ("too_many_shards", "21 shards requested but .* only 20 vectors"),
    ("mixed_models", "mixes embeddings of several models"),
    ("missing_product_id", "1 rows have no product_id"),
])
def test_bad_input_fails_clearly_and_publishes_nothing(tmp_path, kind, message):
    path, shards = _bad_snapshot(kind, str(tmp_path / "snap"))
    root = str(tmp_path / "index")
    with pytest.raises(IndexBuildError, match=message):
        run_build_index(path, root, make_config(shards=shards))
    assert not os.path.exists(root)


def test_not_a_snapshot_is_a_clear_error(tmp_path):
    with pytest.raises(IndexBuildError, match="neither a complete embeddings snapshot"):
        run_build_index(str(tmp_path), str(tmp_path / "index"), make_config())


# --------------------------------------------------------------------------- CLI

def test_cli_build_index_and_index_info(tmp_path, capsys):
    emb_root = str(tmp_path / "embeddings")
    write_snapshot(fs.join(emb_root, "run1"), clustered_vectors(120, 16, seed=12))
    snapshot.mark_latest(emb_root, "run1")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("runner: {direct_running_mode: in_memory, direct_num_workers: 1}\n"
                   "index: {eval_queries: 50}\n")
    root = str(tmp_path / "index")
    rc = cli_main(["build-index", "--config", str(cfg), "--embeddings", emb_root,
                   "--index-root", root, "--shards", "2", "--version", "v1", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["version"] == "v1" and out["latest"] == "v1"
    assert out["shards"] == 2 and out["num_vectors"] == 120 and out["recall@10"] == 1.0

    assert cli_main(["index-info", "--index-root", root]) == 0
    text = capsys.readouterr().out
    assert "LATEST:     v1" in text and "recall@10=1.0000" in text and "passed" in text
    assert cli_main(["index-info", "--index-root", root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["latest"] == "v1" and info["versions"][0]["num_vectors"] == 120

    rc = cli_main(["build-index", "--config", str(cfg), "--embeddings", emb_root,
                   "--index-root", root, "--shards", "500"])
    assert rc == 1 and "500 shards requested" in capsys.readouterr().err
    rc = cli_main(["build-index", "--config", str(cfg), "--embeddings", emb_root,
                   "--index-root", root, "--shards", "0"])
    assert rc == 2 and "--shards must be >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- distributed build

def _write_split_snapshot(path: str, vectors: np.ndarray, files: int, row_group: int) -> str:
    """A snapshot of several Parquet files with several row groups each (= several splits)."""
    import pyarrow.parquet as pq
    table = snapshot_table(vectors)
    per_file = -(-len(vectors) // files)
    os.makedirs(path, exist_ok=True)
    for f in range(files):
        pq.write_table(table.slice(f * per_file, per_file),
                       os.path.join(path, f"embeddings-{f:05d}-of-{files:05d}.parquet"),
                       row_group_size=row_group)
    dim = vectors.shape[1]
    snapshot.write_summary(path, summary_for(os.path.basename(path), len(vectors), dim))
    return path


def _launcher_must_not_read_rows(monkeypatch) -> None:
    """Make every row-reading entry point raise in this (the launcher's) process.

    The multi-process DirectRunner runs the pipeline's steps in worker subprocesses, which
    do not see these patches: a build that passes read no row data in the launcher.
    """
    import pyarrow.parquet as pq

    def refuse(*args, **kwargs):
        raise AssertionError("the launcher read snapshot rows")

    for name in ("read_table", "read_pandas"):
        monkeypatch.setattr(pq, name, refuse)
    for name in ("read", "read_row_group", "read_row_groups", "iter_batches"):
        monkeypatch.setattr(pq.ParquetFile, name, refuse)
    monkeypatch.setattr(snapshot, "read_table", refuse)
    monkeypatch.setattr(snapshot, "load", refuse)


@pytest.mark.heavy
def test_shards_are_built_by_workers_from_parquet_splits(tmp_path, monkeypatch):
    vectors = clustered_vectors(900, 32, seed=21)
    snap_path = _write_split_snapshot(str(tmp_path / "snap"), vectors, files=3, row_group=100)
    root = str(tmp_path / "index")
    config = make_config(shards=3, runner={"direct_running_mode": "multi_processing",
                                           "direct_num_workers": 2})
    _launcher_must_not_read_rows(monkeypatch)
    manifest = run_build_index(snap_path, root, config)
    monkeypatch.undo()

    assert manifest.status == "passed" and manifest.num_vectors == 900
    assert manifest.build["splits"] == 9           # 3 files x 3 row groups
    assert manifest.build["parts"] == 27           # every split had rows of every shard
    assert os.getpid() not in manifest.build["worker_pids"]
    assert manifest.num_images == 900 and manifest.num_products == 300
    assert manifest.evaluation["recall@10"] == 1.0
    assert manifest.evaluation["self_found"] == 1.0
    assert not os.path.exists(os.path.join(art.version_dir(root, manifest.version), "_build"))
    shards = reader.open_index(root).load_shards()
    got = sorted(i for sh in shards for i in sh.rows.column("image_id").to_pylist())
    assert got == [f"img{i:06d}" for i in range(900)]
    for sh in shards:
        ids = sh.rows.column("image_id").to_pylist()
        assert ids == sorted(ids) and all(shard_for(i, 3) == sh.shard for i in ids)
        # row i of rows.parquet is the vector of that image
        np.testing.assert_allclose(sh.vectors(), vectors[[int(i[3:]) for i in ids]])


def test_bad_row_is_named_by_file_and_row(tmp_path):
    vectors = clustered_vectors(300, 16, seed=22)
    vectors[250, 5] = np.inf  # file 2 (rows 200..299), row 50 of that file
    snap_path = _write_split_snapshot(str(tmp_path / "snap"), vectors, files=3, row_group=40)
    root = str(tmp_path / "index")
    with pytest.raises(IndexBuildError,
                       match=r"1 vectors contain NaN .* image_id 'img000250' in "
                             r"embeddings-00002-of-00003.parquet row 50"):
        run_build_index(snap_path, root, make_config(shards=2))
    assert not os.path.exists(root)


def test_gate_in_the_pipeline_equals_a_search_of_the_published_index(tmp_path):
    """The pipeline's merged Q x shards x k gate = searching the whole index in one process."""
    from pipelines.index.build_plan import sample_key
    from pipelines.index.recall_gate import TIE_EPSILON

    vectors = clustered_vectors(3000, 32, seed=23, clusters=0)
    snap_path = write_snapshot(str(tmp_path / "snap"), vectors)
    root = str(tmp_path / "index")
    manifest = run_build_index(snap_path, root, make_config(
        shards=3, brute_force_below=0, tune_recall_target=0.8, recall_threshold=0.0,
        eval_queries=150))
    ev = manifest.evaluation
    ids = [f"img{i:06d}" for i in range(3000)]
    sample = sorted(range(3000), key=lambda i: sample_key(0, ids[i], "original"))[:150]
    queries = vectors[sample]
    searcher = ShardedSearcher(reader.open_index(root).load_shards())
    _, rows = searcher.search(queries, 10)
    exact, _ = search_exact(vectors, queries, 10)
    found_vecs = vectors[[int(searcher.image_ids[r][3:]) for r in rows.reshape(-1)]]
    true = np.einsum("qd,qkd->qk", queries, found_vecs.reshape(150, 10, 32))
    recall = (true >= exact[:, -1:] - TIE_EPSILON).sum(axis=1).mean() / 10
    assert ev["queries"] == 150
    assert ev["recall@10"] == pytest.approx(recall, abs=1e-6)
    assert 0.5 < ev["recall@10"] < 1.0  # an approximate index: the check can tell them apart
    self_found = np.mean([ids[q] in {searcher.image_ids[r] for r in row}
                          for q, row in zip(sample, rows)])
    assert ev["self_found"] == pytest.approx(self_found, abs=1e-6)
