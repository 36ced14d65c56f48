"""Security headers of every answer: nosniff, a Content-Security-Policy (the page's or a
catalog image's), no referrer, no framing."""
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


def add_security_headers(response: Response) -> None:
    """The headers every answer carries (a route's own CSP, e.g. IMAGE_CSP, is kept)."""
    headers = response.headers
    headers["x-content-type-options"] = "nosniff"
    if "content-security-policy" not in headers:
        headers["content-security-policy"] = PAGE_CSP
    headers.setdefault("referrer-policy", "no-referrer")
    headers.setdefault("x-frame-options", "DENY")
