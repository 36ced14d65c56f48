"""HTTP search service (FastAPI): search by photo or vector, "more like this", a results page.

    app = create_app(index_root, config)          # uvicorn.run(app, host=..., port=...)

Endpoints (OpenAPI at /openapi.json, docs at /docs):
    POST /v1/search                  multipart (image file + k, filters, collapse) or JSON
                                     {"vector": [...], "k": 10, "filters": {...}}
    GET  /v1/products/{id}/similar   "more like this" for a catalog product
    GET  /v1/images/{id}/similar     "more like this" for a catalog image
    GET  /v1/images/{image_id}       a catalog image of the loaded index (thumbnails)
    POST /v1/reload[?force=true]     check LATEST now (Airflow hand-off); 409 when refused;
                                     needs the admin bearer token when one is set
    GET  /healthz  /readyz  /metrics (Prometheus text)
    GET  /                           the search page (serving/static/)

Bad input never yields a 500: oversized uploads 413, undecodable images, bad k or
filters, too deeply nested JSON 422 with the reason, unknown products/images 404, no
index loaded yet 503, every decode slot busy 503 with Retry-After. Every response
carries `X-Content-Type-Options: nosniff` and a Content-Security-Policy; catalog images
are served only as the image type their bytes show (JPEG, PNG, GIF, WebP).
"""
from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
import re
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Sequence
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile

from pipelines.core.config import Config
from serving.auth import admin_token_from_env, check_bearer
from serving.searcher import (CatalogSearcher, IndexWatcher, NotReadyError, QueryError,
                              SearchResults)

log = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# Multipart framing and form fields on top of the image itself.
_MULTIPART_OVERHEAD = 64 * 1024
# Content-Security-Policy of the page and API answers: scripts and styles only from this
# origin (the page has no inline code), images also from blob: (the query preview) and
# http(s) (catalog images hosted elsewhere), no frames, no plugins.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
            "img-src 'self' blob: data: https: http:; connect-src 'self'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")
# Catalog image bytes: nothing may run, even if a browser is talked into rendering them.
IMAGE_CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; sandbox"
# FastAPI's /docs and /redoc pages load Swagger UI / ReDoc from its CDN with inline code.
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self'; "
            "worker-src blob:; frame-ancestors 'none'")
_DOCS_PATHS = ("/docs", "/redoc", "/docs/oauth2-redirect")
# Image types served from /v1/images, detected from the leading bytes (never the name).
_IMAGE_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"),
                (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))
# A JSON string (once escapes are removed) or one bracket: what the nesting check looks at.
_JSON_TOKENS = re.compile(rb'"[^"]*"|[\[\]{}]')
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_STATUS_BY_REASON = {"too_large": 413, "unknown_product": 404, "unknown_image": 404}


