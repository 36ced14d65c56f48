"""serving.searcher on a real published index: search by image, vector and id; filters;
shard subsets; hot reload (under concurrent queries, refused versions, the watcher)."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from pipelines.core import filesystem as fs
from serving.query import run_visual
from serving.errors import IndexLoadError, QueryError
from serving.filters import validate_filters
from serving.reload import IndexWatcher
from serving.searcher import CatalogSearcher
from serving_fixtures import (IMAGES_PER_PRODUCT, NUM_PRODUCTS, build_index, copy_index,
                              register_object_store_stand_in,
                              jpeg_bytes, serving_world, snapshot_subset)


@pytest.fixture(scope="module")
def world():
    return serving_world()


@pytest.fixture(scope="module")
def searcher(world):
    return CatalogSearcher.open(world.index_root, config=world.config)


def test_opens_latest_with_every_vector(searcher, world):
    idx = searcher.current
    assert searcher.version == "v0001"
    assert idx.num_vectors == NUM_PRODUCTS * IMAGES_PER_PRODUCT
    assert idx.num_products == NUM_PRODUCTS
    assert idx.shard_ids == [0, 1]
    assert {"category", "title", "product_id", "image_id"} <= idx.filter_keys


def test_search_image_finds_the_catalog_image_itself(searcher, world):
    """Query embedding = the pipeline's embedding: the same photo scores ~1.0 on itself."""
    for row in world.catalog_rows()[::7]:
        results = searcher.search_image(fs.read_bytes(row["image_uri"]), k=5)
        top = results.hits[0]
        assert (top.product_id, top.image_id) == (row["product_id"], row["image_id"])
        assert top.score == pytest.approx(1.0, abs=1e-4)
        assert top.metadata["category"] == row["category"]
        assert top.image_uri == row["image_uri"]
        assert len({h.product_id for h in results.hits}) == len(results.hits) == 5
        assert [h.score for h in results.hits] == sorted((h.score for h in results.hits),
                                                         reverse=True)
        assert {"decode_ms", "embed_ms", "search_ms"} <= set(results.timings_ms)


def test_search_vector_matches_exact_search(searcher):
    idx = searcher.current
    vectors = idx.vectors_of(range(idx.num_vectors))
    rng = np.random.default_rng(1)
    for _ in range(5):
        query = vectors[rng.integers(idx.num_vectors)] + rng.normal(0, 0.05, idx.dim)
        got = searcher.search_vector(query.tolist(), k=4, collapse=False)
        q = query / np.linalg.norm(query)
        expected = np.argsort(-(vectors @ q))[:4]
        assert [h.image_id for h in got.hits] == [idx.hit(int(r), 0).image_id for r in expected]


def test_uncollapsed_results_list_images(searcher, world):
    row = world.catalog_rows()[0]
    results = searcher.search_image(fs.read_bytes(row["image_uri"]), k=12, collapse=False)
    ids = [h.image_id for h in results.hits]
    assert len(ids) == len(set(ids)) == 12
    assert len({h.product_id for h in results.hits}) < 12  # images of one product repeat


def test_similar_to_product_and_image(searcher):
    results = searcher.similar_to(product_id="P0003", k=5)
    assert len(results.hits) == 5
    assert all(h.product_id != "P0003" for h in results.hits)
    by_image = searcher.similar_to(image_id="P0003-1", k=5, collapse=False)
    assert by_image.hits[0].image_id != "P0003-1"
    assert "P0003" in {h.product_id for h in by_image.hits}  # its sibling images
    with pytest.raises(QueryError) as e:
        searcher.similar_to(product_id="nope")
    assert e.value.reason == "unknown_product"
    with pytest.raises(QueryError) as e:
        searcher.similar_to(image_id="nope")
    assert e.value.reason == "unknown_image"


