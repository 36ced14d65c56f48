"""build_index, step 2 (Beam workers): read a split, validate every row, stage per-shard parts.

A bad row (no embedding, wrong dimension, NaN/inf, zero or non-unit vector, empty
image_id/product_id/view, another model_id) is reported with its file and row number
(describe_errors); a split that finds any stages nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core import filesystem as fs
from pipelines.embed import snapshot as snap
from pipelines.index import artifact as art

from pipelines.index.build_plan import BuildSpec, Split, sample_key, shard_for
from pipelines.index.reader import NORM_TOLERANCE

# Rows read per Arrow batch inside a split (bounds a worker's memory per batch).
READ_BATCH_ROWS = 8192
_EXAMPLES = 5
_ROW_STRING_COLUMNS = ("image_id", "product_id", "view")


def _row_error(kind: str, split: Split, row: int, image_id: Any, detail: str = "") -> dict:
    return {"kind": kind, "file": os.path.basename(split.uri), "row": int(row),
            "image_id": image_id, "detail": detail}


def _batch_vectors(col: pa.ChunkedArray | pa.Array, dim: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors [n, dim] float32, row has embedding, row has the right dimension)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    present = ~col.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(col.type) and col.type.list_size == dim and present.all():
        return snap.embedding_matrix(col, dim), present, np.ones(n, bool)
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    good_dim = present & (lengths == dim)
    out = np.zeros((n, dim), np.float32)
    idx = np.flatnonzero(good_dim)
    if len(idx):
        sub = col.take(pa.array(idx))
        out[idx] = snap.embedding_matrix(sub, dim)
    return out, present, good_dim


def validate_batch(batch: pa.RecordBatch, spec: BuildSpec, split: Split, first_row: int
                   ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(vectors, good-row mask, row errors) of one batch; errors name file and row."""
    n = batch.num_rows
    ids = batch.column("image_id").to_pylist()
    errors: list[dict] = []
    good = np.ones(n, bool)

    def flag(mask: np.ndarray, kind: str, detail: Any = None) -> None:
        nonlocal good
        for i in np.flatnonzero(mask & good):
            d = detail(i) if callable(detail) else (detail or "")
            errors.append(_row_error(kind, split, first_row + int(i), ids[i], d))
        good &= ~mask

    for name in _ROW_STRING_COLUMNS:
        col = batch.column(name)
        empty = pc.fill_null(pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_length(col), 0)),
                             True).to_numpy(zero_copy_only=False)
        flag(empty, f"missing:{name}")
    model_ids = batch.column("model_id")
    other = pc.fill_null(pc.not_equal(model_ids, spec.model_id), True).to_numpy(
        zero_copy_only=False)
    mids = model_ids.to_pylist()
    flag(other, "model", lambda i: repr(mids[i]))
    vectors, present, good_dim = _batch_vectors(batch.column("embedding"), spec.raw_dim)
    flag(~present, "no_embedding")
    flag(~good_dim, "dimension", f"expected {spec.raw_dim}")
    finite = np.isfinite(vectors).all(axis=1)
    flag(~finite, "nan")
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0), axis=1)
    flag(norms < 1e-6, "zero")
    flag(np.abs(norms - 1.0) > NORM_TOLERANCE, "norm", lambda i: f"{norms[i]:.4f}")
    return vectors, good, errors


_ERROR_TEXT = {
    "missing:image_id": "rows have no image_id",
    "missing:product_id": "rows have no product_id",
    "missing:view": "rows have no view",
    "model": ("rows have another model_id than summary.json's (the snapshot mixes "
              "embeddings of several models)"),
    "no_embedding": "rows have no embedding",
    "dimension": "rows have mixed embedding dimensions",
    "nan": "vectors contain NaN or infinite values",
    "zero": "zero vectors (cannot be L2-normalised)",
    "norm": f"vectors are not L2-normalised (|norm - 1| > {NORM_TOLERANCE})",
    "duplicate": "duplicate (image_id, view) pairs",
}