class ApiError(Exception):
    """An HTTP error answer: status, machine-readable reason, human message, extra headers."""

    def __init__(self, status: int, reason: str, message: str,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.headers = headers or {}


def sniff_image_type(data: bytes) -> str | None:
    """The media type of JPEG / PNG / GIF / WebP bytes, from their magic; None otherwise."""
    for magic, media in _IMAGE_MAGIC:
        if data.startswith(magic):
            return media
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_json_depth(text: bytes | str, max_depth: int, what: str = "JSON body") -> None:
    """ApiError 422 (too_deep) when `text` nests arrays/objects deeper than `max_depth`.

    Runs before json.loads (whose recursive parser would otherwise raise RecursionError
    on a deeply nested document); strings are skipped, so brackets inside them do not count.
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    # Drop escaped backslashes, then escaped quotes: every '"' left delimits a string, so
    # one linear regex pass finds strings and brackets (no backtracking over escapes).
    data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    depth = 0
    for m in _JSON_TOKENS.finditer(data):
        token = m.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise ApiError(422, "too_deep", f"{what} nests arrays/objects more than "
                                                f"{max_depth} levels deep")
        elif token in (b"]", b"}"):
            depth -= 1


class QueryGate:
    """Bounds concurrent decode+embed work: `slots` at a time, at most `max_queued` waiting.

    A request that finds every slot busy and the queue full, or waits longer than
    `timeout_s`, gets 503 (reason busy) with Retry-After instead of holding more memory.
    """

    def __init__(self, slots: int, max_queued: int, timeout_s: float):
        self.slots, self.max_queued, self.timeout_s = slots, max_queued, timeout_s
        self._semaphore: asyncio.Semaphore | None = None
        self.waiting = 0
        self.rejected = 0

    def _busy(self, why: str) -> ApiError:
        self.rejected += 1
        return ApiError(503, "busy", f"the server is decoding {self.slots} photos already "
                                     f"({why}); retry shortly", headers={"Retry-After": "1"})

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._semaphore is None:  # created on the serving event loop
            self._semaphore = asyncio.Semaphore(self.slots)
        sem = self._semaphore
        if sem.locked():
            if self.waiting >= self.max_queued:
                raise self._busy(f"{self.waiting} more waiting")
            self.waiting += 1
            try:
                await asyncio.wait_for(sem.acquire(), self.timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                raise self._busy(f"no slot within {self.timeout_s:g}s") from None
            finally:
                self.waiting -= 1
        else:
            await sem.acquire()
        try:
            yield
        finally:
            sem.release()


class Metrics:
    """Request counters and latency histograms, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = {}
        self.latency_count: dict[str, int] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (route, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            buckets = self.latency.setdefault(route, [0] * (len(LATENCY_BUCKETS_S) + 1))
            buckets[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            self.latency_sum[route] = self.latency_sum.get(route, 0.0) + seconds
            self.latency_count[route] = self.latency_count.get(route, 0) + 1

    def error(self, route: str, reason: str) -> None:
        with self._lock:
            self.errors[(route, reason)] = self.errors.get((route, reason), 0) + 1

    def render(self, searcher: CatalogSearcher) -> str:
        lines = ["# HELP catalog_search_requests_total HTTP requests by route, method, status.",
                 "# TYPE catalog_search_requests_total counter"]
        with self._lock:
            for (route, method, status), n in sorted(self.requests.items()):
                lines.append(f'catalog_search_requests_total{{route="{route}",method="{method}",'
                             f'status="{status}"}} {n}')
            lines += ["# HELP catalog_search_errors_total Requests answered with an error, "
                      "by route and reason.", "# TYPE catalog_search_errors_total counter"]
            for (route, reason), n in sorted(self.errors.items()):
                lines.append(f'catalog_search_errors_total{{route="{route}",reason="{reason}"}} '
                             f'{n}')
            lines += ["# HELP catalog_search_request_seconds Request latency.",
                      "# TYPE catalog_search_request_seconds histogram"]
            for route, buckets in sorted(self.latency.items()):
                cumulative = 0
                for bound, n in zip(LATENCY_BUCKETS_S + (float("inf"),), buckets):
                    cumulative += n
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    lines.append(f'catalog_search_request_seconds_bucket{{route="{route}",'
                                 f'le="{le}"}} {cumulative}')
                lines.append(f'catalog_search_request_seconds_sum{{route="{route}"}} '
                             f'{self.latency_sum[route]:.6f}')
                lines.append(f'catalog_search_request_seconds_count{{route="{route}"}} '
                             f'{self.latency_count[route]}')
        idx = searcher.loaded
        lines += ["# HELP catalog_search_index_info The serving index version (value 1).",
                  "# TYPE catalog_search_index_info gauge"]
        if idx is not None:
            lines.append(f'catalog_search_index_info{{version="{idx.version}"}} 1')
        lines += ["# HELP catalog_search_index_vectors Vectors in the serving index.",
                  "# TYPE catalog_search_index_vectors gauge",
                  f"catalog_search_index_vectors {idx.num_vectors if idx else 0}",
                  "# HELP catalog_search_index_ready 1 when an index version is loaded.",
                  "# TYPE catalog_search_index_ready gauge",
                  f"catalog_search_index_ready {1 if idx else 0}",
                  "# HELP catalog_search_reloads_total Reload checks by outcome.",
                  "# TYPE catalog_search_reloads_total counter"]
        for outcome, n in sorted(searcher.reload_counts.items()):
            lines.append(f'catalog_search_reloads_total{{outcome="{outcome}"}} {n}')
        return "\n".join(lines) + "\n"


def _error_response(status: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"reason": reason, "message": message}}, status_code=status)


def _api_error(e: Exception) -> ApiError:
    if isinstance(e, QueryError):
        return ApiError(_STATUS_BY_REASON.get(e.reason, 422), e.reason, str(e))
    if isinstance(e, NotReadyError):
        return ApiError(503, "not_ready", str(e))
    raise e


def _parse_k(raw: Any) -> int | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool):
        raise ApiError(422, "bad_k", f"k must be an integer, got {raw!r}")
    if isinstance(raw, int):
        return raw
    try:
        return int(str(raw).strip())
    except ValueError:
        raise ApiError(422, "bad_k", f"k must be an integer, got {raw!r}") from None


