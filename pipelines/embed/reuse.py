"""Reused rows of the embed job: rows whose image did not change since the previous
snapshot are copied from it (vectors in Arrow, never re-embedded) instead of embedded.

`ReadPreviousRows` reads a previous snapshot file's rows (without their vectors), keyed
by image_id; pipelines/embed/transforms.py decides per row whether it is reused and
emits `copy_record`s; `CopyReused` writes one embeddings-reused-*.parquet per previous
file with those rows. See docs/ARCHITECTURE.md (change signal).
"""
from __future__ import annotations

import hashlib
from typing import Any

import apache_beam as beam

from pipelines.core import filesystem as fs
from pipelines.embed import snapshot
from pipelines.embed.change_signal import SIGNAL_COLUMN

#: Files of reused / carried-forward rows: embeddings-reused-<digest of the previous file>.
REUSED_PREFIX = f"{snapshot.EMBEDDINGS_PREFIX}-reused"
#: Row groups of those files: build_index reads a snapshot in parallel by row group.
REUSED_ROW_GROUP_ROWS = 10_000
#: Key of the previous snapshot file a previous row was read from (not written out).
SOURCE_FILE = "_previous_file"
#: Catalog fields a reused row takes from the current manifest row.
_CATALOG_FIELDS = ("product_id", "image_uri", "metadata")


def output_schema(dim: int):
    """The snapshot's embeddings schema plus the change signal each row was embedded at."""
    import pyarrow as pa
    return snapshot.embeddings_schema(dim).append(pa.field(SIGNAL_COLUMN, pa.string()))


def copy_record(previous_row: dict[str, Any], fields: dict[str, Any]
                ) -> tuple[str, dict[str, Any]]:
    """(previous file, what CopyReused needs to copy one previous row): its key and its
    catalog fields, replaced by `fields` where given (a carried row keeps its own)."""
    record = {"image_id": previous_row["image_id"], "view": previous_row["view"],
              **{f: previous_row.get(f) for f in _CATALOG_FIELDS + (SIGNAL_COLUMN,)}}
    record.update(fields)
    return previous_row[SOURCE_FILE], record


class ReadPreviousRows(beam.DoFn):
    """A previous snapshot file -> (image_id, row without its embedding, + SOURCE_FILE)."""

    def process(self, uri: str):
        columns = [c for c in fs.parquet_column_names(uri) if c != "embedding"]
        table = fs.read_parquet(uri, columns)
        for row in table.to_pylist():
            row[SOURCE_FILE] = uri
            yield row["image_id"], row


class CopyReused(beam.DoFn):
    """(previous file, records) -> one embeddings-reused-*.parquet in the new snapshot: the
    file's rows for those (image_id, view) keys, vectors copied in Arrow, catalog fields
    and change signal from the records (their count is already in the outcomes)."""

    def __init__(self, snapshot_dir: str, dim: int):
        self.snapshot_dir = snapshot_dir
        self.dim = dim

    def process(self, element):
        import pyarrow as pa
        import pyarrow.compute as pc
        uri, records = element
        records = sorted(records, key=lambda r: (r["image_id"], r["view"]))
        table = fs.read_parquet(uri)
        keys = pc.binary_join_element_wise(table.column("image_id"), table.column("view"),
                                           "\0").to_pylist()
        where = {key: i for i, key in enumerate(keys)}
        try:
            take = [where[r["image_id"] + "\0" + r["view"]] for r in records]
        except KeyError as e:
            raise RuntimeError(f"previous snapshot file {uri} changed during the run: "
                               f"{e.args[0]!r} is gone") from None
        rows = table.take(pa.array(take, pa.int64()))
        schema = output_schema(self.dim)
        columns = []
        for field in schema:
            if field.name in _CATALOG_FIELDS or field.name == SIGNAL_COLUMN:
                columns.append(pa.array([r[field.name] for r in records], field.type))
            else:
                columns.append(rows.column(field.name).cast(field.type))
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        fs.write_parquet(fs.join(self.snapshot_dir, f"{REUSED_PREFIX}-{digest}.parquet"),
                         pa.Table.from_arrays(columns, schema=schema),
                         row_group_size=REUSED_ROW_GROUP_ROWS)
        return []
