"""GET /: the search page (serving/static/, mounted at /static by serving.app)."""
from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "static")

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(os.path.join(STATIC_DIR, "index.html"))
