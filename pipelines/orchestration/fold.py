"""How a full build's version holds the delta log of the version it replaces (the `folded`
part of the index Asset event; pipelines/index/deltas.py). Read by the full-build publish
(steps.publish); delta_step.py runs the backfill's deltas themselves."""
from __future__ import annotations

from typing import Any


def fold_report(index_root: str, version: str) -> dict[str, Any] | None:
    """What a full build's `version` did with the delta log of the passed version before
    it (the one it replaces as LATEST): that log's counts (deltas, rows upserted, ids
    deleted, age) and how its changes stand in the new version: upserted images it holds
    (`images_folded`) or not (`images_not_folded`: the catalog no longer lists them, or
    they were taken down), deleted image_ids / product_ids it still holds
    (`deleted_still_served`: 0 unless the catalog relisted them and the takedown was
    lifted), and its own log's deltas (`new_log_deltas`, 0: a fresh log). None when there is no previous
    passed version; its log is left as it is (retention removes it with its version)."""
    from pipelines.index import artifact as art
    from pipelines.index import deltas as dl
    from pipelines.index.reader import shard_rows
    earlier = [v for v in art.list_versions(index_root)
               if v.version < version and v.state == art.STATUS_PASSED]
    if not earlier:
        return None
    previous = earlier[-1]
    log_ = dl.read_log(index_root, previous.version)
    out: dict[str, Any] = {"version": previous.version, **dl.summarize(log_)}
    manifest = art.read_manifest(index_root, version)
    images: set[str] = set()
    products: set[str] = set()
    for _, t in shard_rows(index_root, manifest, ["image_id", "product_id"]):
        images.update(t.column("image_id").to_pylist())
        products.update(t.column("product_id").to_pylist())
    upserted: dict[str, str] = {}  # the log's net effect, in order: image_id -> product_id
    deleted_images: set[str] = set()
    deleted_products: set[str] = set()
    for d in log_.deltas:
        gone_i, gone_p = set(d.delete_image_ids), set(d.delete_product_ids)
        upserted = {i: p for i, p in upserted.items() if i not in gone_i and p not in gone_p}
        deleted_images |= gone_i
        deleted_products |= gone_p
        for i, p in zip(d.rows.column("image_id").to_pylist(),
                        d.rows.column("product_id").to_pylist()):
            upserted[i] = p
            deleted_images.discard(i)
            deleted_products.discard(p)
    out.update(images_folded=len(upserted.keys() & images),
               images_not_folded=len(upserted.keys() - images),
               deleted_still_served=len(deleted_images & images)
               + len(deleted_products & products),
               new_log_deltas=len(dl.committed_seqs(index_root, version)))
    return out
