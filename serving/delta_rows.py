"""A version's deltas and takedowns applied to its row space, from the ids alone
(serving.delta_index.DeltaIndex builds on it; pipelines.index.delta_accounting counts the
same rules without vectors).

Rows 0..N-1 are the version's, N..N+M-1 the upserted delta rows in log order. Each delta
applies its deletes (every live row of a deleted image_id / product_id), then its upserts
(an upserted image_id replaces every live row of that image); the takedown list applies
last. A removed row is *masked*; `images` / `products` hold the live rows of every image
and product a delta or takedown touched (the others: the base's own lists).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from pipelines.index.deltas import Delta


@dataclass
class DeltaRows:
    """The delta rows (columns by delta row j = row - N) and what is masked."""
    n_base: int
    image_ids: list[str] = field(default_factory=list)
    product_ids: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    uris: list[str] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    masked: set[int] = field(default_factory=set)
    images: dict[str, list[int]] = field(default_factory=dict)
    products: dict[str, list[int]] = field(default_factory=dict)
    ids_deleted: dict[str, int] = field(
        default_factory=lambda: {"image_ids": 0, "product_ids": 0})
    takedowns: dict[str, list[str]] = field(
        default_factory=lambda: {"image_ids": [], "product_ids": []})


class _Applier:
    """Applies deltas and takedowns to a DeltaRows over `base` (a LoadedIndex)."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.out = DeltaRows(base.num_vectors)

    def rows_of_image(self, img: str) -> list[int]:
        images = self.out.images
        if img not in images:
            images[img] = list(self.base.image_rows(img))
        return images[img]

    def rows_of_product(self, pid: str) -> list[int]:
        products = self.out.products
        if pid not in products:
            products[pid] = list(self.base.product_rows(pid))
        return products[pid]

    def drop(self, rows: list[int]) -> None:
        out, n_base = self.out, self.out.n_base
        for row in list(rows):
            if row in out.masked:
                continue
            out.masked.add(row)
            img = self.base.image_id(row) if row < n_base else out.image_ids[row - n_base]
            pid = self.base.product_id(row) if row < n_base else out.product_ids[row - n_base]
            img_rows = self.rows_of_image(img)
            if row in img_rows:
                img_rows.remove(row)
            prod_rows = self.rows_of_product(pid)
            if row in prod_rows:
                prod_rows.remove(row)

    def apply(self, delta: Delta) -> None:
        out = self.out
        for img in delta.delete_image_ids:
            self.drop(self.rows_of_image(img))
        for pid in delta.delete_product_ids:
            self.drop(self.rows_of_product(pid))
        out.ids_deleted["image_ids"] += len(delta.delete_image_ids)
        out.ids_deleted["product_ids"] += len(delta.delete_product_ids)
        if not delta.rows.num_rows:
            return
        d_images = delta.rows.column("image_id").to_pylist()
        for img in dict.fromkeys(d_images):  # an upsert replaces every row of the image
            self.drop(self.rows_of_image(img))
        start = out.n_base + len(out.image_ids)
        d_products = delta.rows.column("product_id").to_pylist()
        out.image_ids += d_images
        out.product_ids += d_products
        out.views += delta.rows.column("view").to_pylist()
        out.uris += delta.rows.column("image_uri").to_pylist()
        out.metadata += delta.rows.column("metadata").to_pylist()
        out.vectors.append(delta.vectors)
        for j, (img, pid) in enumerate(zip(d_images, d_products)):
            self.rows_of_image(img).append(start + j)
            self.rows_of_product(pid).append(start + j)


def apply_deltas(base: Any, deltas: Sequence[Delta], takedown_image_ids: Iterable[str] = (),
                 takedown_product_ids: Iterable[str] = ()) -> DeltaRows:
    """`deltas` (in seq order), then the takedown list, applied to `base`'s rows."""
    applier = _Applier(base)
    for delta in deltas:
        applier.apply(delta)
    out = applier.out
    out.takedowns = {"image_ids": sorted(set(takedown_image_ids)),
                     "product_ids": sorted(set(takedown_product_ids))}
    for img in out.takedowns["image_ids"]:
        applier.drop(applier.rows_of_image(img))
    for pid in out.takedowns["product_ids"]:
        applier.drop(applier.rows_of_product(pid))
    return out
