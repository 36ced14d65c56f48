"""Takedowns: `catalog-search delete` and `POST /v1/admin/delete` both call `delete_ids`.

Under the delta log lock, the ids are added to the takedown list
(pipelines/index/takedowns.py) and a delete delta is committed to the version LATEST names
(pipelines/index/deltas.py), each fsynced before this returns. `restore_ids` lifts
takedowns (the ids come back with the next build or a delta that upserts them).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from pipelines.core import filesystem as fs
from pipelines.index import deltas as dl
from pipelines.index import takedowns as td
from pipelines.index.artifact import ROWS_FILE, read_latest, read_manifest, version_dir

#: Longest id accepted (a takedown id is a catalog id, never a path).
MAX_ID_CHARS = 512
#: Most ids one call may take down.
MAX_IDS = 10_000


def check_ids(image_ids: Sequence[Any], product_ids: Sequence[Any]) -> tuple[list[str], list[str]]:
    """The ids, checked: strings of 1..MAX_ID_CHARS characters, at most MAX_IDS given (counted
    before repeats are dropped, as the API schema states), one at least."""
    if len(image_ids) + len(product_ids) > MAX_IDS:
        raise dl.DeltaError(f"at most {MAX_IDS} ids per call")
    out = []
    for what, ids in (("image_id", image_ids), ("product_id", product_ids)):
        clean: list[str] = []
        for i in ids:
            if not isinstance(i, str) or not i.strip() or len(i) > MAX_ID_CHARS \
                    or any(ord(c) < 32 for c in i):
                raise dl.DeltaError(f"{what} {str(i)[:80]!r}: must be a non-empty string of at "
                                    f"most {MAX_ID_CHARS} printable characters")
            if i not in clean:
                clean.append(i)
        out.append(clean)
    if not out[0] and not out[1]:
        raise dl.DeltaError("give at least one image_id or product_id")
    return out[0], out[1]


def present_ids(index_root: str, version: str, log: dl.DeltaLog | None = None
                ) -> tuple[set[str], set[str]]:
    """(image_ids, product_ids) held by a version's rows or upserted by its deltas."""
    manifest = read_manifest(index_root, version)
    images: set[str] = set()
    products: set[str] = set()
    base = version_dir(index_root, version)
    for entry in manifest.shards:
        if not entry.num_vectors:
            continue
        t = fs.read_parquet(fs.join(base, entry.path, ROWS_FILE), columns=["image_id",
                                                                          "product_id"])
        images.update(t.column("image_id").to_pylist())
        products.update(t.column("product_id").to_pylist())
    log = log if log is not None else dl.read_log(index_root, version)
    for d in log.deltas:
        images.update(d.rows.column("image_id").to_pylist())
        products.update(d.rows.column("product_id").to_pylist())
    return images, products


def delete_ids(index_root: str, image_ids: Sequence[str] = (), product_ids: Sequence[str] = (),
               reason: str = "takedown", source: Mapping[str, Any] | None = None
               ) -> dict[str, Any]:
    """Take ids down durably; returns what was removed (found in the serving version or
    its deltas), what was on the takedown list already, and what was not found (still
    listed, so it cannot appear later)."""
    images, products = check_ids(image_ids, product_ids)
    with dl.log_lock(index_root):
        version = read_latest(index_root)
        if version is None:
            raise dl.DeltaError(f"no published version under {index_root}")
        current = td.read_takedowns(index_root)
        have_i, have_p = present_ids(index_root, version)
        td.write_takedowns(index_root, td.add(current, images, products, reason))
        dm = dl.write_delta(index_root, version, delete_image_ids=images,
                            delete_product_ids=products,
                            source={"reason": reason, **dict(source or {})})
    return {
        "version": version, "delta": dm.seq, "reason": reason,
        "removed": {"image_ids": [i for i in images if i in have_i],
                    "product_ids": [p for p in products if p in have_p]},
        "not_found": {"image_ids": [i for i in images if i not in have_i],
                      "product_ids": [p for p in products if p not in have_p]},
        "already_taken_down": {"image_ids": [i for i in images if i in current.image_ids],
                               "product_ids": [p for p in products
                                               if p in current.product_ids]},
    }


def restore_ids(index_root: str, image_ids: Sequence[str] = (),
                product_ids: Sequence[str] = ()) -> dict[str, Any]:
    """Lift takedowns (the ids return with the next build or an upserting delta)."""
    images, products = check_ids(image_ids, product_ids)
    with dl.log_lock(index_root):
        current = td.read_takedowns(index_root)
        lifted_i = [i for i in images if i in current.image_ids]
        lifted_p = [p for p in products if p in current.product_ids]
        td.write_takedowns(index_root, td.remove(current, images, products))
    return {"lifted": {"image_ids": lifted_i, "product_ids": lifted_p},
            "not_listed": {"image_ids": [i for i in images if i not in lifted_i],
                           "product_ids": [p for p in products if p not in lifted_p]}}
