"""Feedback as supervision over real HTTP on loopback: search answers carry a query_id when
serving.feedback_root is set, POST /v1/feedback appends the query's model-space vector and
the chosen product to the bounded, rotated log (never the photo), bad inputs answer 4xx in
the error shape, and the log is what `train-adapter --feedback` reads as pairs."""
from __future__ import annotations

import dataclasses
import json
import os

import httpx
import numpy as np
import pytest

from pipelines.adapter.feedback import CURRENT_FILE, FeedbackLog, read_feedback_pairs, read_records
from pipelines.core import filesystem as fs
from serving.app import create_app
from serving_fixtures import LiveServer, serving_world


@pytest.fixture(scope="module")
def world():
    return serving_world()


def _config(world, root, **serving):
    sc = dataclasses.replace(world.config.serving, feedback_root=str(root), **serving)  # validated
    return dataclasses.replace(world.config, serving=sc)


def _photo(row) -> tuple[str, bytes]:
    return row["image_id"], fs.read_bytes(row["image_uri"])


def test_feedback_off_by_default_no_query_id_and_404(world):
    assert world.config.serving.feedback_root is None
    app = create_app(world.index_root, world.config, watch=False)
    row = world.catalog_rows()[0]
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        r = c.post("/v1/search", files={"image": _photo(row)})
        assert r.status_code == 200 and "query_id" not in r.json()
        r = c.post("/v1/feedback", json={"query_id": "0" * 32, "product_id": row["product_id"]})
        assert r.status_code == 404 and r.json()["error"]["reason"] == "feedback_off"
        assert r.headers["x-error-reason"] == "feedback_off"
        op = c.get("/openapi.json").json()["paths"]["/v1/feedback"]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert set(body["required"]) == {"query_id", "product_id"}
        assert op["responses"]["202"]["content"]["application/json"]["schema"]["$ref"] \
            .endswith("/FeedbackResponse")
        assert {"404", "413", "422", "503"} <= set(op["responses"])


def test_search_then_feedback_logs_the_query_vector_in_model_space(world, tmp_path):
    root = tmp_path / "feedback"
    app = create_app(world.index_root, _config(world, root), watch=False)
    rows = world.catalog_rows()
    image_id, data = _photo(rows[4])
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        r = c.post("/v1/search", files={"image": (image_id, data)}, data={"k": "3"})
        assert r.status_code == 200, r.text
        photo = r.json()
        qid = photo["query_id"]
        assert len(qid) == 32 and int(qid, 16) >= 0
        chosen = photo["results"][1]["product_id"]  # not necessarily the first hit
        idx = app.state.serving.searcher.current
        r = c.post("/v1/feedback", json={"query_id": qid, "product_id": chosen})
        assert r.status_code == 202, r.text
        assert r.json() == {"status": "recorded", "query_id": qid, "product_id": chosen,
                            "version": photo["version"]}
        # a vector query (with text fused or not) gets its own id; text alone and
        # "more like this" have no query vector: no id
        vec = np.arange(1, idx.query_dim + 1, dtype=np.float32)
        r = c.post("/v1/search", json={"vector": vec.tolist(), "k": 2})
        vqid = r.json()["query_id"]
        assert vqid != qid
        assert "query_id" not in c.post("/v1/search", json={"text": "product"}).json()
        r = c.get(f"/v1/products/{rows[0]['product_id']}/similar")
        assert r.status_code == 200 and "query_id" not in r.json()
        r = c.post("/v1/feedback", json={"query_id": vqid, "product_id": rows[0]["product_id"]})
        assert r.status_code == 202, r.text
    records = read_records(str(root))
    assert len(records) == 2
    first = records[0]
    assert set(first) == {"query_id", "product_id", "version", "model_id", "adapter_id",
                          "vector", "at"}
    assert (first["query_id"], first["product_id"], first["version"]) == (qid, chosen, "v0001")
    assert first["model_id"] == idx.manifest.model_id and first["adapter_id"] is None
    raw = idx.embedder.embed_bytes(data)
    np.testing.assert_allclose(first["vector"], raw / np.linalg.norm(raw), atol=1e-5)
    np.testing.assert_allclose(records[1]["vector"], vec / np.linalg.norm(vec), atol=1e-6)
    assert not any(isinstance(v, str) and len(v) > 200 for v in first.values())  # no photo
    # what train-adapter --feedback ROOT reads: two pairs of the model's dimension
    pairs = read_feedback_pairs(str(root))
    assert len(pairs) == 2 and pairs.vectors.shape == (2, idx.query_dim)
    assert list(pairs.products) == [chosen, rows[0]["product_id"]]


