"""The search page in a real headless Chromium, driven over the Chrome DevTools protocol:
open the page, put a photo into the file input, see result thumbnails with scores."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

from pipelines.core import filesystem as fs
from serving.app import create_app
from serving_fixtures import LiveServer, jpeg_bytes, serving_world

pytestmark = pytest.mark.heavy  # a headless Chromium

# A system browser is a set-up step (`make browser`, README), not something a test installs.
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find_chromium() -> str:
    """Path of a Chromium-family browser: $CHROMIUM, else the first of BROWSER_NAMES on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        assert os.access(explicit, os.X_OK), f"$CHROMIUM={explicit} is not an executable"
        return explicit
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium found (looked for $CHROMIUM and " + ", ".join(BROWSER_NAMES)
                + " on PATH); install one with `make browser`")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """Headless chromium with a remote-debugging port and a minimal CDP client."""

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={self.profile}",
             f"--remote-debugging-port={self.port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def page_ws_url(self, timeout: float = 30.0) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list",
                                            timeout=2) as r:
                    targets = json.load(r)
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("chromium did not open its DevTools endpoint")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


class Cdp:
    """Send DevTools commands over one page websocket and wait for their answers."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0

    async def send(self, method: str, **params):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == my_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")


async def _drive(ws_url: str, page_url: str, photo: str, bad_photo: str) -> dict:
    import websockets
    async with websockets.connect(ws_url, max_size=None) as ws:
        cdp = Cdp(ws)
        await cdp.send("Page.enable")
        await cdp.send("DOM.enable")
        await cdp.send("Runtime.enable")
        await cdp.send("Page.navigate", url=page_url)
        await cdp.wait_for("document.readyState === 'complete' && "
                           "document.getElementById('index-status').textContent.includes('index')")
        status = await cdp.evaluate("document.getElementById('index-status').textContent")

        async def upload(path: str) -> None:
            doc = await cdp.send("DOM.getDocument")
            node = await cdp.send("DOM.querySelector", nodeId=doc["root"]["nodeId"],
                                  selector="#file-input")
            await cdp.send("DOM.setFileInputFiles", files=[path], nodeId=node["nodeId"])

        await upload(photo)
        await cdp.wait_for("document.body.dataset.state === 'results'")
        # Every thumbnail has loaded from /v1/images/... (naturalWidth > 0).
        await cdp.wait_for("[...document.querySelectorAll('#results img')].length > 0 && "
                           "[...document.querySelectorAll('#results img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
        results = await cdp.evaluate("""[...document.querySelectorAll('#results li')].map(li => ({
            product: li.dataset.productId,
            score: li.querySelector('.score').textContent,
            img: li.querySelector('img').getAttribute('src'),
            text: li.textContent}))""")
        message = await cdp.evaluate("document.getElementById('message').textContent")
        await upload(bad_photo)
        await cdp.wait_for("document.body.dataset.state === 'error'")
        error = await cdp.evaluate("document.getElementById('message').textContent")
        return {"status": status, "results": results, "message": message, "error": error}


def test_page_upload_shows_result_thumbnails(tmp_path):
    chromium = _find_chromium()
    world = serving_world()
    row = world.catalog_rows()[10]
    photo = str(tmp_path / "query.jpg")
    with open(photo, "wb") as f:
        f.write(fs.read_bytes(row["image_uri"]))
    bad = str(tmp_path / "broken.jpg")
    with open(bad, "wb") as f:
        f.write(jpeg_bytes()[:200])
    app = create_app(world.index_root, world.config, watch=False)
    browser = Browser(chromium)
    try:
        with LiveServer(app) as live:
            seen = asyncio.run(_drive(browser.page_ws_url(), live.url + "/", photo, bad))
    finally:
        browser.close()
    assert "v0001" in seen["status"]
    results = seen["results"]
    assert len(results) == 10
    assert results[0]["product"] == row["product_id"]
    assert results[0]["score"] == "score 1.000"
    assert results[0]["img"] == f"/v1/images/{row['image_id']}"
    assert row["category"] in results[0]["text"] and row["title"] in results[0]["text"]
    assert "10 results from index v0001" in seen["message"]
    assert seen["error"].startswith("error 422")


async def _drive_words(ws_url: str, page_url: str, words: str) -> list:
    import websockets
    async with websockets.connect(ws_url, max_size=None) as ws:
        cdp = Cdp(ws)
        await cdp.send("Page.enable")
        await cdp.send("Runtime.enable")
        await cdp.send("Page.navigate", url=page_url)
        await cdp.wait_for("document.readyState === 'complete' && "
                           "document.getElementById('index-status').textContent.includes('index')")
        await cdp.evaluate(f"document.getElementById('text').value = {json.dumps(words)}; "
                           "document.getElementById('text-search').click(); true")
        await cdp.wait_for("document.body.dataset.state === 'results'")
        return await cdp.evaluate(
            "[...document.querySelectorAll('#results li')].map(li => li.dataset.productId)")


def test_page_words_alone_search_the_catalog_text():
    """The text box: words with no photo run a text-only search (BM25 over titles...)."""
    chromium = _find_chromium()
    world = serving_world()
    app = create_app(world.index_root, world.config, watch=False)
    browser = Browser(chromium)
    try:
        with LiveServer(app) as live:
            products = asyncio.run(_drive_words(browser.page_ws_url(), live.url + "/",
                                                "organic juice"))
    finally:
        browser.close()
    titles = {r["product_id"]: r["title"].lower() for r in world.catalog_rows()}
    assert products and products[0] == "P0005"  # "Organic Juice 5": both words
    assert all("organic" in titles[p] or "juice" in titles[p] for p in products)
    assert set(products) == {p for p, t in titles.items() if "organic" in t or "juice" in t}


async def _drive_crowded(ws_url: str, page_url: str, words: str) -> dict:
    import websockets
    async with websockets.connect(ws_url, max_size=None) as ws:
        cdp = Cdp(ws)
        await cdp.send("Page.enable")
        await cdp.send("Runtime.enable")
        await cdp.send("Page.navigate", url=page_url)
        # the group-by choices come from the index's metadata fields (/readyz)
        await cdp.wait_for("document.getElementById('group-by').options.length > 1")
        options = await cdp.evaluate(
            "[...document.getElementById('group-by').options].map(o => o.value)")
        await cdp.evaluate(f"document.getElementById('text').value = {json.dumps(words)}; "
                           "document.getElementById('k').value = '8'; "
                           "document.getElementById('group-by').value = 'category'; "
                           "document.getElementById('max-per-group').value = '1'; "
                           "document.getElementById('text-search').click(); true")
        await cdp.wait_for("document.body.dataset.state === 'results'")
        crowded = await cdp.evaluate(
            "[...document.querySelectorAll('#results li')].map(li => li.dataset.productId)")
        await cdp.evaluate("document.getElementById('max-per-group').value = '0'; "
                           "document.getElementById('text-search').click(); true")
        await cdp.wait_for("document.body.dataset.state === 'error'")
        error = await cdp.evaluate("document.getElementById('message').textContent")
        return {"options": options, "crowded": crowded, "error": error}


def test_page_crowding_caps_results_per_field():
    """"at most 1 per category": one product of each category, from the page's controls."""
    chromium = _find_chromium()
    world = serving_world()
    app = create_app(world.index_root, world.config, watch=False)
    browser = Browser(chromium)
    try:
        with LiveServer(app) as live:
            seen = asyncio.run(_drive_crowded(browser.page_ws_url(), live.url + "/",
                                              "juice crackers apples detergent yogurt"))
    finally:
        browser.close()
    assert seen["options"] == ["", "category", "title"]
    category = {r["product_id"]: r["category"] for r in world.catalog_rows()}
    cats = [category[p] for p in seen["crowded"]]
    assert len(cats) == 5 and len(set(cats)) == 5  # five categories, one product each
    assert seen["error"].startswith("error 422") and "max_per_group" in seen["error"]


