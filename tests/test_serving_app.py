"""The HTTP service over real HTTP on loopback (uvicorn + httpx): every endpoint, every
error path (never a 500 for bad input), metrics, and hot reload under concurrent requests."""
from __future__ import annotations

import json
import os
import threading

import httpx
import pytest

from pipelines.core import filesystem as fs
from serving.app import PAGE_CSP, create_app
from serving.searcher import CatalogSearcher
from serving_fixtures import (LiveServer, build_index, copy_index,
                              serving_world, snapshot_subset)


@pytest.fixture(scope="module")
def world():
    return serving_world()


@pytest.fixture(scope="module")
def server(world):
    app = create_app(world.index_root, world.config, watch=False)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _upload(client, data: bytes, **fields):
    return client.post("/v1/search", files={"image": ("q.jpg", data, "image/jpeg")},
                       data={k: str(v) for k, v in fields.items()})


def _reason(response) -> str:
    return response.json()["error"]["reason"]


def test_health_ready_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True and ready.json()["version"] == "v0001"
    spec = client.get("/openapi.json").json()
    for page in ("/docs", "/redoc"):  # no CDN-loaded Swagger UI / ReDoc (issue 23 item 7)
        answer = client.get(page)
        assert answer.status_code == 404 and _reason(answer) == "no_docs_page"
        assert answer.headers["content-security-policy"] == PAGE_CSP
        assert page not in spec["paths"]
    for path in ("/v1/search", "/v1/products/{product_id}/similar", "/v1/images/{image_id}",
                 "/v1/reload", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"]
    content = spec["paths"]["/v1/search"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    # Generated from the pydantic models (serving.api.schemas): text with or instead of the
    # photo / vector, so neither image nor vector is required.
    form = content["multipart/form-data"]["schema"]
    body = content["application/json"]["schema"]
    for schema in (form, body):
        assert {"text", "text_weight", "k", "filters", "collapse"} <= set(schema["properties"])
        assert not schema.get("required")
    assert "binary" in json.dumps(form["properties"]["image"])
    assert "vector" in body["properties"] and body["additionalProperties"] is False
    search = spec["paths"]["/v1/search"]["post"]["responses"]
    assert search["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/SearchResponse")
    assert search["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse")
    assert "HTTPValidationError" not in json.dumps(spec["paths"])  # errors keep our shape
    assert {"SearchResponse", "HitOut", "ReloadResponse", "ReadyResponse",
            "ErrorResponse"} <= set(spec["components"]["schemas"])


def test_search_by_image_upload(client, world):
    row = world.catalog_rows()[5]
    r = _upload(client, fs.read_bytes(row["image_uri"]), k=4,
                filters=json.dumps({"category": row["category"]}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == "v0001" and len(body["results"]) <= 4
    top = body["results"][0]
    assert top["product_id"] == row["product_id"] and top["image_id"] == row["image_id"]
    assert top["score"] == pytest.approx(1.0, abs=1e-4)
    assert top["metadata"]["title"] == row["title"]
    assert top["image_url"] == f"/v1/images/{row['image_id']}" and "image_uri" not in top
    assert all(h["metadata"]["category"] == row["category"] for h in body["results"])


def test_search_by_vector_and_similar(client, world):
    searcher = CatalogSearcher.open(world.index_root, config=world.config, load_embedder=False)
    vector = searcher.current.vectors_of([3])[0]
    r = client.post("/v1/search", json={"vector": vector.tolist(), "k": 3, "collapse": False})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["image_id"] == searcher.current.hit(3, 0).image_id
    r = client.get("/v1/products/P0002/similar", params={"k": 4})
    assert r.status_code == 200
    ids = [h["product_id"] for h in r.json()["results"]]
    assert len(ids) == 4 and "P0002" not in ids
    r = client.get("/v1/images/P0002-0/similar", params={"k": 3, "collapse": "false"})
    assert r.status_code == 200
    ids = [h["image_id"] for h in r.json()["results"]]
    assert len(ids) == 3 and "P0002-0" not in ids
    assert client.get("/v1/images/NOPE/similar").status_code == 404
    r = client.get("/v1/products/P0002/similar",
                   params={"filters": json.dumps({"category": "dairy"})})
    assert r.status_code == 200
    assert {h["metadata"]["category"] for h in r.json()["results"]} == {"dairy"}


def test_catalog_images_are_served_only_for_indexed_ids(client, world):
    row = world.catalog_rows()[0]
    r = client.get(f"/v1/images/{row['image_id']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == fs.read_bytes(row["image_uri"])
    assert client.get("/v1/images/unknown").status_code == 404
    assert client.get("/v1/images/..%2F..%2Fetc%2Fpasswd").status_code == 404


@pytest.mark.parametrize("case", [
    "oversized_upload", "oversized_declared", "undecodable", "truncated", "empty_file",
    "k_zero", "k_text", "k_huge", "filters_not_json", "filters_unknown_key", "filters_nested",
    "missing_image", "vector_wrong_dim", "vector_strings", "vector_nan", "vector_missing",
    "json_broken", "json_unknown_field", "unsupported_type", "unknown_product",
    "similar_bad_k", "similar_bad_filters", "collapse_bad"])
def test_bad_input_never_500(client, world, case):
    good = fs.read_bytes(world.catalog_rows()[0]["image_uri"])
    limit = world.config.serving.max_upload_bytes
    expected = {"oversized_upload": (413, "too_large"), "oversized_declared": (413, "too_large"),
                "undecodable": (422, "not_an_image"), "truncated": (422, None),
                "empty_file": (422, "empty"), "k_zero": (422, "bad_k"),
                "k_text": (422, "bad_k"), "k_huge": (422, "bad_k"),
                "filters_not_json": (422, "bad_filter"),
                "filters_unknown_key": (422, "bad_filter"),
                "filters_nested": (422, "bad_filter"), "missing_image": (422, "missing_image"),
                "vector_wrong_dim": (422, "bad_vector"), "vector_strings": (422, "bad_vector"),
                "vector_nan": (422, None), "vector_missing": (422, "bad_vector"),
                "json_broken": (422, "bad_json"), "json_unknown_field": (422, "bad_request"),
                "unsupported_type": (415, "unsupported_media_type"),
                "unknown_product": (404, "unknown_product"),
                "similar_bad_k": (422, "bad_k"), "similar_bad_filters": (422, "bad_filter"),
                "collapse_bad": (422, "bad_collapse")}[case]
    if case == "oversized_upload":
        r = _upload(client, good + b"\0" * (limit + 10))
    elif case == "oversized_declared":
        r = client.post("/v1/search", content=b"x" * (limit + 100_000),
                        headers={"content-type": "multipart/form-data; boundary=abc"})
    elif case == "undecodable":
        r = _upload(client, b"GIF89a but not really an image")
    elif case == "truncated":
        r = _upload(client, good[: len(good) // 3])
    elif case == "empty_file":
        r = _upload(client, b"")
    elif case in ("k_zero", "k_text", "k_huge"):
        r = _upload(client, good, k={"k_zero": 0, "k_text": "ten", "k_huge": 10_000}[case])
    elif case == "filters_not_json":
        r = _upload(client, good, filters="{category: dairy")
    elif case == "filters_unknown_key":
        r = _upload(client, good, filters=json.dumps({"colour": "red"}))
    elif case == "filters_nested":
        r = _upload(client, good, filters=json.dumps({"category": [{"a": 1}]}))
    elif case == "missing_image":
        r = client.post("/v1/search", data={"k": "3"}, files={"other": ("x", b"1")})
    elif case == "vector_wrong_dim":
        r = client.post("/v1/search", json={"vector": [0.1, 0.2]})
    elif case == "vector_strings":
        r = client.post("/v1/search", json={"vector": ["a"] * 48})
    elif case == "vector_nan":
        r = client.post("/v1/search", content=b'{"vector": [NaN' + b", 1" * 47 + b"]}",
                        headers={"content-type": "application/json"})
    elif case == "vector_missing":
        r = client.post("/v1/search", json={"k": 3})
    elif case == "json_broken":
        r = client.post("/v1/search", content=b'{"vector": [1,',
                        headers={"content-type": "application/json"})
    elif case == "json_unknown_field":
        r = client.post("/v1/search", json={"vector": [1.0] * 48, "kk": 3})
    elif case == "unsupported_type":
        r = client.post("/v1/search", content=b"hello", headers={"content-type": "text/plain"})
    elif case == "unknown_product":
        r = client.get("/v1/products/NOPE/similar")
    elif case == "similar_bad_k":
        r = client.get("/v1/products/P0001/similar", params={"k": "many"})
    elif case == "similar_bad_filters":
        r = client.get("/v1/products/P0001/similar", params={"filters": "[1, 2]"})
    else:
        r = _upload(client, good, collapse="maybe")
    status, reason = expected
    assert r.status_code == status, (case, r.status_code, r.text)
    body = r.json()
    assert body["error"]["message"]
    if reason is not None:
        assert body["error"]["reason"] == reason, body
    if case == "truncated":
        assert body["error"]["reason"] in ("truncated", "corrupt")


def test_metrics_count_requests_errors_and_latency(client):
    client.get("/healthz")
    _upload(client, b"not an image")
    text = client.get("/metrics").text
    # prometheus_client writes labels in name order and values as floats
    assert 'catalog_search_requests_total{method="GET",route="/healthz",status="200"}' in text
    assert 'catalog_search_requests_total{method="POST",route="/v1/search",status="422"}' in text
    assert 'catalog_search_errors_total{reason="not_an_image",route="/v1/search"}' in text
    assert 'catalog_search_request_seconds_bucket{le="+Inf",route="/v1/search"}' in text
    assert 'catalog_search_index_info{version="v0001"} 1' in text
    assert "catalog_search_index_vectors 36" in text
    count = [line for line in text.splitlines()
             if line.startswith('catalog_search_request_seconds_count{route="/v1/search"}')]
    assert count and float(count[0].split()[-1]) >= 1


def test_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "Catalog visual search" in r.text
    assert client.get("/static/app.js").status_code == 200


def test_not_ready_without_an_index(tmp_path, world):
    app = create_app(str(tmp_path / "no-index"), world.config, watch=False)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False
        r = c.post("/v1/search", json={"vector": [1.0] * 48})
        assert r.status_code == 503 and _reason(r) == "not_ready"
        assert c.get("/v1/images/P0000-0").status_code == 503
        assert "catalog_search_index_ready 0" in c.get("/metrics").text
        assert c.post("/v1/reload").status_code == 409


@pytest.mark.heavy
def test_reload_endpoint_and_hot_swap_under_load(tmp_path, world):
    root = copy_index(world, str(tmp_path / "index"))
    app = create_app(root, world.config, watch=False)
    image = fs.read_bytes(world.catalog_rows()[7]["image_uri"])
    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()
    with LiveServer(app) as live:
        def load() -> None:
            with httpx.Client(base_url=live.url, timeout=60) as c:
                while not stop.is_set():
                    r = _upload(c, image, k=3)
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        versions.add(r.json()["version"])

        with httpx.Client(base_url=live.url, timeout=120) as c:
            assert c.post("/v1/reload").json()["status"] == "unchanged"
            threads = [threading.Thread(target=load) for _ in range(3)]
            for t in threads:
                t.start()
            try:
                build_index(snapshot_subset(world, str(tmp_path / "s2"), {"P0009"}), root,
                            world.config, version="v0002")
                r = c.post("/v1/reload")
                assert r.status_code == 200 and r.json()["status"] == "loaded"
                assert r.json()["serving_version"] == "v0002"
                # A broken newer version: refused (409), v0002 keeps serving.
                build_index(world.snapshot, root, world.config, version="v0003")
                rows = os.path.join(root, "versions", "v0003", "manifest.json")
                manifest = fs.read_json(rows)
                manifest["shards"][0]["files"][0]["sha256"] = "0" * 64
                fs.write_json(rows, manifest)
                r = c.post("/v1/reload")
                assert r.status_code == 409 and r.json()["status"] == "refused"
                assert "checksum" in r.json()["reason"]
            finally:
                stop.set()
                for t in threads:
                    t.join()
            assert c.get("/readyz").json()["version"] == "v0002"
            assert 'catalog_search_reloads_total{outcome="refused"} 1' in c.get("/metrics").text
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert "v0002" in versions
