"""Image + text search on a real index (real embed job, real build_index, real BM25):
the text decides between two visually identical products, text-only search, fused
"similar products", and the HTTP API (real uvicorn on loopback) never answering 5xx to
bad text."""
from __future__ import annotations

import csv
import os

import httpx
import pytest

from pipelines.core import filesystem as fs
from pipelines.core.config import load_config
from pipelines.embed.job import run_embed
from pipelines.index.build import run_build_index
from pipelines.embed.sample_catalog import write_catalog
from serving.app import create_app
from serving.errors import QueryError
from serving.searcher import CatalogSearcher
from serving_fixtures import LiveServer

# Two products share one photo (identical bytes); only their text tells them apart.
ROWS = [  # product_id, image of generated product #, title, category, description
    ("OAT-ORGANIC", 0, "Organic oat drink", "dairy", "Oats grown without pesticides"),
    ("COW-CLASSIC", 0, "Classic cow milk", "dairy", "Fresh whole milk from the farm"),
    ("OAT-FAMILY", 1, "Organic oat drink family pack", "dairy", "Three litres of oat drink"),
    ("APPLE", 2, "Red apple", "fruit", "Crisp and sweet"),
    ("LEEK", 3, "Leek", "vegetable", "Long green stalk"),
    ("TOMATO", 4, "Beef tomato", "vegetable", "Large and juicy"),
]


@pytest.fixture(scope="module")
def fusion_world(tmp_path_factory):
    from tiny_model import make_tiny_model
    root = tmp_path_factory.mktemp("fusion")
    config = load_config(overrides={
        "model": {"handle": make_tiny_model(str(root)), "cache_dir": str(root / "cache"),
                  "batch_size": 8},
        "runner": {"direct_running_mode": "in_memory", "direct_num_workers": 1},
        "index": {"eval_queries": 6, "recall_threshold": 0.5},
        "fusion": {"text_weight": 0.5, "candidates": 10, "max_text_chars": 50},
    })
    generated = write_catalog(str(root / "gen"), num_products=5, images_per_product=1,
                              size=128, seed=7)
    with open(generated, newline="", encoding="utf-8") as f:
        images = [r["image_uri"] for r in csv.DictReader(f)]
    manifest = str(root / "catalog.csv")
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["product_id", "image_id", "image_uri", "title", "category", "description"])
        for pid, img, title, cat, desc in ROWS:
            w.writerow([pid, pid + "-0", images[img], title, cat, desc])
    emb = run_embed([manifest], str(root / "emb"), config, run_id="r1")
    assert emb.embedded == len(ROWS)
    run_build_index(emb.snapshot, str(root / "index"), config, version="v1")
    searcher = CatalogSearcher.open(str(root / "index"), config=config)
    return searcher, images, config, str(root / "index")


def test_photo_alone_cannot_tell_the_twins_apart(fusion_world):
    searcher, images, _, _ = fusion_world
    hits = searcher.search_image(fs.read_bytes(images[0]), k=2).hits
    assert {h.product_id for h in hits} == {"OAT-ORGANIC", "COW-CLASSIC"}
    assert hits[0].score == pytest.approx(hits[1].score, abs=1e-5)


@pytest.mark.parametrize("text,first,second", [("organic", "OAT-ORGANIC", "COW-CLASSIC"),
                                                ("whole milk", "COW-CLASSIC", "OAT-ORGANIC")])
def test_text_decides_between_visually_identical_products(fusion_world, text, first, second):
    searcher, images, _, _ = fusion_world
    hits = searcher.search_image(fs.read_bytes(images[0]), k=4, text=text).hits
    order = [h.product_id for h in hits]
    assert order[0] == first and order.index(first) < order.index(second)
    a, b = hits[0], hits[order.index(second)]
    assert a.visual_score == pytest.approx(b.visual_score, abs=1e-5)
    assert a.text_score > b.text_score == 0.0
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # weight 0: the visual order (the twins tie; the text no longer decides anything)
    plain = searcher.search_image(fs.read_bytes(images[0]), k=2, text=text, text_weight=0.0)
    assert plain.hits[0].score == pytest.approx(plain.hits[1].score, abs=1e-6)


def test_text_unknown_to_the_catalog_keeps_the_visual_order(fusion_world):
    searcher, images, _, _ = fusion_world
    visual = searcher.search_image(fs.read_bytes(images[3]), k=4).hits
    fused = searcher.search_image(fs.read_bytes(images[3]), k=4, text="zzzz qqqq").hits
    assert [h.product_id for h in fused] == [h.product_id for h in visual]


def test_text_only_search_ranks_matching_products(fusion_world):
    searcher, _, _, _ = fusion_world
    hits = searcher.search_text("organic oat", k=10).hits
    assert [h.product_id for h in hits[:2]] == ["OAT-ORGANIC", "OAT-FAMILY"] or \
        [h.product_id for h in hits[:2]] == ["OAT-FAMILY", "OAT-ORGANIC"]
    assert {h.product_id for h in hits} == {"OAT-ORGANIC", "OAT-FAMILY"}  # only matches
    assert [h.product_id for h in searcher.search_text("vegetable", k=10).hits] != []
    assert {h.product_id for h in searcher.search_text("vegetable", k=10).hits} == \
        {"LEEK", "TOMATO"}
    assert searcher.search_text("juicy", k=10, filters={"category": "fruit"}).hits == []
    assert searcher.search_text("nothing-matches-this", k=5).hits == []


