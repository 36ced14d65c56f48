"""fetch_bytes against a real HTTP server on loopback, and local files."""
from __future__ import annotations

import http.server
import threading
import time

import pytest

from pipelines.core.config import FetchConfig
from pipelines.embed.fetch import FetchError, fetch_bytes

PAYLOAD = b"\xff\xd8" + b"x" * 5000


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path == "/ok.jpg":
            self._send(200, PAYLOAD)
        elif self.path == "/flaky.jpg" and n < 3:
            self._send(503, b"busy")
        elif self.path == "/flaky.jpg":
            self._send(200, PAYLOAD)
        elif self.path == "/slow.jpg":
            time.sleep(1.0)
            self._send(200, PAYLOAD)
        elif self.path == "/big-declared.jpg":
            self._send(200, PAYLOAD * 10)
        elif self.path == "/big-chunked.jpg":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the cap applies while reading
            self.wfile.write(PAYLOAD * 10)
        elif self.path == "/gone.jpg":
            self._send(404, b"no")
        else:
            self._send(500, b"error")

    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


CFG = FetchConfig(timeout_s=0.3, retries=2, backoff_s=0.01, max_bytes=20_000)


def test_http_ok(server):
    assert fetch_bytes(server + "/ok.jpg", CFG) == PAYLOAD


def test_http_retries_on_503_then_succeeds(server):
    assert fetch_bytes(server + "/flaky.jpg", CFG) == PAYLOAD
    assert _Handler.hits["/flaky.jpg"] == 3


def test_http_404_is_not_retried(server):
    with pytest.raises(FetchError) as e:
        fetch_bytes(server + "/gone.jpg", CFG)
    assert e.value.reason == "not_found" and _Handler.hits["/gone.jpg"] == 1


def test_http_500_after_retries(server):
    with pytest.raises(FetchError) as e:
        fetch_bytes(server + "/error.jpg", CFG)
    assert e.value.reason == "http_500" and "after 3 attempts" in str(e.value)


def test_http_timeout(server):
    with pytest.raises(FetchError) as e:
        fetch_bytes(server + "/slow.jpg", FetchConfig(timeout_s=0.2, retries=0))
    assert e.value.reason == "timeout"


@pytest.mark.parametrize("path", ["/big-declared.jpg", "/big-chunked.jpg"])
def test_http_byte_cap(server, path):
    with pytest.raises(FetchError) as e:
        fetch_bytes(server + path, CFG)
    assert e.value.reason == "too_large"


def test_local_files(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(PAYLOAD)
    assert fetch_bytes(str(p), CFG) == PAYLOAD
    with pytest.raises(FetchError) as e:
        fetch_bytes(str(tmp_path / "missing.jpg"), CFG)
    assert e.value.reason == "not_found"
    with pytest.raises(FetchError) as e:
        fetch_bytes(str(p), FetchConfig(max_bytes=100))
    assert e.value.reason == "too_large"


def test_connection_refused_is_a_connection_error():
    with pytest.raises(FetchError) as e:
        fetch_bytes("http://127.0.0.1:9/x.jpg", FetchConfig(timeout_s=0.5, retries=0))
    assert e.value.reason in ("connection", "timeout")
