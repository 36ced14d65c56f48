"""An index built over adapted vectors (build-index --adapter) and served through it:
the version carries its adapter under checksums, serving projects every query kind
(photo, vector, similar products) and the results equal a projection done by hand.

Real build_index (Beam DirectRunner), real ScaNN shards, the tiny real SavedModel of the
serving tests, real HTTP on loopback for the vector query.
"""
from __future__ import annotations

import json
import os
import shutil

import httpx
import numpy as np
import pytest

from catalog_search.cli import main as cli_main
from pipelines.adapter import load_adapter, load_for_version
from pipelines.adapter.artifact import WEIGHTS_FILE, make_adapter, save_adapter
from pipelines.core import filesystem as fs
from pipelines.embed import snapshot as snap
from pipelines.index import artifact as art
from pipelines.index.build import IndexBuildError, run_build_index
from pipelines.index.reader import open_index, verify_version
from serving.app import create_app
from serving.searcher import CatalogSearcher
from serving_fixtures import LiveServer, serving_world

OUT_DIM = 8


@pytest.fixture(scope="module")
def world():
    return serving_world()


@pytest.fixture(scope="module")
def adapted(world, tmp_path_factory):
    """A random linear adapter for the world's model, and an index built through it."""
    root = tmp_path_factory.mktemp("adapted")
    s = snap.load(world.snapshot)
    rng = np.random.default_rng(7)
    weights, _ = np.linalg.qr(rng.standard_normal((s.dim, OUT_DIM)))
    from pipelines.adapter.artifact import base_model_record
    adapter = save_adapter(make_adapter(weights.astype(np.float32),
                                        base_model_record(s.summary.model, None)),
                           str(root / "adapter"))
    index_root = str(root / "index")
    rc = cli_main(["build-index", "--embeddings", world.snapshot, "--index-root", index_root,
                   "--adapter", adapter.path, "--version", "v-adapted", "--shards", "2"]
                  + _config_args(world, root))
    assert rc == 0
    return {"adapter": adapter, "index_root": index_root, "snapshot": s, "root": root}


def _config_args(world, root) -> list[str]:
    path = os.path.join(str(root), "config.yaml")
    if not os.path.exists(path):
        cfg = world.config.to_dict()
        keep = {k: cfg[k] for k in ("model", "runner", "index", "serving")}
        keep["index"] = {**keep["index"], "adapter": None}
        with open(path, "w") as f:
            json.dump(keep, f)
    return ["--config", path]


def test_the_version_carries_the_adapter_and_holds_adapted_vectors(adapted):
    adapter, root = adapted["adapter"], adapted["index_root"]
    manifest = art.read_manifest(root, "v-adapted")
    assert manifest.dim == OUT_DIM and manifest.model["dim"] == adapted["snapshot"].dim
    rec = manifest.adapter
    assert rec["id"] == adapter.id and rec["in_dim"] == adapted["snapshot"].dim
    assert rec["files"][0]["sha256"] == adapter.files[0]["sha256"]
    vdir = art.version_dir(root, "v-adapted")
    carried = load_for_version(vdir, rec)
    assert carried.id == adapter.id and carried.path == fs.join(vdir, "adapter")
    # stored vectors (read through the loader) = adapter(raw snapshot vectors), row by row
    opened = open_index(root, "v-adapted")
    raw = adapted["snapshot"]
    by_id = dict(zip(raw.table.column("image_id").to_pylist(), raw.vectors()))
    for shard in opened.load_shards():
        ids = shard.rows.column("image_id").to_pylist()
        expect = adapter.apply(np.stack([by_id[i] for i in ids]))
        np.testing.assert_allclose(shard.vectors(), expect, atol=1e-5)
    verify_version(root, "v-adapted")


def _by_hand(adapter, snapshot, query_index_space, k, exclude_product=None):
    """Top-k products by exact search over adapter(raw) done here, best image per product."""
    gallery = adapter.apply(snapshot.vectors())
    products = snapshot.table.column("product_id").to_pylist()
    scores = gallery @ query_index_space
    best: dict[str, float] = {}
    for p, sc in zip(products, scores):
        if p != exclude_product:
            best[p] = max(best.get(p, -9.0), float(sc))
    ranked = sorted(best.items(), key=lambda kv: -kv[1])[:k]
    return [p for p, _ in ranked], [s for _, s in ranked]


