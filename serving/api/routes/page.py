"""GET /: the search page (serving/static/, mounted at /static by serving.app).

GET /docs, /redoc: 404 naming /openapi.json. FastAPI's pages are switched off (they load
Swagger UI / ReDoc from a CDN: blank offline, and not allowed by the page CSP)."""
from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse

from serving.api.errors import error_response

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "static")

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(os.path.join(STATIC_DIR, "index.html"))


@router.get("/docs")
@router.get("/redoc")
async def no_docs_page() -> JSONResponse:
    return error_response(404, "no_docs_page", "this service has no API docs page (it would "
                          "load Swagger UI from a CDN); its OpenAPI schema is at /openapi.json")
