"""What serving holds for a version + its delta log + the takedown list, counted from the
ids alone (pipelines/index/deltas.py; the same rules as serving.delta_index.DeltaIndex)."""
from __future__ import annotations

from typing import Any, Iterable

from pipelines.core import filesystem as fs
from pipelines.index.artifact import read_manifest
from pipelines.index.delta_format import ROWS_FILE, version_adapter
from pipelines.index.delta_read import DeltaLog, read_log


def served_rows(index_root: str, version: str, log_: DeltaLog | None = None,
                takedown_image_ids: Iterable[str] = (),
                takedown_product_ids: Iterable[str] = ()) -> dict[str, Any]:
    """What serving holds for a version + its log + the takedown list, from the ids alone
    (the version's rows.parquet id columns; no vectors, no ScaNN): the same rules as
    serving.delta_index.DeltaIndex. Returns the counts (base_rows, rows_added,
    rows_removed, searchable_rows = base + added - removed) and `live`, the set of
    (image_id, view) served."""
    from pipelines.index.artifact import version_dir
    manifest = read_manifest(index_root, version)
    log_ = log_ if log_ is not None else read_log(index_root, version, manifest.dim,
                                                  adapter=version_adapter(manifest))
    rows: list[tuple[str, str, str]] = []  # (image_id, view, product_id) by row
    base = version_dir(index_root, version)
    for entry in manifest.shards:
        if not entry.num_vectors:
            continue
        t = fs.read_parquet(fs.join(base, entry.path, ROWS_FILE),
                            columns=["image_id", "view", "product_id"])
        rows += zip(t.column("image_id").to_pylist(), t.column("view").to_pylist(),
                    t.column("product_id").to_pylist())
    n_base = len(rows)
    images: dict[str, set[int]] = {}
    products: dict[str, set[int]] = {}
    for i, (img, _, pid) in enumerate(rows):
        images.setdefault(img, set()).add(i)
        products.setdefault(pid, set()).add(i)
    removed = 0

    def drop(found: set[int]) -> None:
        nonlocal removed
        for r in list(found):
            img, _, pid = rows[r]
            images[img].discard(r)
            products[pid].discard(r)
            removed += 1

    for d in log_.deltas:
        for img in d.delete_image_ids:
            drop(images.get(img, set()))
        for pid in d.delete_product_ids:
            drop(products.get(pid, set()))
        if not d.rows.num_rows:
            continue
        new = list(zip(d.rows.column("image_id").to_pylist(), d.rows.column("view").to_pylist(),
                       d.rows.column("product_id").to_pylist()))
        for img in dict.fromkeys(r[0] for r in new):
            drop(images.get(img, set()))
        for row in new:
            rows.append(row)
            images.setdefault(row[0], set()).add(len(rows) - 1)
            products.setdefault(row[2], set()).add(len(rows) - 1)
    for img in set(takedown_image_ids):
        drop(images.get(img, set()))
    for pid in set(takedown_product_ids):
        drop(products.get(pid, set()))
    live = {(rows[r][0], rows[r][1]) for found in images.values() for r in found}
    added = len(rows) - n_base
    return {"version": version, "base_rows": n_base, "rows_added": added,
            "rows_removed": removed, "searchable_rows": n_base + added - removed,
            "deltas": len(log_.deltas), "error": log_.error, "live": live}

