"""The duplicates job's worker steps: candidate pairs and their checks.

- `FindPairs`: a block of one shard's vectors searched against the whole index version
  (loaded once per worker through the index reader, checksums verified; stored vectors
  only through `LoadedShard.vectors()`), neighbours re-scored exactly (dot product of the
  stored vectors), pairs of images of *different* products at or above
  `duplicates.candidate_threshold` kept.
- `VerifyPairs`: the decision. A pair is a near duplicate when its similarity is >=
  `duplicates.threshold`, or when it is a candidate and the images' pixel signatures
  (RGB thumbnails of four centred crops, 32x32 windows, zero-mean unit-norm, shifts of
  up to 2 pixels searched) correlate >= `duplicates.pixel_threshold` at their best match:
  re-encoded, resized and lightly cropped copies keep their pixels, a distinct look-alike
  product (same shape, other colours or label) does not.
- `exact_pairs`: images of different products with the same content_sha256 (from the
  version's source snapshot), reported as exact duplicates.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)

# Signature: centred crops (fraction of each side kept), compared at SIZE x SIZE pixels
# within a CONTEXT x CONTEXT thumbnail (so shifts of up to 2 pixels are searched).
SIGNATURE_CROPS = (1.0, 0.94, 0.88, 0.82)
SIGNATURE_SIZE = 32
SIGNATURE_CONTEXT = 36
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


def pair_key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


class FindPairs:
    """Beam DoFn body: (shard, start, end) -> candidate pairs + the count of query images.

    Written as a plain class wrapped by `find_pairs_dofn` so that importing this module
    does not import Beam.
    """

    def __init__(self, spec: DuplicatesSpec):
        self.spec = spec
        self._index: Any = None

    def load(self) -> Any:
        if self._index is None:
            from pipelines.index.reader import open_index
            from pipelines.index.sharded_search import ShardedSearcher
            version = open_index(self.spec.index_root, self.spec.version, verify=True)
            self._index = ShardedSearcher(version.load_shards(), concurrent=False)
        return self._index

    def process(self, unit: tuple[int, int, int]) -> Iterator[tuple[str, Any]]:
        shard_pos, start, end = unit
        index = self.load()
        shard = index.shards[shard_pos]
        offset = int(index.offsets[shard_pos])
        rows = np.arange(offset + start, offset + end, dtype=np.int64)
        if self.spec.query_view is not None:
            views = index.views
            rows = rows[[views[r] == self.spec.query_view for r in rows.tolist()]]
        yield "scanned", len(rows)
        if not len(rows):
            return
        queries = np.asarray(shard.vectors()[rows - offset], np.float32)
        k = min(index.num_vectors, self.spec.neighbours + 1)
        _, found = index.search(queries, k)
        valid = found >= 0
        safe = np.where(valid, found, 0)
        neighbour_vectors = index.vectors(safe.reshape(-1)).reshape(len(rows), k, -1)
        exact = np.einsum("qd,qkd->qk", queries, neighbour_vectors)
        image_ids, product_ids = index.image_ids, index.product_ids
        for qi, row in enumerate(rows.tolist()):
            a_img, a_pid = image_ids[row], product_ids[row]
            for j in range(k):
                if not valid[qi, j]:
                    continue
                score = float(exact[qi, j])
                if score < self.spec.candidate_threshold:
                    continue
                nb = int(found[qi, j])
                b_img, b_pid = image_ids[nb], product_ids[nb]
                if b_pid == a_pid or b_img == a_img:
                    continue
                key = pair_key(a_img, b_img)
                yield "pair", (key, {"score": min(1.0, score), "uri": {
                    a_img: index.image_uris[row], b_img: index.image_uris[nb]},
                    "product": {a_img: a_pid, b_img: b_pid}})


def merge_pair(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One record per image pair (found from both sides): the best score."""
    best: dict[str, Any] | None = None
    for item in items:
        if best is None or item["score"] > best["score"]:
            best = item
    assert best is not None
    return best


# --------------------------------------------------------------------------- pixel check

def pixel_signature(data: bytes, max_pixels: int) -> np.ndarray:
    """float32 [len(SIGNATURE_CROPS), CONTEXT, CONTEXT, 3]: RGB thumbnails of centred
    crops (the project's decoder; DecodeError for bad bytes)."""
    from PIL import Image

    from pipelines.model.image_decode import decode_image
    img = decode_image(data, max_pixels=max_pixels, target_size=4 * SIGNATURE_SIZE)
    w, h = img.size
    out = np.zeros((len(SIGNATURE_CROPS), SIGNATURE_CONTEXT, SIGNATURE_CONTEXT, 3), np.float32)
    for i, frac in enumerate(SIGNATURE_CROPS):
        cw, ch = max(1, int(round(w * frac))), max(1, int(round(h * frac)))
        left, top = (w - cw) // 2, (h - ch) // 2
        crop = img.crop((left, top, left + cw, top + ch)).resize(
            (SIGNATURE_CONTEXT, SIGNATURE_CONTEXT), Image.Resampling.BILINEAR)
        out[i] = np.asarray(crop, np.float32)
    return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-6)


def _centres(sig: np.ndarray) -> np.ndarray:
    m = (SIGNATURE_CONTEXT - SIGNATURE_SIZE) // 2
    return _unit_rows(sig[:, m:m + SIGNATURE_SIZE, m:m + SIGNATURE_SIZE].reshape(len(sig), -1))


def _windows(sig: np.ndarray) -> np.ndarray:
    view = np.lib.stride_tricks.sliding_window_view(
        sig, (SIGNATURE_SIZE, SIGNATURE_SIZE), axis=(1, 2))  # [c, dy, dx, 3, S, S]
    view = view.transpose(0, 1, 2, 4, 5, 3)                  # [c, dy, dx, S, S, 3]
    return _unit_rows(np.ascontiguousarray(view).reshape(-1, 3 * SIGNATURE_SIZE ** 2))


def pixel_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Best correlation (-1..1) between a centred crop of one image and any crop of the
    other shifted by up to (CONTEXT - SIZE) / 2 pixels of the thumbnail, both ways."""
    return float(max(np.max(_centres(a) @ _windows(b).T), np.max(_centres(b) @ _windows(a).T)))


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
