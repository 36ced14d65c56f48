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

import collections
import csv
import datetime as dt
import decimal
import io
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core import filesystem as fs
from pipelines.core.errors import BadInputError

REQUIRED = ("product_id", "image_uri")
ID_FIELDS = ("product_id", "image_uri", "image_id")
TEXT_FIELDS = ("title", "category", "updated_at")
MAX_ID_LENGTH = 1024          # longer product_id / image_id: dead letter `id_too_long`
MAX_MANIFEST_BYTES = 2_000_000_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")   # in ids or image_uri: dead letter invalid_characters
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
           ".parquet": "parquet"}


class ManifestError(BadInputError):
    """A manifest file cannot be read at all (missing, unreadable, wrong format, no header)."""


@dataclass(frozen=True)
class ManifestLimits:
    """What one manifest row may decode to: a row with a field over
    `max_cell_bytes` or fields over `max_row_bytes` in all (UTF-8 bytes of text, bytes of
    binary, the JSON of nested values) is dead-lettered `manifest/too_large`; Parquet is
    decoded `batch_rows` rows at a time, text columns as dictionaries, so a value a
    dictionary repeats is measured, not copied, until its row is accepted."""
    max_cell_bytes: int = 65_536
    max_row_bytes: int = 262_144
    batch_rows: int = 256

    @classmethod
    def of(cls, config: Any) -> "ManifestLimits":
        """The limits `config.embed` sets."""
        return cls(max_cell_bytes=config.embed.max_cell_bytes,
                   max_row_bytes=config.embed.max_row_bytes)


DEFAULT_LIMITS = ManifestLimits()


@dataclass(frozen=True)
class TooLarge:
    """A raw record over the limits: never decoded further; its ids when they are small."""
    message: str
    product_id: str = ""
    image_id: str = ""


def _ensure_csv_field_limit() -> None:
    """Python's csv module refuses fields over 128 KiB and fails the whole file; the
    manifest text is in memory already (MAX_MANIFEST_BYTES), so any field fits, and
    oversize rows are dead-lettered by ManifestLimits instead. (Process-wide setting.)"""
    if csv.field_size_limit() < MAX_MANIFEST_BYTES:
        csv.field_size_limit(MAX_MANIFEST_BYTES)


def _text_bytes(value: str, limit: int) -> int:
    """UTF-8 size of `value` (exact when it may exceed `limit`, else its length)."""
    n = len(value)
    return n if n * 4 <= limit else len(value.encode("utf-8", "surrogatepass"))


def _cell_bytes(value: Any, limit: int) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return _text_bytes(value, limit)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, (dict, list, tuple)):
        return len(json.dumps(value, default=str))
    return 8


def _oversize(record: dict[str, Any], limits: ManifestLimits) -> str | None:
    """Why a decoded record is over the limits, or None."""
    total = 0
    for name, value in record.items():
        size = _cell_bytes(value, limits.max_cell_bytes)
        if size > limits.max_cell_bytes:
            return (f"column {str(name)[:40]} holds {size} bytes; at most "
                    f"{limits.max_cell_bytes} per field (embed.max_cell_bytes)")
        total += size
    if total > limits.max_row_bytes:
        return (f"the row holds {total} bytes; at most {limits.max_row_bytes} per row "
                "(embed.max_row_bytes)")
    return None


def _small_id(value: Any) -> str:
    return value.strip() if isinstance(value, str) and len(value) <= MAX_ID_LENGTH else ""


def _too_large(record: dict[str, Any], message: str) -> TooLarge:
    return TooLarge(message, _small_id(record.get("product_id")),
                    _small_id(record.get("image_id")))


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


def _read_manifest_bytes(uri: str) -> bytes:
    from pipelines.core.config import FetchConfig
    from pipelines.embed.fetch import FetchError, fetch_bytes, read_local_file
    try:
        if uri.startswith(("http://", "https://")):
            return fetch_bytes(uri, FetchConfig(max_bytes=MAX_MANIFEST_BYTES, deadline_s=600.0))
        if fs.is_local(uri):  # regular files only: a FIFO or device must not block the job
            return read_local_file(fs.normalize(uri), MAX_MANIFEST_BYTES)
        return fs.read_bytes(uri)
    except FetchError as e:
        raise ManifestError(f"cannot read manifest {uri}: {e} ({e.reason})") from e
    except Exception as e:
        raise ManifestError(f"cannot read manifest {uri}: {type(e).__name__}: {e}") from e


def _raw_records(uri: str, data: bytes, limits: ManifestLimits = DEFAULT_LIMITS
                 ) -> Iterator[tuple[int, Any]]:
    """(line/row number, raw record) pairs; a record that cannot be parsed is a str error,
    one over `limits` a TooLarge."""
    fmt = manifest_format(uri)
    if fmt == "csv":
        yield from _csv_records(uri, data, limits)
    elif fmt == "jsonl":
        yield from _jsonl_records(uri, data, limits)
    else:
        yield from _parquet_records(uri, data, limits)


