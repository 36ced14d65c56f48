"""Crowding (group_by + max_per_group, serving.crowding) on a real published index: every
query kind (photo, vector, text, photo + text, similar product / image) returns the top-k
of its own ranking that respects the cap; the arguments are validated in the library, the
HTTP API (4xx naming the known fields) and the CLI (exit 2)."""
from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest

from catalog_search.cli import main
from pipelines.core import filesystem as fs
from serving.app import create_app
from serving.crowding import group_value
from serving.errors import QueryError
from serving.searcher import CatalogSearcher
from serving_fixtures import LiveServer, serving_world

ALL = 36  # every image of the test catalog (12 products x 3 images)


@pytest.fixture(scope="module")
def world():
    return serving_world()


@pytest.fixture(scope="module")
def searcher(world):
    return CatalogSearcher.open(world.index_root, config=world.config)


def _capped(hits, field: str, cap: int, k: int) -> list[tuple[str, str]]:
    """The reference: walk the uncrowded ranking, keep a hit while its group has room."""
    counts: Counter = Counter()
    out = []
    for h in hits:
        value = group_value(h, field)
        if value is not None and counts[value] >= cap:
            continue
        counts[value] += 1
        out.append((h.product_id, h.image_id))
        if len(out) == k:
            break
    return out


def _ids(results) -> list[tuple[str, str]]:
    return [(h.product_id, h.image_id) for h in results.hits]


def _queries(world, searcher):
    """Each query kind as fn(k, collapse, **crowding) -> SearchResults."""
    row = world.catalog_rows()[4]
    photo = fs.read_bytes(row["image_uri"])
    vector = searcher.current.vectors_of([7])[0] * 3.0  # not normalised: the server does it
    return {
        "photo": lambda k, c, **kw: searcher.search_image(photo, k=k, collapse=c, **kw),
        "vector": lambda k, c, **kw: searcher.search_vector(vector, k=k, collapse=c, **kw),
        "text": lambda k, c, **kw: searcher.search_text("organic juice crackers apples yogurt", k=k,
                                                         collapse=c, **kw),
        "photo+text": lambda k, c, **kw: searcher.search_image(photo, k=k, collapse=c,
                                                               text="juice", **kw),
        "similar product": lambda k, c, **kw: searcher.similar_to(product_id="P0003", k=k,
                                                                  collapse=c, **kw),
        "similar image": lambda k, c, **kw: searcher.similar_to(image_id="P0008-1", k=k,
                                                                collapse=c, **kw),
    }


@pytest.mark.parametrize("kind", ["photo", "vector", "text", "photo+text", "similar product",
                                  "similar image"])
def test_every_query_kind_returns_the_capped_top_k(world, searcher, kind):
    run = _queries(world, searcher)[kind]
    # products, at most 1 and 2 per category
    full = run(ALL, True).hits
    assert len({h.metadata["category"] for h in full}) >= 3
    for cap, k in ((1, 4), (2, 6)):
        got = run(k, True, group_by="category", max_per_group=cap)
        assert _ids(got) == _capped(full, "category", cap, k), (kind, cap)
        per_group = Counter(h.metadata["category"] for h in got.hits)
        assert max(per_group.values()) <= cap
        assert len({h.product_id for h in got.hits}) == len(got.hits)  # still collapsed
        assert got.crowding == {"group_by": "category", "max_per_group": cap}
    # a cap larger than any group changes nothing
    assert _ids(run(5, True, group_by="category", max_per_group=50)) == _ids(run(5, True))
    # group_by product_id: up to N images per product, from the uncollapsed ranking
    images = run(ALL, False).hits
    got = run(8, True, group_by="product_id", max_per_group=2)
    assert _ids(got) == _capped(images, "product_id", 2, 8)
    assert got.collapsed is False
    assert max(Counter(h.product_id for h in got.hits).values()) <= 2
    # max_per_group alone groups by product
    assert _ids(run(8, True, max_per_group=2)) == _ids(got)
    # group_by alone caps at one per group
    assert _ids(run(4, True, group_by="category")) == _ids(
        run(4, True, group_by="category", max_per_group=1))


def test_tight_cap_returns_fewer_than_k_when_the_index_has_no_more_groups(searcher):
    """Five categories, at most one each: k=10 gives the best product of every category."""
    vector = searcher.current.vectors_of([0])[0]
    got = searcher.search_vector(vector, k=10, group_by="category", max_per_group=1)
    assert sorted(h.metadata["category"] for h in got.hits) == sorted(
        ["beverages", "snacks", "produce", "household", "dairy"])


@pytest.mark.parametrize("group_by, cap, reason", [
    ("brand", 2, "bad_group_by"), ("", 2, "bad_group_by"), (3, 2, "bad_group_by"),
    ("category", 0, "bad_max_per_group"), ("category", -1, "bad_max_per_group"),
    ("category", 10_000, "bad_max_per_group"), ("category", True, "bad_max_per_group"),
    ("category", "2", "bad_max_per_group"), (None, 1.5, "bad_max_per_group")])
def test_bad_crowding_arguments_are_refused(searcher, group_by, cap, reason):
    vector = searcher.current.vectors_of([0])[0]
    for call in (lambda: searcher.search_vector(vector, group_by=group_by, max_per_group=cap),
                 lambda: searcher.search_text("juice", group_by=group_by, max_per_group=cap),
                 lambda: searcher.similar_to(product_id="P0001", group_by=group_by,
                                             max_per_group=cap)):
        with pytest.raises(QueryError) as e:
            call()
        assert e.value.reason == reason
        if reason == "bad_group_by":
            assert "known: category, image_id, product_id, title" in str(e.value)