def _example_text(e: dict) -> str:
    where = f"{e['file']} row {e['row']}" if "file" in e else ""
    if e["kind"] == "norm":
        return f"{e['image_id']} (norm {e['detail']}) in {where}"
    if e["kind"] == "duplicate":
        return e["detail"]
    detail = f" ({e['detail']})" if e.get("detail") else ""
    return f"image_id {e['image_id']!r}{detail} in {where}"


def describe_errors(summary: dict[str, Any]) -> str:
    """One sentence per kind of bad row: count, what is wrong, examples with file and row."""
    parts = []
    for kind in sorted(summary):
        entry = summary[kind]
        text = _ERROR_TEXT.get(kind, kind)
        examples = [_example_text(e) for e in entry["examples"]]
        more = entry["count"] - len(examples)
        parts.append(f"{entry['count']} {text}, e.g. {', '.join(examples)}"
                     + (f" (and {more} more)" if more > 0 else ""))
    return "; ".join(parts)


def merge_error_summaries(summaries: Iterable[dict]) -> dict:
    """Several error summaries ({kind: {"count", "examples"}}) as one, a few examples per
    kind (a CombineFn's merge; the launcher merges the shards' with it too)."""
    out: dict[str, dict] = {}
    for s in summaries:
        for kind, entry in s.items():
            cur = out.setdefault(kind, {"count": 0, "examples": []})
            cur["count"] += entry["count"]
            cur["examples"] = sorted(cur["examples"] + entry["examples"],
                                     key=lambda e: (e.get("file", ""), e.get("row", 0),
                                                    str(e.get("detail"))))[:_EXAMPLES]
    return out


def summarise_errors(errors: Iterable[dict]) -> dict:
    """The error summary of single row errors (see merge_error_summaries)."""
    out: dict[str, dict] = {}
    for e in errors:
        cur = out.setdefault(e["kind"], {"count": 0, "examples": []})
        cur["count"] += 1
        cur["examples"].append(e)
    return merge_error_summaries([out])


_ADAPTERS: dict[tuple[str, str], Any] = {}


def _worker_adapter(spec: BuildSpec) -> Any:
    """The version's adapter copy, loaded and verified once per worker process."""
    from pipelines.adapter import load_adapter
    assert spec.adapter_dir is not None
    key = (spec.adapter_dir, str(spec.adapter_id))
    adapter = _ADAPTERS.get(key)
    if adapter is None:
        adapter = load_adapter(spec.adapter_dir)
        if adapter.id != spec.adapter_id:
            raise ValueError(f"{spec.adapter_dir}: holds adapter {adapter.id}, the build "
                             f"planned {spec.adapter_id}")
        _ADAPTERS.clear()
        _ADAPTERS[key] = adapter
    return adapter


def _part_schema(dim: int) -> pa.Schema:
    return pa.schema([(c, pa.string()) for c in art.ROW_COLUMNS]
                     + [("embedding", pa.list_(pa.float32(), dim))])


@dataclass
class _Staged:
    """What ReadSplit gathers from a split's good rows before it writes its parts."""
    by_shard: dict[int, list[pa.Table]] = field(default_factory=dict)
    products: set[str] = field(default_factory=set)
    views: set[str] = field(default_factory=set)
    id_pairs: list[tuple[list[str], list[str]]] = field(default_factory=list)


def read_split(split: Split, spec: BuildSpec, partitions: Any = None) -> Iterator[Any]:
    """ReadSplit (worker): validate one row group, stage per-shard parts, draw samples.

    Yields TaggedOutputs: "part" (shard, {"uri", "rows"}), "errors" (a summary of bad rows,
    capped at a few examples per kind), "gate"/"tune" (sample_key, image_id, view, vector
    bytes) candidates, "views" (set of views), "products" (bucket, uri), and with
    `partitions` (pipelines.index.routing: rows go to their nearest centroid's shard)
    "ids" (bucket, uri of the split's (image_id, view) pairs of that sha256 bucket: the
    views of an image may then lie in several shards, so duplicates are found by bucket).
    """
    from apache_beam import pvalue

    errors: list[dict] = []
    staged = _Staged()
    columns = list(dict.fromkeys([*art.ROW_COLUMNS, "model_id", "embedding"]))
    with fs.FileSystems.open(split.uri) as f:
        pf = pq.ParquetFile(f)
        present = [c for c in columns if c in pf.schema_arrow.names]
        row = split.first_row
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[split.row_group],
                                     columns=present):
            vectors, good, errs = validate_batch(batch, spec, split, row)
            row += batch.num_rows
            errors += errs
            if errors:
                continue  # the build will fail: stop staging, keep collecting errors
            for name, sample in _stage_batch(batch, vectors, spec, partitions, staged):
                yield pvalue.TaggedOutput(name, sample)
    if errors:
        yield pvalue.TaggedOutput("errors", summarise_errors(errors))
        return
    for name, value in _write_staged(staged, spec, split, partitions is not None):
        yield pvalue.TaggedOutput(name, value)