def test_bad_feedback_answers_4xx_in_the_error_shape(world, tmp_path):
    root = tmp_path / "feedback"
    app = create_app(world.index_root, _config(world, root, feedback_recent_queries=2,
                                               max_json_bytes=2048), watch=False)
    rows = world.catalog_rows()
    product = rows[0]["product_id"]

    def search() -> str:
        dim = app.state.serving.searcher.current.query_dim
        r = c.post("/v1/search", json={"vector": [1.0] * dim, "k": 1})
        assert r.status_code == 200, r.text
        return r.json()["query_id"]

    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        qid = search()
        cases = [
            (b"{not json", 422, "bad_json"),
            (json.dumps([qid, product]).encode(), 422, "bad_feedback"),
            (json.dumps({"query_id": qid}).encode(), 422, "bad_feedback"),
            (json.dumps({"product_id": product}).encode(), 422, "bad_feedback"),
            (json.dumps({"query_id": 7, "product_id": product}).encode(), 422, "bad_feedback"),
            (json.dumps({"query_id": qid, "product_id": ""}).encode(), 422, "bad_feedback"),
            (json.dumps({"query_id": qid, "product_id": product, "x": 1}).encode(), 422,
             "bad_feedback"),
            (json.dumps({"query_id": "f" * 32, "product_id": product}).encode(), 404,
             "unknown_query"),
            (json.dumps({"query_id": "f" * 65, "product_id": product}).encode(), 422,
             "bad_feedback"),
            (json.dumps({"query_id": qid, "product_id": "no-such-product"}).encode(), 422,
             "unknown_product"),
            (json.dumps({"query_id": qid, "product_id": "p" * 3000}).encode(), 413,
             "too_large"),
            (b"", 422, "bad_json"),
        ]
        for body, status, reason in cases:
            r = c.post("/v1/feedback", content=body,
                       headers={"content-type": "application/json"})
            assert r.status_code == status, (body[:80], r.text)
            assert r.json()["error"]["reason"] == reason, (body[:80], r.text)
            assert r.headers["x-error-reason"] == reason
        assert c.get("/v1/feedback").status_code == 405
        # the LRU keeps the 2 most recent ids: the first expires after two more searches
        second, third = search(), search()
        r = c.post("/v1/feedback", json={"query_id": qid, "product_id": product})
        assert r.status_code == 404 and r.json()["error"]["reason"] == "unknown_query"
        for q in (second, third):
            assert c.post("/v1/feedback", json={"query_id": q, "product_id": product}
                          ).status_code == 202
        # a feedback log that cannot be written (its folder is now a file): 503, not a 500
        os.rename(root, str(root) + ".moved")
        try:
            root.write_bytes(b"not a folder")
            r = c.post("/v1/feedback", json={"query_id": third, "product_id": product})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["reason"] == "feedback_unavailable"
        finally:
            root.unlink()
            os.rename(str(root) + ".moved", root)
    assert len(read_records(str(root))) == 2  # only the accepted ones


def test_the_size_cap_rotates_and_bounds_the_log_over_http(world, tmp_path):
    root = tmp_path / "feedback"
    app = create_app(world.index_root, _config(world, root, feedback_max_bytes=4096,
                                               feedback_max_files=2), watch=False)
    product = world.catalog_rows()[0]["product_id"]
    rng = np.random.default_rng(0)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        dim = app.state.serving.searcher.current.query_dim
        for _ in range(40):
            r = c.post("/v1/search", json={"vector": rng.standard_normal(dim).tolist(),
                                           "k": 1})
            r = c.post("/v1/feedback", json={"query_id": r.json()["query_id"],
                                             "product_id": product})
            assert r.status_code == 202, r.text
    log = FeedbackLog(str(root), 4096, 2)
    assert len(log.rotated()) == 2  # the oldest were deleted
    assert os.path.getsize(root / CURRENT_FILE) <= 4096
    assert all(os.path.getsize(p) <= 4096 for p in log.rotated())
    assert log.total_bytes() <= 3 * 4096
    kept = read_records(str(root))
    assert 0 < len(kept) < 40


def test_feedback_log_unit_rotation_cap_and_unreadable_lines(tmp_path):
    log = FeedbackLog(str(tmp_path / "fb"), max_bytes=1024, max_files=3)
    rec = {"query_id": "q", "product_id": "P1", "vector": [0.5] * 20}
    size = len(json.dumps({**rec, "query_id": "q000"}, sort_keys=True,
                          separators=(",", ":"))) + 1
    for i in range(50):
        log.append({**rec, "query_id": f"q{i:03d}"})
    assert len(log.rotated()) == 3
    assert all(os.path.getsize(p) <= 1024 for p in log.rotated() + [log.current])
    assert log.total_bytes() <= 4 * 1024
    ids = [r["query_id"] for r in read_records(log.root)]
    assert ids == sorted(ids) and ids[-1] == "q049"  # oldest first, newest kept
    assert len(ids) >= 3 * (1024 // size)
    with pytest.raises(ValueError, match="exceeds"):
        log.append({**rec, "vector": [0.5] * 1000})
    with open(log.current, "ab") as f:
        f.write(b"{torn line\n")
    assert len(read_records(log.root)) == len(ids)  # the torn line is skipped
    with pytest.raises(ValueError):
        FeedbackLog(str(tmp_path / "x"), max_bytes=10)