@pytest.fixture(scope="module")
def client(world):
    app = create_app(world.index_root, world.config, watch=False)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def test_api_crowding_for_every_query_kind(world, searcher, client):
    row = world.catalog_rows()[4]
    photo = fs.read_bytes(row["image_uri"])
    vector = [float(x) for x in searcher.current.vectors_of([7])[0]]
    crowd = {"group_by": "category", "max_per_group": 1}
    answers = {
        "photo": client.post("/v1/search", files={"image": ("q.jpg", photo, "image/jpeg")},
                             data={"k": "4", **{k: str(v) for k, v in crowd.items()}}),
        "vector": client.post("/v1/search", json={"vector": vector, "k": 4, **crowd}),
        "text": client.post("/v1/search", json={"text": "organic juice crackers apples", "k": 4,
                                                **crowd}),
        "text form": client.post("/v1/search", files={  # multipart without a file
            "text": (None, "organic juice crackers apples"), "k": (None, "4"),
            "group_by": (None, "category")}),
        "similar product": client.get("/v1/products/P0003/similar",
                                      params={"k": 4, **crowd}),
        "similar image": client.get("/v1/images/P0008-1/similar", params={"k": 4, **crowd}),
    }
    for kind, r in answers.items():
        assert r.status_code == 200, (kind, r.text)
        body = r.json()
        cats = [h["metadata"]["category"] for h in body["results"]]
        assert cats and len(cats) == len(set(cats)), (kind, cats)
        assert body["group_by"] == "category" and body["max_per_group"] == 1
    library = searcher.search_vector(vector, k=4, group_by="category", max_per_group=1)
    assert [h["image_id"] for h in answers["vector"].json()["results"]] == \
        [h.image_id for h in library.hits]
    per_product = client.post("/v1/search", json={"vector": vector, "k": 6,
                                                  "max_per_group": 2}).json()
    assert per_product["collapsed"] is False and per_product["group_by"] == "product_id"
    assert max(Counter(h["product_id"] for h in per_product["results"]).values()) == 2
    plain = client.post("/v1/search", json={"vector": vector, "k": 4}).json()
    assert "group_by" not in plain and "max_per_group" not in plain
    assert "fields" in client.get("/readyz").json()


def test_api_refuses_bad_crowding_with_a_4xx(world, client):
    vector = [0.1] * 8
    photo = fs.read_bytes(world.catalog_rows()[0]["image_uri"])
    bad = [
        client.post("/v1/search", json={"vector": vector, "group_by": "seller"}),
        client.post("/v1/search", json={"text": "juice", "group_by": "seller"}),
        client.post("/v1/search", files={"image": ("q.jpg", photo, "image/jpeg")},
                    data={"group_by": "seller"}),
        client.get("/v1/products/P0001/similar", params={"group_by": "seller"}),
        client.get("/v1/images/P0001-0/similar", params={"group_by": "seller"}),
    ]
    for r in bad:
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["reason"] == "bad_group_by"
        assert "'seller'" in error["message"] and "category" in error["message"]
    for value in (0, -2, 10_000, "two", 1.5, True, [1]):
        r = client.post("/v1/search", json={"text": "juice", "max_per_group": value})
        assert r.status_code == 422 and r.json()["error"]["reason"] == "bad_max_per_group", \
            (value, r.text)
    for value in ("0", "x", "1.5"):
        r = client.get("/v1/products/P0001/similar", params={"max_per_group": value})
        assert r.status_code == 422 and r.json()["error"]["reason"] == "bad_max_per_group"
        r = client.post("/v1/search", files={"image": ("q.jpg", photo, "image/jpeg")},
                        data={"max_per_group": value})
        assert r.status_code == 422 and r.json()["error"]["reason"] == "bad_max_per_group"
    r = client.post("/v1/search", json={"text": "juice", "group_by": ["category"]})
    assert r.status_code == 422 and r.json()["error"]["reason"] == "bad_group_by"


def test_cli_crowding(world, capsys):
    trust = ["--allow-model", world.config.model.handle]
    row = world.catalog_rows()[4]
    code = main(["query", "--index-root", world.index_root, *trust, "--json", "-k", "4",
                 "--group-by", "category", "--max-per-group", "1", row["image_uri"]])
    out = capsys.readouterr().out
    assert code == 0, out
    body = json.loads(out.splitlines()[0])
    cats = [h["metadata"]["category"] for h in body["results"]]
    assert len(cats) == 4 and len(set(cats)) == 4
    assert body["group_by"] == "category" and body["max_per_group"] == 1
    code = main(["query", "--index-root", world.index_root, *trust, "--json", "-k", "6",
                 "--max-per-group", "3", "--text", "juice"])
    out = capsys.readouterr().out
    assert code == 0, out
    body = json.loads(out.splitlines()[0])
    assert body["collapsed"] is False
    assert max(Counter(h["product_id"] for h in body["results"]).values()) <= 3
    assert main(["query", "--index-root", world.index_root, *trust, "--max-per-group", "0",
                 row["image_uri"]]) == 2
    assert main(["query", "--index-root", world.index_root, *trust, "--group-by", "seller",
                 row["image_uri"]]) == 2
    assert "known: category" in capsys.readouterr().err