def _stage_batch(batch: pa.RecordBatch, vectors: np.ndarray, spec: BuildSpec,
                 partitions: Any, staged: _Staged) -> Iterator[tuple[str, tuple]]:
    """Add a validated batch's rows to `staged` (by shard); yields its gate / tune sample
    candidates as (tag, (sample_key, image_id, view, vector bytes))."""
    if spec.takedown_image_ids or spec.takedown_product_ids:
        batch, vectors = _without_takedowns(batch, vectors, spec)
    if spec.adapter_dir is not None:  # model space -> index space
        vectors = _worker_adapter(spec).apply(vectors)
    ids = batch.column("image_id").to_pylist()
    vws = batch.column("view").to_pylist()
    staged.views.update(vws)
    staged.products.update(batch.column("product_id").to_pylist())
    fraction = spec.sample_fraction
    for name, seed in (("gate", spec.eval_seed), ("tune", spec.eval_seed + 1)):
        for i, (iid, v) in enumerate(zip(ids, vws)):
            key = sample_key(seed, iid, v)
            if key < fraction:
                yield name, (key, iid, v, vectors[i].tobytes())
    if partitions is not None:
        shards = partitions.assign(vectors)
        staged.id_pairs.append((ids, vws))
    else:
        shards = np.fromiter((shard_for(i, spec.num_shards) for i in ids), np.int64,
                             count=len(ids))
    table = pa.table({c: (batch.column(c) if c in batch.schema.names
                          else pa.nulls(batch.num_rows, pa.string()))
                      for c in art.ROW_COLUMNS})
    table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(
        pa.array(vectors.reshape(-1), pa.float32()), spec.dim))
    for s in np.unique(shards):
        staged.by_shard.setdefault(int(s), []).append(
            table.take(pa.array(np.flatnonzero(shards == s))))


def _write_staged(staged: _Staged, spec: BuildSpec, split: Split, partitioned: bool
                  ) -> Iterator[tuple[str, Any]]:
    """Write a split's staged parts, product buckets and (partitioned) id buckets; yields
    (tag, value) for each, then ("views", its sorted views)."""
    schema = _part_schema(spec.dim)
    for s, tables in sorted(staged.by_shard.items()):
        part = pa.concat_tables(tables).cast(schema)
        uri = spec.part_uri(s, split.index)
        fs.write_parquet(uri, part, compression="none")
        yield "part", (s, {"uri": uri, "rows": part.num_rows})
    buckets: dict[int, list[str]] = {}
    for pid in staged.products:
        buckets.setdefault(shard_for(pid, spec.num_shards), []).append(pid)
    for b, pids in sorted(buckets.items()):
        uri = spec.products_uri(b, split.index)
        fs.write_parquet(uri, pa.table({"product_id": sorted(pids)}), compression="zstd")
        yield "products", (b, uri)
    if partitioned:
        by_bucket: dict[int, tuple[list[str], list[str]]] = {}
        for ids, vws in staged.id_pairs:
            for iid, v in zip(ids, vws):
                pair = by_bucket.setdefault(shard_for(iid, spec.num_shards), ([], []))
                pair[0].append(iid)
                pair[1].append(v)
        for bucket, (iids, vvs) in sorted(by_bucket.items()):
            uri = spec.ids_uri(bucket, split.index)
            fs.write_parquet(uri, pa.table({"image_id": iids, "view": vvs}), compression="zstd")
            yield "ids", (bucket, uri)
    yield "views", sorted(staged.views)


