"""Reading requests safely: bodies under a byte limit, JSON nesting checked before parsing
(json.loads recurses), and the query values of forms, query strings and JSON bodies
(k, filters, collapse, text, text_weight, group_by, max_per_group) with the reason a bad
one is answered with."""
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



def parse_k(raw: Any) -> int | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool):
        raise ApiError(422, "bad_k", f"k must be an integer, got {raw!r}")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():  # JSON 3.0 is an integer (JSON Schema)
        return int(raw)
    try:
        return int(str(raw).strip())
    except ValueError:
        raise ApiError(422, "bad_k", f"k must be an integer, got {raw!r}") from None


def parse_filters(raw: Any, max_depth: int = 8, max_bytes: int = 1_000_000
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


def parse_json_body(body: bytes, max_depth: int) -> Any:
    """A JSON request body: nesting checked first, then parsed; ApiError 422 with why."""
    check_json_depth(body, max_depth)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(422, "bad_json", f"body is not valid JSON: {e}") from None


def parse_text(raw: Any) -> str | None:
    """Query text from a form field or JSON (None when absent); length is checked later."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ApiError(422, "bad_text", "text must be a string")
    return raw


def parse_weight(raw: Any) -> float | None:
    """text_weight from a form field, query string or JSON: a number in [0, 1], refused
    even where it is not used (a text-only search), as the OpenAPI schema states."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool):
        raise ApiError(422, "bad_text_weight", f"text_weight must be a number, got {raw!r}")
    if isinstance(raw, (int, float)):
        value = float(raw)
    else:
        try:
            value = float(str(raw).strip())
        except ValueError:
            raise ApiError(422, "bad_text_weight",
                           f"text_weight must be a number, got {str(raw)[:40]!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN too
        raise ApiError(422, "bad_text_weight", f"text_weight must be a number in [0, 1], "
                                               f"got {value!r}")
    return value


def parse_group_by(raw: Any) -> str | None:
    """group_by (a metadata field name; whether the index has it is checked later)."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise ApiError(422, "bad_group_by", "group_by must be a metadata field name (a string)")
    return raw.strip()


def parse_max_per_group(raw: Any) -> int | None:
    """max_per_group from a form field, query string or JSON; range is checked later."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, float) and raw.is_integer():  # JSON 3.0 is an integer (JSON Schema)
        return int(raw)
    if isinstance(raw, bool) or isinstance(raw, float):
        raise ApiError(422, "bad_max_per_group", f"max_per_group must be an integer, "
                                                 f"got {raw!r}")
    if isinstance(raw, int):
        return raw
    try:
        return int(str(raw).strip())
    except ValueError:
        raise ApiError(422, "bad_max_per_group",
                       f"max_per_group must be an integer, got {str(raw)[:40]!r}") from None


def parse_bool(raw: Any, name: str, default: bool = True) -> bool:
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