def test_metadata_filters(searcher, world):
    row = next(r for r in world.catalog_rows() if r["category"] == "dairy")
    results = searcher.search_image(fs.read_bytes(row["image_uri"]), k=10,
                                    filters={"category": ["produce", "snacks"]})
    assert results.hits and {h.metadata["category"] for h in results.hits} <= {"produce",
                                                                                "snacks"}
    # 12 products over 5 categories: only 2 are produce or snacks... plus filter by id
    assert len(results.hits) == sum(1 for p in range(NUM_PRODUCTS) if p % 5 in (1, 2))
    only = searcher.similar_to(product_id="P0000", k=3, filters={"product_id": "P0005"})
    assert [h.product_id for h in only.hits] == ["P0005"]
    with pytest.raises(QueryError, match="not a metadata field"):
        searcher.search_vector(np.ones(searcher.current.dim), filters={"colour": "red"})
    for bad in (["category"], {"category": {"a": 1}}, {"category": []}, {"": "x"}):
        with pytest.raises(QueryError) as e:
            validate_filters(bad)
        assert e.value.reason == "bad_filter"


@pytest.mark.parametrize("k", [0, -1, 101, "3", 2.5, True])
def test_bad_k_is_refused(searcher, k):
    with pytest.raises(QueryError) as e:
        searcher.search_vector(np.ones(searcher.current.dim), k=k)
    assert e.value.reason == "bad_k"


@pytest.mark.parametrize("vector", [[1.0, 2.0], np.zeros(48), [float("nan")] * 48,
                                    ["a"] * 48, [[1.0] * 48]])
def test_bad_vectors_are_refused(searcher, vector):
    with pytest.raises(QueryError) as e:
        searcher.search_vector(vector)
    assert e.value.reason == "bad_vector"


@pytest.mark.parametrize("data,reason", [(b"", "empty"), (b"not an image at all", "not_an_image"),
                                         (jpeg_bytes()[:300], "truncated")])
def test_undecodable_images_are_refused_with_the_reason(searcher, data, reason):
    with pytest.raises(QueryError) as e:
        searcher.search_image(data)
    assert e.value.reason in (reason, "corrupt", "not_an_image")


def test_too_large_image_is_refused(searcher):
    with pytest.raises(QueryError) as e:
        searcher.search_image(b"\xff" * (searcher.config.serving.max_upload_bytes + 1))
    assert e.value.reason == "too_large"


def test_shard_subset(world, searcher):
    part = CatalogSearcher.open(world.index_root, config=world.config, shard_ids=[1])
    idx = part.current
    full = searcher.current
    shard_rows = full.manifest.shards[1].num_vectors
    assert idx.shard_ids == [1] and idx.num_vectors == shard_rows < full.num_vectors
    own = {idx.hit(r, 0).image_id for r in range(idx.num_vectors)}
    results = part.search_vector(np.ones(idx.dim), k=10, collapse=False)
    assert {h.image_id for h in results.hits} <= own
    with pytest.raises(IndexLoadError, match="asked for"):
        CatalogSearcher.open(world.index_root, config=world.config, shard_ids=[7])


def test_hot_reload_under_concurrent_queries(world, tmp_path):
    root = copy_index(world, str(tmp_path / "index"))
    smaller = snapshot_subset(world, str(tmp_path / "snap-2"), {"P0000", "P0001"})
    build_index(smaller, root, world.config, version="v0002")
    searcher = CatalogSearcher.open(root, version="v0001", config=world.config)
    old = searcher.current
    image = fs.read_bytes(world.catalog_rows()[4]["image_uri"])
    failures: list[BaseException] = []
    versions_seen: set[str] = set()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                r = searcher.search_image(image, k=3)
                versions_seen.add(r.version)
                assert len(r.hits) == 3
            except BaseException as e:  # noqa: BLE001 - any failure is a test failure
                failures.append(e)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(6):
            outcome = searcher.reload(version="v0002" if i % 2 == 0 else "v0001")
            assert outcome.status == "loaded", outcome
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert versions_seen == {"v0001", "v0002"}
    # A request that started on the old version finishes on it, after the swap.
    assert searcher.version == "v0001" and searcher.current is not old
    assert old.num_vectors == NUM_PRODUCTS * IMAGES_PER_PRODUCT
    assert searcher.reload(version="v0002").status == "loaded"
    hits = run_visual(old, old.vectors_of([0])[0], 3, {}, True, ())
    assert hits.version == "v0001" and len(hits.hits) == 3
    assert searcher.current.num_vectors == (NUM_PRODUCTS - 2) * IMAGES_PER_PRODUCT
    assert searcher.reload().status == "unchanged"  # LATEST = v0002


