"""The duplicates job's worker steps: candidate pairs and their checks.

- `FindPairs`: a unit of one shard's vectors searched against the whole index version
  (loaded once per worker through the index reader, checksums verified; stored vectors
  only through `LoadedShard.vectors()`) with ScaNN's batched search and the index's own
  tuned settings; neighbours within a small margin of `duplicates.candidate_threshold`
  re-scored exactly (dot product of the stored vectors), pairs of images of *different*
  products at or above it written to part files by pair bucket (`bucket_of`).
- `VerifyBucket`: per pair bucket, one record per pair (its best score), each decided by
  `VerifyPairs`; the accepted pairs written to the bucket's part file.
- `VerifyPairs`: the decision. A pair is a near duplicate when its similarity is >=
  `duplicates.threshold`, or when it is a candidate and the images' pixel signatures
  (pipelines/duplicates/pixels.py: RGB thumbnails of four centred crops, 32x32 windows,
  zero-mean unit-norm, shifts of up to 2 pixels searched) correlate >=
  `duplicates.pixel_threshold` at their best match:
  re-encoded, resized and lightly cropped copies keep their pixels, a distinct look-alike
  product (same shape, other colours or label) does not.
- `split_hashes` / `exact_bucket` / `exact_pairs`: images of different products with the
  same content_sha256 (from the version's source snapshot, split into hash buckets),
  reported as exact duplicates.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from pipelines.duplicates.pixels import pixel_signature, pixel_similarity

log = logging.getLogger(__name__)

# Signatures kept per worker (one per image, ~62 KB each).
_SIGNATURE_CACHE = 1024


@dataclass(frozen=True)
class DuplicatesSpec:
    """What every worker step needs (small; pickled into the Beam graph)."""
    index_root: str
    version: str
    out_dir: str
    threshold: float
    candidate_threshold: float
    pixel_threshold: float | None
    neighbours: int
    query_view: str | None        # rows of this view are the queries (None: every row)
    max_image_bytes: int
    max_pixels: int
    report_groups: int
    report_images_per_group: int
    snapshot: str | None          # source snapshot (content_sha256), None if unreadable
    work_dir: str = ""            # this run's intermediate files (deleted at the end)
    buckets: int = 1              # pair / hash buckets (the verify and exact steps' units)
    block_rows: int = 2048        # query vectors per search call
    leaves_fraction: float = 1.0  # of each tree shard's tuned leaves_to_search searched


def pair_key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def bucket_of(key: str, buckets: int) -> int:
    """A stable bucket (the same in every process) of a pair key or a content hash."""
    return zlib.crc32(key.encode("utf-8")) % buckets


# Candidate pairs, accepted pairs and hashes travel between the steps as Parquet files under
# spec.work_dir: the runner (with the DirectRunner: the launcher process) moves only their
# paths and counts, so its memory does not grow with the catalog.
PAIR_COLUMNS = ("a", "b", "product_a", "product_b", "uri_a", "uri_b")
# ScaNN's scores are exact dot products up to float32 rounding (float32 reorder, brute
# force; quantized reorder is rescored by ShardedSearcher): neighbours within this margin
# below the candidate threshold are re-scored from the stored vectors, the rest dropped.
_SCORE_MARGIN = 1e-3


def _pair_schema() -> pa.Schema:
    return pa.schema([*((c, pa.string()) for c in PAIR_COLUMNS), ("score", pa.float64())])


def _accepted_schema() -> pa.Schema:
    return pa.schema([*((c, pa.string()) for c in PAIR_COLUMNS), ("score", pa.float64()),
                      ("pixel", pa.float64()), ("kind", pa.string()), ("sha256", pa.string())])


def _write_part(path: str, rows: dict[str, list[Any]], schema: pa.Schema) -> str:
    from pipelines.core import filesystem as fs
    fs.write_bytes_atomic(path, fs.parquet_to_bytes(pa.table(rows, schema=schema)))
    return path


def read_parts(paths: Iterable[str]) -> list[dict[str, Any]]:
    """The rows of the given part files (accepted / exact pairs), as dicts."""
    from pipelines.core import filesystem as fs
    out: list[dict[str, Any]] = []
    for path in sorted(paths):
        out += fs.read_parquet(path).to_pylist()
    return out


class FindPairs:
    """Beam DoFn body: (shard, start, end) -> the count of query images, and (bucket, part
    file) for each bucket with candidate pairs of the unit.

    The unit's query vectors are searched against the whole version with the index's own
    per-shard settings (ShardedSearcher.search: ScaNN search_batched, spec.block_rows
    queries a call, each shard's reorder pool and `spec.leaves_fraction` of its tuned
    leaves_to_search: tuned for a query's top 10, which a near duplicate leads); the filter
    (valid neighbour, other product, other image, score) is vectorised. Written as a
    plain class wrapped by job._StepDoFn so that importing this module does not import Beam.
    """

    def __init__(self, spec: DuplicatesSpec):
        self.spec = spec
        self._index: Any = None
        self._codes: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None

    def load(self) -> Any:
        if self._index is None:
            from pipelines.index.reader import open_index
            from pipelines.index.sharded_search import ShardedSearcher
            version = open_index(self.spec.index_root, self.spec.version, verify=True)
            shards = version.load_shards()
            for shard in shards:  # a near duplicate sits in or next to its query's leaf
                if shard.leaves_to_search > 0:
                    shard.leaves_to_search = max(1, round(
                        shard.leaves_to_search * self.spec.leaves_fraction))
            self._index = ShardedSearcher(shards, concurrent=False)

            def codes(column: str) -> np.ndarray:
                chunks = [s.rows.column(column) for s in shards]
                arr = pa.chunked_array([c for ch in chunks for c in ch.chunks],
                                       type=pa.string()).combine_chunks()
                return np.asarray(arr.dictionary_encode().indices.to_numpy(
                    zero_copy_only=False), np.int64)
            view_is_query = None
            if self.spec.query_view is not None:
                view_is_query = np.asarray(
                    [v == self.spec.query_view for v in self._index.views], bool)
            self._codes = (codes("image_id"), codes("product_id"), view_is_query)
        return self._index

    def search_block(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global query rows -> candidate (query row, neighbour row, exact score) arrays."""
        index = self.load()
        assert self._codes is not None
        image_code, product_code, _ = self._codes
        queries = index.vectors(rows)
        k = min(index.num_vectors, self.spec.neighbours + 1)
        scores, found = index.search(queries, k)
        valid = found >= 0
        safe = np.where(valid, found, 0)
        keep = (valid & (scores >= self.spec.candidate_threshold - _SCORE_MARGIN)
                & (product_code[safe] != product_code[rows][:, None])
                & (image_code[safe] != image_code[rows][:, None]))
        qi, j = np.nonzero(keep)
        a_rows, b_rows = rows[qi], found[qi, j]
        # the few kept neighbours re-scored exactly (dot product of the stored vectors)
        exact = np.einsum("pd,pd->p", queries[qi], index.vectors(b_rows)).astype(np.float64)
        ok = exact >= self.spec.candidate_threshold
        return a_rows[ok], b_rows[ok], np.minimum(1.0, exact[ok])

    def process(self, unit: tuple[int, int, int]) -> Iterator[tuple[str, Any]]:
        from pipelines.core import filesystem as fs
        from pipelines.core import progress
        shard_pos, start, end = unit
        index = self.load()
        assert self._codes is not None
        offset = int(index.offsets[shard_pos])
        rows = np.arange(offset + start, offset + end, dtype=np.int64)
        view_is_query = self._codes[2]
        if view_is_query is not None:
            rows = rows[view_is_query[rows]]
        yield "scanned", int(len(rows))
        step = max(1, self.spec.block_rows)
        found = [self.search_block(rows[i:i + step]) for i in range(0, len(rows), step)]
        progress.tick()  # one work unit searched (the launcher logs units done / total)
        if not found:
            return
        a_rows = np.concatenate([f[0] for f in found])
        b_rows = np.concatenate([f[1] for f in found])
        scores = np.concatenate([f[2] for f in found])
        ids, pids, uris = index.image_ids, index.product_ids, index.image_uris
        parts: dict[int, dict[str, list[Any]]] = {}
        for ra, rb, score in zip(a_rows.tolist(), b_rows.tolist(), scores.tolist()):
            if ids[rb] < ids[ra]:
                ra, rb = rb, ra
            a, b = ids[ra], ids[rb]
            part = parts.setdefault(bucket_of(f"{a}\0{b}", self.spec.buckets),
                                    {c: [] for c in (*PAIR_COLUMNS, "score")})
            for col, value in zip((*PAIR_COLUMNS, "score"),
                                  (a, b, pids[ra], pids[rb], uris[ra], uris[rb], score)):
                part[col].append(value)
        for bucket, part in sorted(parts.items()):
            path = fs.join(self.spec.work_dir, "pairs",
                           f"b{bucket:04d}-s{shard_pos:05d}-{start:010d}.parquet")
            yield "part", (bucket, _write_part(path, part, _pair_schema()))


class VerifyPairs:
    """Beam DoFn body: (pair key, record) -> the accepted pair as an output row, or a
    rejected count. Signatures are cached per worker."""

    def __init__(self, spec: DuplicatesSpec):
        self.spec = spec
        self._cache: dict[str, np.ndarray | None] = {}

    def _signature(self, image_id: str, uri: str) -> np.ndarray | None:
        if image_id in self._cache:
            return self._cache[image_id]
        from pipelines.core import filesystem as fs
        sig: np.ndarray | None
        try:
            if uri[:8].lower().startswith(("http://", "https://")):
                sig = None  # not fetched again here: the embedding decides alone
            else:
                sig = pixel_signature(fs.read_bytes(uri, max_bytes=self.spec.max_image_bytes),
                                      self.spec.max_pixels)
        except Exception as e:  # noqa: BLE001 - an unreadable image: the embedding decides
            log.warning("duplicates: no pixel signature for %s (%s): %s", image_id, uri, e)
            sig = None
        if len(self._cache) >= _SIGNATURE_CACHE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[image_id] = sig
        return sig

    def process(self, element: tuple[tuple[str, str], dict[str, Any]]
                ) -> Iterator[tuple[str, Any]]:
        (a, b), rec = element
        score = float(rec["score"])
        pixel: float | None = None
        if self.spec.pixel_threshold is not None and score < self.spec.threshold:
            sa = self._signature(a, rec["uri"][a])
            sb = self._signature(b, rec["uri"][b])
            if sa is None or sb is None:
                yield "no_pixels", 1
            else:
                pixel = pixel_similarity(sa, sb)
        accepted = score >= self.spec.threshold or (
            pixel is not None and self.spec.pixel_threshold is not None
            and pixel >= self.spec.pixel_threshold)
        if not accepted:
            yield "rejected", 1
            return
        yield "accepted", {"a": a, "b": b, "product_a": rec["product"][a],
                           "product_b": rec["product"][b], "score": score,
                           "pixel": pixel, "kind": "near",
                           "uri_a": rec["uri"][a], "uri_b": rec["uri"][b]}


class VerifyBucket:
    """Beam DoFn body: (bucket, its candidate part files) -> one record per image pair (the
    best score of the sides that found it), each checked by VerifyPairs; yields the counts
    (candidates, rejected, no_pixels) and the bucket's accepted part file, if any."""

    def __init__(self, spec: DuplicatesSpec):
        self.spec = spec
        self._verify = VerifyPairs(spec)

    def process(self, element: tuple[int, Iterable[str]]) -> Iterator[tuple[str, Any]]:
        from pipelines.core import filesystem as fs
        bucket, paths = element
        best: dict[tuple[str, str], dict[str, Any]] = {}
        for path in sorted(set(paths)):
            for r in fs.read_parquet(path).to_pylist():
                key = (r["a"], r["b"])
                cur = best.get(key)
                if cur is None or r["score"] > cur["score"]:
                    best[key] = r
        counts = {"candidates": len(best), "rejected": 0, "no_pixels": 0}
        accepted: dict[str, list[Any]] = {c: [] for c in _accepted_schema().names}
        for (a, b) in sorted(best):  # by image: consecutive pairs share signatures
            r = best[(a, b)]
            rec = {"score": r["score"], "uri": {a: r["uri_a"], b: r["uri_b"]},
                   "product": {a: r["product_a"], b: r["product_b"]}}
            for tag, value in self._verify.process(((a, b), rec)):
                if tag == "accepted":
                    for col in accepted:
                        accepted[col].append(value.get(col))
                else:
                    counts[tag] += int(value)
        for tag, n in counts.items():
            yield tag, n
        if accepted["a"]:
            path = fs.join(self.spec.work_dir, "accepted", f"b{bucket:04d}.parquet")
            yield "accepted_part", _write_part(path, accepted, _accepted_schema())


# --------------------------------------------------------------------------- exact pairs

def read_hashes(uri: str) -> Iterator[tuple[str, tuple[str, str, str]]]:
    """One snapshot file -> (content_sha256, (image_id, product_id, image_uri)) per image
    with a hash (a snapshot without the column yields nothing)."""
    from pipelines.core import filesystem as fs
    names = fs.parquet_column_names(uri)
    if "content_sha256" not in names:
        return
    table = fs.read_parquet(uri, columns=["image_id", "product_id", "image_uri",
                                          "content_sha256"])
    seen: set[str] = set()
    for iid, pid, image_uri, sha in zip(table.column("image_id").to_pylist(),
                                        table.column("product_id").to_pylist(),
                                        table.column("image_uri").to_pylist(),
                                        table.column("content_sha256").to_pylist()):
        if sha and iid not in seen:  # several views of one image: once
            seen.add(iid)
            yield sha, (iid, pid, image_uri or "")


def exact_pairs(sha: str, members: Iterable[tuple[str, str, str]]
                ) -> Iterator[dict[str, Any]]:
    """Images sharing one content hash across products -> exact pairs: each image linked
    to the first image (by id) of another product, so the hash's images form one group."""
    images = sorted(set(members))
    if len({pid for _, pid, _ in images}) < 2:
        return
    first = images[0]
    other = next(m for m in images if m[1] != first[1])
    for img in images[1:]:
        anchor = first if img[1] != first[1] else other
        if img == anchor:
            continue
        yield {"a": anchor[0], "b": img[0], "product_a": anchor[1], "product_b": img[1],
               "uri_a": anchor[2], "uri_b": img[2], "score": 1.0, "pixel": None,
               "kind": "exact", "sha256": sha}


def _hash_schema() -> pa.Schema:
    return pa.schema([("sha256", pa.string()), ("image_id", pa.string()),
                      ("product_id", pa.string()), ("image_uri", pa.string())])


def split_hashes(item: tuple[int, str], spec: DuplicatesSpec) -> Iterator[tuple[int, str]]:
    """(file position, snapshot file) -> (bucket, part file of its hashes in that bucket)."""
    from pipelines.core import filesystem as fs
    position, uri = item
    parts: dict[int, dict[str, list[Any]]] = {}
    for sha, (iid, pid, image_uri) in read_hashes(uri):
        part = parts.setdefault(bucket_of(sha, spec.buckets), {c: [] for c in _hash_schema().names})
        for col, value in zip(_hash_schema().names, (sha, iid, pid, image_uri)):
            part[col].append(value)
    for bucket, part in sorted(parts.items()):
        path = fs.join(spec.work_dir, "hashes", f"b{bucket:04d}-f{position:05d}.parquet")
        yield bucket, _write_part(path, part, _hash_schema())


def exact_bucket(element: tuple[int, Iterable[str]], spec: DuplicatesSpec) -> Iterator[str]:
    """(bucket, its hash part files) -> the bucket's exact-pairs part file, if any."""
    from pipelines.core import filesystem as fs
    bucket, paths = element
    members: dict[str, list[tuple[str, str, str]]] = {}
    for path in sorted(set(paths)):
        for r in fs.read_parquet(path).to_pylist():
            members.setdefault(r["sha256"], []).append(
                (r["image_id"], r["product_id"], r["image_uri"]))
    rows: dict[str, list[Any]] = {c: [] for c in _accepted_schema().names}
    for sha in sorted(members):
        for pair in exact_pairs(sha, members[sha]):
            for col in rows:
                rows[col].append(pair.get(col))
    if rows["a"]:
        yield _write_part(fs.join(spec.work_dir, "exact", f"b{bucket:04d}.parquet"), rows,
                          _accepted_schema())
