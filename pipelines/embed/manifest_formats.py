"""The manifest formats (CSV, JSON Lines, Parquet): a manifest's bytes as raw records,
each measured against ManifestLimits before it is decoded whole; validating a record
into a row is pipelines/embed/manifest.py's.
"""
from __future__ import annotations

import collections
import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core import filesystem as fs
from pipelines.core.errors import BadInputError

REQUIRED = ("product_id", "image_uri")
MAX_ID_LENGTH = 1024          # longer product_id / image_id: dead letter `id_too_long`
MAX_MANIFEST_BYTES = 2_000_000_000
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


def too_large(record: dict[str, Any], message: str) -> TooLarge:
    """The TooLarge of a record over the limits, with its ids when they are small."""
    return TooLarge(message, _small_id(record.get("product_id")),
                    _small_id(record.get("image_id")))


def manifest_format(uri: str) -> str:
    """"csv", "jsonl" or "parquet", by the file's extension (FORMATS); ManifestError else."""
    ext = os.path.splitext(uri.lower())[1]
    if ext not in FORMATS:
        raise ManifestError(f"{uri}: unknown manifest format {ext or '(no extension)'!r}; "
                            f"use one of {', '.join(sorted(FORMATS))}")
    return FORMATS[ext]


def read_manifest_bytes(uri: str) -> bytes:
    """A manifest's bytes (http(s), local regular files, FileSystems; at most
    MAX_MANIFEST_BYTES); ManifestError naming the file when it does not read."""
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


def raw_records(uri: str, data: bytes, limits: ManifestLimits = DEFAULT_LIMITS
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
            yield reader.line_num, (too_large(record, problem) if problem else record)
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
        yield n, (too_large(record, problem) if problem else record)


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
            yield first + i + 1, too_large(ids, str(reason[i]))
            continue
        (record,) = batch.slice(i, 1).to_pylist()  # nested cells are measured decoded
        problem = _oversize(record, limits)
        yield first + i + 1, (too_large(record, problem) if problem else record)