def test_serving_projects_photo_vector_and_similar_queries(adapted, world):
    adapter, s = adapted["adapter"], adapted["snapshot"]
    searcher = CatalogSearcher.open(adapted["index_root"], config=world.config)
    idx = searcher.current
    assert idx.adapter.id == adapter.id and idx.query_dim == s.dim and idx.dim == OUT_DIM
    rows = world.catalog_rows()
    # photo: the photo's model vector, projected by hand
    for row in rows[::9]:
        data = fs.read_bytes(row["image_uri"])
        raw = idx.embedder.embed_bytes(data)
        want, want_scores = _by_hand(adapter, s, adapter.apply(raw), 5)
        got = searcher.search_image(data, k=5).hits
        assert [h.product_id for h in got] == want
        np.testing.assert_allclose([h.score for h in got], want_scores, atol=1e-4)
        assert got[0].image_id == row["image_id"]
    # vector: a model-space vector (the model's dimension), projected by the server
    rng = np.random.default_rng(3)
    raw = s.vectors()[5] + rng.normal(0, 0.05, s.dim).astype(np.float32)
    q = adapter.apply(raw / np.linalg.norm(raw))
    want, want_scores = _by_hand(adapter, s, q, 6)
    vector_want = want
    got = searcher.search_vector(raw.tolist(), k=6).hits
    assert [h.product_id for h in got] == want
    np.testing.assert_allclose([h.score for h in got], want_scores, atol=1e-4)
    with pytest.raises(Exception, match=f"vector must have {s.dim} numbers"):
        searcher.search_vector([0.1] * OUT_DIM)  # an index-space vector is not a query
    # similar products: the mean of the product's stored (already adapted) vectors
    pid = rows[0]["product_id"]
    mine = adapter.apply(s.vectors()[np.asarray(s.table.column("product_id").to_pylist())
                                     == pid])
    mean = mine.mean(axis=0)
    want, want_scores = _by_hand(adapter, s, mean / np.linalg.norm(mean), 4,
                                 exclude_product=pid)
    got = searcher.similar_to(product_id=pid, k=4).hits
    assert [h.product_id for h in got] == want
    np.testing.assert_allclose([h.score for h in got], want_scores, atol=1e-4)
    # the same over HTTP: vector query in model space, /readyz names the adapter
    app = create_app(adapted["index_root"], world.config, watch=False)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        ready = c.get("/readyz").json()
        assert ready["adapter_id"] == adapter.id and ready["dim"] == OUT_DIM
        r = c.post("/v1/search", json={"vector": raw.tolist(), "k": 6})
        assert r.status_code == 200, r.text
        assert [h["product_id"] for h in r.json()["results"]] == vector_want
        assert c.post("/v1/search", json={"vector": [0.1] * OUT_DIM}).status_code == 422


def test_a_damaged_or_replaced_adapter_copy_is_refused_at_load(adapted, world, tmp_path):
    root = str(tmp_path / "index")
    shutil.copytree(adapted["index_root"], root)
    weights = os.path.join(art.version_dir(root, "v-adapted"), "adapter", WEIGHTS_FILE)
    data = bytearray(open(weights, "rb").read())
    data[-1] ^= 0x01
    open(weights, "wb").write(bytes(data))
    searcher = CatalogSearcher(root, config=world.config)
    outcome = searcher.reload()
    assert outcome.status == "refused"
    assert "adapter" in outcome.reason and WEIGHTS_FILE in outcome.reason
    with pytest.raises(Exception, match="weights.npy: damaged"):
        verify_version(root, "v-adapted")
    # another valid adapter put in its place: refused, it is not the one the manifest records
    vdir = art.version_dir(root, "v-adapted")
    shutil.rmtree(os.path.join(vdir, "adapter"))
    other = make_adapter(np.eye(adapted["snapshot"].dim, OUT_DIM, dtype=np.float32),
                         adapted["adapter"].base_model)
    save_adapter(other, os.path.join(vdir, "adapter"))
    outcome = CatalogSearcher(root, config=world.config).reload()
    assert outcome.status == "refused" and "does not match the one the index manifest" \
        in outcome.reason


def test_build_refuses_mismatched_or_damaged_adapters_naming_the_file(adapted, world,
                                                                       tmp_path, capsys):
    good = adapted["adapter"]
    other_model = save_adapter(make_adapter(good.weights, {**good.base_model,
                                                           "fingerprint": "f" * 64,
                                                           "model_id": "other@ffffffffffff"}),
                               str(tmp_path / "other-model"))
    wrong_dim = save_adapter(make_adapter(np.eye(good.in_dim + 1, OUT_DIM, dtype=np.float32),
                                          good.base_model), str(tmp_path / "wrong-dim"))
    damaged = str(tmp_path / "damaged")
    shutil.copytree(good.path, damaged)
    with open(os.path.join(damaged, WEIGHTS_FILE), "r+b") as f:
        f.seek(-2, 2)
        f.write(b"\x00\x01")
    cases = [(other_model.path, "trained on model"),
             (wrong_dim.path, f"takes {good.in_dim + 1}-d vectors"),
             (damaged, "weights.npy: damaged")]
    config = world.config.replace(index={"adapter": None})
    for path, message in cases:
        with pytest.raises(IndexBuildError, match=message):
            run_build_index(world.snapshot, str(tmp_path / "ix"),
                            config.replace(index={"adapter": path}))
        assert not os.path.exists(str(tmp_path / "ix" / "versions")) or not os.listdir(
            str(tmp_path / "ix" / "versions"))
        rc = cli_main(["build-index", "--embeddings", world.snapshot, "--index-root",
                       str(tmp_path / "ix"), "--adapter", path] + _config_args(world, tmp_path))
        err = capsys.readouterr().err
        assert rc == 1 and message in err and path in err, err
    assert load_adapter(good.path).id == good.id


