"""A real HTTP/1.1 image server on loopback for fetch tests: keep-alive connections, a
fixed first-byte delay, and one route per behaviour a CDN shows.

    /ok/<name>        200, the bytes in `files[name]` (after `delay_s`)
    /gone/<name>      404
    /flaky/<name>     500 on the first request for the path, then as /ok/
    /busy/<name>      429 with `Retry-After: <retry_after_s>` on the first request, then as /ok/
    /big/<name>       200 with a body of `big_bytes` bytes (declared in Content-Length)
    /slow/<name>      200, Content-Length declared, then 100 bytes every 50 ms (a trickle)
    /hang/<name>      sleeps `hang_s` before answering
    /loop/<name>      302 to itself (urllib and our client give up: a redirect loop)

The server records per request the Host header and the time it arrived, the most
requests in flight at once per Host (`peak`; /slow/ and /hang/ are counted apart, as
their handlers run on after the client gave up), and the connections it accepted.
"""
from __future__ import annotations

import http.server
import threading
import time
from collections import Counter, defaultdict


class _State:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.delay_s = 0.0
        self.retry_after_s = 1
        self.big_bytes = 100_000
        self.hang_s = 2.0
        self.hits: Counter = Counter()
        self.requests: list[tuple[str, str, float]] = []  # (host, path, monotonic at arrival)
        self.in_flight: Counter = Counter()
        self.peak: Counter = Counter()
        self.connections = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: connection reuse is observable
    disable_nagle_algorithm = True
    wbufsize = 1 << 16  # headers and body in one write (as a CDN sends them)
    state: _State

    def handle(self):
        try:
            super().handle()
        except (ConnectionResetError, BrokenPipeError):
            pass  # the client closed a connection with an unread body (too_large, deadline)

    def finish(self):
        try:
            super().finish()
        except (ConnectionResetError, BrokenPipeError):
            pass

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        with self.state.lock:
            self.state.connections += 1

    def do_GET(self):
        st = self.state
        host = self.headers.get("Host", "")
        if self.path.startswith(("/slow/", "/hang/")):
            host = "(outlives the client)"  # the handler runs on after the client gave up
        with st.lock:
            st.hits[self.path] += 1
            n = st.hits[self.path]
            st.requests.append((host, self.path, time.monotonic()))
            st.in_flight[host] += 1
            st.peak[host] = max(st.peak[host], st.in_flight[host])
        try:
            self._answer(n)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with st.lock:
                st.in_flight[host] -= 1

    def _answer(self, n: int) -> None:
        st = self.state
        kind, _, name = self.path.lstrip("/").partition("/")
        if st.delay_s:
            time.sleep(st.delay_s)
        if kind == "ok" or (kind in ("flaky", "busy") and n > 1):
            body = st.files.get(name)
            if body is None:
                return self._send(404, b"no such image")
            return self._send(200, body)
        if kind == "gone":
            return self._send(404, b"gone")
        if kind == "flaky":
            return self._send(500, b"try again")
        if kind == "busy":
            return self._send(429, b"slow down", {"Retry-After": str(st.retry_after_s)})
        if kind == "big":
            return self._send(200, b"\xff" * st.big_bytes)
        if kind == "loop":
            return self._send(302, b"", {"Location": self.path})
        if kind == "hang":
            st.stop.wait(st.hang_s)
            return self._send(200, st.files.get(name, b""))
        if kind == "slow":
            self.send_response(200)
            self.send_header("Content-Length", "10000")
            self.end_headers()
            for _ in range(100):
                if st.stop.wait(0.05):
                    break
                self.wfile.write(b"\xff" * 100)
                self.wfile.flush()
            self.close_connection = True
            return None
        return self._send(500, b"unknown route")

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ImageServer:
    """`with ImageServer() as srv:` -- srv.url(path), srv.other_host_url(path), srv.state."""

    def __init__(self) -> None:
        self.state = _State()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ImageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.state.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def other_host_url(self, path: str) -> str:
        """The same server under a second host name (a second host for per-host limits)."""
        return f"http://localhost:{self.port}{path}"

    def reset(self) -> None:
        st = self.state
        with st.lock:
            st.hits.clear()
            st.requests.clear()
            st.in_flight.clear()
            st.peak.clear()
            st.connections = 0

    def arrivals(self, path: str) -> list[float]:
        return [t for _, p, t in self.state.requests if p == path]


def by_host(requests: list[tuple[str, str, float]]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for host, _, _ in requests:
        out[host] += 1
    return dict(out)
