"""Read catalog manifests (CSV, JSONL, Parquet) into validated rows.

Contract (../shared/DESIGN.md): one row per image; required product_id and
image_uri; optional image_id (default = product_id), title, category, updated_at and
any other columns, carried through as metadata. A relative image_uri is resolved
against the manifest's folder, so a catalog folder can be moved as a whole.

Rows are plain dicts (cheap to pickle between Beam workers):
    {"image_id", "product_id", "image_uri", "metadata": {...}, "source": "file:line",
     "order": [manifest_index, row_index], "error": None | (reason, message)}
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Iterator

from pipelines import filesystem as fs

REQUIRED = ("product_id", "image_uri")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
           ".parquet": "parquet"}


class ManifestError(ValueError):
    """A manifest file cannot be read at all (missing, unreadable, wrong format, no header)."""


def manifest_format(uri: str) -> str:
    ext = os.path.splitext(uri.lower())[1]
    if ext not in FORMATS:
        raise ManifestError(f"{uri}: unknown manifest format {ext or '(no extension)'!r}; "
                            f"use one of {', '.join(sorted(FORMATS))}")
    return FORMATS[ext]


def expand_manifests(patterns: list[str]) -> list[str]:
    """Manifest URIs (globs allowed) -> existing files, in the order given; fails fast."""
    if not patterns:
        raise ManifestError("no manifest given")
    uris: list[str] = []
    for pattern in patterns:
        if pattern.startswith(("http://", "https://")):
            uris.append(pattern)
            continue
        matched = fs.match(pattern) if any(c in pattern for c in "*?[") else (
            [pattern] if fs.exists(pattern) else [])
        if not matched:
            raise ManifestError(f"manifest {pattern} does not exist")
        for uri in matched:
            manifest_format(uri)
            uris.append(uri)
    return uris


def _read_manifest_bytes(uri: str) -> bytes:
    if uri.startswith(("http://", "https://")):
        from pipelines.fetch import fetch_bytes
        from pipelines.config import FetchConfig
        return fetch_bytes(uri, FetchConfig(max_bytes=2_000_000_000))
    try:
        return fs.read_bytes(uri)
    except Exception as e:
        raise ManifestError(f"cannot read manifest {uri}: {e}") from e


def _raw_records(uri: str, data: bytes) -> Iterator[tuple[int, Any]]:
    """(line/row number, raw record) pairs; a record that cannot be parsed is a str error."""
    fmt = manifest_format(uri)
    if fmt == "csv":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ManifestError(f"{uri}: not UTF-8 text: {e}") from e
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames:
            raise ManifestError(f"{uri}: empty CSV (no header row)")
        missing = [c for c in REQUIRED if c not in reader.fieldnames]
        if missing:
            raise ManifestError(f"{uri}: CSV header lacks required column(s) {missing}; "
                                f"found {reader.fieldnames}")
        for record in reader:
            if None in record:  # more fields than the header names
                yield reader.line_num, f"row has {len(record) - 1 + len(record[None])} fields, " \
                                       f"header has {len(reader.fieldnames)}"
            else:
                yield reader.line_num, record
    elif fmt == "jsonl":
        for n, line in enumerate(data.decode("utf-8-sig", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, f"invalid JSON: {e}"
                continue
            yield n, record if isinstance(record, dict) else "a JSON line must be an object"
    else:
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as e:
            raise ManifestError(f"{uri}: not a readable Parquet file: {e}") from e
        missing = [c for c in REQUIRED if c not in table.column_names]
        if missing:
            raise ManifestError(f"{uri}: Parquet schema lacks required column(s) {missing}")
        for n, record in enumerate(table.to_pylist(), 1):
            yield n, record


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(value).strip()


def _resolve_uri(image_uri: str, manifest_uri: str) -> str:
    if "://" in image_uri or os.path.isabs(image_uri):
        return image_uri
    return fs.join(os.path.dirname(manifest_uri) or ".", image_uri) if "://" in manifest_uri \
        else os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(manifest_uri)),
                                           image_uri))


def validate_record(record: Any, uri: str, line: int, manifest_index: int) -> dict[str, Any]:
    """A raw record -> a row dict; invalid rows carry `error` = (reason, message)."""
    source = f"{uri}:{line}"
    row: dict[str, Any] = {"image_id": "", "product_id": "", "image_uri": "", "metadata": {},
                           "source": source, "order": [manifest_index, line], "error": None}
    if isinstance(record, str):
        row["error"] = ("invalid_row", f"{source}: {record}")
        return row
    product_id = _text(record.get("product_id"))
    image_uri = _text(record.get("image_uri"))
    image_id = _text(record.get("image_id")) or product_id
    metadata = {k: v for k, v in record.items()
                if k not in ("product_id", "image_uri", "image_id") and v not in (None, "")}
    row.update(image_id=image_id, product_id=product_id, metadata=_jsonable(metadata))
    if not product_id:
        row["error"] = ("missing_product_id", f"{source}: product_id is empty")
    elif not image_uri:
        row["error"] = ("missing_image_uri", f"{source}: image_uri is empty")
    else:
        row["image_uri"] = _resolve_uri(image_uri, uri)
    return row


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def read_rows(manifest_index: int, uri: str) -> Iterator[dict[str, Any]]:
    """Every record of one manifest as a row dict (invalid ones with `error` set)."""
    data = _read_manifest_bytes(uri)
    for line, record in _raw_records(uri, data):
        yield validate_record(record, uri, line, manifest_index)


def check_manifest(uri: str) -> int:
    """Read a whole manifest before a job starts; returns its row count, raises ManifestError."""
    return sum(1 for _ in read_rows(0, uri))
