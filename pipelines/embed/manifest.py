"""Read catalog manifests (CSV, JSONL, Parquet) into validated rows.

Contract (../shared/DESIGN.md): one row per image; required product_id and
image_uri; optional image_id (default = product_id), title, category, updated_at and
any other columns, carried through as metadata. A relative image_uri is resolved
against the manifest's folder, so a catalog folder can be moved as a whole.

The formats themselves (CSV, JSON Lines, Parquet; the row size limits) are
pipelines/embed/manifest_formats.py's. Rows are plain dicts (cheap to pickle between Beam workers):
    {"image_id", "product_id", "image_uri", "metadata": {...}, "source": "file:line",
     "order": [manifest_index, row_index], "error": None | (reason, message)}
"""
from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import os
import re
from typing import Any, Iterator

from pipelines.core import filesystem as fs
from pipelines.embed.manifest_formats import (DEFAULT_LIMITS, MAX_ID_LENGTH, REQUIRED,
                                             ManifestError, ManifestLimits, TooLarge,
                                             manifest_format, raw_records, read_manifest_bytes)

ID_FIELDS = ("product_id", "image_uri", "image_id")
TEXT_FIELDS = ("title", "category", "updated_at")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")   # in ids or image_uri: dead letter invalid_characters


def expand_manifests(patterns: list[str]) -> list[str]:
    """Manifest URIs (globs allowed) -> existing files, in the order given; fails fast."""
    if not patterns:
        raise ManifestError("no manifest given")
    uris: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ManifestError(f"manifest URI must be a non-empty string, got {pattern!r}")
        if pattern.startswith(("http://", "https://")):
            manifest_format(pattern.split("?", 1)[0])
            uris.append(pattern)
            continue
        try:
            pattern = fs.check_supported(pattern, "manifest")
        except fs.UnsupportedUriError as e:
            raise ManifestError(str(e)) from e
        matched = fs.match(pattern) if any(c in pattern for c in "*?[") else (
            [pattern] if fs.exists(pattern) else [])
        if not matched:
            raise ManifestError(f"manifest {pattern} does not exist")
        for uri in matched:
            if fs.is_local(uri) and os.path.isdir(uri):
                raise ManifestError(f"manifest {uri} is a directory, not a manifest file")
            manifest_format(uri)
            uris.append(uri)
    return uris


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(value).strip()


def _type_error(name: str, value: Any) -> str | None:
    """Why a manifest field's value has the wrong type, or None when it is acceptable.

    product_id / image_id: text (or an integer id); image_uri: text; title / category /
    updated_at: a scalar (text, number, date); other columns: anything JSON can hold.
    Bytes are never accepted (they would be stringified as b'...').
    """
    if value is None:
        return None
    kind = type(value).__name__
    if name == "image_uri":  # a number is no location: never turned into a path
        return None if isinstance(value, str) else (
            f"column image_uri holds a {kind}; expected text (a path or URI)")
    if name in ID_FIELDS:
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return None
        return f"column {name} holds a {kind}; expected text"
    if name in TEXT_FIELDS:
        if isinstance(value, (str, int, float, decimal.Decimal, dt.date, dt.datetime,
                              dt.time)) and not isinstance(value, bool):
            return None
        return f"column {name} holds a {kind}; expected text, a number or a date"
    return _nested_bytes(name, value)


def _nested_bytes(name: str, value: Any, depth: int = 0) -> str | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"column {name} holds binary data (bytes); expected text or JSON values"
    if depth > 32:
        return f"column {name} is nested more than 32 levels deep"
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        return None
    for item in items:
        problem = _nested_bytes(name, item, depth + 1)
        if problem:
            return problem
    return None


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def resolve_uri(image_uri: str, manifest_uri: str) -> str:
    """An image URI as written in a manifest, relative ones against the manifest's folder."""
    if "://" in image_uri or os.path.isabs(image_uri) or image_uri[:5].lower() == "data:":
        return image_uri  # absolute; data: URIs are refused by the fetch (unsupported_scheme)
    return fs.join(os.path.dirname(manifest_uri) or ".", image_uri) if "://" in manifest_uri \
        else os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(manifest_uri)),
                                           image_uri))


def unreachable_id(value: str) -> str | None:
    """Why an id cannot be one URL path segment of the service's routes
    (`/v1/products/{id}/similar`, `/v1/images/{id}`), or None. A `/` (also sent as %2F:
    servers decode it before routing) splits the segment; `.` and `..` are removed by
    every client that normalises paths (RFC 3986 dot segments), encoded or not."""
    if "/" in value:
        return ("contains '/', which no URL path segment can carry (the service's "
                "/v1/products/{id} and /v1/images/{id} routes); use ids without '/'")
    if value in (".", ".."):
        return ("is a dot segment, which clients remove from URL paths; use another id")
    return None


