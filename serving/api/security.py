"""Security headers of every answer: nosniff, a Content-Security-Policy (the page's, the
API docs' or a catalog image's), no referrer, no framing."""
from __future__ import annotations

from starlette.responses import Response

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
DOCS_PATHS = ("/docs", "/redoc", "/docs/oauth2-redirect")


def add_security_headers(path: str, response: Response) -> None:
    """The headers every answer carries (a route's own CSP, e.g. IMAGE_CSP, is kept)."""
    headers = response.headers
    headers["x-content-type-options"] = "nosniff"
    if "content-security-policy" not in headers:
        headers["content-security-policy"] = DOCS_CSP if path in DOCS_PATHS else PAGE_CSP
    headers.setdefault("referrer-policy", "no-referrer")
    headers.setdefault("x-frame-options", "DENY")