def test_broken_version_is_refused_and_old_one_keeps_serving(world, tmp_path, caplog):
    root = copy_index(world, str(tmp_path / "index"))
    build_index(world.snapshot, root, world.config, version="v0002")
    searcher = CatalogSearcher.open(root, version="v0001", config=world.config)
    shard_dir = os.path.join(root, "versions", "v0002", "shards")
    victim = next(os.path.join(d, f) for d, _, files in sorted(os.walk(shard_dir))
                  for f in sorted(files) if f.endswith(".parquet"))
    with open(victim, "r+b") as f:
        f.seek(10)
        f.write(b"\x00garbage\x00")
    outcome = searcher.reload()
    assert outcome.status == "refused" and outcome.version == "v0002"
    assert "checksum" in outcome.reason
    assert searcher.version == "v0001" and outcome.serving_version == "v0001"
    assert "refused" in caplog.text
    assert searcher.search_vector(np.ones(searcher.current.dim), k=2).version == "v0001"
    # Refused once: not retried on every watcher tick, unless forced.
    again = searcher.reload()
    assert again.status == "refused" and searcher.reload_counts["refused"] == 1


def test_wrong_dimension_model_version_is_refused(world, tmp_path):
    """A version whose manifest model does not resolve here is refused."""
    root = copy_index(world, str(tmp_path / "index"))
    manifest_path = os.path.join(root, "versions", "v0001", "manifest.json")
    manifest = fs.read_json(manifest_path)
    manifest["model"]["fingerprint"] = "0" * 64
    fs.write_json(manifest_path, manifest)
    with pytest.raises(IndexLoadError, match="fingerprint"):
        CatalogSearcher.open(root, config=world.config)


def test_watcher_loads_new_latest(world, tmp_path):
    root = copy_index(world, str(tmp_path / "index"))
    searcher = CatalogSearcher.open(root, config=world.config)
    watcher = IndexWatcher(searcher, interval_s=0.1).start()
    try:
        build_index(snapshot_subset(world, str(tmp_path / "snap-2"), {"P0002"}), root,
                    world.config, version="v0002")
        deadline = time.time() + 60
        while searcher.version != "v0002" and time.time() < deadline:
            time.sleep(0.1)
        assert searcher.version == "v0002"
        assert watcher.last_outcome is not None and watcher.last_outcome.status in (
            "loaded", "unchanged")
    finally:
        watcher.stop()


def test_open_without_index_fails_with_reason(tmp_path, world):
    with pytest.raises(IndexLoadError, match="LATEST"):
        CatalogSearcher.open(str(tmp_path / "empty"), config=world.config)


def test_object_store_root_is_copied_locally_and_old_copies_pruned(world, tmp_path):
    scheme = register_object_store_stand_in()
    root = copy_index(world, str(tmp_path / "index"))
    build_index(snapshot_subset(world, str(tmp_path / "s2"), {"P0004"}), root, world.config,
                version="v0002")
    build_index(world.snapshot, root, world.config, version="v0003")
    remote = f"{scheme}://{root}"
    searcher = CatalogSearcher.open(remote, version="v0001", config=world.config)
    copies = searcher._copies_root
    assert copies and not copies.startswith(root)
    assert searcher.search_vector(np.ones(searcher.current.dim), k=2).version == "v0001"
    assert searcher.reload(version="v0002").status == "loaded"
    assert searcher.reload(version="v0003").status == "loaded"
    # Local copies: the serving version and the previous one only.
    assert sorted(os.listdir(copies)) == ["v0002", "v0003"]
    assert searcher.similar_to(product_id="P0004", k=3).version == "v0003"
