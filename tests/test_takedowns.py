"""Takedowns over real HTTP and real builds: POST /v1/admin/delete (token required, the
answer after the delete is durable and applied), and the takedown list keeping ids out of
versions built later from snapshots that still hold them, until the catalog drops them."""
from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import numpy as np
import pytest

from pipelines.embed import snapshot
from pipelines.index import artifact as art
from pipelines.index import deltas as dl
from pipelines.index import takedowns as td
from pipelines.index.delete import delete_ids, restore_ids
from serving.app import create_app
from serving.searcher import CatalogSearcher
from serving_fixtures import (NUM_PRODUCTS, LiveServer, build_index, copy_index, serving_world,
                              snapshot_subset)

TOKEN = "t" * 32


@pytest.fixture(scope="module")
def world():
    return serving_world()


def _vectors(world):
    snap = snapshot.load(world.snapshot)
    return snap.table.to_pylist(), snap.vectors()


def test_admin_delete_needs_the_token_and_applies_before_answering(world, tmp_path):
    root = copy_index(world, str(tmp_path / "index"))
    rows, vectors = _vectors(world)
    product = rows[0]["product_id"]
    app = create_app(root, world.config, watch=False, admin_token=TOKEN)
    auth = {"authorization": f"Bearer {TOKEN}"}
    body = {"product_ids": [product], "reason": "legal"}
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        def products():
            r = c.post("/v1/search", json={"vector": vectors[0].tolist(), "k": NUM_PRODUCTS})
            assert r.status_code == 200
            return {h["product_id"] for h in r.json()["results"]}

        assert product in products()
        r = c.post("/v1/admin/delete", json=body)
        assert r.status_code == 401 and r.json()["error"]["reason"] == "unauthorized"
        r = c.post("/v1/admin/delete", json=body, headers={"authorization": "Bearer nope"})
        assert r.status_code == 403 and r.json()["error"]["reason"] == "forbidden"
        assert dl.committed_seqs(root, "v0001") == [] and not td.read_takedowns(root)
        for bad in ({"product_ids": "P"}, {"other": 1}, [1], {"product_ids": [""]}, {}):
            r = c.post("/v1/admin/delete", json=bad, headers=auth)
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["error"]["reason"] in ("bad_delete", "bad_json")
        t0 = time.perf_counter()
        r = c.post("/v1/admin/delete", json={**body, "image_ids": ["no-such"]}, headers=auth)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["removed"]["product_ids"] == [product]
        assert out["not_found"]["image_ids"] == ["no-such"]
        assert out["applied"]["status"] == "deltas_applied" and out["delta"] == 1
        assert product not in products()  # right after the call returns
        elapsed = time.perf_counter() - t0
        assert c.get(f"/v1/products/{product}/similar").status_code == 404
        ready = c.get("/readyz").json()
        assert ready["deltas"]["rows_removed"] == 3
        assert ready["num_vectors"] == NUM_PRODUCTS * 3 - 3
        metrics = c.get("/metrics").text
        assert "catalog_search_index_vectors 33.0" in metrics
        r = c.post("/v1/admin/delete", json=body, headers=auth)
        assert r.json()["already_taken_down"]["product_ids"] == [product]
    assert elapsed < 5
    # durable: the delta and the list are on disk; a restart keeps the product out
    assert dl.committed_seqs(root, "v0001") == [1, 2]
    assert td.read_takedowns(root).product_ids[product]["reason"] == "legal"
    again = CatalogSearcher.open(root, config=world.config)
    assert product not in {h.product_id for h in
                           again.search_vector(vectors[0], k=NUM_PRODUCTS).hits}


def test_takedowns_persist_across_builds_until_the_catalog_drops_them(world, tmp_path):
    root = copy_index(world, str(tmp_path / "index"))
    rows, vectors = _vectors(world)
    product = rows[0]["product_id"]
    delete_ids(root, product_ids=[product])
    s = CatalogSearcher.open(root, config=world.config)
    # A build from a snapshot that still holds the product leaves it out.
    m2 = build_index(world.snapshot, root, world.config, version="v0002")
    assert m2.num_vectors == NUM_PRODUCTS * 3 - 3
    assert m2.build["takedowns"]["rows_removed"] == 3
    assert s.reload().status == "loaded" and s.version == "v0002"
    assert product not in {h.product_id for h in s.search_vector(vectors[0], k=50).hits}
    assert product in td.read_takedowns(root).product_ids  # still listed
    # A version built without the list (a build that started before the takedown) is
    # still served without the product: serving applies the list to every version.
    listing = td.takedowns_uri(root)
    shutil.move(listing, listing + ".aside")
    build_index(world.snapshot, root, world.config, version="v0003")
    shutil.move(listing + ".aside", listing)
    assert art.read_manifest(root, "v0003").num_vectors == NUM_PRODUCTS * 3
    assert s.reload().status == "loaded" and s.version == "v0003"
    assert product not in {h.product_id for h in s.search_vector(vectors[0], k=50).hits}
    assert s.current.delta_info()["takedown_product_ids"] == 1
    # The catalog drops the product: the next build clears the takedown.
    build_index(snapshot_subset(world, str(tmp_path / "s4"), {product}), root, world.config,
                version="v0004")
    assert product not in td.read_takedowns(root).product_ids
    assert "takedowns" not in art.read_manifest(root, "v0004").build or \
        art.read_manifest(root, "v0004").build["takedowns"]["rows_removed"] == 0


def test_restore_lifts_a_takedown(world, tmp_path):
    root = copy_index(world, str(tmp_path / "index"))
    rows, _ = _vectors(world)
    image = rows[4]["image_id"]
    delete_ids(root, image_ids=[image])
    out = restore_ids(root, image_ids=[image, "x"])
    assert out == {"lifted": {"image_ids": [image], "product_ids": []},
                   "not_listed": {"image_ids": ["x"], "product_ids": []}}
    m2 = build_index(world.snapshot, root, world.config, version="v0002")
    assert m2.num_vectors == NUM_PRODUCTS * 3  # back with the next build


def test_a_damaged_takedown_list_fails_builds_and_writers(world, tmp_path):
    root = copy_index(world, str(tmp_path / "index"))
    delete_ids(root, product_ids=["P0001"])
    path = td.takedowns_uri(root)
    d = json.load(open(path))
    d["product_ids"]["P0002"] = {"at": "x", "reason": "edited by hand"}
    json.dump(d, open(path, "w"))
    with pytest.raises(td.TakedownError, match="checksum"):
        td.read_takedowns(root)
    from pipelines.index.build import IndexBuildError
    with pytest.raises(IndexBuildError, match="takedowns.json"):
        build_index(world.snapshot, root, world.config, version="v0002")
    with pytest.raises(td.TakedownError):
        delete_ids(root, product_ids=["P0003"])
    assert not os.path.exists(os.path.join(root, "versions", "v0002"))
    s = CatalogSearcher.open(root, config=world.config)  # serving still starts
    assert s.version == "v0001" and np.isfinite(s.current.num_vectors)
