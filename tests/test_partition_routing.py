"""Partition-routed shards (index.shard_assignment: partition; pipelines/index/routing.py):
rows go to the shard of their nearest k-means centroid, the centroids are a checksummed
file the manifest names, queries search their best `budget` shards, a budget covering
every shard returns exactly the full fan-out's hits, hosts serving a shard subset keep
working, and duplicates are still refused although views may land in different shards."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from pipelines.index import artifact as art
from pipelines.index import reader
from pipelines.index.build import IndexBuildError, run_build_index
from pipelines.index.routing import CENTROIDS_FILE, Routing
from pipelines.index.sharded_search import ShardedSearcher
from serving.searcher import CatalogSearcher
from index_fixtures import clustered_vectors, exact_ids, make_config, write_snapshot

DIM = 32


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    vectors = clustered_vectors(3000, DIM, seed=31, clusters=40)
    snap = write_snapshot(str(tmp_path_factory.mktemp("snap") / "s"), vectors)
    root = str(tmp_path_factory.mktemp("index"))
    manifest = run_build_index(snap, root, make_config(
        shards=4, shard_assignment="partition", routing_partitions_per_shard=3,
        routing_min_coverage=0.97))
    return vectors, snap, root, manifest


def test_the_manifest_names_checksummed_centroids_and_a_tuned_budget(built):
    vectors, _, root, manifest = built
    r = manifest.routing
    assert r is not None and r["kind"] == "partition" and r["centroids_file"] == CENTROIDS_FILE
    assert r["partitions"] == 12 and sorted(set(r["centroid_shards"])) == [0, 1, 2, 3]
    assert 1 <= r["budget"] <= 4 and manifest.evaluation["routing_budget"] == r["budget"]
    coverage = r["budget_tuning"]["coverage_by_budget"]
    assert coverage == sorted(coverage) and coverage[-1] == 1.0
    assert coverage[r["budget"] - 1] >= 0.97
    assert manifest.shard_assignment.startswith("partition")
    assert manifest.evaluation["passed"]
    path = os.path.join(art.version_dir(root, manifest.version), CENTROIDS_FILE)
    assert os.path.getsize(path) == r["bytes"]
    # each shard holds the rows nearest its centroids, and the shards are balanced
    opened = reader.open_index(root)
    routing = opened.routing()
    assert isinstance(routing, Routing)
    shards = opened.load_shards()
    by_id = {f"img{i:06d}": v for i, v in enumerate(vectors)}
    for sh in shards:
        vs = np.stack([by_id[i] for i in sh.rows.column("image_id").to_pylist()])
        assert (routing.partitions.assign(vs) == sh.shard).all()
        assert 0.1 * 3000 < sh.num_vectors < 0.45 * 3000


def test_a_budget_covering_every_shard_returns_the_full_fan_out(built):
    vectors, snap, root, _ = built
    opened = reader.open_index(root)
    shards = opened.load_shards()
    routing = opened.routing()
    full = ShardedSearcher(shards)
    # queries from the catalog's distribution: catalog vectors plus noise
    noisy = vectors[::75] + 0.2 * np.random.default_rng(32).standard_normal((40, DIM))
    queries = (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)
    want = full.search(queries, 10)
    routed = ShardedSearcher(shards, routing=Routing(routing.partitions, 4))
    got = routed.search(queries, 10)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    # also when the routed code path runs (budget 4 of 4 is the fan-out shortcut): a
    # searcher over the same shards whose budget is 4 but which routes
    forced = ShardedSearcher(shards, routing=Routing(routing.partitions, 4))
    rows = forced._routed_top_k(queries, 10)
    np.testing.assert_array_equal(rows[1], want[1])
    # single-query searches agree with batched ones
    for q, w in zip(queries[:5], want[1][:5]):
        np.testing.assert_array_equal(forced._routed_top_k(q[None], 10)[1][0], w)
    # the build's budget searches fewer shards and still finds most of the exact top-10
    tuned = ShardedSearcher(shards, routing=routing)
    _, rows = tuned.search(queries, 10)
    _, want_ids = exact_ids(snap, queries, 10)
    got_ids = [[tuned.image_ids[r] for r in row if r >= 0] for row in rows]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got_ids, want_ids)])
    # (the budget is tuned on catalog rows; these noisy queries are harder)
    assert routing.budget < 4 and recall >= 0.8, (routing.budget, recall)


def test_a_host_serving_a_shard_subset_routes_among_its_shards(built):
    vectors, _, root, manifest = built
    config = make_config()
    s = CatalogSearcher.open(root, shard_ids=[1, 2], config=config, load_embedder=False)
    assert s.current.shards.routing is not None
    for i in range(0, 3000, 300):
        hits = s.search_vector(vectors[i], k=5, collapse=False).hits
        assert hits and all(h.shard in (1, 2) for h in hits)
    whole = CatalogSearcher.open(root, config=config, load_embedder=False)
    own = [i for i in range(3000) if whole.search_vector(vectors[i], k=1,
                                                          collapse=False).hits[0].image_id
           == f"img{i:06d}"]
    assert len(own) >= 2970  # self-search through the routing


def test_altered_centroids_are_refused(built, tmp_path):
    _, _, root, manifest = built
    copy = shutil.copytree(root, str(tmp_path / "index"))
    path = os.path.join(art.version_dir(copy, manifest.version), CENTROIDS_FILE)
    data = bytearray(open(path, "rb").read())
    data[-4:] = b"\0\0\0\0"
    open(path, "wb").write(bytes(data))
    with pytest.raises(art.IndexIntegrityError, match="routing centroids"):
        reader.open_index(copy).routing()
    s = CatalogSearcher(copy, config=make_config(), load_embedder=False)
    assert s.reload().status == "refused"
    # a manifest whose routing names another file is refused when opened
    mpath = art.manifest_uri(copy, manifest.version)
    raw = json.load(open(mpath))
    raw["routing"]["centroids_file"] = "../../elsewhere.npy"
    json.dump(raw, open(mpath, "w"))
    with pytest.raises(art.IndexIntegrityError, match="routing names no valid"):
        reader.open_index(copy)


def test_duplicate_rows_in_different_shards_are_refused(tmp_path):
    vectors = clustered_vectors(600, DIM, seed=33, clusters=6)
    ids = [f"img{i:06d}" for i in range(600)]
    far = int(np.argmin(vectors @ vectors[0]))  # a row far from row 0: another partition
    ids[far] = ids[0]
    snap = write_snapshot(str(tmp_path / "snap"), vectors, image_ids=ids)
    root = str(tmp_path / "index")
    with pytest.raises(IndexBuildError, match="duplicate"):
        run_build_index(snap, root, make_config(shards=3, shard_assignment="partition"))
    assert not os.path.exists(os.path.join(root, art.LATEST_FILE))


def test_tree_ah_partition_shards_pass_the_gate(tmp_path):
    vectors = clustered_vectors(3000, DIM, seed=34, clusters=40)
    snap = write_snapshot(str(tmp_path / "snap"), vectors)
    manifest = run_build_index(snap, str(tmp_path / "index"), make_config(
        shards=3, shard_assignment="partition", brute_force_below=0))
    assert manifest.evaluation["passed"] and manifest.evaluation["recall@10"] >= 0.95
    assert all(s.kind == "scann_tree_ah" for s in manifest.shards)
    # the tuner works on the routed index as a whole: each shard tunes on the tuning
    # queries routed to it, to target / coverage of the routed shards' share
    budget = manifest.routing["budget"]
    coverage = manifest.routing["budget_tuning"]["coverage_by_budget"][budget - 1]
    target = 0.98  # configs/default.yaml index.tune_recall_target
    routed_queries = [s.tuning["queries"] for s in manifest.shards]
    assert sum(routed_queries) == pytest.approx(200 * budget, abs=1)
    for s in manifest.shards:
        assert s.tuning["routing_budget"] == budget
        assert s.tuning["routing_coverage"] == round(coverage, 4)
        if coverage >= target:
            assert s.tuning["shard_target"] == pytest.approx(target / coverage, abs=1e-6)
            assert s.tuning["shard_recall"] >= s.tuning["shard_target"]


def test_partition_routing_with_an_adapter_trains_centroids_in_index_space(tmp_path):
    from pipelines.adapter.artifact import base_model_record, make_adapter, save_adapter
    from pipelines.embed import snapshot as snapshot_mod
    vectors = clustered_vectors(1200, DIM, seed=35, clusters=12)
    snap = write_snapshot(str(tmp_path / "snap"), vectors)
    weights, _ = np.linalg.qr(np.random.default_rng(36).standard_normal((DIM, 12)))
    adapter = save_adapter(make_adapter(
        weights.astype(np.float32),
        base_model_record(snapshot_mod.load(snap).summary.model, None)),
        str(tmp_path / "adapter"))
    root = str(tmp_path / "index")
    manifest = run_build_index(snap, root, make_config(
        shards=3, shard_assignment="partition", adapter=adapter.path))
    assert manifest.dim == 12 and manifest.routing is not None
    opened = reader.open_index(root)
    routing = opened.routing()
    assert routing.partitions.centroids.shape[1] == 12
    by_id = {f"img{i:06d}": v for i, v in enumerate(adapter.apply(vectors))}
    for sh in opened.load_shards():
        vs = np.stack([by_id[i] for i in sh.rows.column("image_id").to_pylist()])
        assert (routing.partitions.assign(vs) == sh.shard).all()
    assert manifest.evaluation["passed"]


def test_indexes_without_routing_load_and_search_every_shard(tmp_path):
    """A hash-sharded version (no `routing` key, format 2) and one written by a format-1
    writer load with no routing and answer as a full fan-out."""
    import dataclasses

    from pipelines.index.manifest import FORMAT_V1
    vectors = clustered_vectors(900, DIM, seed=37, clusters=9)
    snap = write_snapshot(str(tmp_path / "snap"), vectors)
    root = str(tmp_path / "index")
    manifest = run_build_index(snap, root, make_config(shards=3))
    raw = json.load(open(art.manifest_uri(root, manifest.version)))
    assert "routing" not in raw and manifest.routing is None
    queries = vectors[::60]
    opened = reader.open_index(root)
    assert opened.routing() is None
    want = ShardedSearcher(opened.load_shards()).search(queries, 10)
    old = dataclasses.replace(
        manifest, format=FORMAT_V1,
        shards=[dataclasses.replace(s, vectors_file=None, options=None) for s in manifest.shards])
    art.write_manifest(root, manifest.version, old)
    opened = reader.open_index(root)
    assert opened.manifest.format == FORMAT_V1 and opened.routing() is None
    s = CatalogSearcher.open(root, config=make_config(), load_embedder=False)
    assert s.current.shards.routing is None
    got = s.current.shards.search(queries, 10)
    np.testing.assert_array_equal(got[1], want[1])


def test_single_query_path_returns_the_routed_batched_hits(built):
    # ShardedSearcher.search_one (Q = 1: shards in the calling thread, routed by
    # _route_one) returns what the routed batched path returns for that query, for
    # every budget and for a host's shard subset
    vectors, _, root, _ = built
    opened = reader.open_index(root)
    shards = opened.load_shards()
    partitions = opened.routing().partitions
    noisy = vectors[::150] + 0.2 * np.random.default_rng(35).standard_normal((20, DIM))
    queries = (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)
    for subset in (shards, [shards[1], shards[3]]):
        for budget in range(1, len(subset) + 1):
            searcher = ShardedSearcher(subset, routing=Routing(partitions, budget))
            want_s, want_r = searcher._routed_top_k(queries, 10)
            for q, ws, wr in zip(queries, want_s, want_r):
                got_s, got_r = searcher.search(q[None], 10)
                np.testing.assert_array_equal(got_r[0], wr)
                np.testing.assert_allclose(got_s[0], ws, rtol=1e-6)  # batched rounding
                one_s, one_r = searcher.search_one(q, 10)
                np.testing.assert_array_equal(one_r, wr)