def _parse_filters(raw: Any, max_depth: int = 8, max_bytes: int = 1_000_000
                   ) -> dict[str, Any] | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        if len(raw) > max_bytes:
            raise ApiError(413, "too_large", f"filters is longer than {max_bytes} characters")
        check_json_depth(raw, max_depth, "filters")
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ApiError(422, "bad_filter", f"filters must be a JSON object: {e}") from None
    if not isinstance(raw, dict):
        raise ApiError(422, "bad_filter", "filters must be a JSON object of key -> value(s)")
    return raw


def _parse_json_body(body: bytes, max_depth: int) -> Any:
    """A JSON request body: nesting checked first, then parsed; ApiError 422 with why."""
    check_json_depth(body, max_depth)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(422, "bad_json", f"body is not valid JSON: {e}") from None


def _parse_text(raw: Any) -> str | None:
    """Query text from a form field or JSON (None when absent); length is checked later."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ApiError(422, "bad_text", "text must be a string")
    return raw


def _parse_weight(raw: Any) -> float | None:
    """text_weight from a form field, query string or JSON; range is checked later."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool):
        raise ApiError(422, "bad_text_weight", f"text_weight must be a number, got {raw!r}")
    if isinstance(raw, (int, float)):
        return float(raw)
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ApiError(422, "bad_text_weight",
                       f"text_weight must be a number, got {raw!r}") from None
    if value != value:  # NaN
        raise ApiError(422, "bad_text_weight", "text_weight must be a number in [0, 1]")
    return value


def _parse_bool(raw: Any, name: str, default: bool = True) -> bool:
    if raw is None or raw == "":
        return default
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ApiError(422, f"bad_{name}", f"{name} must be true or false, got {raw!r}")


async def _read_body_limited(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, "too_large", f"request body of {declared} bytes is larger "
                                                 f"than the limit of {limit}")
        except ValueError:
            raise ApiError(400, "bad_request", "Content-Length is not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"request body is larger than the limit of {limit}")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # lets request.form()/json() parse what was already read
    return body


_SEARCH_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {
                    "image": {"type": "string", "format": "binary",
                              "description": "the query photo (JPEG, PNG, WebP, ...); "
                                             "required unless 'text' is given"},
                    "text": {"type": "string", "description": "query words: fused with the "
                             "photo, or searched alone (BM25 over product text)"},
                    "text_weight": {"type": "number", "minimum": 0, "maximum": 1,
                                    "description": "default fusion.text_weight"},
                    "k": {"type": "integer", "minimum": 1},
                    "filters": {"type": "string",
                                "description": 'JSON object, e.g. {"category": "dairy"}'},
                    "collapse": {"type": "boolean", "default": True,
                                 "description": "best image per product (default) or images"},
                }}},
            "application/json": {"schema": {
                "type": "object",
                "properties": {
                    "vector": {"type": "array", "items": {"type": "number"}},
                    "text": {"type": "string", "description": "with or instead of 'vector'"},
                    "text_weight": {"type": "number", "minimum": 0, "maximum": 1},
                    "k": {"type": "integer", "minimum": 1},
                    "filters": {"type": "object", "additionalProperties": True},
                    "collapse": {"type": "boolean", "default": True},
                }}},
        },
    },
    "responses": {
        "413": {"description": "upload larger than serving.max_upload_bytes"},
        "422": {"description": "undecodable image, bad k, bad vector, bad filters, empty or "
                               "too long text, text_weight outside [0, 1]"},
        "503": {"description": "no index version loaded yet"},
    },
}


