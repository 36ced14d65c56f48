"""ShardedSearcher merging on real ScaNN shards, and the exact brute-force reference."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.index import reader
from pipelines.index.build import run_build_index
from pipelines.index.sharded_search import ShardedSearcher, search_exact
from index_fixtures import clustered_vectors, make_config, write_snapshot


def test_search_exact_matches_a_full_sort_in_any_block_size():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((103, 12)).astype(np.float32)
    queries = rng.standard_normal((9, 12)).astype(np.float32)
    full = queries @ vectors.T
    want = np.argsort(-full, axis=1, kind="stable")[:, :10]
    for block in (7, 64, 1000):
        scores, idx = search_exact(vectors, queries, 10, block_rows=block)
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_allclose(scores, np.take_along_axis(full, want, axis=1), rtol=1e-6)
    scores, idx = search_exact(vectors, queries, 500)  # k larger than the data
    assert idx.shape == (9, 103) and sorted(idx[0].tolist()) == list(range(103))


def test_search_exact_breaks_ties_by_lower_index():
    vectors = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], np.float32)
    _, idx = search_exact(vectors, np.array([[1, 0]], np.float32), 3, block_rows=2)
    assert idx.tolist() == [[0, 2, 3]]


@pytest.fixture(scope="module")
def brute_force_index(tmp_path_factory):
    base = tmp_path_factory.mktemp("sharded")
    vectors = clustered_vectors(300, 24, seed=31)
    snap = write_snapshot(str(base / "snap"), vectors)
    root = str(base / "index")
    run_build_index(snap, root, make_config(shards=3), version="v1")
    return vectors, ShardedSearcher(reader.open_index(root).load_shards())


def test_merged_top_k_equals_global_exact_search(brute_force_index):
    vectors, searcher = brute_force_index
    assert searcher.num_vectors == 300 and searcher.dim == 24
    assert len(searcher.shards) == 3 and searcher.offsets.tolist()[-1] == 300
    queries = clustered_vectors(30, 24, seed=32)
    scores, rows = searcher.search(queries, 10)
    exact_scores, exact_rows = searcher.search_exact(queries, 10)
    np.testing.assert_array_equal(rows, exact_rows)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    # global rows map back to the snapshot's vectors and ids
    ids = [f"img{i:06d}" for i in range(300)]
    ref_scores, ref_idx = search_exact(vectors, queries, 10)
    assert [[searcher.image_ids[r] for r in row] for row in rows] == [
        [ids[i] for i in row] for row in ref_idx]
    np.testing.assert_allclose(searcher.vectors(rows[:, 0]), vectors[ref_idx[:, 0]])
    # a single query takes ScaNN's single-query path and gives the same answer
    one_scores, one_rows = searcher.search(queries[3], 10)
    np.testing.assert_array_equal(one_rows[0], rows[3])
    np.testing.assert_allclose(one_scores[0], scores[3], atol=1e-6)


def test_hits_carry_catalog_fields(brute_force_index):
    vectors, searcher = brute_force_index
    scores, rows = searcher.search(vectors[:2], 3)
    hits = searcher.hits(scores, rows)
    assert [h.image_id for h in hits[0]][:1] == ["img000000"]
    h = hits[1][0]
    assert h.image_id == "img000001" and h.product_id == "P00000" and h.view == "original"
    assert h.metadata == {"title": "item img000001", "category": "c1"}
    assert h.image_uri == "file:///catalog/img000001.jpg" and h.score == pytest.approx(1.0)
    assert h.shard == searcher.shards[int(np.searchsorted(searcher.offsets, h.row,
                                                          side="right") - 1)].shard


@pytest.mark.parametrize("queries,k,message", [
    (np.zeros((2, 5), np.float32), 3, "queries have 5 dimensions, the index has 24"),
    (np.full((1, 24), np.nan, np.float32), 3, "NaN"),
    (np.zeros((2, 2, 24), np.float32), 3, "must be a \\[Q, D\\] array"),
    (np.ones((1, 24), np.float32), 0, "k must be >= 1"),
])
def test_bad_queries_are_refused(brute_force_index, queries, k, message):
    _, searcher = brute_force_index
    with pytest.raises(ValueError, match=message):
        searcher.search(queries, k)


def test_fewer_neighbours_than_k_are_padded(tmp_path):
    # tree-AH with 1 leaf searched and ~17 vectors per leaf cannot find 100 neighbours
    vectors = clustered_vectors(300, 16, seed=33, clusters=0)
    snap = write_snapshot(str(tmp_path / "snap"), vectors)
    root = str(tmp_path / "index")
    run_build_index(snap, root, make_config(brute_force_below=0, tune_recall_target=None,
                                            leaves_to_search_fraction=0.01,
                                            recall_threshold=0.0), version="v1")
    shards = reader.open_index(root).load_shards()
    assert shards[0].kind == "scann_tree_ah" and shards[0].leaves_to_search == 1
    searcher = ShardedSearcher(shards)
    scores, rows = searcher.search(vectors[:4], 100)
    assert scores.shape == rows.shape == (4, 100)
    missing = rows < 0
    assert missing.any() and np.isneginf(scores[missing]).all()
    assert np.isfinite(scores[~missing]).all()
    hits = searcher.hits(scores, rows)
    assert [len(h) for h in hits] == (~missing).sum(axis=1).tolist()
    assert [h[0].image_id for h in hits] == [f"img{i:06d}" for i in range(4)]
    one_scores, one_rows = searcher.search(vectors[0], 100)  # single-query path pads too
    assert one_rows.shape == (1, 100) and (one_rows[0] < 0).any()


def test_concurrent_search_returns_the_same_hits_as_sequential(tmp_path):
    import threading

    vectors = clustered_vectors(4000, 32, seed=33, clusters=0)
    snap = write_snapshot(str(tmp_path / "snap"), vectors)
    root = str(tmp_path / "index")
    manifest = run_build_index(snap, root, make_config(shards=4, brute_force_below=0,
                                                       tune_recall_target=0.9,
                                                       recall_threshold=0.0))
    assert {s.kind for s in manifest.shards} == {"scann_tree_ah"}
    shards = reader.open_index(root).load_shards()
    queries = clustered_vectors(64, 32, seed=34, clusters=0)
    for subset in (shards, [shards[0], shards[2]]):  # all shards, and a per-host subset
        concurrent = ShardedSearcher(subset)
        sequential = ShardedSearcher(subset, concurrent=False)
        for q in (queries, queries[5]):  # batched and single-query paths
            cs, cr = concurrent.search(q, 10)
            ss, sr = sequential.search(q, 10)
            np.testing.assert_array_equal(cr, sr)
            np.testing.assert_array_equal(cs, ss)
            assert concurrent.hits(cs, cr) == sequential.hits(ss, sr)
        es, er = concurrent.search_exact(queries, 10)
        np.testing.assert_array_equal(er, sequential.search_exact(queries, 10)[1])
    assert any(t.name.startswith("shard-search") for t in threading.enumerate())


def test_single_query_path_returns_the_batched_hits(tmp_path):
    # search_one (the lean Q = 1 path) merges shards like the batched path: same rows and
    # scores per query, tree-AH and brute-force shards mixed, k above a shard's size
    vectors = clustered_vectors(3000, 24, seed=36, clusters=0)
    snap = write_snapshot(str(tmp_path / "snap"), vectors)
    root = str(tmp_path / "index")
    run_build_index(snap, root, make_config(shards=3, brute_force_below=0,
                                            tune_recall_target=0.9, recall_threshold=0.0))
    shards = reader.open_index(root).load_shards()
    queries = clustered_vectors(30, 24, seed=37, clusters=0)
    for subset in (shards, [shards[2]]):
        searcher = ShardedSearcher(subset)
        for k in (1, 10, 50):
            want_s, want_r = ShardedSearcher._merged_top_k(searcher, queries, k,
                                                           searcher._search_shard)
            for q, ws, wr in zip(queries, want_s, want_r):
                got_s, got_r = searcher.search(q[None], k)
                np.testing.assert_array_equal(got_r[0], wr)
                np.testing.assert_allclose(got_s[0], ws, rtol=1e-6)
                one_s, one_r = searcher.search_one(q, k)
                assert one_s.dtype == np.float32 and one_r.dtype == np.int64
                np.testing.assert_array_equal(one_r, wr)
    with pytest.raises(ValueError, match="dimensions"):
        ShardedSearcher(shards).search(queries[:1, :10], 10)


def test_over_fetch_reorders_the_tuned_pool_plus_one_per_extra_neighbour(tmp_path):
    from types import SimpleNamespace

    from pipelines.index.sharded_search import reorder_pool
    shard = SimpleNamespace(reorder_multiplier=10, tuned_k=10)
    assert [reorder_pool(shard, n) for n in (1, 10, 11, 32)] == [10, 100, 101, 122]
    old = SimpleNamespace(reorder_multiplier=10, tuned_k=0)  # an index without the record
    assert reorder_pool(old, 32) == 320
    vectors = clustered_vectors(2000, 16, seed=38, clusters=0)
    snap = write_snapshot(str(tmp_path / "snap"), vectors)
    root = str(tmp_path / "index")
    run_build_index(snap, root, make_config(brute_force_below=0, recall_threshold=0.0))
    shards = reader.open_index(root).load_shards()
    assert shards[0].tuned_k == 10  # the gate's k, read from the manifest
    searcher = ShardedSearcher(shards)
    queries = vectors[:20]
    _, rows = searcher.search(queries, 40)  # over-fetch: rows still exact-scored, own first
    assert (rows[:, 0] == np.arange(20)).all()
    scores = searcher.search(queries, 40)[0]
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vectors[rows]),
                               rtol=1e-5, atol=1e-6)


def test_hits_equal_hits_built_the_usual_way_and_stay_frozen(brute_force_index):
    import dataclasses

    from pipelines.index.sharded_search import Hit, parse_metadata
    _, searcher = brute_force_index
    for row in (0, searcher.num_vectors // 2, searcher.num_vectors - 1):
        hit = searcher.hit(row, 0.5)
        shard = int(np.searchsorted(searcher.offsets, row, side="right") - 1)
        want = Hit(row=row, shard=int(searcher.shards[shard].shard), score=0.5,
                   image_id=searcher.image_ids[row], product_id=searcher.product_ids[row],
                   view=searcher.views[row], image_uri=searcher.image_uris[row],
                   metadata=parse_metadata(searcher.metadata[row]))
        assert hit == want and repr(hit) == repr(want)
        assert dataclasses.replace(hit, score=0.25).score == 0.25
        with pytest.raises(dataclasses.FrozenInstanceError):
            hit.score = 1.0  # type: ignore[misc]