def routing_sample(split: Split, spec: BuildSpec) -> Iterator[tuple[float, bytes]]:
    """SampleSplit (worker): the split's candidates for the routing sample, (sample_key
    with seed eval_seed + 2, vector bytes); the rows are validated later, by ReadSplit."""
    fraction = spec.routing_fraction
    seed = spec.eval_seed + 2
    with fs.FileSystems.open(split.uri) as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[split.row_group],
                                     columns=["image_id", "view", "embedding"]):
            ids = batch.column("image_id").to_pylist()
            vws = batch.column("view").to_pylist()
            keys = [sample_key(seed, str(i), str(v)) for i, v in zip(ids, vws)]
            take = [j for j, key in enumerate(keys) if key < fraction]
            if not take:
                continue
            vectors, _, good_dim = _batch_vectors(batch.column("embedding"), spec.raw_dim)
            take = [j for j in take if good_dim[j]]
            if not take:
                continue
            picked = vectors[take]
            if spec.adapter_dir is not None:  # centroids live in index space
                picked = _worker_adapter(spec).apply(picked)
            for j, vector in zip(take, picked):
                yield keys[j], np.ascontiguousarray(vector, np.float32).tobytes()


def duplicate_ids(bucket: int, uris: Iterable[str]) -> dict:
    """CheckDuplicates (worker): the error summary of (image_id, view) pairs that occur
    more than once in one sha256 bucket (partition-routed builds)."""
    table = pa.concat_tables([fs.read_parquet(u) for u in sorted(uris)])
    if not table.num_rows:
        return {}
    keys = pc.binary_join_element_wise(table.column("image_id"), table.column("view"), "\0")
    counts = pc.value_counts(keys)
    dup = [str(v["values"]) for v in counts.to_pylist() if v["counts"] > 1]
    return summarise_errors(
        {"kind": "duplicate", "detail": repr(tuple(d.split("\0", 1))),
         "image_id": d.split("\0", 1)[0]} for d in sorted(dup))


def _without_takedowns(batch: pa.RecordBatch, vectors: np.ndarray, spec: BuildSpec
                       ) -> tuple[pa.RecordBatch, np.ndarray]:
    """The batch without the rows of taken-down image_ids / product_ids."""
    keep = np.fromiter(
        (i not in spec.takedown_image_ids and p not in spec.takedown_product_ids
         for i, p in zip(batch.column("image_id").to_pylist(),
                         batch.column("product_id").to_pylist())), bool, count=batch.num_rows)
    if keep.all():
        return batch, vectors
    return batch.filter(pa.array(keep)), vectors[keep]


def read_staged_shard(parts: list[dict], dim: int) -> tuple[pa.Table, np.ndarray]:
    """A shard's staged rows (the parts ReadSplit wrote for it) sorted by (image_id, view),
    and their vectors.

    Memory: the float32 matrix plus one staged part at a time (the rows without their
    embeddings are small). Concatenating the parts and sorting the whole table, as this
    did before, held three or four copies of the shard's vectors at once.
    """
    ordered = sorted(parts, key=lambda p: p["uri"])
    columns = list(art.ROW_COLUMNS)
    rows = pa.concat_tables([fs.read_parquet(p["uri"], columns).select(columns) for p in ordered]
                            or [_part_schema(dim).empty_table().select(columns)])
    n = rows.num_rows
    if not n:
        return rows, np.zeros((0, dim), np.float32)
    order = pc.sort_indices(rows, sort_keys=[("image_id", "ascending"),
                                             ("view", "ascending")]).to_numpy()
    rows = rows.take(pa.array(order))
    position = np.empty(n, np.int64)  # position[i] = sorted position of concatenated row i
    position[order] = np.arange(n)
    vectors = np.empty((n, dim), np.float32)
    start = 0
    for p in ordered:
        col = fs.read_parquet(p["uri"], columns=["embedding"]).column("embedding")
        m = len(col)
        vectors[position[start:start + m]] = snap.embedding_matrix(col, dim)
        start += m
        del col
    return rows, vectors
