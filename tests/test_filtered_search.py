"""Fast filtered search (serving/filter_index.py): a metadata filter returns exactly the
top-k of the filter's own rows (checked against numpy brute force) for a rare and a
common value, k hits whenever k exist even when the approximate search finds few, and
with deltas the filter sees upserted rows and never a deleted one."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from pipelines.embed import snapshot
from pipelines.index import deltas as dl
from pipelines.index.build import run_build_index
from serving import query
from serving.filter_index import FilterIndex, matching_rows
from serving.searcher import CatalogSearcher
from index_fixtures import MODEL_ID, clustered_vectors, make_config, summary_for

N, DIM = 3000, 32


def _category(i: int) -> str:
    if i % 200 == 7:
        return "rare"          # 15 rows (0.5%), spread over every cluster
    if i % 2 == 0:
        return "common"        # 50%
    return f"other{i % 5}"


def _write(path: str, vectors: np.ndarray) -> str:
    n = len(vectors)
    ids = [f"img{i:06d}" for i in range(n)]
    table = pa.table({
        "image_id": ids, "product_id": [f"P{i // 3:05d}" for i in range(n)],
        "image_uri": [f"file:///c/{i}.jpg" for i in ids], "content_sha256": ["0" * 64] * n,
        "model_id": [MODEL_ID] * n, "view": ["original"] * n,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
        "metadata": [json.dumps({"category": _category(i), "title": f"item {i}",
                                 "flag": i % 3 == 0}) for i in range(n)],
    }, schema=snapshot.embeddings_schema(DIM))
    snapshot.write_table(path, table)
    snapshot.write_summary(path, summary_for("snap", n, DIM, MODEL_ID, {
        "handle": "test", "model_id": MODEL_ID, "dim": DIM, "fingerprint": "ab" * 24}))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    vectors = clustered_vectors(N, DIM, seed=21)
    snap = _write(str(tmp_path_factory.mktemp("snap") / "s"), vectors)
    roots = {}
    # brute force (exact) shards, and tree-AH shards searched with a tiny fixed budget
    roots["exact"] = str(tmp_path_factory.mktemp("exact"))
    run_build_index(snap, roots["exact"], make_config(shards=2))
    roots["approx"] = str(tmp_path_factory.mktemp("approx"))
    run_build_index(snap, roots["approx"], make_config(
        shards=2, brute_force_below=0, tune_recall_target=None,
        leaves_to_search_fraction=0.03, reorder_multiplier=1, recall_threshold=0.0))
    return vectors, roots


def _open(root: str) -> CatalogSearcher:
    return CatalogSearcher.open(root, config=make_config(), load_embedder=False)


def _brute_force(vectors, q, k, collapse, **where):
    """The reference: every row passing the filter, exact scores, best first."""
    ok = [i for i in range(N) if all(_category(i) == v for v in where.values())]
    scores = vectors[ok] @ q
    order = sorted(range(len(ok)), key=lambda j: (-scores[j], ok[j]))
    out, seen = [], set()
    for j in order:
        i = ok[j]
        key = f"P{i // 3:05d}" if collapse else f"img{i:06d}"
        if key in seen:
            continue
        seen.add(key)
        out.append((f"img{i:06d}", float(scores[j])))
        if len(out) == k:
            break
    return out


# (an approximate index answers a common value approximately: the next test)
@pytest.mark.parametrize("kind,value,collapse", [
    ("exact", "rare", False), ("exact", "rare", True), ("exact", "common", False),
    ("exact", "common", True), ("approx", "rare", False), ("approx", "rare", True)])
def test_filtered_search_returns_exactly_the_top_k_of_the_filters_rows(data, kind, value,
                                                                       collapse):
    vectors, roots = data
    s = _open(roots[kind])
    queries = clustered_vectors(12, DIM, seed=22)
    for q in queries:
        got = s.search_vector(q, k=10, filters={"category": value}, collapse=collapse).hits
        want = _brute_force(vectors, q, 10, collapse, category=value)
        assert len(want) == 10
        assert [h.image_id for h in got] == [w[0] for w in want]
        np.testing.assert_allclose([h.score for h in got], [w[1] for w in want], atol=1e-5)


def test_a_common_value_over_fetches_and_still_returns_k_hits(data, monkeypatch):
    vectors, roots = data
    monkeypatch.setattr(query, "EXACT_MAX_ROWS", 100)  # 1,500 rows: the over-fetch path
    s = _open(roots["approx"])
    searched = []
    real = type(s.current).search

    def spy(self, queries, n, exact=False):
        searched.append(n)
        return real(self, queries, n, exact)

    monkeypatch.setattr(type(s.current), "search", spy)
    queries = clustered_vectors(12, DIM, seed=23)
    found = 0.0
    for q in queries:
        got = s.search_vector(q, k=20, filters={"category": "common"}, collapse=False).hits
        want = _brute_force(vectors, q, 20, False, category="common")
        assert len(got) == 20 and all(h.metadata["category"] == "common" for h in got)
        found += len({h.image_id for h in got} & {w[0] for w in want}) / 20
    assert found / len(queries) >= 0.5
    # 1 / selectivity = 2: the first round asks for twice the unfiltered fetch
    assert searched[0] >= 2 * 4 * 20


def test_k_hits_whenever_k_exist_when_the_approximate_search_finds_few(data, monkeypatch):
    """Force the over-fetch path for the rare value: the approximate index (3% of its
    leaves, no reordering slack) finds few of its rows; the exact finish still returns
    exactly the top-k."""
    vectors, roots = data
    monkeypatch.setattr(query, "EXACT_MAX_ROWS", 5)
    s = _open(roots["approx"])
    for q in clustered_vectors(8, DIM, seed=24):
        got = s.search_vector(q, k=10, filters={"category": "rare"}, collapse=False).hits
        assert [h.image_id for h in got] == [w[0] for w in
                                             _brute_force(vectors, q, 10, False,
                                                          category="rare")]
    # fewer than k exist: all of them, and nothing else
    got = s.search_vector(vectors[7], k=50, filters={"category": "rare"}, collapse=False).hits
    assert sorted(h.image_id for h in got) == sorted(f"img{i:06d}" for i in range(N)
                                                     if _category(i) == "rare")


def test_filter_index_counts_and_what_it_leaves_unindexed(data):
    _, roots = data
    idx = _open(roots["exact"]).current
    fi = idx.filter_index
    assert fi.counts("category")["rare"] == 15 and fi.count("category", "common") == N // 2
    assert fi.count("flag", "true") == N // 3  # booleans compare as filters write them
    assert fi.indexed("category") and fi.indexed("flag") and fi.indexed("title")
    rows = matching_rows(idx, {"category": frozenset({"rare"}), "flag": frozenset({"true"})})
    assert rows is not None
    assert all(idx.metadata(r)["category"] == "rare" and idx.metadata(r)["flag"] for r in rows)
    # free text and keys with too many values are not indexed
    many = FilterIndex.build([json.dumps({"t": "x" * 300, "c": "a"})] * 3)
    assert not many.indexed("t") and many.indexed("c") and "t" in many.skipped


def test_filters_see_delta_rows_and_never_deleted_ones(data, tmp_path):
    import shutil
    vectors, roots = data
    root = shutil.copytree(roots["exact"], str(tmp_path / "index"))
    rare = [i for i in range(N) if _category(i) == "rare"]
    q = vectors[rare[0]]
    new = (q + 0.01 * np.random.default_rng(0).standard_normal(DIM)).astype(np.float32)
    new /= np.linalg.norm(new)
    rows = pa.table({"image_id": ["new-img"], "view": ["original"], "product_id": ["NEWP"],
                     "image_uri": [None], "metadata": [json.dumps({"category": "rare"})]},
                    schema=pa.schema([(c, pa.string()) for c in
                                      ("image_id", "view", "product_id", "image_uri",
                                       "metadata")]))
    dl.write_delta(root, rows=rows, vectors=new[None])
    dl.write_delta(root, delete_image_ids=[f"img{rare[0]:06d}"])
    s = _open(root)
    got = s.search_vector(q, k=20, filters={"category": "rare"}, collapse=False).hits
    ids = [h.image_id for h in got]
    assert ids[0] == "new-img"
    assert f"img{rare[0]:06d}" not in ids
    assert sorted(ids) == sorted(["new-img"] + [f"img{i:06d}" for i in rare[1:]])
