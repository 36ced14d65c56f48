"""The takedown list: ids that must stay out of every index version until lifted.

    <index_root>/takedowns.json   {"format": "catalog-search-takedowns/1",
                                    "image_ids": {id: {"at": ISO time, "reason": str}},
                                    "product_ids": {...}, "sha256": digest of the two maps}

`catalog-search delete` / `POST /v1/admin/delete` add ids here and write a delete delta
for the version LATEST names, both under the delta log lock and fsynced before they
return. Serving applies the list on top of every version and its deltas (so a version
published by a build that started before the takedown cannot bring the id back), and
build_index leaves the listed ids out of a new version. An entry is cleared by
`catalog-search delete --restore --product-id P` (the id returns with the next build or a
delta that upserts it), or by a full build whose snapshot no longer holds the id (the
catalog itself dropped it; the build records the cleared ids in its manifest).

The file is replaced atomically (temp file, fsync, rename, fsync of the folder). A file
whose digest does not match is refused (`TakedownError`, naming the file): writers stop,
builds fail, serving keeps the last list it read.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from pipelines.core import filesystem as fs
from pipelines.index.manifest import IndexArtifactError

TAKEDOWNS_FORMAT = "catalog-search-takedowns/1"
TAKEDOWNS_FILE = "takedowns.json"


class TakedownError(IndexArtifactError):
    """The takedown list is damaged or an id given is not valid. Permanent: a retry reads the
    same list (a person repairs it; `catalog-search delete` names the file)."""

    permanent = True


def takedowns_uri(index_root: str) -> str:
    return fs.join(index_root, TAKEDOWNS_FILE)


def _digest(image_ids: Mapping[str, Any], product_ids: Mapping[str, Any]) -> str:
    body = json.dumps({"image_ids": image_ids, "product_ids": product_ids}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


@dataclass
class Takedowns:
    image_ids: dict[str, dict[str, Any]] = field(default_factory=dict)
    product_ids: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.image_ids or self.product_ids)

    def to_dict(self) -> dict[str, Any]:
        return {"format": TAKEDOWNS_FORMAT, "image_ids": self.image_ids,
                "product_ids": self.product_ids,
                "sha256": _digest(self.image_ids, self.product_ids)}


def read_takedowns(index_root: str) -> Takedowns:
    """The list (empty when the file does not exist); TakedownError when it is damaged."""
    uri = takedowns_uri(index_root)
    if not fs.exists(uri):
        return Takedowns()
    try:
        d = json.loads(fs.read_bytes(uri).decode("utf-8"))
    except (OSError, ValueError) as e:
        raise TakedownError(f"{uri}: unreadable: {e}") from e
    if not isinstance(d, dict) or d.get("format") != TAKEDOWNS_FORMAT:
        raise TakedownError(f"{uri}: not a takedown list of format {TAKEDOWNS_FORMAT}")
    images, products = d.get("image_ids"), d.get("product_ids")
    if not isinstance(images, dict) or not isinstance(products, dict):
        raise TakedownError(f"{uri}: image_ids and product_ids must be objects")
    if d.get("sha256") != _digest(images, products):
        raise TakedownError(f"{uri}: checksum mismatch; the takedown list is damaged")
    return Takedowns(dict(images), dict(products))


def stamp(index_root: str) -> str:
    """Changes whenever the list is replaced (size + mtime); "" when there is none."""
    uri = takedowns_uri(index_root)
    if fs.is_local(uri):
        path = fs.normalize(uri)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return ""
        return f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    return hashlib.sha256(fs.read_bytes(uri)).hexdigest() if fs.exists(uri) else ""


def write_takedowns(index_root: str, takedowns: Takedowns) -> None:
    """Replace the list atomically and durably (the caller holds the delta log lock)."""
    uri = takedowns_uri(index_root)
    fs.write_json(uri, takedowns.to_dict(), atomic=True)
    if fs.is_local(uri):
        fd = os.open(os.path.dirname(fs.normalize(uri)) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def add(takedowns: Takedowns, image_ids: Iterable[str], product_ids: Iterable[str],
        reason: str) -> Takedowns:
    at = now_iso()
    images = dict(takedowns.image_ids)
    products = dict(takedowns.product_ids)
    for i in image_ids:
        images.setdefault(i, {"at": at, "reason": reason})
    for p in product_ids:
        products.setdefault(p, {"at": at, "reason": reason})
    return Takedowns(images, products)


def remove(takedowns: Takedowns, image_ids: Iterable[str], product_ids: Iterable[str]
           ) -> Takedowns:
    drop_i, drop_p = set(image_ids), set(product_ids)
    return Takedowns({k: v for k, v in takedowns.image_ids.items() if k not in drop_i},
                     {k: v for k, v in takedowns.product_ids.items() if k not in drop_p})


def count_in_snapshot(files: Iterable[str], listed: Takedowns) -> dict[str, Any]:
    """What a takedown list does to a snapshot (its embeddings files; only the id columns
    are read): rows it removes, and the listed ids the snapshot does not hold."""
    images, products = set(listed.image_ids), set(listed.product_ids)
    seen_i: set[str] = set()
    seen_p: set[str] = set()
    removed = 0
    for uri in files:
        t = fs.read_parquet(uri, columns=["image_id", "product_id"])
        for i, p in zip(t.column("image_id").to_pylist(), t.column("product_id").to_pylist()):
            hit = False
            if i in images:
                seen_i.add(i)
                hit = True
            if p in products:
                seen_p.add(p)
                hit = True
            removed += hit
    return {"rows_removed": removed, "image_ids": len(seen_i), "product_ids": len(seen_p),
            "absent": {"image_ids": sorted(images - seen_i),
                       "product_ids": sorted(products - seen_p)}}


def clear_absent(index_root: str, absent: Mapping[str, Iterable[str]]) -> None:
    """Lift the takedowns of ids a published version's snapshot no longer holds."""
    from pipelines.index.deltas import log_lock
    with log_lock(index_root):
        current = read_takedowns(index_root)
        write_takedowns(index_root, remove(current, absent.get("image_ids", ()),
                                           absent.get("product_ids", ())))
