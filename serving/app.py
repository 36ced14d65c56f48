"""HTTP search service (FastAPI): search by photo or vector, "more like this", a results page.

    app = create_app(index_root, config)          # uvicorn.run(app, host=..., port=...)

Endpoints (OpenAPI at /openapi.json, built by FastAPI from the pydantic models of
serving.api.schemas; no /docs or /redoc: FastAPI's pages load Swagger UI / ReDoc from a
CDN, which an offline deployment cannot reach and this CSP does not allow), one APIRouter
per area (serving.api.routes):
    search   POST /v1/search                  multipart (image file + k, filters, collapse,
                                              text, text_weight) or JSON {"vector": [...],
                                              "text": ..., "k": 10, "filters": {...}}
    catalog  GET  /v1/products/{id}/similar   "more like this" for a catalog product
             GET  /v1/images/{id}/similar     "more like this" for a catalog image
             GET  /v1/images/{image_id}       a catalog image of the loaded index (thumbnails)
    feedback POST /v1/feedback                {"query_id", "product_id"}: the product a shopper
                                              chose for a search answer, appended to the
                                              feedback log (serving.feedback_root; off: 404)
    admin    POST /v1/reload[?force=true]     check LATEST now (Airflow hand-off); 409 when
                                              refused; needs the admin bearer token when set
    health   GET  /healthz  /readyz  /metrics (Prometheus, prometheus_client)
    page     GET  /                           the search page (serving/static/)

Bad input never yields a 500: oversized uploads 413, undecodable images, bad k or
filters, too deeply nested JSON 422 with the reason, unknown products/images 404, no
index loaded yet 503, every decode slot busy 503 with Retry-After. Errors answer
`{"error": {"reason": ..., "message": ...}}` (serving.api.errors). Every response
carries `X-Content-Type-Options: nosniff` and a Content-Security-Policy
(serving.api.security); catalog images are served only as the image type their bytes
show (JPEG, PNG, GIF, WebP).
"""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, Sequence

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect

from pipelines.core.admin_token import admin_token_from_env
from pipelines.core.config import Config
from serving.api.errors import error_response, install_error_handlers
from serving.api.gate import QueryGate
from serving.api import openapi_limits
from serving.api.metrics import ServingMetrics
from serving.api.routes import admin, catalog, feedback, health, page, search
from serving.api.schemas import public_image_url
from serving.api.security import PAGE_CSP, add_security_headers
from serving.api.state import ServingState
from serving.feedback import Feedback
from serving.reload import IndexWatcher
from serving.searcher import CatalogSearcher

__all__ = ["create_app", "PAGE_CSP", "public_image_url"]

log = logging.getLogger(__name__)
#: The status a request the client aborted is counted with (nginx's "client closed request");
#: nothing is sent, the connection is gone.
CLIENT_CLOSED_REQUEST = 499


def create_app(index_root: str, config: Config, *, version: str | None = None,
               shard_ids: Sequence[int] | None = None, searcher: CatalogSearcher | None = None,
               watch: bool = True, admin_token: str | None = None) -> FastAPI:
    """The search service for the index under `index_root`.

    Loads LATEST (or `version`) at start-up (a failure leaves the service up but not
    ready: /readyz 503), and with `watch` a background watcher hot-reloads whenever
    LATEST changes. Pass `searcher` to serve an already opened CatalogSearcher.
    `admin_token` (default: from CATALOG_SEARCH_ADMIN_TOKEN / _FILE, see serving.api.state)
    guards the mutating endpoints; with none they are open.
    """
    searcher = searcher or CatalogSearcher(index_root, config=config, shard_ids=shard_ids)
    sc = config.serving
    gate = QueryGate(sc.max_concurrent_queries, sc.max_queued_queries, sc.queue_timeout_s)
    state = ServingState(searcher=searcher, config=config, gate=gate,
                         metrics=ServingMetrics(searcher, gate), watcher=IndexWatcher(searcher),
                         admin_token=admin_token if admin_token is not None
                         else admin_token_from_env(),
                         feedback=Feedback.from_config(sc))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not searcher.ready:
            outcome = await run_in_threadpool(searcher.reload, version)
            if outcome.status != "loaded":
                log.warning("starting without an index (not ready): %s", outcome.reason)
        if watch and version is None:
            state.watcher.start()
        try:
            yield
        finally:
            state.watcher.stop()

    app = FastAPI(title="Catalog visual search",
                  description="Which catalog products look like this photo?",
                  version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serving = state

    @app.middleware("http")
    async def observe(request: Request,
                      call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except ClientDisconnect:  # the client went away mid-request: no one to answer
            log.info("client disconnected during %s %s (counted as 499 client_disconnect)",
                     request.method, request.url.path)
            response = error_response(CLIENT_CLOSED_REQUEST, "client_disconnect",
                                      "the client closed the connection before the answer")
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            response = error_response(500, "internal", "internal error")
        add_security_headers(response)
        route = getattr(request.scope.get("route"), "path", None) or "(unmatched)"
        state.metrics.observe(route, request.method, response.status_code,
                              time.perf_counter() - started,
                              response.headers.get("x-error-reason"))
        return response

    install_error_handlers(app)
    for router in (search.router, catalog.router, feedback.router, admin.router, health.router,
                   page.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=page.STATIC_DIR), name="static")
    openapi_limits.install(app, config, admin_token=state.admin_token is not None)
    return app