def validate_record(record: Any, uri: str, line: int, manifest_index: int) -> dict[str, Any]:
    """A raw record -> a row dict; invalid rows carry `error` = (reason, message)."""
    source = f"{uri}:{line}"
    row: dict[str, Any] = {"image_id": "", "product_id": "", "image_uri": "", "metadata": {},
                           "source": source, "order": [manifest_index, line], "error": None}
    if isinstance(record, str):
        row["error"] = ("invalid_row", f"{source}: {record}")
        return row
    if isinstance(record, TooLarge):
        row.update(image_id=record.image_id or record.product_id, product_id=record.product_id)
        row["error"] = ("too_large", f"{source}: {record.message}")
        return row
    for name, value in record.items():
        problem = _type_error(str(name), value)
        if problem:
            row["image_id"] = _text(record.get("image_id")) if isinstance(
                record.get("image_id"), str) else ""
            row["product_id"] = _text(record.get("product_id")) if isinstance(
                record.get("product_id"), str) else ""
            row["error"] = ("wrong_type", f"{source}: {problem}")
            return row
    product_id = _text(record.get("product_id"))
    image_uri = _text(record.get("image_uri"))
    image_id = _text(record.get("image_id")) or product_id
    metadata = {k: v for k, v in record.items()
                if k not in ID_FIELDS and not _missing(v)}
    row.update(image_id=image_id, product_id=product_id, metadata=_jsonable(metadata))
    bad_chars = [n for n, v in (("product_id", product_id), ("image_id", image_id),
                                ("image_uri", image_uri)) if _CONTROL.search(v)]
    if bad_chars:
        row.update(image_id=_CONTROL.sub("?", image_id)[:64],
                   product_id=_CONTROL.sub("?", product_id)[:64])
        row["error"] = ("invalid_characters", f"{source}: {bad_chars[0]} contains control "
                                              "characters (NUL, newline, ...)")
        return row
    too_long = [(n, len(v)) for n, v in (("product_id", product_id), ("image_id", image_id))
                if len(v) > MAX_ID_LENGTH]
    if too_long:
        row.update(image_id=image_id[:64] + "...", product_id=product_id[:64] + "...")
        name, length = too_long[0]
        row["error"] = ("id_too_long", f"{source}: {name} is {length} characters long; at "
                                       f"most {MAX_ID_LENGTH} are allowed")
    elif unreachable_id(product_id) or unreachable_id(image_id):
        name, value = (("product_id", product_id) if unreachable_id(product_id)
                       else ("image_id", image_id))
        row["error"] = ("unreachable_id", f"{source}: {name} {value[:64]!r} {unreachable_id(value)}")
    elif not product_id:
        row["error"] = ("missing_product_id", f"{source}: product_id is empty")
    elif not image_uri:
        row["error"] = ("missing_image_uri", f"{source}: image_uri is empty")
    else:
        row["image_uri"] = resolve_uri(image_uri, uri)
    return row


def _jsonable(value: Any) -> Any:
    """Plain JSON values (dates and decimals as text; NaN/inf as null)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.loads(json.dumps(clean(value), default=str))


def read_rows(manifest_index: int, uri: str, limits: ManifestLimits = DEFAULT_LIMITS
              ) -> Iterator[dict[str, Any]]:
    """Every record of one manifest as a row dict (invalid ones with `error` set)."""
    data = read_manifest_bytes(uri)
    for line, record in raw_records(uri, data, limits):
        yield validate_record(record, uri, line, manifest_index)


def check_manifest(uri: str, limits: ManifestLimits = DEFAULT_LIMITS) -> int:
    """Read a whole manifest before a job starts; returns its row count, raises ManifestError.

    Besides unreadable files, refuses a manifest none of whose records can be parsed (every
    JSON line invalid), or none of whose records name a required field (a JSONL file of
    other objects): such a file is not a catalog manifest, and is better refused whole than
    dead-lettered row by row.
    """
    rows = unparsable = without_required = 0
    first_error = None
    for line, record in raw_records(uri, read_manifest_bytes(uri), limits):
        rows += 1
        if isinstance(record, str):
            unparsable += 1
            first_error = first_error or f"line {line}: {record}"
        elif not isinstance(record, TooLarge) and not any(k in record for k in REQUIRED):
            without_required += 1
    if rows and unparsable == rows:
        raise ManifestError(f"{uri}: no record can be parsed ({rows} tried); first error: "
                            f"{first_error}")
    if rows and unparsable + without_required == rows:
        raise ManifestError(f"{uri}: no record has the required fields {list(REQUIRED)}")
    return rows