def test_similar_products_fuse_title_similarity(fusion_world):
    searcher, _, _, _ = fusion_world
    visual = searcher.similar_to(product_id="OAT-FAMILY", k=5, text_weight=0.0).hits
    fused = searcher.similar_to(product_id="OAT-FAMILY", k=5, text_weight=0.5).hits
    assert "OAT-FAMILY" not in {h.product_id for h in visual + fused}
    order = [h.product_id for h in fused]
    assert order.index("OAT-ORGANIC") < order.index("COW-CLASSIC")
    assert fused[0].product_id == "OAT-ORGANIC"
    assert len(visual) == len(fused) == 5


@pytest.mark.parametrize("text", ["", "   ", "x" * 51])
def test_bad_text_is_a_query_error(fusion_world, text):
    searcher, images, _, _ = fusion_world
    with pytest.raises(QueryError) as e:
        searcher.search_text(text)
    assert e.value.reason == "bad_text"
    with pytest.raises(QueryError):
        searcher.search_image(fs.read_bytes(images[0]), text=text)
    with pytest.raises(QueryError) as e:
        searcher.search_image(fs.read_bytes(images[0]), text="organic", text_weight=1.5)
    assert e.value.reason == "bad_text_weight"


def test_http_text_and_photo_plus_text(fusion_world):
    searcher, images, config, index_root = fusion_world
    app = create_app(index_root, config, watch=False)
    photo = fs.read_bytes(images[0])
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        r = client.post("/v1/search", files={"image": ("q.jpg", photo, "image/jpeg")},
                        data={"text": "organic", "k": "2"})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["product_id"] == "OAT-ORGANIC"
        assert "text_score" in r.json()["results"][0]
        r = client.post("/v1/search", files={"image": ("q.jpg", photo, "image/jpeg")},
                        data={"text": "whole milk", "k": "1"})
        assert r.json()["results"][0]["product_id"] == "COW-CLASSIC"
        r = client.post("/v1/search", json={"text": "vegetable"})
        assert r.status_code == 200
        assert {h["product_id"] for h in r.json()["results"]} == {"LEEK", "TOMATO"}
        r = client.post("/v1/search", data={"text": "organic oat"},
                        files={"unused": ("x.txt", b"", "text/plain")})
        assert r.status_code == 200, r.text
        assert {h["product_id"] for h in r.json()["results"]} == {"OAT-ORGANIC", "OAT-FAMILY"}
        r = client.get("/v1/products/OAT-FAMILY/similar", params={"text_weight": "0.5", "k": 1})
        assert r.json()["results"][0]["product_id"] == "OAT-ORGANIC"
        bad = [
            client.post("/v1/search", json={"text": ""}),
            client.post("/v1/search", json={"text": "y" * 5000}),
            client.post("/v1/search", json={"text": 3}),
            client.post("/v1/search", json={"text": "organic", "text_weight": "heavy"}),
            client.post("/v1/search", json={"text": "organic", "vector": [0.1] * 48,
                                            "text_weight": 7}),
            client.post("/v1/search", files={"image": ("q.jpg", photo, "image/jpeg")},
                        data={"text": ""}),
            client.post("/v1/search", files={"image": ("q.jpg", photo, "image/jpeg")},
                        data={"text": "organic", "text_weight": "nan"}),
            client.get("/v1/products/OAT-FAMILY/similar", params={"text_weight": "-1"}),
        ]
        for resp in bad:
            assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
            assert resp.json()["error"]["reason"] in ("bad_text", "bad_text_weight")
    assert os.path.isdir(index_root)


def test_cli_query_text_only_photo_plus_text_and_bad_args(fusion_world, tmp_path, capsys):
    import json as _json

    import yaml

    from catalog_search.cli import main
    _, images, config, index_root = fusion_world
    cfg = tmp_path / "c.yaml"
    # The operator configures the model the index was built with (serving trusts only that).
    cfg.write_text(yaml.safe_dump({"model": {"handle": config.model.handle,
                                             "cache_dir": config.model.cache_dir},
                                   "fusion": {"max_text_chars": 50}}))
    base = ["--config", str(cfg), "query", "--index-root", index_root, "--json"]
    assert main(base + ["--text", "vegetable"]) == 0
    lines = [_json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert {h["product_id"] for h in lines[0]["results"]} == {"LEEK", "TOMATO"}
    assert main(base + [images[0], "--text", "whole milk", "-k", "1"]) == 0
    lines = [_json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert lines[0]["results"][0]["product_id"] == "COW-CLASSIC"
    for bad in ([], ["--text", "  "], ["--text", "z" * 51],
                [images[0], "--text", "milk", "--text-weight", "2"]):
        assert main(base + bad) == 2, bad
        assert "text" in capsys.readouterr().err
