"""The ScaNN searcher over delta rows (serving/delta_segment.py, used by
serving/delta_index.py): built from serving.delta_scann_min_rows live delta rows, reused
while the log only grows by a small tail (searched exactly), rebuilt when the tail reaches
the threshold; its rows are found and a deleted id never comes back for any query kind;
on a small set searched over every leaf its top-k equals the exact path's."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest

from pipelines.core import filesystem as fs
from pipelines.embed import snapshot
from pipelines.index import deltas as dl
from pipelines.index.delete import delete_ids
from serving.delta_index import DeltaIndex
from serving.errors import QueryError
from serving.searcher import CatalogSearcher


def _config(world, min_rows, leaves_fraction=1.0, reorder_multiplier=4):
    cfg = world.config
    return dataclasses.replace(cfg, serving=dataclasses.replace(
        cfg.serving, delta_scann_min_rows=min_rows,
        delta_scann_leaves_fraction=leaves_fraction,
        delta_scann_reorder_multiplier=reorder_multiplier))


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _delta(world, n, prefix, seed, copies=0):
    """n delta rows of n products: the first `copies` carry the base rows' own vectors
    (photo queries of those images find them), the rest random unit vectors."""
    snap = snapshot.load(world.snapshot)
    base_rows, base_vecs = snap.table.to_pylist(), snap.vectors()
    rng = np.random.default_rng(seed)
    vecs = _unit(rng.normal(size=(n, base_vecs.shape[1])))
    vecs[:copies] = base_vecs[:copies]
    rows = pa.table({
        "image_id": [f"{prefix}-img-{i}" for i in range(n)],
        "view": [base_rows[0]["view"]] * n,
        "product_id": [f"{prefix}-P{i}" for i in range(n)],
        "image_uri": [base_rows[i % len(base_rows)]["image_uri"] for i in range(n)],
        "metadata": [json.dumps({"category": "seg-cat", "title": f"zebrafruit {prefix} {i}"})
                     for i in range(n)]})
    return rows, vecs.astype(np.float32), base_rows


def _ids(hits):
    return {h.image_id for h in hits}, {h.product_id for h in hits}


def test_segment_rows_are_found_and_deleted_ids_never_returned_for_every_query_kind(world,
                                                                                     root):
    rows, vecs, base_rows = _delta(world, 400, "SEG", seed=1, copies=6)
    dl.write_delta(root, rows=rows, vectors=vecs)
    s = CatalogSearcher.open(root, config=_config(world, min_rows=300))
    idx = s.current
    assert isinstance(idx, DeltaIndex) and idx.segment is not None
    assert idx.segment.kind == "scann_tree_ah" and idx.segment.num_rows == 400
    assert idx.delta_info()["exact_delta_rows"] == 0
    seg = idx.segment
    # found: vector (own vector first), photo (a copy of the photo's image), filtered,
    # text, similar
    for j in (7, 123, 399):
        hit = s.search_vector(vecs[j], k=1, collapse=False).hits[0]
        assert hit.image_id == f"SEG-img-{j}" and hit.score == pytest.approx(1, abs=1e-4)
    # a copy of a base row ties with it
    assert "SEG-img-0" in _ids(s.search_vector(vecs[0], k=2, collapse=False).hits)[0]
    photo = fs.read_bytes(base_rows[2]["image_uri"])
    top = s.search_image(photo, k=6, collapse=False).hits
    assert "SEG-img-2" in _ids(top)[0]
    only = s.search_vector(vecs[5], k=10, filters={"category": "seg-cat"}).hits
    assert len(only) == 10 and all(p.startswith("SEG-P") for p in _ids(only)[1])
    assert only[0].product_id == "SEG-P5"
    assert s.search_text("zebrafruit", k=5).hits[0].product_id.startswith("SEG-P")
    sim = s.similar_to(product_id=base_rows[3]["product_id"], k=40, collapse=False).hits
    assert "SEG-img-3" in _ids(sim)[0]  # the copy of that product's image
    assert "SEG-P9" not in _ids(s.similar_to(product_id="SEG-P9", k=40).hits)[1]

    # deletes: a product and an image by takedown, an image by a delete delta
    delete_ids(root, product_ids=["SEG-P0"], image_ids=["SEG-img-2"])
    dl.write_delta(root, delete_image_ids=["SEG-img-123"])
    assert s.reload().status == "deltas_applied"
    assert s.current.segment is seg  # reused: deletes only mask its rows
    victims_img, victims_prod = {"SEG-img-0", "SEG-img-2", "SEG-img-123"}, {"SEG-P0",
                                                                          "SEG-P2", "SEG-P123"}

    def check(hits):
        images, products = _ids(hits)
        assert not images & victims_img and not products & victims_prod

    def check_all(searcher):
        for collapse in (True, False):
            for j in (0, 2, 123):
                check(searcher.search_vector(vecs[j], k=100, collapse=collapse).hits)
                check(searcher.search_vector(vecs[j], k=10, collapse=collapse,
                                             filters={"category": "seg-cat"}).hits)
                check(searcher.search_vector(vecs[j], k=10, collapse=collapse,
                                             text=f"zebrafruit SEG {j}").hits)
            check(searcher.search_image(photo, k=100, collapse=collapse).hits)
            check(searcher.search_image(photo, k=10, collapse=collapse,
                                        text="zebrafruit SEG 2").hits)
            check(searcher.similar_to(product_id=base_rows[2]["product_id"], k=100,
                                      collapse=collapse).hits)
        assert searcher.search_vector(vecs[0], k=10, filters={"product_id": "SEG-P0"}).hits \
            == []
        check(searcher.search_text("zebrafruit SEG 0", k=100).hits)
        check(searcher.search_text("SEG-P123", k=100).hits)
        with pytest.raises(QueryError):
            searcher.similar_to(product_id="SEG-P0")
        with pytest.raises(QueryError):
            searcher.similar_to(image_id="SEG-img-123")
        # the segment still serves its live rows
        assert searcher.search_vector(vecs[7], k=1, collapse=False).hits[0].image_id \
            == "SEG-img-7"

    check_all(s)
    info = s.current.delta_info()
    assert info["searchable_rows"] == info["base_rows"] + 400 - 3
    # a restart builds its own segment (nothing of it was written) and keeps them out
    again = CatalogSearcher.open(root, config=_config(world, min_rows=300))
    assert again.current.segment is not None and again.current.segment is not seg
    assert again.current.segment.num_rows == 397
    check_all(again)


def test_the_threshold_both_sides_reuse_and_rebuild(world, root):
    rows, vecs, _ = _delta(world, 299, "A", seed=2)
    dl.write_delta(root, rows=rows, vectors=vecs)
    s = CatalogSearcher.open(root, config=_config(world, min_rows=300))
    assert s.current.segment is None  # below: exact
    assert s.current.delta_info()["exact_delta_rows"] == 299
    assert s.search_vector(vecs[10], k=1, collapse=False).hits[0].image_id == "A-img-10"
    # one more row: 300 live delta rows, a segment over all of them
    rows, vecs_b, _ = _delta(world, 1, "B", seed=3)
    dl.write_delta(root, rows=rows, vectors=vecs_b)
    s.reload()
    seg = s.current.segment
    assert seg is not None and seg.num_rows == 300 and len(seg.covers) == 2
    assert s.current.delta_info()["exact_delta_rows"] == 0
    assert s.search_vector(vecs_b[0], k=1, collapse=False).hits[0].image_id == "B-img-0"
    # a small delta on top: the segment is reused, its 5 rows are the exact tail
    rows, vecs_c, _ = _delta(world, 5, "C", seed=4)
    dl.write_delta(root, rows=rows, vectors=vecs_c)
    s.reload()
    assert s.current.segment is seg
    assert s.current.delta_info()["exact_delta_rows"] == 5
    for j in range(5):
        assert s.search_vector(vecs_c[j], k=1, collapse=False).hits[0].image_id == f"C-img-{j}"
    assert s.search_vector(vecs[20], k=1, collapse=False).hits[0].image_id == "A-img-20"
    # the tail reaches the threshold: one new segment over every live delta row
    rows, vecs_d, _ = _delta(world, 300, "D", seed=5)
    dl.write_delta(root, rows=rows, vectors=vecs_d)
    s.reload()
    assert s.current.segment is not seg and s.current.segment.num_rows == 605
    assert s.current.delta_info()["exact_delta_rows"] == 0
    assert s.search_vector(vecs_d[7], k=1, collapse=False).hits[0].image_id == "D-img-7"
    # 0 = off: the same log searched exactly
    off = CatalogSearcher.open(root, config=_config(world, min_rows=0))
    assert off.current.segment is None and off.current.delta_info()["exact_delta_rows"] == 605


def test_segment_top_k_equals_the_exact_path_on_a_small_set(world, root):
    rows, vecs, _ = _delta(world, 600, "E", seed=6)
    dl.write_delta(root, rows=rows, vectors=vecs)
    dl.write_delta(root, delete_image_ids=[f"E-img-{i}" for i in range(0, 600, 7)])
    # every leaf, and reordering enough AH candidates that the true top-k are among them
    seg_s = CatalogSearcher.open(root, config=_config(world, min_rows=300, leaves_fraction=1.0,
                                                      reorder_multiplier=20))
    exact_s = CatalogSearcher.open(root, config=_config(world, min_rows=0))
    a, b = seg_s.current, exact_s.current
    assert a.segment is not None and a.segment.kind == "scann_tree_ah" and b.segment is None
    rng = np.random.default_rng(7)
    queries = np.concatenate([_unit(rng.normal(size=(40, vecs.shape[1]))),
                              _unit(vecs[:40] + rng.normal(0, 0.3, (40, vecs.shape[1])))])
    for n in (10, 40):
        sa, ra = a.search(queries.astype(np.float32), n)
        sb, rb = b.search(queries.astype(np.float32), n)
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_allclose(sa, sb, rtol=0, atol=1e-5)
        assert not np.isin(ra, np.flatnonzero(a._masked)).any()
    # the query paths agree too (collapsed, filtered)
    for q in queries[:10]:
        assert [h.image_id for h in seg_s.search_vector(q, k=10).hits] == \
            [h.image_id for h in exact_s.search_vector(q, k=10).hits]
        assert [h.image_id for h in seg_s.search_vector(q, k=10, collapse=False,
                                                        filters={"category": "seg-cat"}).hits] \
            == [h.image_id for h in exact_s.search_vector(
                q, k=10, collapse=False, filters={"category": "seg-cat"}).hits]