def test_evaluate_reports_with_and_without_the_adapter(adapted, world, tmp_path, capsys):
    from serving.evaluate import evaluate
    cfg = world.config.replace(index={"adapter": None})
    plain = evaluate(world.index_root, world.queries, str(tmp_path / "plain"), cfg)
    report = evaluate(adapted["index_root"], world.queries, str(tmp_path / "adapted"), cfg)
    assert set(report["overall"]) == {"index", "exact", "without_adapter"}
    assert report["adapter"]["id"] == adapted["adapter"].id
    assert report["adapter"]["dim"] == OUT_DIM
    # "without the adapter" is exact search over the same snapshot's raw vectors: what the
    # index built without an adapter gives by exact search
    for m, value in plain["overall"]["exact"].items():
        assert report["overall"]["without_adapter"][m] == pytest.approx(value, abs=1e-9), m
    assert "without_adapter" not in plain["overall"] and plain["adapter"] is None
    # with the adapter: the published index = exact search in index space (small shards)
    assert report["overall"]["index"] == report["overall"]["exact"]
    cat = next(iter(report["by_category"].values()))
    assert {"index", "exact", "without_adapter"} <= set(cat)
    rc = cli_main(["evaluate", "--index-root", adapted["index_root"], "--queries",
                   world.queries, "--out", str(tmp_path / "cli")] + _config_args(world, tmp_path))
    out = capsys.readouterr().out
    assert rc == 0 and "without_adapter" in out


def test_feedback_logs_model_space_vectors_naming_the_adapter(adapted, world, tmp_path):
    """With an adapter the index holds adapted vectors, but the feedback log keeps the
    query in model space (the adapter's input) so a retrained adapter can use it."""
    import dataclasses

    from pipelines.adapter.feedback import read_feedback_pairs, read_records
    adapter, s = adapted["adapter"], adapted["snapshot"]
    root = tmp_path / "feedback"
    config = dataclasses.replace(world.config, serving=dataclasses.replace(
        world.config.serving, feedback_root=str(root)))
    row = world.catalog_rows()[2]
    data = fs.read_bytes(row["image_uri"])
    raw = s.vectors()[7]
    app = create_app(adapted["index_root"], config, watch=False)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        photo = c.post("/v1/search", files={"image": ("q.jpg", data)}).json()
        vector = c.post("/v1/search", json={"vector": raw.tolist(), "k": 3}).json()
        for answer in (photo, vector):
            r = c.post("/v1/feedback", json={"query_id": answer["query_id"],
                                             "product_id": row["product_id"]})
            assert r.status_code == 202, r.text
        embedded = app.state.serving.searcher.current.embedder.embed_bytes(data)
    records = read_records(str(root))
    assert [r["adapter_id"] for r in records] == [adapter.id, adapter.id]
    assert all(r["version"] == "v-adapted" and len(r["vector"]) == s.dim for r in records)
    np.testing.assert_allclose(records[0]["vector"], embedded / np.linalg.norm(embedded),
                               atol=1e-5)
    np.testing.assert_allclose(records[1]["vector"], raw / np.linalg.norm(raw), atol=1e-5)
    pairs = read_feedback_pairs(str(root))
    assert pairs.vectors.shape == (2, s.dim) and adapter.in_dim == s.dim != OUT_DIM
    # what train-adapter --feedback uses: the records of the snapshot's model only (a
    # record of another model of the same dimension is another vector space)
    from pipelines.adapter.commands import feedback_pairs
    from pipelines.adapter.feedback import FeedbackLog
    assert records[0]["model_id"] == s.summary.model_id
    FeedbackLog(str(root)).append({**records[0], "model_id": "othermodel@ffffffffffff",
                                   "product_id": world.catalog_rows()[5]["product_id"]})
    assert len(read_feedback_pairs(str(root))) == 3
    used = feedback_pairs(world.snapshot, str(root))
    assert used.vectors.shape == (2, s.dim)
    assert list(used.products) == [row["product_id"]] * 2
