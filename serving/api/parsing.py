"""Reading requests safely: bodies under a byte limit, JSON nesting checked before parsing
(json.loads recurses). The values a request carries are validated by the request models
(serving.api.schemas)."""
from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request

from serving.api.errors import ApiError

# A JSON string (once escapes are removed) or one bracket: what the nesting check looks at.
_JSON_TOKENS = re.compile(rb'"[^"]*"|[\[\]{}]')


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



def parse_json_body(body: bytes, max_depth: int) -> Any:
    """A JSON request body: nesting checked first, then parsed; ApiError 422 with why."""
    check_json_depth(body, max_depth)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(422, "bad_json", f"body is not valid JSON: {e}") from None


async def read_body_limited(request: Request, limit: int) -> bytes:
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