def _csv_records(uri: str, data: bytes, limits: ManifestLimits) -> Iterator[tuple[int, Any]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{uri}: not UTF-8 text: {e}") from e
    _ensure_csv_field_limit()
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        fieldnames = reader.fieldnames
        if not fieldnames:
            raise ManifestError(f"{uri}: empty CSV (no header row)")
        duplicated = sorted(n for n, c in collections.Counter(fieldnames).items() if c > 1)
        if duplicated:  # DictReader would keep the last column of a name silently
            raise ManifestError(f"{uri}: CSV header names column(s) more than once: "
                                f"{[n[:40] for n in duplicated[:20]]}")
        missing = [c for c in REQUIRED if c not in fieldnames]
        if missing:
            raise ManifestError(f"{uri}: CSV header lacks required column(s) {missing}; "
                                f"found {[n[:40] for n in fieldnames[:20]]}")
        for record in reader:
            if None in record:  # more fields than the header names
                yield reader.line_num, (f"row has {len(record) - 1 + len(record[None])} "
                                        f"fields, header has {len(fieldnames)}")
                continue
            problem = _oversize(record, limits)
            yield reader.line_num, (_too_large(record, problem) if problem else record)
    except csv.Error as e:  # a NUL byte, ...
        raise ManifestError(f"{uri}: not a readable CSV file near line "
                            f"{reader.line_num}: {e}") from e


def _jsonl_records(uri: str, data: bytes, limits: ManifestLimits
                   ) -> Iterator[tuple[int, Any]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{uri}: not UTF-8 text: {e}") from e
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        size = _text_bytes(line, limits.max_row_bytes)
        if size > limits.max_row_bytes:  # not parsed: its objects would be larger still
            yield n, TooLarge(f"the line holds {size} bytes; at most {limits.max_row_bytes} "
                              "per row (embed.max_row_bytes)")
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            yield n, f"invalid JSON: {str(e)[:200]}"
            continue
        if not isinstance(record, dict):
            yield n, (f"a JSON line must be an object, got {type(record).__name__} "
                      "(the manifest format is JSON Lines: one object per line)")
            continue
        problem = _oversize(record, limits)
        yield n, (_too_large(record, problem) if problem else record)


def _column_sizes(column: pa.Array, limit: int) -> np.ndarray | None:
    """Bytes each row of a column decodes to, without decoding it: text and binary (also
    dictionary-encoded: the dictionary's lengths taken by index), fixed-width types 8;
    None for nested types (measured after decoding, row by row)."""
    typ = column.type
    if pa.types.is_dictionary(typ):
        value_type = typ.value_type
        if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)
                or pa.types.is_binary(value_type) or pa.types.is_large_binary(value_type)):
            return None
        lengths = pc.binary_length(column.dictionary)
        sizes = pc.take(lengths, column.indices)
    elif (pa.types.is_string(typ) or pa.types.is_large_string(typ)
          or pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
        sizes = pc.binary_length(column)
    elif pa.types.is_nested(typ):
        return None
    else:
        return np.full(len(column), 8, dtype=np.int64)
    return np.asarray(pc.fill_null(sizes, 0).to_numpy(zero_copy_only=False), dtype=np.int64)


def _parquet_records(uri: str, data: bytes, limits: ManifestLimits
                     ) -> Iterator[tuple[int, Any]]:
    try:
        schema = pq.read_schema(pa.BufferReader(data))
        text_columns = [f.name for f in schema if (
            pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
            or pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))]
        parquet = pq.ParquetFile(pa.BufferReader(data), read_dictionary=text_columns)
    except Exception as e:
        raise ManifestError(f"{uri}: not a readable Parquet file: {e}") from e
    names = schema.names
    duplicated = sorted(n for n, c in collections.Counter(names).items() if c > 1)
    if duplicated:
        raise ManifestError(f"{uri}: Parquet schema names column(s) more than once: "
                            f"{[n[:40] for n in duplicated[:20]]}")
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise ManifestError(f"{uri}: Parquet schema lacks required column(s) {missing}")
    n = 0
    batches = parquet.iter_batches(batch_size=limits.batch_rows)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # a corrupt row group
            raise ManifestError(f"{uri}: not a readable Parquet file near row {n + 1}: "
                                f"{e}") from e
        yield from _batch_records(batch, n, limits)
        n += batch.num_rows


def _batch_id(batch: pa.RecordBatch, name: str, i: int) -> str:
    """Row `i`'s id column `name` when it is small text (else "")."""
    if name not in batch.schema.names:
        return ""
    cell = batch.column(name).slice(i, 1)
    sizes = _column_sizes(cell, MAX_ID_LENGTH)
    if sizes is None or int(sizes[0]) > MAX_ID_LENGTH:
        return ""
    return _small_id(cell.to_pylist()[0])


def _batch_records(batch: pa.RecordBatch, first: int, limits: ManifestLimits
                   ) -> Iterator[tuple[int, Any]]:
    """The records of one Parquet batch; a row over the limits is never decoded whole."""
    rows = batch.num_rows
    total = np.zeros(rows, dtype=np.int64)
    reason: list[str | None] = [None] * rows
    for name, column in zip(batch.schema.names, batch.columns):
        sizes = _column_sizes(column, limits.max_cell_bytes)
        if sizes is None:
            continue
        total += sizes
        for j in np.flatnonzero(sizes > limits.max_cell_bytes).tolist():
            reason[j] = reason[j] or (
                f"column {name[:40]} holds {int(sizes[j])} bytes; at most "
                f"{limits.max_cell_bytes} per field (embed.max_cell_bytes)")
    for j in np.flatnonzero(total > limits.max_row_bytes).tolist():
        reason[j] = reason[j] or (f"the row holds {int(total[j])} bytes; at most "
                                  f"{limits.max_row_bytes} per row (embed.max_row_bytes)")
    for i in range(rows):  # plain ints (numpy's are not the row numbers' type)
        if reason[i] is not None:
            ids = {c: _batch_id(batch, c, i) for c in ("product_id", "image_id")}
            yield first + i + 1, _too_large(ids, str(reason[i]))
            continue
        (record,) = batch.slice(i, 1).to_pylist()  # nested cells are measured decoded
        problem = _oversize(record, limits)
        yield first + i + 1, (_too_large(record, problem) if problem else record)


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
    data = _read_manifest_bytes(uri)
    for line, record in _raw_records(uri, data, limits):
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
    for line, record in _raw_records(uri, _read_manifest_bytes(uri), limits):
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