def public_image_url(image_id: str, image_uri: str | None) -> str:
    """Where a client loads a result's image: the catalog's own http(s) URL, else our endpoint.

    The server never fetches a URL read from the catalog; an http(s) catalog image is
    loaded by the client from its host. Any other URI is served by /v1/images/{id}, with
    the id percent-encoded (every character but unreserved ones).
    """
    if image_uri and image_uri[:8].lower().startswith(("http://", "https://")):
        try:
            parts = urlsplit(image_uri)
        except ValueError:
            parts = None
        if parts is not None and parts.scheme.lower() in ("http", "https") and parts.hostname \
                and not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in image_uri):
            return quote(image_uri, safe=":/?#[]@!$&'()*+,;=%~")
    return "/v1/images/" + quote(image_id, safe="")


def create_app(index_root: str, config: Config, *, version: str | None = None,
               shard_ids: Sequence[int] | None = None, searcher: CatalogSearcher | None = None,
               watch: bool = True, admin_token: str | None = None) -> FastAPI:
    """The search service for the index under `index_root`.

    Loads LATEST (or `version`) at start-up (a failure leaves the service up but not
    ready: /readyz 503), and with `watch` a background watcher hot-reloads whenever
    LATEST changes. Pass `searcher` to serve an already opened CatalogSearcher.
    `admin_token` (default: from CATALOG_SEARCH_ADMIN_TOKEN / _FILE, see serving.auth)
    guards the mutating endpoints; with none they are open.
    """
    searcher = searcher or CatalogSearcher(index_root, config=config, shard_ids=shard_ids)
    metrics = Metrics()
    watcher = IndexWatcher(searcher)
    sc = config.serving
    max_upload = sc.max_upload_bytes
    token = admin_token if admin_token is not None else admin_token_from_env()
    gate = QueryGate(sc.max_concurrent_queries, sc.max_queued_queries, sc.queue_timeout_s)

    def parse_filters(raw: Any) -> dict[str, Any] | None:
        return _parse_filters(raw, sc.max_json_depth, sc.max_json_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not searcher.ready:
            outcome = await run_in_threadpool(searcher.reload, version)
            if outcome.status != "loaded":
                log.warning("starting without an index (not ready): %s", outcome.reason)
        if watch and version is None:
            watcher.start()
        try:
            yield
        finally:
            watcher.stop()

    app = FastAPI(title="Catalog visual search",
                  description="Which catalog products look like this photo?",
                  version="1", lifespan=lifespan)
    app.state.searcher = searcher
    app.state.metrics = metrics
    app.state.watcher = watcher
    app.state.query_gate = gate
    app.state.admin_token_set = token is not None

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            response = _error_response(500, "internal", "internal error")
        headers = response.headers
        headers["x-content-type-options"] = "nosniff"
        if "content-security-policy" not in headers:
            headers["content-security-policy"] = (DOCS_CSP if request.url.path in _DOCS_PATHS
                                                  else PAGE_CSP)
        headers.setdefault("referrer-policy", "no-referrer")
        headers.setdefault("x-frame-options", "DENY")
        route = request.scope.get("route")
        route_path = getattr(route, "path", None) or "(unmatched)"
        metrics.observe(route_path, request.method, response.status_code,
                        time.perf_counter() - started)
        if response.status_code >= 400:
            metrics.error(route_path, response.headers.get("x-error-reason",
                                                           str(response.status_code)))
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        response = _error_response(e.status, e.reason, e.message)
        response.headers["x-error-reason"] = e.reason
        for name, value in e.headers.items():
            response.headers[name] = value
        return response

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
                             for err in e.errors())
        fields = {str(err.get("loc", ("",))[-1]) for err in e.errors()}
        reason = ("bad_k" if fields == {"k"} else "bad_filter" if fields == {"filters"}
                  else "bad_collapse" if fields == {"collapse"} else "bad_request")
        response = _error_response(422, reason, problems or "invalid request")
        response.headers["x-error-reason"] = reason
        return response

    def answer(results: SearchResults) -> dict[str, Any]:
        out = results.to_dict()
        for hit in out["results"]:
            uri = hit.pop("image_uri", None)  # internal storage paths stay internal
            hit["image_url"] = public_image_url(hit["image_id"], uri)
        return out

    def require_admin(request: Request) -> None:
        """401/403 unless the request carries the admin bearer token (when one is set)."""
        if token is None:
            return
        status = check_bearer(request.headers.get("authorization"), token)
        if status == 401:
            raise ApiError(401, "unauthorized", "this endpoint needs 'Authorization: Bearer "
                                                "<admin token>'",
                           headers={"WWW-Authenticate": 'Bearer realm="catalog-search"'})
        if status == 403:
            raise ApiError(403, "forbidden", "the admin token is wrong")

    async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await run_in_threadpool(fn, *args, **kwargs)
        except (QueryError, NotReadyError) as e:
            raise _api_error(e) from None

    @app.post("/v1/search", summary="Search by photo (multipart) or by vector (JSON)",
              openapi_extra=_SEARCH_OPENAPI)
    async def search(request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            await _read_body_limited(request, max_upload + _MULTIPART_OVERHEAD)
            try:
                form = await request.form(max_files=1, max_fields=16,
                                          max_part_size=max_upload + 1)
            except Exception as e:  # MultiPartException and malformed bodies
                raise ApiError(422, "bad_multipart", f"cannot parse the form: {e}") from None
            upload = form.get("image")
            text, text_weight = _parse_text(form.get("text")), _parse_weight(
                form.get("text_weight"))
            if upload is None and text is not None:  # text-only query
                results = await call(searcher.search_text, text, _parse_k(form.get("k")),
                                     parse_filters(form.get("filters")),
                                     _parse_bool(form.get("collapse"), "collapse"))
                return answer(results)
            if not isinstance(upload, UploadFile):
                raise ApiError(422, "missing_image", "multipart field 'image' (a file) is "
                                                     "required (or 'text' alone)")
            data = await upload.read()
            if len(data) > max_upload:
                raise ApiError(413, "too_large", f"image is {len(data)} bytes; the limit is "
                                                 f"{max_upload}")
            k = _parse_k(form.get("k"))
            filters = parse_filters(form.get("filters"))
            collapse = _parse_bool(form.get("collapse"), "collapse")
            async with gate.slot():  # bounds the memory of concurrent decodes + embeds
                results = await call(searcher.search_image, data, k, filters, collapse, text,
                                     text_weight)
        elif content_type == "application/json":
            body = await _read_body_limited(request, sc.max_json_bytes)
            payload = await run_in_threadpool(_parse_json_body, body, sc.max_json_depth)
            if not isinstance(payload, dict) or not ("vector" in payload or "text" in payload):
                raise ApiError(422, "bad_vector",
                               'JSON body must be an object with "vector" and/or "text"')
            unknown = set(payload) - {"vector", "k", "filters", "collapse", "text", "text_weight"}
            if unknown:
                raise ApiError(422, "bad_request", f"unknown fields: {', '.join(sorted(unknown))}")
            k = _parse_k(payload.get("k"))
            filters = parse_filters(payload.get("filters"))
            collapse = _parse_bool(payload.get("collapse"), "collapse")
            text, text_weight = _parse_text(payload.get("text")), _parse_weight(
                payload.get("text_weight"))
            if "vector" not in payload:  # text-only query
                if text is None:
                    raise ApiError(422, "bad_text", '"text" must be a non-empty string')
                return answer(await call(searcher.search_text, text, k, filters, collapse))
            vector = payload["vector"]
            if not isinstance(vector, list) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector):
                raise ApiError(422, "bad_vector", "vector must be a list of numbers")
            if any(isinstance(x, int) and not -2 ** 128 < x < 2 ** 128 for x in vector):
                raise ApiError(422, "bad_vector", "vector has a number too large for float32")
            results = await call(searcher.search_vector, vector, k, filters, collapse, text,
                                 text_weight)
        else:
            raise ApiError(415, "unsupported_media_type",
                           "send multipart/form-data with an 'image' file, or application/json "
                           "with a 'vector'")
        return answer(results)

    @app.get("/v1/products/{product_id}/similar", summary='"More like this" for a product')
    async def similar(product_id: str, k: int | None = Query(None),
                      filters: str | None = Query(None, description="JSON object"),
                      collapse: bool = Query(True),
                      text_weight: str | None = Query(
                          None, description="weight of title similarity, 0..1 (default "
                                            "fusion.similar_text_weight)")) -> dict[str, Any]:
        results = await call(searcher.similar_to, product_id=product_id, k=k,
                             filters=parse_filters(filters), collapse=collapse,
                             text_weight=_parse_weight(text_weight))
        return answer(results)

    @app.get("/v1/images/{image_id:path}/similar",
             summary='"More like this" for a catalog image')
    async def similar_image(image_id: str, k: int | None = Query(None),
                            filters: str | None = Query(None, description="JSON object"),
                            collapse: bool = Query(True)) -> dict[str, Any]:
        results = await call(searcher.similar_to, image_id=image_id, k=k,
                             filters=parse_filters(filters), collapse=collapse)
        return answer(results)

    @app.get("/v1/images/{image_id:path}", summary="A catalog image of the loaded index",
             response_class=Response)
    async def image(image_id: str) -> Response:
        """The image's bytes, as the type they show (JPEG/PNG/GIF/WebP), never guessed from a
        name. Catalog images at http(s) URLs are not fetched by the server: search results
        give their URL as image_url for the client to load (404 reason remote_image here)."""
        try:
            idx = searcher.current
        except NotReadyError as e:
            raise _api_error(e) from None
        uri = idx.image_uri(image_id)
        if uri is None:
            raise ApiError(404, "unknown_image", f"image {json.dumps(image_id)[:200]} is not in "
                                                 f"index version {idx.version}")
        if uri[:8].lower().startswith(("http://", "https://")):
            raise ApiError(404, "remote_image",
                           "this catalog image is hosted at an http(s) URL, which the server "
                           "does not fetch; search results give that URL as image_url")
        from pipelines.core import filesystem as fs
        try:
            data = await run_in_threadpool(fs.read_bytes, uri, config.fetch.max_bytes)
        except Exception as e:
            log.warning("image %s: cannot read %s: %s", image_id, uri, e)
            raise ApiError(404, "image_unavailable",
                           "this catalog image cannot be read from storage") from None
        media = sniff_image_type(data[:16])
        if media is None:
            log.warning("image %s: %s is not a JPEG/PNG/GIF/WebP file: not served", image_id, uri)
            raise ApiError(404, "unsupported_image_type",
                           "this catalog file is not a JPEG, PNG, GIF or WebP image and is not "
                           "served")
        return Response(data, media_type=media,
                        headers={"cache-control": "public, max-age=3600",
                                 "content-security-policy": IMAGE_CSP,
                                 "content-disposition": "inline"})

    @app.post("/v1/reload", summary="Check LATEST now and load it if it changed",
              responses={401: {"description": "admin token missing (when one is set)"},
                         403: {"description": "admin token wrong"},
                         409: {"description": "the version was refused (reason in the body)"}})
    async def reload(request: Request,
                     force: bool = Query(False, description="retry a version refused before "
                                                            "even if its files did not change")
                     ) -> JSONResponse:
        require_admin(request)
        outcome = await run_in_threadpool(searcher.reload, None, force)
        status = 409 if outcome.status == "refused" else 200
        return JSONResponse(outcome.to_dict(), status_code=status,
                            headers={"x-error-reason": "refused"} if status == 409 else None)

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="An index version is loaded")
    async def readyz() -> JSONResponse:
        idx = searcher.loaded
        if idx is None:
            return JSONResponse({"ready": False, "version": None}, status_code=503,
                                headers={"x-error-reason": "not_ready"})
        return JSONResponse({"ready": True, **idx.describe()})

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(searcher),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