async def _drive_docs(ws_url: str, base: str) -> dict:
    """What a browser shows at /docs, /redoc and /openapi.json."""
    import websockets
    async with websockets.connect(ws_url, max_size=None) as ws:
        cdp = Cdp(ws)
        await cdp.send("Page.enable")
        await cdp.send("Runtime.enable")
        seen = {}
        for path in ("/docs", "/redoc", "/openapi.json"):
            await cdp.send("Page.navigate", url=base + path)
            await cdp.wait_for(f"location.pathname === {json.dumps(path)} && "
                               "document.readyState === 'complete' && "
                               "document.body.innerText.length > 0")
            seen[path] = await cdp.evaluate("document.body.innerText")
        return seen


def test_docs_pages_name_the_openapi_schema_instead_of_a_blank_page():
    """Issue 23 item 7: FastAPI's /docs loaded Swagger UI from a CDN (blank offline, and
    outside the CSP); the service now says where its schema is, and the schema opens."""
    chromium = _find_chromium()
    world = serving_world()
    app = create_app(world.index_root, world.config, watch=False)
    browser = Browser(chromium)
    try:
        with LiveServer(app) as live:
            seen = asyncio.run(_drive_docs(browser.page_ws_url(), live.url))
    finally:
        browser.close()
    for path in ("/docs", "/redoc"):
        error = json.loads(seen[path])["error"]
        assert error["reason"] == "no_docs_page" and "/openapi.json" in error["message"]
    spec = json.loads(seen["/openapi.json"])
    assert "/v1/search" in spec["paths"] and "/docs" not in spec["paths"]
