"""Hostile HTTP input against the real service on a loopback socket (uvicorn + httpx).

Issue 9, serving side. Every answer must be < 500; the only 5xx allowed is the
deliberate 503 `busy` of the decode slots (with Retry-After). Covered: hostile JSON
bodies (nesting, huge numbers, NaN/inf), nested filters, multipart framing and content
types (text, HTML, SVG, HTML-in-GIF, PDF/EPS), decompression bombs and their memory,
path traversal in ids, the stored-XSS catalog file, percent-encoded image URLs, http(s)
catalog images, security headers, the admin token (and the Airflow hand-off sending
it), a manifest naming an untrusted model, and refused versions retried after repair.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pyarrow as pa
import pytest

from hostile_http import SVG, hostile_cases, html_gif, png_bomb
from pipelines.core import filesystem as fs
from pipelines.index import artifact as art
from pipelines.embed import snapshot
from serving.app import create_app
from serving_fixtures import LiveServer, build_index, copy_index, serving_world

TOKEN = "t0ken-for-tests-0123456789abcdef"
WEIRD_ID = "sku/1?x=1#frag <b>&amp;"
HTTP_URI = "https://images.example.com/catalog/p1.jpg?size=large"


@pytest.fixture(scope="module")
def hostile_http_world():
    return serving_world()


@pytest.fixture(scope="module")
def hostile_http_index(hostile_http_world, tmp_path_factory):
    """An index whose rows name hostile catalog files: the XSS GIF named .html, a text file
    named .jpg, an SVG, an http(s) URL, and an id full of URL-special characters."""
    world = hostile_http_world
    root = tmp_path_factory.mktemp("hostile-index")
    files = root / "files"
    files.mkdir()
    (files / "xss.html").write_bytes(html_gif())
    (files / "script.jpg").write_bytes(b"<html><script>alert(1)</script></html>")
    (files / "vector.svg").write_bytes(SVG)
    rows = world.catalog_rows()
    snap = snapshot.load(world.snapshot)
    table = snap.table
    ids = table.column("image_id").to_pylist()
    uris = table.column("image_uri").to_pylist()
    where = {img: i for i, img in enumerate(ids)}
    changes = {rows[0]["image_id"]: ("xss", str(files / "xss.html")),
               rows[1]["image_id"]: ("script", str(files / "script.jpg")),
               rows[2]["image_id"]: ("svg", str(files / "vector.svg")),
               rows[3]["image_id"]: ("remote", HTTP_URI),
               rows[4]["image_id"]: (WEIRD_ID, rows[4]["image_uri"])}
    for old, (new_id, new_uri) in changes.items():
        ids[where[old]], uris[where[old]] = new_id, new_uri
    table = table.set_column(table.schema.get_field_index("image_id"), "image_id",
                             pa.array(ids, pa.string()))
    table = table.set_column(table.schema.get_field_index("image_uri"), "image_uri",
                             pa.array(uris, pa.string()))
    snap_dir = str(root / "snapshot")
    snapshot.write_table(snap_dir, table)
    snapshot.write_summary(snap_dir, dataclasses.replace(snap.summary, run_id="hostile",
                                                         snapshot=snap_dir))
    index_root = str(root / "index")
    build_index(snap_dir, index_root, world.config, version="h0001")
    return index_root


@pytest.fixture(scope="module")
def hostile_http_server(hostile_http_world, hostile_http_index):
    saved = os.environ.get("CATALOG_SEARCH_ADMIN_TOKEN")
    os.environ["CATALOG_SEARCH_ADMIN_TOKEN"] = TOKEN  # read by create_app (pipelines.core.admin_token)
    try:
        app = create_app(hostile_http_index, hostile_http_world.config, watch=False)
    finally:
        if saved is None:
            del os.environ["CATALOG_SEARCH_ADMIN_TOKEN"]
        else:
            os.environ["CATALOG_SEARCH_ADMIN_TOKEN"] = saved
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def hostile_http_client(hostile_http_server):
    with httpx.Client(base_url=hostile_http_server.url, timeout=120) as c:
        yield c


def _good_image(world) -> bytes:
    return fs.read_bytes(world.catalog_rows()[6]["image_uri"])


def _assert_4xx_with_reason(r: httpx.Response, kind: str) -> None:
    assert 400 <= r.status_code < 500, (kind, r.status_code, r.text[:300])
    if r.headers.get("content-type", "").startswith("application/json"):
        body = r.json()
        if "error" in body:
            assert body["error"]["reason"] and body["error"]["message"], body
    assert r.headers.get("x-content-type-options") == "nosniff", kind


# --------------------------------------------------------------------------- hostile corpus

def test_hostile_requests_never_5xx(hostile_http_client, hostile_http_world):
    """Defect 10: ~60 hostile kinds (deep JSON/filters, 10**400, NaN, bombs, traversal...)."""
    cases = hostile_cases(48, _good_image(hostile_http_world), "P0005-0")
    assert len(cases) >= 55
    answers = {}
    for kind, method, path, kwargs in cases:
        r = hostile_http_client.request(method, path, **kwargs)
        answers[kind] = (r.status_code, r.headers.get("x-error-reason"))
        if kind == "upload_html_in_gif":  # a real (1x1) GIF: a normal search
            assert r.status_code in (200, 422), (kind, r.text[:300])
            continue
        _assert_4xx_with_reason(r, kind)
        assert b"root:x:0:0" not in r.content, kind
    expected = {"json_deep_array_body": "too_deep", "json_deep_vector": "too_deep",
                "json_deep_filters": "too_deep", "json_nested_filter_values": "bad_filter",
                "multipart_deep_filters": "too_deep", "similar_deep_filters": "too_deep",
                "json_huge_int": "bad_vector", "json_huge_float": "bad_vector",
                "json_nan": "bad_vector", "json_float32_overflow": "bad_vector",
                "json_k_huge": "bad_k", "upload_png_bomb": "too_many_pixels",
                "upload_gif_header_bomb": "too_many_pixels", "upload_svg": "not_an_image",
                "upload_eps": "not_an_image", "upload_pdf": "not_an_image",
                "upload_oversized": "too_large", "json_too_large": "too_large"}
    for kind, reason in expected.items():
        assert answers[kind][1] == reason, (kind, answers[kind])


@pytest.mark.parametrize("kind", ["json_deep_array_body", "json_deep_filters",
                                  "multipart_deep_filters", "similar_deep_filters",
                                  "json_huge_int"])
def test_recursion_and_overflow_are_422(hostile_http_client, hostile_http_world, kind):
    """Defect 10 regression: these answered 500 (RecursionError / OverflowError) before."""
    case = next(c for c in hostile_cases(48, _good_image(hostile_http_world), "x")
                if c[0] == kind)
    r = hostile_http_client.request(case[1], case[2], **case[3])
    assert r.status_code == 422, r.text[:300]


# --------------------------------------------------------------------------- images and XSS

def test_xss_file_is_served_as_an_image_with_headers(hostile_http_client):
    r = hostile_http_client.get("/v1/images/xss")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/gif"  # from the bytes, not ".html"
    assert r.headers["x-content-type-options"] == "nosniff"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "sandbox" in csp


@pytest.mark.parametrize("image_id", ["script", "svg"])
def test_non_images_are_not_served(hostile_http_client, image_id):
    r = hostile_http_client.get(f"/v1/images/{image_id}")
    assert r.status_code == 404 and r.json()["error"]["reason"] == "unsupported_image_type"
    assert b"<script>" not in r.content


def test_image_urls_are_percent_encoded(hostile_http_client, hostile_http_index,
                                                 hostile_http_world):
    from serving.searcher import CatalogSearcher
    searcher = CatalogSearcher.open(hostile_http_index, config=hostile_http_world.config,
                                    load_embedder=False)
    idx = searcher.current
    row = idx.image_rows(WEIRD_ID)[0]
    vector = idx.vectors_of([row])[0].tolist()
    r = hostile_http_client.post("/v1/search", json={"vector": vector, "k": 1,
                                                     "collapse": False})
    assert r.status_code == 200
    hit = r.json()["results"][0]
    assert hit["image_id"] == WEIRD_ID
    assert hit["image_url"] == "/v1/images/sku%2F1%3Fx%3D1%23frag%20%3Cb%3E%26amp%3B"
    image = hostile_http_client.get(hit["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"


def test_http_catalog_images_are_left_to_the_client(hostile_http_client,
                                                              hostile_http_index,
                                                              hostile_http_world):
    from serving.searcher import CatalogSearcher
    idx = CatalogSearcher.open(hostile_http_index, config=hostile_http_world.config,
                               load_embedder=False).current
    vector = idx.vectors_of(idx.image_rows("remote"))[0].tolist()
    r = hostile_http_client.post("/v1/search", json={"vector": vector, "k": 1,
                                                     "collapse": False})
    assert r.json()["results"][0]["image_url"] == HTTP_URI
    r = hostile_http_client.get("/v1/images/remote")
    assert r.status_code == 404 and r.json()["error"]["reason"] == "remote_image"


def test_security_headers_on_every_answer(hostile_http_client):
    for path in ("/", "/static/app.js", "/static/style.css", "/healthz", "/readyz", "/metrics",
                 "/openapi.json", "/no/such/path", "/v1/images/unknown"):
        r = hostile_http_client.get(path)
        assert r.status_code < 500
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["content-security-policy"], path
    from serving.app import PAGE_CSP
    page = hostile_http_client.get("/")
    assert page.headers["content-security-policy"] == PAGE_CSP
    # The page keeps working under that CSP: no inline script, style or handlers.
    html = page.text
    assert "<script>" not in html and " style=" not in html and " onload=" not in html
    assert "'unsafe-inline'" not in PAGE_CSP and "script-src 'self'" in PAGE_CSP
    assert "blob:" in PAGE_CSP  # the query preview uses URL.createObjectURL


# --------------------------------------------------------------------------- auth

def test_reload_needs_the_admin_token(hostile_http_client):
    r = hostile_http_client.post("/v1/reload")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    r = hostile_http_client.post("/v1/reload", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and r.json()["error"]["reason"] == "forbidden"
    r = hostile_http_client.post("/v1/reload", headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status_code == 401
    r = hostile_http_client.post("/v1/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["status"] == "unchanged"
    # Queries stay open.
    assert hostile_http_client.get("/v1/products/P0001/similar").status_code == 200


UNAUTHORIZED = {"error": {"reason": "unauthorized",
                          "message": "this endpoint needs 'Authorization: Bearer <admin token>'"}}
FORBIDDEN = {"error": {"reason": "forbidden", "message": "the admin token is wrong"}}


@pytest.mark.parametrize("header,status", [
    (None, 401), ("Bearer", 401), ("Basic {t}", 401), ("{t}", 401),
    ("Bearer\t{t}", 401), ("Bearer {t}x", 403), ("Bearer x{t}", 403),
    ("Bearer t\xf6ken-of-enough-length", 403),
    ("Bearer {t}", 200), ("bearer {t}", 200), ("BEARER   {t}", 200),
])
def test_admin_token_header_forms(hostile_http_client, header, status):
    """What each Authorization header gets on POST /v1/reload, with the exact error bodies:
    no bearer token 401 (with WWW-Authenticate), a wrong one 403, the scheme's name in any
    case and spaces before the token allowed (HTTP strips those after a header's value)."""
    headers = {} if header is None else {
        "Authorization": header.format(t=TOKEN).encode("latin-1")}
    r = hostile_http_client.post("/v1/reload", headers=headers)
    assert r.status_code == status, (header, r.text)
    if status == 401:
        assert r.json() == UNAUTHORIZED
        assert r.headers["www-authenticate"] == 'Bearer realm="catalog-search"'
        assert r.headers["x-error-reason"] == "unauthorized"
    elif status == 403:
        assert r.json() == FORBIDDEN and "www-authenticate" not in r.headers
    else:
        assert r.json()["status"] == "unchanged"


def test_a_bad_parameter_is_refused_before_the_token_is_checked(hostile_http_client):
    """Parameters are validated first: a bad `force` answers 422 with or without a token."""
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = hostile_http_client.post("/v1/reload?force=maybe", headers=headers)
        assert r.status_code == 422, r.text


def test_token_from_env_and_airflow_hand_off(hostile_http_world, monkeypatch,
                                                      tmp_path):
    from pipelines.orchestration.errors import StepError
    from pipelines.orchestration.handoff import hand_off
    from pipelines.core.admin_token import AdminTokenError, admin_token_from_env
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.delenv("CATALOG_SEARCH_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("CATALOG_SEARCH_ADMIN_TOKEN_FILE", str(token_file))
    assert admin_token_from_env() == TOKEN
    app = create_app(hostile_http_world.index_root, hostile_http_world.config, watch=False)
    with LiveServer(app) as live:
        out = hand_off({"version": "v0001"}, live.url, hostile_http_world.index_root)
        assert out["notified"] and out["status"] == 200
        monkeypatch.delenv("CATALOG_SEARCH_ADMIN_TOKEN_FILE")
        with pytest.raises(StepError, match="401"):
            hand_off({"version": "v0001"}, live.url, hostile_http_world.index_root)
    with pytest.raises(AdminTokenError, match="at least"):
        admin_token_from_env({"CATALOG_SEARCH_ADMIN_TOKEN": "short"})
    with pytest.raises(AdminTokenError, match="only one"):
        admin_token_from_env({"CATALOG_SEARCH_ADMIN_TOKEN": TOKEN,
                              "CATALOG_SEARCH_ADMIN_TOKEN_FILE": str(token_file)})


# --------------------------------------------------------------------------- model trust

class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        _RecordingHandler.requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _publish_with_model(root: str, source: str, target: str, model: dict) -> None:
    shutil.copytree(art.version_dir(root, source), art.version_dir(root, target))
    path = os.path.join(art.version_dir(root, target), "manifest.json")
    manifest = fs.read_json(path)
    manifest["version"] = target
    manifest["model"] = {**manifest["model"], **model}
    fs.write_json(path, manifest)
    art.write_latest(root, target)


def test_manifest_cannot_make_the_server_fetch_a_model(hostile_http_world, tmp_path):
    world = hostile_http_world
    root = copy_index(world, str(tmp_path / "index"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        handle = f"http://127.0.0.1:{server.server_address[1]}/evil-model"
        size = int(fs.read_json(art.manifest_uri(root, "v0001"))["model"]["input_size"])
        # The fingerprint resolve_model computes for a URL: passes the fingerprint check.
        fingerprint = hashlib.sha256(f"{handle}|{size}".encode()).hexdigest()
        _publish_with_model(root, "v0001", "v0002",
                            {"handle": handle, "path": handle, "fingerprint": fingerprint})
        app = create_app(root, world.config, watch=False, version="v0001")
        with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=120) as c:
            r = c.post("/v1/reload")
            assert r.status_code == 409, r.text
            assert "not trusted" in r.json()["reason"], r.json()
            assert c.get("/readyz").json()["version"] == "v0001"
            assert c.get("/v1/products/P0001/similar").status_code == 200
    finally:
        server.shutdown()
    assert _RecordingHandler.requests == []  # the URL was never fetched


def test_local_model_only_when_allow_listed(hostile_http_world, tmp_path):
    from serving.searcher import CatalogSearcher
    world = hostile_http_world
    root = copy_index(world, str(tmp_path / "index"))
    other = str(tmp_path / "other-model")
    shutil.copytree(world.config.model.handle, other)  # same bytes, a path only the index names
    _publish_with_model(root, "v0001", "v0002", {"handle": other, "path": other})
    searcher = CatalogSearcher(root, config=world.config)
    outcome = searcher.reload()
    assert outcome.status == "refused" and "not trusted" in outcome.reason
    trusted = world.config.replace(serving={"allowed_model_handles": [other]})
    searcher = CatalogSearcher(root, config=trusted)
    assert searcher.reload().status == "loaded"


# --------------------------------------------------------------------------- refused versions

def test_refused_version_retried_after_repair_and_force(hostile_http_world, tmp_path):
    world = hostile_http_world
    root = copy_index(world, str(tmp_path / "index"))
    shutil.copytree(art.version_dir(root, "v0001"), art.version_dir(root, "v0002"))
    manifest_path = os.path.join(art.version_dir(root, "v0002"), "manifest.json")
    manifest = fs.read_json(manifest_path)
    manifest["version"] = "v0002"
    fs.write_json(manifest_path, manifest)
    shard = os.path.join(art.version_dir(root, "v0002"), manifest["shards"][0]["path"])
    victim = os.path.join(shard, manifest["shards"][0]["files"][0]["name"])
    good = open(victim, "rb").read()
    with open(victim, "wb") as f:
        f.write(b"\0" * len(good))
    app = create_app(root, world.config, watch=False, version="v0001")
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=120) as c:
        art.write_latest(root, "v0002")
        first = c.post("/v1/reload")
        assert first.status_code == 409 and "checksum" in first.json()["reason"]
        cached = c.post("/v1/reload")  # unchanged files: the cached refusal, no new attempt
        assert cached.status_code == 409 and cached.json()["seconds"] == 0.0
        forced = c.post("/v1/reload", params={"force": "true"})  # a real new attempt
        assert forced.status_code == 409 and forced.json()["seconds"] > 0.0
        time.sleep(0.01)
        with open(victim, "wb") as f:  # repaired
            f.write(good)
        repaired = c.post("/v1/reload")
        assert repaired.status_code == 200 and repaired.json()["serving_version"] == "v0002"


# --------------------------------------------------------------------------- bombs and memory

def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def test_concurrent_bombs_stay_cheap(hostile_http_client):
    """24 concurrent 6000x6000 1-bit PNGs (4 KB each): refused before any decode."""
    bomb = png_bomb()
    assert len(bomb) < 10_000
    if not _reset_peak_rss():
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    before = _vm_kib("VmRSS")

    def send(_: int) -> httpx.Response:
        return hostile_http_client.post("/v1/search",
                                        files={"image": ("b.png", bomb, "image/png")})

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(send, range(24)))
    peak_growth_mb = (_vm_kib("VmHWM") - before) / 1024
    assert {r.status_code for r in answers} == {422}
    assert {r.json()["error"]["reason"] for r in answers} == {"too_many_pixels"}
    print(f"24 concurrent PNG bombs: peak RSS growth {peak_growth_mb:.1f} MB")
    assert peak_growth_mb < 60, peak_growth_mb


def test_decode_slots_answer_503_with_retry_after(hostile_http_world):
    world = hostile_http_world
    config = world.config.replace(serving={"max_concurrent_queries": 1,
                                           "max_queued_queries": 1, "queue_timeout_s": 0.05})
    app = create_app(world.index_root, config, watch=False)
    image = _good_image(world)
    with LiveServer(app) as live:
        def send(_: int) -> httpx.Response:
            with httpx.Client(base_url=live.url, timeout=120) as c:
                return c.post("/v1/search", files={"image": ("q.jpg", image, "image/jpeg")})

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(send, range(24)))
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503}, statuses
    busy = [r for r in answers if r.status_code == 503]
    assert busy, "24 concurrent uploads through one slot should see some 503 busy"
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["reason"] == "busy"
               for r in busy)
    assert statuses.count(200) >= 1
